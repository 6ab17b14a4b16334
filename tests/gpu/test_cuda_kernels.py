"""Every Triton kernel on a CUDA GPU in fp16, bf16 and fp32 against its plain-torch reference.

These run where CUDA is (``make gpu-bench`` runs them first and stores the JUnit XML with its
reports); without CUDA every case is skipped, saying so. bf16 is here because the Triton
interpreter cannot check it on the CPU (its ``tl.dot`` multiplies bf16 raw bits,
triton-lang/triton#11584). Shapes sweep M = 1, odd N, K that leave partial tiles, and large K.
"""

import pytest
import torch
import torch.nn.functional as F

from sparsekit.kernels import (
    accumulate_gram,
    accumulate_sq_sum,
    bitmap_mm,
    bitmap_mm_ref,
    compress_24,
    compress_bitmap,
    masked_mm,
    masked_mm_ref,
    nm_keep_mask,
    obs_block_solve,
    obs_block_solve_ref,
    pack_mask,
    sparse24_mm,
    sparse24_mm_ref,
    unpack_mask,
    wanda_mask,
    wanda_mask_ref,
)
from tests.conftest import TOL

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: runs in `make gpu-bench` (bench/gpu_suite.py)"
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [
    (1, 4096, 4096),
    (1, 11008, 4096),
    (7, 300, 1028),
    (16, 64, 128),
    (33, 257, 520),
    (128, 512, 2048),
    (1, 4096, 14336),
    (300, 96, 96),
]  # (M, N, K)


def _ids(shape, dtype):
    return f"M{shape[0]}-N{shape[1]}-K{shape[2]}-{str(dtype).replace('torch.', '')}"


CASES = [pytest.param(s, d, id=_ids(s, d)) for s in SHAPES for d in DTYPES]


def _close(y, ref, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    a, e = y.float(), ref.float()
    rel = ((a - e).norm() / e.norm().clamp_min(1e-12)).item()
    assert rel < max(rtol, 1e-4) * scale, f"relative error {rel:.3g}"
    torch.testing.assert_close(
        a, e, rtol=rtol * scale, atol=atol * scale * max(1.0, e.abs().max().item() / 8)
    )


def _weight(n, k, dtype, pattern="2:4"):
    w = torch.randn(n, k, device="cuda") / k**0.5
    mask = nm_keep_mask(w.abs(), 2, 4) if pattern == "2:4" else torch.rand(n, k, device="cuda") < 0.4
    return (w * mask).to(dtype), mask


@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_sparse24_mm_cuda(shape, dtype):
    m, n, k = shape
    w, _ = _weight(n, k, dtype)
    values, meta = compress_24(w)
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    y = sparse24_mm(x, values, meta, bias, backend="triton")
    _close(y, sparse24_mm_ref(x, values, meta, bias), dtype)


@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_bitmap_mm_cuda(shape, dtype):
    m, n, k = shape
    w, _ = _weight(n, k, dtype, "random")
    values, bits, offsets = compress_bitmap(w)
    x = torch.randn(m, k, device="cuda").to(dtype)
    y = bitmap_mm(x, values, bits, offsets, backend="triton")
    _close(y, bitmap_mm_ref(x, values, bits, offsets), dtype)


@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_masked_mm_cuda_forward_and_backward(shape, dtype):
    m, n, k = shape
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype).requires_grad_()
    bits = pack_mask(torch.rand(n, k, device="cuda") < 0.5)
    x = torch.randn(m, k, device="cuda").to(dtype).requires_grad_()
    y = masked_mm(x, w, bits, backend="triton")
    _close(y, masked_mm_ref(x.detach(), w.detach(), bits), dtype)
    y.float().square().sum().backward()
    keep = unpack_mask(bits, k)
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    F.linear(xr, wr * keep).square().sum().backward()
    _close(x.grad, xr.grad.to(dtype), dtype, scale=2.0)
    _close(w.grad, (wr.grad * keep).to(dtype), dtype, scale=2.0)
    assert torch.equal(w.grad[~keep], torch.zeros_like(w.grad[~keep]))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "pattern",
    [{"sparsity": 0.5}, {"sparsity": 0.29}, {"n": 2, "m": 4}, {"n": 4, "m": 8}],
    ids=["50%", "29%", "2:4", "4:8"],
)
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (300, 1028), (1, 64), (11008, 4096)])
def test_wanda_mask_cuda_equals_reference(dtype, pattern, n, k):
    w = torch.randn(n, k, device="cuda").to(dtype)
    act = torch.rand(k, device="cuda") + 0.1
    assert torch.equal(wanda_mask(w, act, **pattern), pack_mask(wanda_mask_ref(w, act, **pattern)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(("t", "k"), [(1, 64), (2048, 4096), (333, 1003)])
def test_calibration_statistics_cuda(dtype, t, k):
    x = torch.randn(t, k, device="cuda").to(dtype)
    xd = x.double()
    gram = accumulate_gram(x, torch.zeros(k, k, device="cuda"))
    sq = accumulate_sq_sum(x, torch.zeros(k, device="cuda"))
    tol = 1e-5 if dtype != torch.float32 else 2e-3  # fp32 inputs run tf32 dots where torch allows it
    assert ((gram.double() - xd.T @ xd).norm() / (xd.T @ xd).norm()).item() < tol
    assert ((sq.double() - xd.square().sum(0)).norm() / xd.square().sum(0).norm()).item() < 1e-6


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n": 2, "m": 4}], ids=["50%", "2:4"])
@pytest.mark.parametrize("rows", [1, 300, 4096])
def test_obs_block_solve_cuda(pattern, rows):
    torch.manual_seed(0)
    a = torch.randn(128, 512, device="cuda")
    hinv = torch.linalg.cholesky(
        torch.linalg.inv(a @ a.T / 512 + 0.1 * torch.eye(128, device="cuda")), upper=True
    )
    w = torch.randn(rows, 128, device="cuda")
    q, err, mask = obs_block_solve(w, hinv, **pattern)
    q_ref, err_ref, mask_ref = obs_block_solve_ref(w, hinv, **pattern)
    assert (mask != mask_ref).float().mean().item() < 1e-3
    assert ((q - q_ref).norm() / q_ref.norm()).item() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("fmt", ["2:4", "bitmap", "masked"])
def test_sparse_linear_cuda_auto_matches_dense(dtype, m, fmt):
    """backend='auto' on CUDA: the Triton kernels, and torch's sparse tensor cores for 2:4 at M >= 128."""
    from torch import nn

    from sparsekit.nn import SparseLinear

    lin = nn.Linear(1024, 512, device="cuda")
    with torch.no_grad():
        lin.weight.mul_(_weight(512, 1024, torch.float32, "2:4" if fmt == "2:4" else "random")[1])
    lin = lin.to(dtype)
    layer = SparseLinear.from_linear(lin, format=fmt)
    x = torch.randn(2, m, 1024, device="cuda").to(dtype)
    with torch.no_grad():
        _close(layer(x), F.linear(x.float(), lin.weight.float(), lin.bias.float()).to(dtype), dtype)
