"""wanda_mask: the Triton kernel (interpreter) and the torch path equal wanda_mask_ref bit for bit."""

import pytest
import torch

from sparsekit.kernels import unpack_mask, wanda_mask, wanda_mask_ref, wanda_mask_torch
from sparsekit.kernels.wanda_mask import _wanda_mask_triton

# small odd shapes: the interpreter runs the 31-step bisection in Python
UNSTRUCTURED = [(1, 40), (5, 77), (3, 130)]
SPARSITIES = [0.0, 0.5, 0.9]
NM = [((2, 4), (5, 96)), ((4, 8), (3, 64)), ((2, 4), (1, 16))]


def _inputs(rows, cols, dtype=torch.float32):
    weight = torch.randn(rows, cols).to(dtype)
    weight[:, 3:9] = weight[:, 3:4]  # equal |W| in a run of columns: ties under a flat norm
    act_norm = torch.rand(cols) + 0.5
    act_norm[3:9] = 1.0
    return weight, act_norm


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", UNSTRUCTURED, ids=lambda s: f"N{s[0]}-K{s[1]}")
def test_triton_unstructured_matches_ref(triton_backend, shape, sparsity):
    weight, act_norm = _inputs(*shape)
    bits = wanda_mask(weight, act_norm, sparsity=sparsity)
    assert bits.shape == (shape[0], (shape[1] + 7) // 8) and bits.dtype == torch.uint8
    assert torch.equal(unpack_mask(bits, shape), wanda_mask_ref(weight, act_norm, sparsity=sparsity))


@pytest.mark.parametrize("nm,shape", NM, ids=lambda v: "x".join(map(str, v)))
def test_triton_nm_matches_ref(triton_backend, nm, shape):
    n, m = nm
    weight, act_norm = _inputs(*shape)
    bits = wanda_mask(weight, act_norm, n=n, m=m)
    assert torch.equal(unpack_mask(bits, shape), wanda_mask_ref(weight, act_norm, n=n, m=m))


def test_triton_fp16_weight_and_padding_bits(triton_backend):
    weight, act_norm = _inputs(3, 21, torch.float16)  # K % 8 != 0: padding bits stay zero
    bits = wanda_mask(weight, act_norm, sparsity=0.5)
    assert torch.equal(unpack_mask(bits, (3, 21)), wanda_mask_ref(weight, act_norm, sparsity=0.5))
    assert (bits[:, -1] >> 5 == 0).all()


def test_triton_tiles_smaller_than_a_row(triton_backend):
    # several K tiles per row and several rows per program: ties carried across tiles
    weight = torch.ones(3, 50)
    act_norm = torch.ones(50)
    bits = _wanda_mask_triton(weight, act_norm, 0.5, None, None, {"BLOCK_R": 2, "BLOCK_K": 16})
    expected = torch.zeros(3, 50, dtype=torch.bool)
    expected[:, :25] = True  # all tied: the lowest 25 columns win
    assert torch.equal(unpack_mask(bits, (3, 50)), expected)


def test_golden_ties_go_to_the_lower_column():
    # scores [2, 2, 2, 1, 3, 3, 0, 2]: keep 4 -> both 3s, then the first two 2s
    weight = torch.tensor([[2.0, -2.0, 2.0, 1.0, 3.0, -3.0, 0.0, 2.0]])
    expected = [[True, True, False, False, True, True, False, False]]
    assert wanda_mask_ref(weight, torch.ones(8), sparsity=0.5).tolist() == expected
    assert wanda_mask_torch(weight, torch.ones(8), sparsity=0.5).tolist() == expected
    assert unpack_mask(wanda_mask(weight, torch.ones(8), sparsity=0.5), (1, 8)).tolist() == expected


@pytest.mark.parametrize("pattern", [dict(sparsity=0.5), dict(sparsity=0.7), dict(n=2, m=4), dict(n=4, m=8)])
def test_torch_path_matches_ref(torch_backend, pattern):
    weight, act_norm = _inputs(33, 264)
    weight[5] = 0.25  # a row of ties
    bits = wanda_mask(weight, act_norm, **pattern)
    assert torch.equal(unpack_mask(bits, (33, 264)), wanda_mask_ref(weight, act_norm, **pattern))


def test_compile_fullgraph_traces_the_custom_op():
    weight, act_norm = _inputs(4, 32)
    compiled = torch.compile(lambda w, a: wanda_mask(w, a, sparsity=0.5), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(weight, act_norm), wanda_mask(weight, act_norm, sparsity=0.5))


def test_errors_say_the_fix():
    weight = torch.randn(4, 10)
    with pytest.raises(ValueError, match="in_features % 4"):
        wanda_mask(weight, torch.ones(10), n=2, m=4)
    with pytest.raises(ValueError, match="act_norm must be"):
        wanda_mask(weight, torch.ones(9), sparsity=0.5)
    with pytest.raises(ValueError, match="NaN/inf"):
        wanda_mask(weight, torch.full((10,), float("inf")), sparsity=0.5)
