"""sparsekit.save / load / export_dense on tiny random models: bit-exact, atomic, clear errors."""

import copy
import json
import struct

import pytest
import torch
from safetensors import safe_open

from sparsekit.hf.checkpoint import CheckpointError, export_dense, load, save
from sparsekit.nn import SparseLinear, sparsify
from sparsekit.pruning import PruneConfig, prune_model
from tests.conftest import tiny_model


def sparse_tiny(arch="llama", dtype=torch.float32, sparsity="2:4", fmt="auto"):
    model = tiny_model(arch).to(dtype)
    prune_model(model, None, PruneConfig(method="magnitude", sparsity=sparsity, show_progress=False))
    sparsify(model, format=fmt)
    return model


@pytest.mark.parametrize(
    "arch,fmt,sparsity",
    [("llama", "auto", "2:4"), ("gpt2", "auto", "2:4"), ("opt", "bitmap", "0.6"), ("qwen2", "masked", "2:4")],
)
def test_round_trip_is_bit_exact(tmp_path, arch, fmt, sparsity):
    model = sparse_tiny(arch, sparsity=sparsity, fmt=fmt)
    save(model, tmp_path / "ck")
    loaded = load(tmp_path / "ck")
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert all(t.device.type == "cpu" for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) > 0
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    if getattr(model.config, "tie_word_embeddings", False):
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_2_4_linear_bytes_on_disk_are_at_most_0_57_of_dense(tmp_path, dtype):
    model = sparse_tiny("llama", dtype)
    save(model, tmp_path / "ck")
    sparse_bytes = dense_bytes = 0
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118
            if key.endswith((".values", ".meta")):
                t = f.get_tensor(key)
                sparse_bytes += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, SparseLinear):
            dense_bytes += m.in_features * m.out_features * torch.finfo(dtype).bits // 8
    assert sparse_bytes / dense_bytes <= 0.57  # 1.125 / 2 = 0.5625


def test_metadata_and_quantization_config(tmp_path):
    save(sparse_tiny(), tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "sparsekit" and qc["format_version"] == 1
    assert qc["layers"]["model.layers.0.self_attn.q_proj"]["format"] == "2:4"
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        assert f.metadata()["sparsekit_format_version"] == "1"


def test_save_is_atomic_and_overwrites(tmp_path):
    model = sparse_tiny()
    save(model, tmp_path / "ck")
    save(model, tmp_path / "ck")  # replaces the old folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp folders left

    class Boom(RuntimeError):
        pass

    broken = copy.deepcopy(model)
    broken.generation_config = None
    broken.state_dict = lambda: (_ for _ in ()).throw(Boom())
    with pytest.raises(Boom):
        save(broken, tmp_path / "ck2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_truncated_file_is_a_clear_error(tmp_path):
    save(sparse_tiny(), tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated.*save the model again"):
        load(tmp_path / "ck")
    path.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="truncated"):
        load(tmp_path / "ck")
    path.write_bytes(struct.pack("<Q", 10) + b"{not json!")
    with pytest.raises(CheckpointError, match="corrupt"):
        load(tmp_path / "ck")


def test_unknown_format_version_and_shape_mismatch(tmp_path):
    save(sparse_tiny(), tmp_path / "ck")
    cfg_path = tmp_path / "ck" / "config.json"
    config = json.loads(cfg_path.read_text())
    config["quantization_config"]["format_version"] = 99
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format version 99.*reads version 1"):
        load(tmp_path / "ck")
    config["quantization_config"]["format_version"] = 1
    config["intermediate_size"] = 256
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mlp.*config.json builds it as.*different models"):
        load(tmp_path / "ck")
    config["intermediate_size"] = 128
    config["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]["format"] = "dense"
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="up_proj.weight is missing"):
        load(tmp_path / "ck")


def test_not_a_sparsekit_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="not a sparsekit checkpoint"):
        load(tmp_path / "plain")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_dense_loads_in_plain_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = sparse_tiny(arch)
    save(model, tmp_path / "ck")
    export_dense(tmp_path / "ck", tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not any(isinstance(m, SparseLinear) for m in dense.modules())
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-4)


def test_cli_export_dense(tmp_path):
    from sparsekit.cli import main

    save(sparse_tiny(), tmp_path / "ck")
    assert main(["export", str(tmp_path / "ck"), "--dense", "--out", str(tmp_path / "dense")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())


def test_saved_checkpoint_has_ordinary_permissions(tmp_path):
    """A server running as another user must be able to read it (mkdtemp alone gives 0700)."""
    import os
    import stat

    model = tiny_model("llama")
    sparsify(model, format="dense")
    save(model, tmp_path / "ck")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o777 & ~umask
    for path in (tmp_path / "ck").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
