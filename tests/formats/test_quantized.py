"""Weight-only quantized formats (int8, int4, 2:4-int8): each reproduces F.linear(x, its dequantized
weight) on every CPU ISA, against plain-torch references, and round-trips through checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.formats.weight import choose_format, weight_format
from sparsekit.kernels import cpu_ext, nm_keep_mask, quant
from sparsekit.kernels.quant import (
    dequantize_int4,
    dequantize_int8,
    int4_mm_ref,
    pack_int4,
    quantize_int4,
    quantize_int8,
    sparse24_int8_mm_ref,
    unpack_int4,
)
from sparsekit.nn import SparseLinear
from tests.conftest import TOL, require_cpu_extension

SHAPES = [(1, 64, 128), (5, 48, 192), (9, 160, 256)]  # (M, N, K); N % 16 == 0 for the int4 op
ODD_N = (3, 40, 128)  # N % 16 != 0: int4 dequantizes
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# every ISA level this CPU runs (an AVX-512 machine runs all three)
ISAS = [i.value for i, lvl in cpu_ext.ISA_LEVEL.items() if lvl <= cpu_ext.ISA_LEVEL[cpu_ext.supported_isa()]]


def _ids(shape, dtype):
    return f"M{shape[0]}-N{shape[1]}-K{shape[2]}-{str(dtype).replace('torch.', '')}"


def _linear(n, k, dtype, pattern=None, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n).to(dtype).requires_grad_(False)
    if pattern == "2:4":
        lin.weight.mul_(nm_keep_mask(lin.weight.abs().float(), 2, 4))
    return lin


CASES = [(s, d) for s in [*SHAPES, ODD_N] for d in DTYPES]


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-g32", "2:4-int8"])
@pytest.mark.parametrize("shape,dtype", CASES, ids=[_ids(s, d) for s, d in CASES])
def test_layer_matches_linear_of_its_dequantized_weight(fmt, shape, dtype):
    m, n, k = shape
    lin = _linear(n, k, dtype, "2:4" if fmt == "2:4-int8" else None)
    layer = SparseLinear.from_linear(lin, format=fmt)
    x = torch.randn(2, m, k).to(dtype)
    with torch.no_grad():
        y = layer(x)
    w = layer.dense_weight().float()
    ref = F.linear(x.float(), w, lin.bias.float()).to(dtype)
    rtol, atol = TOL[dtype]
    assert y.shape == (2, m, n) and y.dtype == dtype
    torch.testing.assert_close(y, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 3, 8, 9, 33])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_sparse24_int8_kernel_every_isa_against_the_reference(isa, m, dtype):
    """The C++ code of a 2:4-int8 layer at a forced ISA against decompress + scale + F.linear in
    fp32: the direct kernel ``mm24_q8`` up to 16 rows (m = 1..9), the ISA's dequantized tiles +
    GEMM above (``mm24_q8_blas``, m = 33); K = 260 leaves a tail of groups past the vector loop."""
    require_cpu_extension()
    n, k = 37, 260
    lin = _linear(n, k, dtype, "2:4")
    layer = SparseLinear.from_linear(lin, format="2:4-int8")
    layer.cpu_isa = isa
    x = torch.randn(m, k).to(dtype)
    with torch.no_grad():
        y = layer(x)
    ref = sparse24_int8_mm_ref(x, layer.values, layer.meta, layer.scale, layer.bias)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, ref, rtol=rtol, atol=atol)
    assert layer._cache  # the bound C++ call ran, not the dequantizing fallback


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 4, 7, 8])
def test_dense_int8_kernel_every_isa_against_the_reference(isa, m):
    """fp32 int8 layers run sparsekit's C++ direct kernel (``mm_q8``) up to 8 rows; K = 300 leaves
    a tail past the 32-column vector loop."""
    require_cpu_extension()
    from sparsekit.kernels.quant import int8_mm_ref

    layer = SparseLinear.from_linear(_linear(37, 300, torch.float32), format="int8")
    layer.cpu_isa = isa
    x = torch.randn(m, 300)
    with torch.no_grad():
        y = layer(x)
        direct = cpu_ext.extension().mm_q8(
            x, layer.qweight, layer.scale, layer.bias, cpu_ext.ISA_LEVEL[cpu_ext.CpuIsa(isa)]
        )
    ref = int8_mm_ref(x, layer.qweight, layer.scale, layer.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(direct, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 3, 8, 9])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_dense_int4_kernel_every_isa_against_the_reference(isa, m, group):
    """fp32 int4 layers run sparsekit's C++ direct kernel (``mm_q4``) at these M (up to 64 rows;
    above, tests/formats/test_quant_blas.py); against dequantize + F.linear in fp32, on N = 37."""
    require_cpu_extension()
    from sparsekit.kernels.quant import int4_direct_input

    k = 384
    fmt = "int4" if group == 64 else f"int4-g{group}"
    layer = SparseLinear.from_linear(_linear(37, k, torch.float32), format=fmt)
    layer.cpu_isa = isa
    x = torch.randn(m, k)
    with torch.no_grad():
        y = layer(x)
        direct = cpu_ext.extension().mm_q4(
            int4_direct_input(x, group), layer.qweight, layer.scale_zero, layer.bias, group,
            cpu_ext.ISA_LEVEL[cpu_ext.CpuIsa(isa)],
        )  # fmt: skip
        raw = cpu_ext.extension().mm_q4(  # x as is: the rearrangement done in C++
            x, layer.qweight, layer.scale_zero, layer.bias, group, cpu_ext.ISA_LEVEL[cpu_ext.CpuIsa(isa)]
        )
    ref = int4_mm_ref(x, layer.qweight, layer.scale_zero, layer.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(direct, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(raw, ref, rtol=1e-5, atol=1e-4)
    assert layer._cache  # the bound C++ call ran, not the dequantizing fallback


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 4, 5])
def test_half_int4_layer_takes_mm_q4_up_to_its_limit_then_torchs_op(isa, dtype, m, monkeypatch):
    """bf16 / fp16 int4 layers run ``mm_q4`` (x widened inside, y and bias in x's dtype) up to
    INT4_HALF_DIRECT_MAX_M rows (here forced to 4) and torch's packed op above; both against
    dequantize + F.linear in fp32, at every ISA this CPU runs."""
    require_cpu_extension()
    from sparsekit.kernels import quant

    monkeypatch.setattr(quant, "INT4_HALF_DIRECT_MAX_M", 4)
    ext, calls = cpu_ext.extension(), []
    real = ext.mm_q4
    monkeypatch.setattr(ext, "mm_q4", lambda x, *a: calls.append(x.dtype) or real(x, *a))
    layer = SparseLinear.from_linear(_linear(48, 256, dtype), format="int4")
    layer.cpu_isa = isa
    x = torch.randn(m, 256).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert calls == ([dtype] if m <= 4 else []) and y.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        y, int4_mm_ref(x, layer.qweight, layer.scale_zero, layer.bias), rtol=rtol, atol=atol
    )


def test_int4_direct_input_puts_each_groups_even_then_odd_columns_then_the_sums():
    from sparsekit.kernels.quant import int4_direct_input

    x = torch.arange(2 * 64, dtype=torch.float32).view(2, 64)
    got = int4_direct_input(x, 32)
    assert got.shape == (2, 66)
    assert got[0, :16].tolist() == list(range(0, 32, 2)) and got[0, 16:32].tolist() == list(range(1, 32, 2))
    assert got[1, 32:48].tolist() == list(range(96, 128, 2))
    assert got[0, 64:].tolist() == [float(sum(range(32))), float(sum(range(32, 64)))]


def test_mm_q4_refuses_inputs_it_would_misread():
    require_cpu_extension()
    ext = cpu_ext.extension()
    packed, sz = quantize_int4(torch.randn(16, 64), 32)
    with pytest.raises(RuntimeError, match="x must be"):
        ext.mm_q4(torch.randn(1, 65), packed, sz, None, 32, 0)  # neither [M, K] nor [M, K + K/G]
    with pytest.raises(RuntimeError, match="group must be"):
        ext.mm_q4(torch.randn(1, 68), packed, sz, None, 16, 0)


def test_int8_keeps_zeros_and_error_is_bounded_by_half_a_step():
    w = torch.randn(64, 96)
    w[w.abs() < 0.5] = 0
    q, scale = quantize_int8(w)
    deq = dequantize_int8(q, scale)
    assert torch.equal(deq == 0, w == 0)
    assert bool(((deq - w).abs() <= scale[:, None] / 2 + 1e-7).all())
    assert int(q.abs().max()) == 127


def test_int4_packs_two_codes_per_byte_and_bounds_the_error():
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (8, 32) and torch.equal(unpack_int4(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)  # column 0 in the low nibble
    w = torch.randn(32, 128)
    packed, scale_zero = quantize_int4(w, 32)
    assert scale_zero.shape == (4, 32, 2)
    step = scale_zero[..., 0].transpose(0, 1).repeat_interleave(32, dim=1)
    assert bool(((dequantize_int4(packed, scale_zero) - w).abs() <= step / 2 + 1e-6).all())


def test_int4_cpu_op_matches_the_reference_in_fp32():
    lin = _linear(64, 256, torch.float32)
    layer = SparseLinear.from_linear(lin, format="int4")
    x = torch.randn(4, 256)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(
        y, int4_mm_ref(x, layer.qweight, layer.scale_zero, layer.bias), rtol=1e-4, atol=1e-4
    )


def test_int4_cpu_packing_is_kept_per_stored_tensor_and_version():
    """torch's CPU packing (what every bf16 int4 call needs) is built once per stored tensor, again
    after an in-place change, and dropped with the tensor; each build matches the reference."""
    import gc

    from sparsekit.kernels import quant

    packed, scale_zero = quantize_int4(torch.randn(40, 128), 32)  # N = 40: padded to 48 rows
    scale_zero = scale_zero.to(torch.bfloat16)
    first = quant.cpu_int4_pack(packed, scale_zero)
    assert first[1].shape == (4, 48, 2) and quant.cpu_int4_pack(packed, scale_zero) is first
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    want = int4_mm_ref(x, packed, scale_zero, None)
    rtol, atol = TOL[torch.bfloat16]
    torch.testing.assert_close(quant.int4_mm(x, packed, scale_zero), want, rtol=rtol, atol=atol)
    packed.bitwise_xor_(0x11)  # every code changes: the kept packing would be wrong
    again = quant.cpu_int4_pack(packed, scale_zero)
    assert again is not first
    got = quant.int4_mm(x, packed, scale_zero)
    torch.testing.assert_close(got, int4_mm_ref(x, packed, scale_zero, None), rtol=rtol, atol=atol)
    key = id(packed)
    del packed, first, again
    gc.collect()
    assert key not in quant._INT4_PACKS


def test_2_4_int8_takes_0_625_bytes_per_weight_and_keeps_the_mask():
    lin = _linear(128, 256, torch.bfloat16, "2:4")
    layer = SparseLinear.from_linear(lin, format="2:4-int8")
    assert layer.weight_bytes() == 128 * 128 + 128 * 32 + 128 * 2
    assert torch.equal(layer.mask(), lin.weight != 0)
    assert torch.equal(layer.dense_weight() != 0, lin.weight != 0)


def test_lossy_formats_are_never_chosen_and_bad_shapes_are_named():
    w = torch.randn(32, 64) * nm_keep_mask(torch.rand(32, 64), 2, 4)
    assert choose_format(w).name == "2:4"
    with pytest.raises(ValueError, match="in_features % 64"):
        SparseLinear.from_linear(nn.Linear(96, 32), format="int4")
    with pytest.raises(ValueError, match="int4-g32"):
        weight_format("int4").check_shape(32, 96)
    with pytest.raises(ValueError, match="no Triton kernel"):
        SparseLinear.from_linear(nn.Linear(64, 32), format="int8", backend="triton")(torch.randn(1, 64))


def test_sparsify_refuses_2_4_int8_on_a_layer_that_is_not_2_4():
    from sparsekit.nn import sparsify
    from tests.conftest import tiny_model

    with pytest.raises(ValueError, match="is not 2:4-int8"):
        sparsify(tiny_model("llama"), format="2:4-int8")


@pytest.mark.parametrize("fmt,sparsity", [("int8", None), ("int4-g32", None), ("2:4-int8", "2:4")])
def test_checkpoint_round_trip_and_damaged_meta(tmp_path, fmt, sparsity):
    from sparsekit.hf.checkpoint import CheckpointError, load, save
    from sparsekit.nn import sparsify
    from sparsekit.pruning import PruneConfig, prune_model
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    if sparsity:
        prune_model(model, None, PruneConfig(method="magnitude", sparsity=sparsity, show_progress=False))
    sparsify(model, format=fmt)
    save(model, tmp_path / "ck")
    loaded = load(tmp_path / "ck")
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    before, after = model.state_dict(), loaded.state_dict()
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    if fmt == "2:4-int8":
        from tests.hf.test_checkpoint_integrity import _read, _rewrite

        state, metadata = _read(tmp_path / "ck" / "model.safetensors")
        key = next(k for k in state if k.endswith(".meta"))
        state[key] = torch.full_like(state[key], 0x55)  # i0 == i1 == 1: not a 2:4 group
        _rewrite(tmp_path / "ck", state, metadata, recompute_checksums=True)
        with pytest.raises(CheckpointError, match="distinct and ascending"):
            load(tmp_path / "ck")


def test_quantize_model_picks_2_4_int8_and_int4_groups_per_layer():
    from sparsekit.nn import quantize
    from sparsekit.pruning import PruneConfig, prune_model
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    prune_model(model, None, PruneConfig(method="magnitude", sparsity="2:4", show_progress=False))
    mlp = model.model.layers[1].mlp
    mlp.down_proj = nn.Linear(120, mlp.down_proj.out_features, bias=False)  # a width no int4 group divides
    model.model.layers[0].mlp.up_proj.weight.data.normal_()  # dense again: plain int8
    report = quantize(model, "int8")
    formats = {n: m.format for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert formats["model.layers.0.mlp.up_proj"] == "int8"
    assert formats["model.layers.0.self_attn.q_proj"] == "2:4-int8"
    assert report["2:4-int8"]["layers_swapped"] == 12 and report["int8"]["layers_swapped"] == 2

    model = tiny_model("llama")
    model.model.layers[1].mlp.down_proj = nn.Linear(120, 64, bias=False)
    report = quantize(model, "int4-g128")
    formats = {n: m.format for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert formats["model.layers.0.mlp.down_proj"] == "int4-g128"  # K = 128
    assert formats["model.layers.0.self_attn.q_proj"] == "int4"  # K = 64: groups of 64
    assert report["kept_float"] == ["model.layers.1.mlp.down_proj"]  # 120: no group divides it
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        dense = model(ids).logits
        quantize(model, "int4")
        logits = model(ids).logits
    assert ((logits - dense).norm() / dense.norm()) < 0.2  # 4-bit error, not garbage
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize(model, "int3")
    pruned = tiny_model("llama")
    prune_model(pruned, None, PruneConfig(method="magnitude", sparsity="2:4", show_progress=False))
    with pytest.raises(ValueError, match="50% zeros.*Use int8"):
        quantize(pruned, "int4")


def test_cli_quantize_writes_a_checkpoint_transformers_loads(tmp_path, capsys):
    """`sparsekit quantize FOLDER --format int8` on a pruned HF folder: 2:4 layers become 2:4-int8,
    and plain ``from_pretrained`` (after ``import sparsekit``) gives the same logits as sparsekit.load."""
    import transformers

    from sparsekit.cli import main
    from sparsekit.hf.checkpoint import load
    from sparsekit.pruning import PruneConfig, prune_model
    from tests.tiny_folder import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    prune_model(model, None, PruneConfig(method="magnitude", sparsity="2:4", show_progress=False))
    model.save_pretrained(folder)
    out = tmp_path / "q8"
    assert main(["quantize", str(folder), "--format", "int8", "--out", str(out)]) == 0
    assert "2:4-int8: 14 layers" in capsys.readouterr().out
    loaded = load(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert {m.format for m in hf.modules() if isinstance(m, SparseLinear)} == {"2:4-int8"}
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, loaded(ids).logits, rtol=0, atol=0)
    assert main(["quantize", str(folder), "--format", "int8", "--out", str(out)]) != 0  # exists
    assert "exists" in capsys.readouterr().err
    assert main(["quantize", str(folder), "--format", "int3", "--out", str(tmp_path / "x")]) != 0
    assert "int3" in capsys.readouterr().err


def test_int8_float_rows_keep_the_max_scale_and_grid_rows_their_own_step():
    torch.manual_seed(0)
    w = torch.randn(6, 256)
    w[1] = torch.randint(-100, 101, (256,)) * 0.013  # on a grid, largest code 100: step 0.013
    w[2] = torch.randint(-127, 128, (256,)) * 0.002  # the plain case: largest code 127
    w[3] = 0
    w[4, ::2] = 0  # a float row with pruned entries
    q, scale = quantize_int8(w)
    for row in (0, 4, 5):
        assert scale[row] == w[row].abs().max() / 127
    assert torch.allclose(scale[1], torch.tensor(0.013)) and int(q[1].abs().max()) == 100
    assert scale[3] == 1 and not q[3].any()
    for row in (1, 2):
        torch.testing.assert_close(dequantize_int8(q, scale)[row], w[row], rtol=0, atol=1e-6)


def test_int4_stores_a_symmetric_grid_group_exactly_and_floats_as_before():
    torch.manual_seed(0)
    w = torch.randn(4, 128)
    w[1, :64] = torch.randint(-5, 6, (64,)) * 0.03  # codes -5..5 of step 0.03: kept exactly
    w[1, 64:] = torch.randint(-7, 8, (64,)) * 0.5
    packed, scale_zero = quantize_int4(w, 64)
    back = dequantize_int4(packed, scale_zero)
    torch.testing.assert_close(back[1], w[1], rtol=0, atol=1e-6)
    assert scale_zero[0, 1, 1] == 0 and torch.allclose(scale_zero[0, 1, 0], torch.tensor(0.03))
    lo, hi = w[0, :64].min(), w[0, :64].max()  # a float group: the asymmetric min/max grid
    assert torch.allclose(scale_zero[0, 0], torch.stack([(hi - lo) / 15, lo + 8 * (hi - lo) / 15]))


@pytest.mark.parametrize("zen4", [True, False])
def test_24_int8_bf16_takes_the_dot_kernels_limit_only_at_its_level_on_zen4(zen4, monkeypatch):
    """bf16 x at avx512-bf16 on Zen 4 stays on the kernel up to DEQUANT_ABOVE_M_24Q8_BF16DOT_ZEN4
    rows; fp32 x, another level or another CPU keep DEQUANT_ABOVE_M['2:4-int8']."""
    from sparsekit.kernels import quant

    calls = []

    class FakeExt:
        def cpu_isa_supported(self):
            return 3

        def mm24_q8(self, x, *args):
            calls.append(("kernel", x.shape[0]))
            return x.new_zeros(x.shape[0], 4)

        def mm24_q8_blas(self, x, *args):
            calls.append(("tiles", x.shape[0]))
            return x.new_zeros(x.shape[0], 4)

    monkeypatch.setattr(cpu_ext, "extension", lambda: FakeExt())
    monkeypatch.setattr(cpu_ext, "THIS_CPU_IS_ZEN4", zen4)
    values, meta, scale = (
        torch.zeros(4, 32, dtype=torch.int8),
        torch.zeros(4, 8, dtype=torch.uint8),
        torch.ones(4),
    )
    bf16_limit = quant.DEQUANT_ABOVE_M_24Q8_BF16DOT_ZEN4 if zen4 else quant.DEQUANT_ABOVE_M["2:4-int8"]
    for isa, dtype, limit in (
        ("avx512-bf16", torch.bfloat16, bf16_limit),
        ("avx512-bf16", torch.float32, quant.DEQUANT_ABOVE_M["2:4-int8"]),
        ("avx512", torch.bfloat16, quant.DEQUANT_ABOVE_M["2:4-int8"]),
    ):
        mm = quant.bind_sparse24_int8_cpu(values, meta, scale, isa=isa)
        calls.clear()
        mm(torch.zeros(limit, 64, dtype=dtype), None)
        mm(torch.zeros(limit + 1, 64, dtype=dtype), None)
        assert calls == [("kernel", limit), ("tiles", limit + 1)], (isa, dtype)


# the op each format's compiled CPU layer calls: C++ kernels (csrc/ops_cpu.cpp) where sparsekit's own
# kernels run, a Python-kernel op where torch's do (int4; int8 where ATen has a native GEMM in x's dtype)
COMPILED_OPS = {
    "int8": lambda dtype: "q8_routed" if quant._int8_direct(dtype) else "int8_mm_cpu",
    "2:4-int8": lambda dtype: "mm24_q8_routed",
    "int4": lambda dtype: "int4_mm_cpu",
}


@pytest.mark.parametrize("fmt", list(COMPILED_OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_quantized_layer_calls_the_cpu_kernel(fmt, dtype):
    """torch.compile(fullgraph=True) of a CPU int8 / 2:4-int8 / int4 SparseLinear puts one sparsekit
    op in the graph (the bound C++ call), not a dequantize of the whole weight, and matches eager."""
    require_cpu_extension()
    lin = nn.Linear(64, 48, bias=True).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(nm_keep_mask(lin.weight.abs().float(), 2, 4).to(dtype))
    layer = SparseLinear.from_linear(lin, format=fmt).eval()
    targets: list[str] = []

    def backend(gm, example_inputs):
        # tensor ops only (a symbolic size's arithmetic, e.g. the route's rows * K, is no dequantize)
        tensor_nodes = [n for n in gm.graph.nodes if isinstance(n.meta.get("example_value"), torch.Tensor)]
        targets.extend(str(node.target) for node in tensor_nodes)
        return gm.forward

    x = torch.randn(2, 3, 64).to(dtype)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend=backend)(x)
    op = f"sparsekit.{COMPILED_OPS[fmt](dtype)}"
    assert any(op in t for t in targets), targets
    assert not any("decompress" in t or "mul" in t for t in targets), targets
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(compiled, eager, rtol=rtol, atol=atol)


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2", "opt"])
@pytest.mark.parametrize("fmt", ["int8", "int4-g256"])
def test_quantize_head_unties_the_head_and_keeps_the_embedding_float(family, fmt, tmp_path):
    """``quantize(head=True)``: the lm_head becomes ``fmt`` (int4-g256 falls back to int4, groups of 64:
    the largest that divides hidden 64), the input embedding keeps its float table untouched, the
    logits stay near the float head's, and a save / load gives the same logits, untied."""
    from sparsekit.hf.checkpoint import load, save
    from sparsekit.nn import quantize
    from tests.conftest import tiny_model

    model = tiny_model(family)
    emb = model.get_input_embeddings().weight.detach().clone()
    was_tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    report = quantize(model, fmt, head=True)
    head = model.get_output_embeddings()
    assert isinstance(head, SparseLinear) and head.format == ("int8" if fmt == "int8" else "int4")
    assert report["head"]["untied"] == was_tied and report["head"]["format"] == head.format
    assert report["head"]["bytes_after"] < report["head"]["bytes_before"]
    assert torch.equal(model.get_input_embeddings().weight, emb)  # the table is not quantized
    assert not any(
        getattr(c, "tie_word_embeddings", False) for c in (model.config, model.config.get_text_config())
    )
    with torch.no_grad():
        logits = model(ids).logits
    bound = 0.02 if fmt == "int8" else 0.25
    assert (logits - ref).norm() / ref.norm() < bound
    save(model, tmp_path / "q")
    loaded = load(tmp_path / "q")
    assert isinstance(loaded.get_output_embeddings(), SparseLinear)
    assert torch.equal(loaded.get_input_embeddings().weight, emb)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)


def test_quantize_head_refuses_a_model_without_a_linear_head_before_changing_it():
    from sparsekit.nn import quantize, quantize_head
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    model.lm_head = nn.Identity()
    with pytest.raises(ValueError, match="no linear output head.*without head=True"):
        quantize(model, "int8", head=True)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())  # refused before any swap
    model = tiny_model("llama")
    quantize_head(model, "int8")
    assert quantize_head(model, "int8")["skipped"] == "already SparseLinear (int8)"
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_head(tiny_model("llama"), "int3")


def test_cli_quantize_head_prints_and_saves_the_head(tmp_path, capsys):
    from sparsekit.cli import main
    from sparsekit.hf.checkpoint import load
    from tests.tiny_folder import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny")
    out = tmp_path / "q8h"
    assert main(["quantize", str(folder), "--format", "int8", "--head", "--out", str(out)]) == 0
    assert "lm_head: int8" in capsys.readouterr().out
    assert load(out).lm_head.format == "int8"


def test_quantize_head_reads_the_tie_afresh_not_from_a_cached_description():
    """A model described while untied, then tied: quantize_head must still untie its config, or
    transformers would tie the float table back over the int8 head on load."""
    from sparsekit.models import describe
    from sparsekit.nn import quantize_head
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    assert not describe(model).tied  # cached: untied
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    assert quantize_head(model, "int8")["untied"] is True
    assert model.config.tie_word_embeddings is False
