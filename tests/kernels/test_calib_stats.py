"""Calibration statistics: Triton kernels (interpreter) against torch, accumulated in fp32.

The interpreter's tl.dot on bf16 multiplies raw bit patterns (triton-lang/triton#11584), so the
X^T X kernel is checked here on fp32 and fp16 inputs; bf16 is covered by the AOT compile
(test_aot.py) of the same kernel.
"""

import pytest
import torch

from sparsekit.kernels import accumulate_gram, accumulate_sq_sum

SHAPES = [(1, 1, 8), (3, 17, 45), (2, 33, 70)]


def _x(shape, dtype):
    x = torch.randn(shape)
    x[..., 0] *= 30  # an outlier channel
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_torch(triton_backend, assert_close, shape, dtype):
    x = _x(shape, dtype)
    k = shape[-1]
    tokens = x.reshape(-1, k).float()  # exact fp32 copy of the inputs: the expected sums are fp32
    gram, sq = torch.ones(k, k), torch.ones(k)
    accumulate_gram(x, gram)
    accumulate_sq_sum(x, sq)
    accumulate_gram(x, gram)  # accumulates
    accumulate_sq_sum(x, sq)
    expected_gram = 1 + 2 * (tokens.double().T @ tokens.double())
    expected_sq = 1 + 2 * tokens.double().square().sum(0)
    assert_close(gram, expected_gram.float(), torch.float32)
    assert_close(sq, expected_sq.float(), torch.float32)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
def test_torch_path_accumulates_in_fp32(torch_backend, assert_close, dtype):
    x = _x((4, 9, 24), dtype)
    tokens = x.reshape(-1, 24).double()
    gram, sq = torch.zeros(24, 24), torch.zeros(24)
    accumulate_gram(x, gram)
    accumulate_sq_sum(x, sq)
    assert gram.dtype == sq.dtype == torch.float32
    assert_close(gram, (tokens.T @ tokens).float(), torch.float32)
    assert_close(sq, tokens.square().sum(0).float(), torch.float32)


def test_out_must_be_fp32():
    with pytest.raises(ValueError, match="fp32"):
        accumulate_sq_sum(torch.randn(3, 4), torch.zeros(4, dtype=torch.float16))


@pytest.mark.parametrize("k", [512, 1003])
def test_torch_symmetric_gram_matches_full_product(torch_backend, assert_close, k):
    """Large K takes the block-upper-triangle path (uneven tiles at 1003); it must equal x^T x."""
    x = _x((2, 40, k), torch.bfloat16)
    tokens = x.reshape(-1, k).double()
    gram = torch.randn(k, k)  # not symmetric: both triangles must accumulate, neither be overwritten
    expected = gram.double() + tokens.T @ tokens
    accumulate_gram(x, gram)
    assert_close(gram, expected.float(), torch.float32)
    fresh = accumulate_gram(x, torch.zeros(k, k))
    assert torch.equal(fresh, fresh.T)  # from zeros the result is exactly symmetric
