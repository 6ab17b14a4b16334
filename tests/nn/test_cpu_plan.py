"""SparseLinear's eager CPU plan: memoised per rows class and dtype, rebuilt whenever what it was
planned for changes (a use_cpu_isa / use_backend block, the layer's ISA, its rule, a new weight)."""

import pytest
import torch

from sparsekit.kernels import CpuIsa, cpu_ext, nm_keep_mask, use_backend, use_cpu_isa
from sparsekit.nn import SparseLinear
from tests.conftest import require_cpu_extension


def _layer():
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.mul_(nm_keep_mask(lin.weight.abs(), 2, 4))
    return lin, SparseLinear.from_linear(lin, format="2:4").eval()


def _isas_bound(layer) -> set:
    return {k for k in layer._cache if isinstance(k, CpuIsa)}


def test_a_use_cpu_isa_block_replans_and_leaving_it_restores():
    require_cpu_extension()
    if cpu_ext.supported_isa() is CpuIsa.SCALAR:
        pytest.skip(
            "this CPU has neither AVX2 nor AVX-512, so there is no second ISA to switch to; the test "
            "runs on any x86-64 CPU with AVX2 (CI's machines, and every machine this project measured)"
        )
    lin, layer = _layer()
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = lin(x)
        first = layer(x)
        with use_cpu_isa("scalar"):
            scalar = layer(x)
        assert CpuIsa.SCALAR in _isas_bound(layer)  # the block's ISA was bound, not the memo reused
        again = layer(x)
    for y in (first, scalar, again):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_the_layer_isa_setter_and_a_new_weight_replan():
    require_cpu_extension()
    lin, layer = _layer()
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer(x)
        layer.cpu_isa = "scalar"
        assert not any(isinstance(k, int) for k in layer._cache)  # the memoised plan is gone
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
        assert CpuIsa.SCALAR in _isas_bound(layer)
        layer.values = layer.values * 2  # a new stored tensor: the old bound call is stale
        torch.testing.assert_close(layer(x), 2 * (lin(x) - lin.bias) + lin.bias, rtol=1e-5, atol=1e-5)


def test_a_torch_backend_block_keeps_results_and_a_dtype_change_replans():
    lin, layer = _layer()
    x = torch.randn(3, 64)
    with torch.no_grad():
        with use_backend("torch"):
            y = layer(x)
        torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)
        layer.to(torch.bfloat16)
        yb = layer(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), lin(x), rtol=3e-2, atol=3e-2)
