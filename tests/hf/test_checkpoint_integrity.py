"""Damaged and crafted checkpoints are refused on both load paths (``sparsekit.load`` and
``from_pretrained`` after ``import sparsekit``) with an error naming the tensor."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import sparsekit  # noqa: F401  (registers the quantizer)
from sparsekit.hf.checkpoint import WEIGHTS_NAME, CheckpointError, load, save, tensor_checksum
from tests.hf.test_checkpoint import sparse_tiny

LAYER = "model.layers.0.mlp.up_proj"


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _loaders(directory):
    return (lambda: load(directory), lambda: transformers.AutoModelForCausalLM.from_pretrained(directory))


def _both_refuse(directory, match):
    for loader in _loaders(directory):
        with pytest.raises(CheckpointError, match=match):
            loader()


def _rewrite(directory, state, metadata, recompute_checksums: bool):
    """Write ``state`` back; with recomputed checksums it is a crafted file, not a damaged one."""
    if recompute_checksums:
        metadata = dict(
            metadata, sparsekit_checksums=json.dumps({k: tensor_checksum(v) for k, v in state.items()})
        )
    save_file(state, str(directory / WEIGHTS_NAME), metadata=metadata)


@pytest.fixture
def ck24(tmp_path):
    save(sparse_tiny(sparsity="2:4"), tmp_path / "ck")
    return tmp_path / "ck"


@pytest.fixture
def ckbitmap(tmp_path):
    save(sparse_tiny(sparsity="0.6", fmt="bitmap"), tmp_path / "bm")
    return tmp_path / "bm"


def test_intact_checkpoint_loads_on_both_paths(ck24):
    for loader in _loaders(ck24):
        loader()


def test_flipped_bytes_in_tensor_data_are_caught_by_the_checksum(ck24):
    path = ck24 / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 200, len(data) - 100):  # 100 bytes inside the last tensors
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    _both_refuse(ck24, "does not match its checksum")


def test_a_missing_tensor_is_named(ck24):
    state, metadata = _read(ck24 / WEIGHTS_NAME)
    del state[f"{LAYER}.values"]
    _rewrite(ck24, state, metadata, recompute_checksums=False)
    _both_refuse(ck24, f"missing.*{LAYER}.values")


def test_2_4_meta_with_equal_positions_is_refused_even_with_matching_checksums(ck24):
    state, metadata = _read(ck24 / WEIGHTS_NAME)
    state[f"{LAYER}.meta"][0, 0] = 0  # nibble 0: positions 0 and 0
    _rewrite(ck24, state, metadata, recompute_checksums=True)
    _both_refuse(ck24, f"{LAYER}.meta: row 0, group 0 has kept positions 0 and 0")


@pytest.mark.parametrize("damage", ["cleared_bits", "row_all_set", "random_offsets"])
def test_bitmap_structure_is_validated(ckbitmap, damage):
    state, metadata = _read(ckbitmap / WEIGHTS_NAME)
    bits, offsets = state[f"{LAYER}.mask_bits"], state[f"{LAYER}.offsets"]
    if damage == "cleared_bits":
        bits[0, :4] = 0  # 32 bits
        match = "set bits but values holds"
    elif damage == "row_all_set":
        bits[1] = 255
        match = "set bits but values holds"
    else:
        offsets.copy_(torch.randint(0, 10_000, offsets.shape, dtype=torch.int32))
        match = "offsets .* do not match mask_bits"
    _rewrite(ckbitmap, state, metadata, recompute_checksums=True)
    _both_refuse(ckbitmap, match)


def test_non_finite_weights_in_a_file_are_refused(ck24):
    state, metadata = _read(ck24 / WEIGHTS_NAME)
    state["model.norm.weight"][0] = float("nan")
    _rewrite(ck24, state, metadata, recompute_checksums=True)
    _both_refuse(ck24, "model.norm.weight holds NaN")
