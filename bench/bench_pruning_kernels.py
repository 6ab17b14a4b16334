"""Pruning kernels on LLaMA-7B shapes (pytest-benchmark); CPU paths, plus the Triton kernels on CUDA.

    pytest bench/bench_pruning_kernels.py --benchmark-enable --benchmark-group-by=group

Wanda: the torch path (kthvalue threshold, no sort) and, on GPU, the Triton kernel against a
straightforward implementation as in the reference Wanda code (sort whole rows; N:M masks built
by a Python loop over column groups). The naive N:M uses topk(largest=False) like the reference,
so its tie-breaking differs: it is here for speed only. Never times the Triton interpreter.
Under ``--benchmark-disable`` (the default in pyproject) every case runs once and still checks
its result against the independent implementation (the naive Wanda mask, the per-column OBS
loop, the fp64 Gram), so the default test run can fail on a wrong kernel.
"""

from __future__ import annotations

import functools

import pytest
import torch

from sparsekit.kernels import accumulate_gram, accumulate_sq_sum, obs_block_solve_ref, wanda_mask
from sparsekit.kernels._backend import interpreting
from sparsekit.kernels.obs_solve import obs_block_solve_torch
from sparsekit.kernels.wanda_mask import wanda_mask_torch

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
PATTERNS = [0.5, (2, 4)]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ids(v):
    return f"{v[0]}x{v[1]}" if isinstance(v, tuple) and v[1] > 64 else str(v).replace(", ", ":")


def wanda_naive(weight: torch.Tensor, act_norm: torch.Tensor, sparsity=None, n=None, m=None) -> torch.Tensor:
    """The reference Wanda code's mask: full row sort, or a Python loop over column groups."""
    metric = weight.abs().float() * act_norm.float().reshape(1, -1)
    pruned = torch.zeros_like(metric, dtype=torch.bool)
    if n is not None:
        for ii in range(metric.shape[1]):
            if ii % m == 0:
                tmp = metric[:, ii : ii + m]
                pruned.scatter_(1, ii + torch.topk(tmp, m - n, dim=1, largest=False)[1], True)
    else:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        pruned.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
    return ~pruned


def _pattern_kwargs(pattern):
    return dict(sparsity=pattern) if isinstance(pattern, float) else dict(n=pattern[0], m=pattern[1])


def _wanda_inputs(shape, device="cpu"):
    torch.manual_seed(0)
    return torch.randn(shape, device=device).half(), torch.rand(shape[1], device=device) + 0.1


@pytest.mark.parametrize("pattern", PATTERNS, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_wanda_cpu(benchmark, impl, shape, pattern):
    weight, act_norm = _wanda_inputs(shape)
    fn = wanda_naive if impl == "naive" else wanda_mask_torch
    benchmark.group = f"wanda-cpu-{_ids(shape)}-{_ids(pattern)}"
    mask = benchmark.pedantic(fn, args=(weight, act_norm), kwargs=_pattern_kwargs(pattern), rounds=3)
    _check_wanda_mask(mask, shape, pattern)


@functools.lru_cache(maxsize=2)
def _naive_mask(shape, pattern) -> torch.Tensor:
    weight, act_norm = _wanda_inputs(shape)
    return wanda_naive(weight, act_norm, **_pattern_kwargs(pattern))


def _check_wanda_mask(mask: torch.Tensor, shape, pattern) -> None:
    """Exact keep counts, and the naive mask's choice (N:M: up to ties, which the naive code breaks
    the other way; random fp16 weights times distinct norms leave almost none)."""
    rows, cols = shape
    if isinstance(pattern, float):
        assert (mask.sum(1) == cols - int(cols * pattern)).all()
        assert torch.equal(mask, _naive_mask(shape, pattern))
    else:
        n, m = pattern
        assert (mask.reshape(rows, -1, m).sum(-1) == n).all()
        assert (mask != _naive_mask(shape, pattern)).float().mean() < 1e-5


@cuda
@pytest.mark.parametrize("pattern", PATTERNS, ids=_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("impl", ["naive", "triton"])
def test_wanda_gpu(benchmark, impl, shape, pattern):
    if interpreting():
        pytest.skip("never time the Triton interpreter")
    weight, act_norm = _wanda_inputs(shape, "cuda")
    fn = wanda_naive if impl == "naive" else wanda_mask

    def run():
        out = fn(weight, act_norm, **_pattern_kwargs(pattern))
        torch.cuda.synchronize()
        return out

    run()
    benchmark.group = f"wanda-gpu-{_ids(shape)}-{_ids(pattern)}"
    benchmark.pedantic(run, rounds=10)


@pytest.mark.parametrize("impl", ["ref", "torch"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=_ids)
def test_obs_block_cpu(benchmark, impl, pattern):
    torch.manual_seed(0)
    a = torch.randn(128, 256)
    hinv = torch.linalg.cholesky(torch.linalg.inv(a @ a.T / 256 + 0.1 * torch.eye(128)), upper=True)
    w = torch.randn(4096, 128)
    fn = obs_block_solve_ref if impl == "ref" else obs_block_solve_torch
    benchmark.group = f"obs-block-4096x128-{_ids(pattern)}"
    q, _, mask = benchmark.pedantic(fn, args=(w, hinv), kwargs=_pattern_kwargs(pattern), rounds=3)
    if impl == "torch":  # the fast solve against the paper's per-column loop
        q_ref, _, mask_ref = obs_block_solve_ref(w, hinv, **_pattern_kwargs(pattern))
        assert (mask != mask_ref).float().mean() < 1e-4
        assert ((q - q_ref).norm() / q_ref.norm()).item() < 1e-3
    assert torch.equal(q[~mask], torch.zeros_like(q[~mask]))


@pytest.mark.parametrize("stat", ["sq_sum", "gram"])
def test_calib_stats_cpu(benchmark, stat):
    torch.manual_seed(0)
    x = torch.randn(2048, 4096).bfloat16()
    out = torch.zeros(4096) if stat == "sq_sum" else torch.zeros(4096, 4096)
    fn = accumulate_sq_sum if stat == "sq_sum" else accumulate_gram
    benchmark.group = f"calib-{stat}-2048x4096-bf16"
    rounds = 3
    benchmark.pedantic(fn, args=(x, out), rounds=rounds)
    calls = rounds if benchmark.enabled else 1  # each call accumulates into out
    xd = x.double()
    expected = calls * (xd.square().sum(0) if stat == "sq_sum" else xd.T @ xd)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-5
