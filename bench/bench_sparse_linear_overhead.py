"""Per-call cost of SparseLinear's forward beyond its kernel (pytest-benchmark), on the CPU.

    pytest bench/bench_sparse_linear_overhead.py --benchmark-enable --benchmark-only
    python bench/bench_sparse_linear_overhead.py        # the four paths interleaved, medians in us

A 64 x 64 2:4 layer at M = 1 does almost no work, so its time is the per-call path: ``kernel``
is the bare C++ call (``bind_sparse24_cpu``), ``layer`` the module call a model makes (width
check, the eager fast path, the bound kernel), ``op`` the checked custom-op path
(``sparse24_mm``: validation, backend resolution, dispatch; what ``torch.compile`` traces),
``dense`` an ``nn.Linear`` of the same shape. layer - kernel is the overhead SparseLinear adds.
``rule16`` is the layer under ``cpu_rule='fastest'`` with dense pinned for M = 16 (the dense copy
it keeps), ``dense16`` the ``nn.Linear`` on the same 16 rows: rule16 - dense16 is what the rule's
dense path adds per call.
Under ``--benchmark-disable`` (the default) each case runs once and checks its output.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsekit.kernels import nm_keep_mask, sparse24_cpu, sparse24_mm, use_backend
from sparsekit.kernels.cpu_ext import resolve_isa
from sparsekit.nn import SparseLinear, cpu_rule


def _layer(n: int = 64, k: int = 64):
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.mul_(nm_keep_mask(lin.weight.abs(), 2, 4))
    return lin, SparseLinear.from_linear(lin, format="2:4").eval()


def _paths():
    """(the dense layer, each path's input, each path's call)."""
    lin, layer = _layer()
    _, ruled = _layer()
    ruled.load_state_dict(layer.state_dict())
    ruled.cpu_rule = "fastest"
    cpu_rule.pin(("2:4", resolve_isa().value, str(torch.float32), 64, 64, 16), dense_won=True)
    x, x16 = torch.randn(1, 64), torch.randn(16, 64)
    kernel = sparse24_cpu.bind_sparse24_cpu(layer.values, layer.meta)
    fns = {
        "kernel": lambda: kernel(x, None),
        "layer": lambda: layer(x),
        "op": lambda: sparse24_mm(x, layer.values, layer.meta),
        "dense": lambda: lin(x),
        "rule16": lambda: ruled(x16),
        "dense16": lambda: lin(x16),
    }
    inputs = {name: x16 if name.endswith("16") else x for name in fns}
    return lin, inputs, fns


@pytest.mark.parametrize("path", ["kernel", "layer", "op", "dense", "rule16", "dense16"])
def test_per_call_cost(benchmark, path):
    if sparse24_cpu.extension() is None:
        pytest.skip(f"the CPU 2:4 extension did not build: {sparse24_cpu.build_error()}")
    lin, inputs, fns = _paths()
    benchmark.group = "SparseLinear per-call cost, 64x64 2:4, fp32"
    try:
        with torch.no_grad(), use_backend("torch"):
            y = benchmark(fns[path])
            torch.testing.assert_close(y, lin(inputs[path]), rtol=1e-5, atol=1e-5)
    finally:
        cpu_rule.forget()


def main() -> None:
    from sparsekit._env import environment
    from sparsekit.bench.timing import time_cpu_interleaved

    torch.set_num_threads(1)
    _, _, fns = _paths()
    with torch.no_grad(), use_backend("torch"):
        t = time_cpu_interleaved(fns, warmup=100, min_repeats=2000, max_repeats=20000, min_time_s=0.5)
    env = environment()
    print(f"CPU {env['cpu']}, 1 thread, torch {env['torch']}, commit {env['commit']}, {env['time_utc']}")
    us = {name: (tm.median_ms * 1e3, tm.p20_ms * 1e3, tm.p80_ms * 1e3) for name, tm in t.items()}
    for name, (med, p20, p80) in us.items():
        print(f"{name:7s} {med:7.2f} us (p20 {p20:.2f}, p80 {p80:.2f})")
    print(
        f"SparseLinear adds {us['layer'][0] - us['kernel'][0]:.2f} us per call to its kernel; "
        f"the checked op path adds {us['op'][0] - us['kernel'][0]:.2f} us; under cpu_rule='fastest' "
        f"its dense path adds {us['rule16'][0] - us['dense16'][0]:.2f} us to nn.Linear at M = 16"
    )


if __name__ == "__main__":
    main()
