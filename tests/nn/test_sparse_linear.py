"""SparseLinear: every format and backend reproduces F.linear(x, weight_with_zeros, bias)."""

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.kernels import nm_keep_mask
from sparsekit.nn import SparseLinear
from sparsekit.nn.sparse_linear import is_24
from tests.conftest import TOL, require_cpu_extension

SHAPES = [(1, 32, 64), (7, 123, 260), (3, 64, 128)]  # (M, N, K)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMATS = ["2:4", "bitmap", "masked", "dense"]


def _ids(shape, dtype):
    return f"M{shape[0]}-N{shape[1]}-K{shape[2]}-{str(dtype).replace('torch.', '')}"


def pruned_linear(n: int, k: int, dtype=torch.float32, bias=True, pattern="2:4") -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    with torch.no_grad():
        if pattern == "2:4":
            mask = nm_keep_mask(lin.weight.abs().float(), 2, 4)
        else:
            mask = torch.rand(n, k) < 0.4
        lin.weight.mul_(mask)
    return lin


CASES = [(s, d) for s in SHAPES for d in DTYPES]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("shape,dtype", CASES, ids=[_ids(s, d) for s, d in CASES])
def test_every_format_and_backend_matches_dense_with_zeros(shape, dtype, fmt, backend):
    """'triton' launches the Triton kernels here, on CPU tensors through the interpreter."""
    if backend == "triton" and dtype == torch.bfloat16 and fmt != "dense":
        pytest.skip(
            "the Triton interpreter's tl.dot multiplies bf16 raw bits (triton-lang/triton#11584); "
            "bf16 Triton numerics are checked on CUDA by tests/gpu/test_cuda_kernels.py (make gpu-bench)"
        )
    m, n, k = shape
    lin = pruned_linear(n, k, dtype)
    x = torch.randn(2, m, k).to(dtype)  # [..., K] inputs
    ref = F.linear(x.float(), lin.weight.float(), lin.bias.float()).to(dtype)
    layer = SparseLinear.from_linear(lin, format=fmt, backend=backend)
    with torch.no_grad():
        y = layer(x)
    rtol, atol = TOL[dtype]
    assert y.shape == (2, m, n) and y.dtype == dtype
    torch.testing.assert_close(y, ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.to_dense().weight, lin.weight, rtol=0, atol=0)


def test_triton_backend_runs_the_triton_kernel(monkeypatch):
    """backend='triton' on CPU tensors launches the kernel (interpreter), never a silent torch path."""
    import sparsekit.kernels._backend as backend_mod

    lin = pruned_linear(32, 64)
    x = torch.randn(3, 64)
    launched = []
    real_launch = backend_mod.launch
    monkeypatch.setattr(backend_mod, "launch", lambda *a, **k: launched.append(a[0]) or real_launch(*a, **k))
    for module in ("sparse24", "bitmap", "masked_mm"):
        monkeypatch.setattr(sys.modules[f"sparsekit.kernels.{module}"], "launch", backend_mod.launch)
    for fmt in ("2:4", "bitmap", "masked"):
        y = SparseLinear.from_linear(lin, format=fmt, backend="triton")(x)
        torch.testing.assert_close(y, lin(x), rtol=1e-4, atol=1e-4)
    assert len(launched) == 3


def test_triton_backend_without_interpreter_or_gpu_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = SparseLinear.from_linear(pruned_linear(32, 64), backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        layer(torch.randn(3, 64))


def test_unknown_backend_is_refused_at_construction():
    with pytest.raises(ValueError, match="unknown SparseLinear backend"):
        SparseLinear.from_linear(pruned_linear(32, 64), backend="cuda")


def test_golden_1x8_weight_keeps_the_two_largest_of_each_group():
    w = torch.tensor([[0.0, 3.0, 0.0, -4.0, 5.0, 0.0, 0.0, 1.0]])
    lin = nn.Linear(8, 1, bias=False)
    lin.weight.data.copy_(w)
    layer = SparseLinear.from_linear(lin)
    assert layer.format == "2:4"
    assert layer.values.tolist() == [[3.0, -4.0, 5.0, 1.0]]
    # group 0 keeps slots 1, 3 -> 1 | 3 << 2 = 13; group 1 keeps 0, 3 -> 0 | 3 << 2 = 12
    assert layer.meta.tolist() == [[13 | 12 << 4]]
    assert torch.equal(layer.mask(), w != 0)


def test_auto_format_and_explicit_mask():
    lin = nn.Linear(64, 16)
    mask = nm_keep_mask(lin.weight.detach().abs(), 2, 4)
    layer = SparseLinear.from_linear(lin, mask=mask)
    assert layer.format == "2:4" and torch.equal(layer.mask(), mask)
    unstructured = SparseLinear.from_linear(lin, mask=torch.rand(16, 64) < 0.3)
    assert unstructured.format == "bitmap"
    with pytest.raises(ValueError, match="not 2:4"):
        SparseLinear.from_linear(lin, format="2:4")
    with pytest.raises(ValueError, match="unknown weight format"):
        SparseLinear.from_linear(lin, format="4:8")
    with pytest.raises(ValueError, match="mask must be bool"):
        SparseLinear.from_linear(lin, mask=mask.float())


def test_conv1d_weight_is_transposed():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=32, nx=64)  # weight [in, out]
    with torch.no_grad():
        conv.weight.mul_(nm_keep_mask(conv.weight.T.abs(), 2, 4).T)
        conv.bias.normal_()
    layer = SparseLinear.from_linear(conv)
    x = torch.randn(2, 5, 64)
    assert layer.format == "2:4" and layer.conv1d
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


def test_state_dict_holds_the_compressed_form_and_moves_with_to():
    lin = pruned_linear(32, 64)
    layer = SparseLinear.from_linear(lin)
    state = layer.state_dict()
    assert set(state) == {"values", "meta", "bias"}
    assert state["values"].shape == (32, 32) and state["meta"].dtype == torch.uint8
    assert layer.weight_bytes() == 32 * 32 * 4 + 32 * 8
    half = layer.to(torch.bfloat16)
    assert half.values.dtype == torch.bfloat16 and half.meta.dtype == torch.uint8

    bitmap = SparseLinear.from_linear(pruned_linear(32, 64, pattern="random"), format="bitmap")
    fresh = SparseLinear(64, 32, format="bitmap")  # nnz unknown: load_state_dict sizes values
    fresh.load_state_dict(bitmap.state_dict())
    x = torch.randn(4, 64)
    torch.testing.assert_close(fresh(x), bitmap(x), rtol=0, atol=0)


def test_repr_shows_format_backend_and_density():
    text = repr(SparseLinear.from_linear(pruned_linear(32, 64)))
    assert "format=2:4" in text and "backend=auto->cpu" in text and "density=0.500" in text


def test_masked_format_trains_with_the_mask_fixed():
    lin = pruned_linear(32, 64)
    layer = SparseLinear.from_linear(lin, format="masked")
    mask = layer.mask().clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.0)
    x, target = torch.randn(16, 64), torch.randn(16, 32)
    losses = []
    for _ in range(10):
        loss = F.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        assert torch.all(layer.weight.grad[~mask] == 0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(layer.weight != 0, mask)  # pruned entries stay exactly zero
    back = layer.to_format("2:4")
    assert back.format == "2:4" and torch.equal(back.mask(), mask)


def test_is_24():
    assert is_24(torch.tensor([[1.0, 0, 0, 2, 0, 0, 0, 0]]))
    assert not is_24(torch.tensor([[1.0, 1, 1, 0]]))
    assert not is_24(torch.ones(2, 6))  # K % 4 != 0


def _spy_bound_calls(monkeypatch):
    """Count calls of the pre-bound CPU path and of the checked custom-op path."""
    import sparsekit.formats.weight.sparse24 as fmt_mod

    calls = {"bound": 0, "op": 0}
    real_bind, real_mm = fmt_mod.bind_sparse24_cpu, fmt_mod.sparse24_mm

    def bind(values, meta, **kwargs):
        fn = real_bind(values, meta, **kwargs)
        return lambda x, bias: calls.__setitem__("bound", calls["bound"] + 1) or fn(x, bias)

    def mm(*a, **k):
        calls["op"] += 1
        return real_mm(*a, **k)

    monkeypatch.setattr(fmt_mod, "bind_sparse24_cpu", bind)
    monkeypatch.setattr(fmt_mod, "sparse24_mm", mm)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_cpu_forward_takes_the_prebound_path_and_matches(dtype, monkeypatch):
    calls = _spy_bound_calls(monkeypatch)
    lin = pruned_linear(48, 64, dtype)
    layer = SparseLinear.from_linear(lin, format="2:4")
    x = torch.randn(3, 64).to(dtype)
    with torch.no_grad():
        y1, y2 = layer(x), layer(x[:1])
    assert calls == {"bound": 2, "op": 0}
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        y1, F.linear(x.float(), lin.weight.float(), lin.bias.float()).to(dtype), rtol=rtol, atol=atol
    )
    torch.testing.assert_close(y2, y1[:1], rtol=0, atol=0)


def test_prebound_path_follows_changes_to_the_layer(monkeypatch):
    """A new dtype, new stored tensors, a copy or the triton backend never run a stale bound call."""
    import copy

    calls = _spy_bound_calls(monkeypatch)
    lin = pruned_linear(32, 64)
    layer = SparseLinear.from_linear(lin, format="2:4")
    x = torch.randn(2, 64)
    with torch.no_grad():
        layer(x)
        twin = copy.deepcopy(layer)
        twin.values.mul_(2)  # the copy owns its values: the original must not see this
        torch.testing.assert_close(twin(x) - twin.bias, 2 * (layer(x) - layer.bias))
        layer.values = layer.values * 0  # new stored tensor
        torch.testing.assert_close(layer(x), layer.bias.expand(2, 32))
        layer.to(torch.bfloat16)
        assert layer(x.bfloat16()).dtype == torch.bfloat16
        bound_before = calls["bound"]
        layer.backend = "triton"  # forced Triton: the interpreter kernel, never the bound C++ call
        layer.to(torch.float32)(x)
    assert calls["bound"] == bound_before and calls["op"] == 1


def test_compiled_forward_goes_through_the_custom_op():
    layer = SparseLinear.from_linear(pruned_linear(32, 64), format="2:4")
    x = torch.randn(2, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fmt,op,routed", [("2:4", "sparse24_mm", "mm24_routed"), ("bitmap", "bitmap_mm", "bitmap_routed")]
)
def test_compiled_cpu_layer_calls_the_cpp_op_without_grad_and_the_custom_op_with_it(fmt, op, routed):
    """Without grad a compiled CPU layer's graph holds the C++ op ``<routed>`` (no Python per call,
    no autograd formula); with x requiring grad it holds the ``custom_op`` (which refuses backward)."""
    require_cpu_extension()
    layer = SparseLinear.from_linear(pruned_linear(32, 64, pattern=fmt), format=fmt)
    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if "sparsekit" in str(node.target))
        return gm.forward

    x = torch.randn(2, 64)
    with torch.no_grad():
        y = torch.compile(layer, fullgraph=True, backend=backend)(x)
        torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    assert seen == [f"sparsekit.{routed}.default"] or seen == [f"sparsekit.{routed}"], seen
    seen.clear()
    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True, backend=backend)(x.requires_grad_())
    assert seen == [f"sparsekit.{op}"], seen
