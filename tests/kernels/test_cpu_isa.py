"""The C++ CPU kernels on every ISA path (scalar, AVX2, AVX-512, AVX-512 + BF16), each forced here.

Contract: every format, ISA, path (direct / blas) and M reproduces the dense-with-zeros reference
``F.linear(x, w_with_zeros, bias)`` (computed in fp32, cast back) at the TOL table's tolerance;
decompression is bit-exact. Plus the ISA selection rules (argument > use_cpu_isa >
SPARSEKIT_CPU_ISA > auto, unsupported levels refused) and a disassembly check that each level's code
holds no instruction of a higher one.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsekit.kernels import compress_24, compress_bitmap, cpu_ext, use_backend
from sparsekit.kernels._backend import CpuIsa, current_cpu_isa, use_cpu_isa
from sparsekit.kernels.bitmap_cpu import bitmap_mm_cpu, decompress_bitmap_cpu
from sparsekit.kernels.sparse24_cpu import decompress_rows, sparse24_mm_cpu
from sparsekit.kernels.topk_select import nm_keep_mask
from sparsekit.nn import SparseLinear
from tests.conftest import require_cpu_extension

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
ISAS = ("scalar", "avx2", "avx512", "avx512-bf16")
MS = (1, 3, 8, 17, 64)
PATHS = ("direct", "blas")
# K = 100: 25 groups leave a tail after AVX-512's 16-group and AVX2's 8-group steps; K = 520 runs
# several full steps then a tail; K = 12 never enters a vector step; N = 37 / 130 split over threads
SHAPES_24 = [(37, 100), (130, 520), (5, 12)]
# K = 45 ends mid mask byte, 520 crosses 64-column tiles with a tail, 7 never fills a byte
SHAPES_BITMAP = [(37, 45), (130, 520), (3, 7)]


@pytest.fixture(scope="module")
def ext():
    """The compiled extension; a build failure where it must build fails the suite."""
    return require_cpu_extension()


def _runnable(isa: str) -> str:
    """``isa`` if this CPU runs it; a skip naming what is missing otherwise."""
    best = cpu_ext.supported_isa()
    if cpu_ext.ISA_LEVEL[CpuIsa.of(isa)] > cpu_ext.ISA_LEVEL[best]:
        pytest.skip(f"this CPU runs at most {best.value}; the {isa} path needs a CPU that has it")
    return isa


def _reference(x, w, bias):
    """The contract: dense-with-zeros F.linear, fp32 accumulation, cast back to x's dtype."""
    return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)


def _weight_24(n, k, dtype):
    w = torch.randn(n, k)
    return (w * nm_keep_mask(w.abs(), 2, 4)).to(dtype)


def _weight_bitmap(n, k, dtype, sparsity):
    w = torch.randn(n, k) * (torch.rand(n, k) >= sparsity)
    w[0] = 0.0  # an empty row
    if n > 1:
        w[1] = torch.randn(k)  # a full row
    w[-1, -1] = 1.5  # the last value of the matrix sits at the end of the values array
    return w.to(dtype)


def _cases(shapes):
    """Every ISA x M x shape in fp32 and bf16; fp16 (same code, another load/store) at two M."""
    return [
        pytest.param(isa, d, m, n, k, id=f"{isa}-{NAMES[d]}-M{m}-N{n}-K{k}")
        for isa in ISAS
        for d in NAMES
        for m in (MS if d is not torch.float16 else (3, 17))
        for (n, k) in shapes
    ]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("isa", "dtype", "m", "n", "k"), _cases(SHAPES_24))
def test_sparse24_every_isa_matches_dense(isa, dtype, m, n, k, path, ext, assert_close):
    _runnable(isa)
    w = _weight_24(n, k, dtype)
    values, meta = compress_24(w)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype) if m % 2 else None  # odd M with bias, even M without
    y = sparse24_mm_cpu(x, values, meta, bias, isa=isa, path=path)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close(y, _reference(x, w, bias))


@pytest.mark.parametrize("sparsity", [0.5, 0.7], ids=["s50", "s70"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("isa", "dtype", "m", "n", "k"), _cases(SHAPES_BITMAP))
def test_bitmap_every_isa_matches_dense(isa, dtype, m, n, k, path, sparsity, ext, assert_close):
    _runnable(isa)
    w = _weight_bitmap(n, k, dtype, sparsity)
    values, mask_bits, offsets = compress_bitmap(w)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype) if m % 2 else None
    y = bitmap_mm_cpu(x, values, mask_bits, offsets, bias, isa=isa, path=path)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close(y, _reference(x, w, bias))


@pytest.mark.parametrize("sparsity", [0.0, 1.0], ids=["dense", "empty"])
@pytest.mark.parametrize("isa", ISAS)
def test_bitmap_extremes(isa, sparsity, ext, assert_close):
    """All kept (every mask byte 0xFF) and nothing kept (values is empty: no read at all)."""
    _runnable(isa)
    w = (torch.randn(20, 72) * (torch.rand(20, 72) >= sparsity)).bfloat16()
    values, mask_bits, offsets = compress_bitmap(w)
    x = torch.randn(5, 72, dtype=torch.bfloat16)
    for path in PATHS:
        assert_close(bitmap_mm_cpu(x, values, mask_bits, offsets, isa=isa, path=path), _reference(x, w, None))


@pytest.mark.parametrize("dtype", list(NAMES), ids=NAMES.get)
@pytest.mark.parametrize("isa", ISAS)
def test_decompress_every_isa_bit_exact(isa, dtype, ext):
    _runnable(isa)
    for n, k in SHAPES_24:
        w = _weight_24(n, k, dtype)
        values, meta = compress_24(w)
        assert torch.equal(decompress_rows(values, meta, 0, n, isa=isa), w), (n, k)
        out = torch.empty(n - 2, k, dtype=dtype)
        assert torch.equal(decompress_rows(values, meta, 1, n - 1, out, isa=isa), w[1:-1]), (n, k)
    for n, k in SHAPES_BITMAP:
        w = _weight_bitmap(n, k, dtype, 0.6)
        values, mask_bits, offsets = compress_bitmap(w)
        assert torch.equal(decompress_bitmap_cpu(values, mask_bits, offsets, k, isa=isa), w), (n, k)


def test_paths_are_chosen_by_m():
    isa, dtype = CpuIsa.AVX512, torch.float32
    limit = cpu_ext.DIRECT_MAX_M[("2:4", isa, dtype)]
    assert cpu_ext.choose_path("2:4", isa, dtype, limit) == 0
    assert cpu_ext.choose_path("2:4", isa, dtype, limit + 1) == 1
    assert cpu_ext.choose_path("2:4", isa, dtype, 1, path="blas") == 1
    with pytest.raises(ValueError, match="direct, blas"):
        cpu_ext.choose_path("2:4", isa, dtype, 1, path="tiles")


# ----------------------------------------------------------------------------- selection
def test_explicit_isa_beats_the_context_which_beats_the_default(ext):
    _runnable("avx512")
    assert cpu_ext.resolve_isa() is cpu_ext.resolve_isa(current_cpu_isa())
    with use_cpu_isa("scalar"):
        assert cpu_ext.resolve_isa() is CpuIsa.SCALAR
        assert cpu_ext.resolve_isa("avx2") is CpuIsa.AVX2
        with use_cpu_isa("auto"):
            assert cpu_ext.resolve_isa() is cpu_ext.supported_isa()
    with pytest.raises(ValueError, match="avx512, avx2, scalar"):
        CpuIsa.of("sse9")


def test_unsupported_isa_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(cpu_ext, "supported_isa", lambda: CpuIsa.AVX2)
    with pytest.raises(ValueError, match="at most 'avx2'; choose one of avx2, scalar or 'auto'"):
        cpu_ext.resolve_isa("avx512")
    with use_cpu_isa("avx512"), pytest.raises(ValueError, match="requested ISA is 'avx512'"):
        cpu_ext.resolve_isa()
    assert cpu_ext.resolve_isa("auto") is CpuIsa.AVX2


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def test_env_default_is_read_once_at_import():
    code = (
        "import os; from sparsekit.kernels._backend import current_cpu_isa; "
        "os.environ['SPARSEKIT_CPU_ISA'] = 'avx512'; print(current_cpu_isa().value)"
    )
    done = _python(code, SPARSEKIT_CPU_ISA="scalar")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "scalar"
    bad = _python("import sparsekit.kernels", SPARSEKIT_CPU_ISA="avx3")
    assert bad.returncode != 0 and "SPARSEKIT_CPU_ISA: unknown CPU ISA 'avx3'" in bad.stderr


def _functions(disassembly: str, namespace: str) -> dict[str, str]:
    """Function name -> body of every function whose demangled name holds ``namespace``."""
    out, name, body = {}, None, []
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            if name and namespace in name:
                out[name] = "\n".join(body)
            name, body = header.group(1), []
        elif name:
            body.append(line)
    if name and namespace in name:
        out[name] = "\n".join(body)
    return out


def test_avx2_code_holds_no_avx512_instruction(ext):
    """The AVX2 path must run on an AVX2-only CPU: no zmm register, no mask register, anywhere in it."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed: cannot disassemble the extension")
    text = subprocess.run(
        [objdump, "-d", "-C", "--no-show-raw-insn", ext.__file__], capture_output=True, text=True
    )
    assert text.returncode == 0, text.stderr
    avx2, avx512 = _functions(text.stdout, "sk_avx2::"), _functions(text.stdout, "sk_avx512::")
    scalar = _functions(text.stdout, "sk_scalar::")
    assert avx2 and avx512 and scalar, "kernel functions not found in the disassembly"
    for name, body in avx2.items():
        assert "%zmm" not in body and not re.search(r"%k[0-7]\b", body), f"AVX-512 instruction in {name}"
    assert any("%ymm" in body for body in avx2.values()), "the AVX2 kernels hold no 256-bit instruction"
    assert any("%zmm" in body for body in avx512.values()), "the AVX-512 kernels hold no 512-bit instruction"
    for name, body in scalar.items():
        assert "%ymm" not in body and "%zmm" not in body, f"AVX instruction in the scalar kernel {name}"
    # AVX-512 CPUs without AVX512_BF16 (Skylake-X, Ice Lake) run level 2: vdpbf16ps only at level 3
    bf16dot = _functions(text.stdout, "sk_avx512bf16::")
    assert bf16dot, "the AVX-512 + BF16 kernel was not found in the disassembly"
    for name, body in {**avx2, **avx512, **scalar}.items():
        assert "vdpbf16ps" not in body, f"AVX512_BF16 instruction in {name}"
    assert any("vdpbf16ps" in body for body in bf16dot.values()), "the bf16-dot kernel holds no vdpbf16ps"


# ----------------------------------------------------------------------------- SparseLinear
@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sparse_linear_runs_every_isa(fmt, dtype, ext, assert_close, monkeypatch):
    """Per-layer ``cpu_isa`` and ``use_cpu_isa`` both reach the bound call; bitmap never decompresses
    the whole matrix in Python."""
    import sparsekit.kernels.bitmap as bitmap_mod

    def no_whole_matrix(*args, **kwargs):
        raise AssertionError("bitmap forward decompressed the whole matrix")

    monkeypatch.setattr(bitmap_mod, "decompress_bitmap", no_whole_matrix)
    w = _weight_24(48, 64, dtype) if fmt == "2:4" else _weight_bitmap(48, 64, dtype, 0.7)
    lin = torch.nn.Linear(64, 48, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = SparseLinear.from_linear(lin, format=fmt)
    for m in (1, 40):
        x = torch.randn(2, m, 64, dtype=dtype)
        want = _reference(x, w, lin.bias.detach())
        for isa in ISAS:
            if cpu_ext.ISA_LEVEL[CpuIsa.of(isa)] > cpu_ext.ISA_LEVEL[cpu_ext.supported_isa()]:
                continue
            layer.cpu_isa = isa
            with torch.no_grad():
                assert_close(layer(x), want)
            layer.cpu_isa = None
            with use_cpu_isa(isa), torch.no_grad():
                assert_close(layer(x), want)
    assert {k for k in layer._cache if isinstance(k, CpuIsa)} >= {CpuIsa.SCALAR}


@pytest.mark.parametrize("fmt", ["2:4", "bitmap"])
def test_kernel_ops_follow_use_cpu_isa(fmt, ext, assert_close, monkeypatch):
    """The checked ops (what torch.compile traces) read the ISA at call time (their route
    arguments, ``cpu_ext.route_args``)."""
    from sparsekit.kernels import bitmap_mm, sparse24_mm

    seen = []
    real = cpu_ext.resolve_isa

    def spy(isa=None):
        seen.append(real(isa))
        return seen[-1]

    monkeypatch.setattr(cpu_ext, "resolve_isa", spy)
    x = torch.randn(3, 64)
    with use_backend("torch"), use_cpu_isa("scalar"):
        if fmt == "2:4":
            w = _weight_24(16, 64, torch.float32)
            y = sparse24_mm(x, *compress_24(w))
        else:
            w = _weight_bitmap(16, 64, torch.float32, 0.5)
            y = bitmap_mm(x, *compress_bitmap(w))
    assert seen == [CpuIsa.SCALAR]
    assert_close(y, _reference(x, w, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bitmap_without_the_extension_falls_back_to_torch(dtype, monkeypatch, assert_close):
    """No compiler: the same results from a plain-torch decompress + F.linear, bound or not."""
    import sparsekit.kernels.bitmap_cpu as bitmap_cpu

    monkeypatch.setattr(bitmap_cpu, "extension", lambda: None)
    w = _weight_bitmap(30, 45, dtype, 0.5)
    values, mask_bits, offsets = compress_bitmap(w)
    x = torch.randn(4, 45, dtype=dtype)
    bias = torch.randn(30, dtype=dtype)
    want = _reference(x, w, bias)
    assert_close(bitmap_mm_cpu(x, values, mask_bits, offsets, bias, isa="avx512"), want)
    assert_close(bitmap_cpu.bind_bitmap_cpu(values, mask_bits, offsets, 45)(x, bias), want)
    assert torch.equal(decompress_bitmap_cpu(values, mask_bits, offsets, 45), w)


def test_amx_cpus_take_the_blas_path_sooner_for_bf16_bitmap(tmp_path):
    """The AMX crossovers replace the table's only where the CPU reports amx_bf16."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512bw amx_bf16 amx_tile\n")
    assert cpu_ext.has_amx(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512bw avx512_bf16\n")
    assert not cpu_ext.has_amx(str(info)) and not cpu_ext.has_amx(str(tmp_path / "missing"))
    key = ("bitmap", cpu_ext.CpuIsa.AVX512, torch.bfloat16)
    expected = 8 if cpu_ext.has_amx() else (4 if cpu_ext.THIS_CPU_IS_ZEN4 else 16)
    assert cpu_ext.DIRECT_MAX_M[key] == expected
    expected_24 = 8 if cpu_ext.THIS_CPU_IS_ZEN4 and not cpu_ext.has_amx() else 16
    assert cpu_ext.DIRECT_MAX_M[("2:4", cpu_ext.CpuIsa.AVX512, torch.bfloat16)] == expected_24


def test_zen4_is_told_apart_from_zen3_and_intel(tmp_path):
    """Zen 4 (AMD family 25 with AVX-512) takes its own, lower AVX-512 crossovers; Zen 3 (family 25,
    no AVX-512) and Intel do not."""
    info = tmp_path / "cpuinfo"
    zen4 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n"
    zen4 += "flags\t\t: fpu avx2 avx512f avx512bw\n\n"
    info.write_text(zen4 + "processor\t: 1\nvendor_id\t: GenuineIntel\n")
    assert cpu_ext.is_zen4(str(info))
    info.write_text(zen4.replace(" avx512f avx512bw", ""))
    assert not cpu_ext.is_zen4(str(info))  # Zen 3
    info.write_text(zen4.replace("AuthenticAMD", "GenuineIntel").replace("25", "6"))
    assert not cpu_ext.is_zen4(str(info)) and not cpu_ext.is_zen4(str(tmp_path / "missing"))
    info.write_text(zen4.replace("cpu family\t: 25", "cpu family\t: 26"))
    assert not cpu_ext.is_zen4(str(info))  # Zen 5: not measured
    for key, limit in cpu_ext._MEASURED_ZEN4.items():
        assert limit <= cpu_ext._MEASURED[key[:2]][0 if key[2] == torch.float32 else 1]  # lower, never higher


def test_zen3_takes_its_own_avx2_crossovers(tmp_path):
    """An AVX2-only AMD family 25 (Zen 3) is told apart from Zen 4 and Intel, and only there do the
    AVX2 limits come from _MEASURED_ZEN3."""
    info = tmp_path / "cpuinfo"
    zen3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nflags\t\t: fpu fma avx2 bmi2\n\n"
    info.write_text(zen3)
    assert cpu_ext.is_zen3(str(info)) and not cpu_ext.is_zen4(str(info))
    info.write_text(zen3.replace("avx2", "avx2 avx512f"))
    assert not cpu_ext.is_zen3(str(info)) and cpu_ext.is_zen4(str(info))
    info.write_text(zen3.replace("AuthenticAMD", "GenuineIntel").replace("25", "6"))
    assert not cpu_ext.is_zen3(str(info)) and not cpu_ext.is_zen3(str(tmp_path / "missing"))
    info.write_text(zen3.replace(" avx2", ""))
    assert not cpu_ext.is_zen3(str(info))  # no AVX2: the scalar path, nothing measured
    for key, limit in cpu_ext._MEASURED_ZEN3.items():
        assert key[1] is CpuIsa.AVX2
        default = cpu_ext._MEASURED[key[:2]][0 if key[2] == torch.float32 else 1]
        assert cpu_ext.DIRECT_MAX_M[key] == (limit if cpu_ext.is_zen3() else default), key


def test_the_bf16_level_inherits_avx512_crossovers_but_its_own_bf16_ones():
    """Level 3 runs the AVX-512 kernels except the bf16 direct ones, so every other limit is AVX-512's."""
    for (fmt, isa, dtype), limit in cpu_ext.DIRECT_MAX_M.items():
        if isa is CpuIsa.AVX512 and dtype is not torch.bfloat16:
            assert cpu_ext.DIRECT_MAX_M[(fmt, CpuIsa.AVX512_BF16, dtype)] == limit, (fmt, dtype)
    for fmt in ("2:4", "bitmap"):
        own = cpu_ext.DIRECT_MAX_M[(fmt, CpuIsa.AVX512_BF16, torch.bfloat16)]
        avx512 = cpu_ext.DIRECT_MAX_M[(fmt, CpuIsa.AVX512, torch.bfloat16)]
        measured = cpu_ext._MEASURED_ZEN4_BF16DOT[(fmt, CpuIsa.AVX512_BF16, torch.bfloat16)]
        assert own == (measured if cpu_ext.THIS_CPU_IS_ZEN4 else avx512), fmt


def test_the_bf16_dot_kernel_sums_in_fp32(ext):
    """vdpbf16ps adds products into fp32 lanes: a long row of values that cancel except for one
    small term keeps it, where a bf16 running sum would round it away."""
    _runnable("avx512-bf16")
    k = 1024
    w = torch.zeros(4, k)
    w[:, 0::4], w[:, 1::4] = 1.0, -1.0  # 2 of every 4 kept: +1, -1
    w[:, 2] = 2.0**-7  # slot 2 of group 0 replaces the -1
    w[:, 1] = 0.0
    values, meta = compress_24(w.bfloat16())
    x = torch.ones(3, k, dtype=torch.bfloat16) * 256
    y = sparse24_mm_cpu(x, values, meta, isa="avx512-bf16", path="direct")
    assert torch.equal(y, _reference(x, w.bfloat16(), None))
    assert torch.equal(y, torch.full((3, 4), 258.0, dtype=torch.bfloat16))


@pytest.mark.parametrize("path", [0, 1], ids=["direct", "blas"])
@pytest.mark.parametrize("layout", ["3d", "strided"])
def test_entry_points_take_x_with_leading_dims(layout, path, ext, assert_close):
    """The C++ entries the bound layers call take x [..., K] as it comes (3-D, or a strided view)
    and give y x's leading dims: the same numbers as the flat, contiguous call."""
    from sparsekit.kernels.quant import quantize_int8

    k, n, level = 40, 24, cpu_ext.ISA_LEVEL[cpu_ext.supported_isa()]
    base = torch.randn(2, 3, 2 * k)
    x = base.reshape(2, 3, 2 * k)[..., :k] if layout == "strided" else base[..., :k].contiguous()
    w24, wbm = _weight_24(n, k, torch.float32), _weight_bitmap(n, k, torch.float32, 0.6)
    q24, s24 = quantize_int8(w24)
    v24q, m24q = compress_24(q24.float())
    q8, s8 = quantize_int8(wbm)
    calls = {
        "mm24": lambda t: ext.mm24(t, *compress_24(w24), None, level, path, 0),
        "mm_bitmap": lambda t: ext.mm_bitmap(t, *compress_bitmap(wbm), None, level, path, 0),
        "mm24_q8": lambda t: (ext.mm24_q8, ext.mm24_q8_blas)[path](
            t, v24q.to(torch.int8), m24q, s24.float(), None, level, *([0] if path else [])
        ),
        "mm_q8": lambda t: (ext.mm_q8, ext.mm_q8_blas)[path](
            t, q8, s8.float(), None, level, *([0] if path else [])
        ),
    }
    flat = x.reshape(-1, k).contiguous()
    for name, call in calls.items():
        y = call(x)
        assert y.shape == (2, 3, n), name
        assert_close(y.reshape(-1, n), call(flat))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("n", "k"), [(1001, 64), (3, 36), (1, 260)])
def test_decode_pairs_of_weight_rows_every_isa(isa, n, k, ext, assert_close):
    """At M = 1 the AVX2 2:4-int8 kernel takes weight rows two at a time (``dot2``) and a row left
    over alone: N = 1001 at K = 64 splits into weight tiles of an odd row count, N = 3 and 1 leave a
    single last row, K = 36 / 260 a tail of groups past the vector loop; every row against the fp32
    reference, with a bias, on every ISA (2:4 on fp32 / bf16 / fp16 values, int8 and the other ISAs
    run one row at a time: the same sweep holds them to the same contract)."""
    from sparsekit.kernels.quant import quantize_int8

    level = cpu_ext.ISA_LEVEL[CpuIsa.of(_runnable(isa))]
    x, bias = torch.randn(1, k), torch.randn(n)
    w24 = _weight_24(n, k, torch.float32)
    q24, s24 = quantize_int8(w24)
    v24q, m24q = compress_24(q24.float())
    q8, s8 = quantize_int8(torch.randn(n, k))
    for dtype in NAMES:
        xd, bd = x.to(dtype), bias.to(dtype)
        wd = w24.to(dtype)
        assert_close(ext.mm24(xd, *compress_24(wd), bd, level, 0, 0), _reference(xd, wd, bd))
    w24q = (q24.float() * s24.float()[:, None]).to(torch.float32)
    y = ext.mm24_q8(x, v24q.to(torch.int8), m24q, s24.float(), bias, level)
    assert_close(y, _reference(x, w24q, bias))
    y = ext.mm_q8(x, q8, s8.float(), bias, level)
    assert_close(y, _reference(x, q8.float() * s8.float()[:, None], bias))


def test_a_compiled_layer_runs_the_isa_in_force_when_called(ext):
    """torch.compile bakes a layer's route (``cpu_ext.route_args``) into its graph as constants; a
    call under another ``use_cpu_isa`` must retrace rather than run the stale level."""
    best = cpu_ext.ISA_LEVEL[cpu_ext.supported_isa()]
    if best == 0:
        pytest.skip(
            "this CPU runs only the scalar level, so there is no second level to switch to; the test "
            "runs on any CPU with AVX2 + FMA or AVX-512 (the C++ extension built)"
        )
    lin = torch.nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.copy_(_weight_24(16, 64, torch.float32))
    layer = SparseLinear.from_linear(lin, format="2:4")
    levels: list[int] = []

    def backend(gm, example_inputs):
        levels.extend(n.args[4] for n in gm.graph.nodes if "mm24_routed" in str(n.target))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(1, 64)
    with torch.no_grad():
        with use_cpu_isa("scalar"):
            compiled(x)
        compiled(x)
    assert levels == [0, best], levels
