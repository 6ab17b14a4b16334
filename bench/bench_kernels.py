"""Sparse GEMM microbenchmarks: every sparse linear backend against dense ``F.linear``, grouped per shape.

    pytest bench/bench_kernels.py --benchmark-enable --benchmark-only   # measure (real-model shapes)
    pytest bench/bench_kernels.py                                       # CI: --benchmark-disable, tiny shapes

Groups are ``<model> <layers> (NxK) M=<m>``: read each group's rows against its ``dense`` row.
On the CPU the sparse ops run their torch paths (``use_backend("torch")``, never the Triton
interpreter, which tests/conftest.py may have switched on in the same session); GPU-only cases
skip with a reason. Each case also checks the dense-with-zeros contract: the backend's output
equals ``F.linear(x, weight_with_zeros)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsekit.bench.layers import SETUPS, LinearShape, Unavailable, linear_shapes, make_case
from sparsekit.kernels import use_backend
from sparsekit.kernels._backend import interpreting

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.float16 if CUDA else torch.float32
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)}
BACKENDS = ("dense", "2:4", "bitmap", "masked", "cusparselt")
TRITON_BACKENDS = ("2:4", "bitmap", "masked")


def _measuring(config: pytest.Config) -> bool:
    return not (config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"))


def _cases(config: pytest.Config) -> tuple[list[LinearShape], list[int]]:
    if not _measuring(config):  # CI only checks the cases run: keep it fast
        return [LinearShape("tiny", "q_proj", 64, 128)], [1, 16]
    if CUDA:
        return linear_shapes("llama-2-7b") + linear_shapes("llama-3-8b"), [1, 16, 256, 4096]
    llama = [s for s in linear_shapes("llama-2-7b") if s.n == s.k]  # 4096 x 4096
    return linear_shapes("smollm2") + llama, [1, 16, 128]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" in metafunc.fixturenames:
        shapes, ms = _cases(metafunc.config)
        metafunc.parametrize("shape", shapes, ids=[f"{s.model}-{s.layers}-N{s.n}-K{s.k}" for s in shapes])
        metafunc.parametrize("m", ms, ids=[f"M{m}" for m in ms])


@pytest.fixture(autouse=True)
def _no_interpreter():
    if not CUDA:
        with use_backend("torch"):
            yield
    else:
        yield


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear(benchmark, shape: LinearShape, m: int, backend: str) -> None:
    if backend == "cusparselt" and not CUDA:
        pytest.skip("torch semi-structured sparsity (cuSPARSELt) needs CUDA")
    if CUDA and interpreting() and backend in TRITON_BACKENDS:
        pytest.skip("TRITON_INTERPRET=1 in this session: run `pytest bench/` on its own to time Triton")
    case = make_case(shape, m, "2:4", DTYPE, DEVICE)
    try:
        prepared = SETUPS[backend](case)
    except Unavailable as exc:
        pytest.skip(str(exc))

    def fn() -> torch.Tensor:
        y = prepared.fn()
        if CUDA:  # time the kernel, not its launch
            torch.cuda.synchronize()
        return y

    benchmark.group = f"{shape.label} M={m}"
    benchmark.extra_info.update(
        backend=backend, impl=prepared.impl, weight_bytes=prepared.weight_bytes, dtype=str(DTYPE)
    )
    y = benchmark(fn)
    rtol, atol = TOL[DTYPE]
    torch.testing.assert_close(y.float(), F.linear(case.x.float(), case.weight.float()), rtol=rtol, atol=atol)
