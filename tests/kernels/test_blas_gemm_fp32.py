"""The blas paths' GEMM in fp32 for bf16 / fp16 layers (``cpu_ext.blas_gemm_in_fp32``).

On a CPU where ATen has no native bf16 / fp16 GEMM the blas paths (decompressed or dequantized
tiles + ATen GEMM) widen x and each tile to fp32 and round y once. Contract: every blas entry point
(2:4, bitmap, int8, int4, 2:4 + int8) gives the fp32 reference rounded to the layer's dtype in both
modes, on any CPU (each mode forced here); the mode is restored after the block; bad dtypes are
refused; the default follows ``native_half_gemm``; and bf16 int8 layers take the direct kernel at
small M exactly where the GEMM runs in fp32.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsekit.kernels import compress_24, compress_bitmap, cpu_ext, quant
from sparsekit.kernels.bitmap_cpu import bitmap_mm_cpu
from sparsekit.kernels.sparse24_cpu import decompress_24_torch, sparse24_mm_cpu
from sparsekit.kernels.topk_select import nm_keep_mask
from tests.conftest import require_cpu_extension

HALF = {torch.bfloat16: "bf16", torch.float16: "fp16"}
MODES = {"native": (), "fp32": (torch.bfloat16, torch.float16)}
MS = (9, 70)  # above every direct limit: the blas path


@pytest.fixture(scope="module")
def ext():
    return require_cpu_extension()


def _ref(x, w, bias, mode):
    """fp32 mode: the fp32 product of the dtype's weights, rounded once. Native mode: what ATen's own
    GEMM in that dtype gives (on a CPU without a native half GEMM its fallback rounds partial sums)."""
    if mode == "native":
        return F.linear(x, w.to(x.dtype), bias)
    return F.linear(x.float(), w.to(x.dtype).float(), None if bias is None else bias.float()).to(x.dtype)


def _sparse24(n, k, dtype):
    w = torch.randn(n, k)
    return (w * nm_keep_mask(w.abs(), 2, 4)).to(dtype)


def _run(fn, mode):
    with cpu_ext.blas_gemm_in_fp32(MODES[mode]):
        return fn()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", HALF, ids=HALF.get)
def test_sparse24_and_bitmap_blas_match_the_reference_in_both_modes(dtype, m, mode, ext, assert_close):
    torch.manual_seed(m)
    n, k = 130, 520
    x, bias = torch.randn(m, k, dtype=dtype), torch.randn(n, dtype=dtype)
    w24 = _sparse24(n, k, dtype)
    values, meta = compress_24(w24)
    y = _run(lambda: sparse24_mm_cpu(x, values, meta, bias, path="blas"), mode)
    assert y.dtype == dtype
    assert_close(y, _ref(x, w24, bias, mode))
    wb = (torch.randn(n, k) * (torch.rand(n, k) > 0.7)).to(dtype)
    bits, vals, offs = compress_bitmap(wb)
    y = _run(lambda: bitmap_mm_cpu(x, bits, vals, offs, None, path="blas"), mode)
    assert_close(y, _ref(x, wb, None, mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", HALF, ids=HALF.get)
def test_quantized_blas_paths_match_their_references_in_both_modes(dtype, mode, ext, assert_close):
    torch.manual_seed(1)
    n, k, m = 96, 256, 80  # m above every quantized direct limit
    x, bias = torch.randn(m, k, dtype=dtype), torch.randn(n, dtype=dtype)
    w = torch.randn(n, k)
    q, scale = quant.quantize_int8(w)
    y = _run(lambda: quant.bind_int8_cpu(q, scale.to(dtype))(x, bias), mode)
    assert_close(y, _ref(x, quant.dequantize_int8(q, scale.to(dtype).float()), bias, mode))
    packed, sz = quant.quantize_int4(w, 64)
    y = _run(lambda: quant.bind_int4_cpu(packed, sz.to(dtype))(x, bias), mode)
    assert_close(y, _ref(x, quant.dequantize_int4(packed, sz.to(dtype).float()), bias, mode))
    values, meta = compress_24(_sparse24(n, k, torch.float32))
    q24, scale24 = quant.quantize_int8(values)
    y = _run(lambda: quant.bind_sparse24_int8_cpu(q24, meta, scale24)(x, bias), mode)
    w24 = decompress_24_torch(quant.dequantize_int8(q24, scale24), meta)
    assert_close(y, _ref(x, w24, bias, mode))


def test_fp32_mode_widens_the_gemm_and_native_mode_does_not(ext):
    """The profiler sees the fp32 GEMM's widening copies only in fp32 mode (one thread: the tile loop
    runs on this thread, where the profiler records)."""
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    values, meta = compress_24(_sparse24(32, 64, torch.bfloat16))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        names = {}
        for mode in MODES:
            with cpu_ext.blas_gemm_in_fp32(MODES[mode]), torch.profiler.profile() as prof:
                sparse24_mm_cpu(x, values, meta, path="blas")
            names[mode] = {e.name for e in prof.events()}
    finally:
        torch.set_num_threads(threads)
    assert "aten::mm" in names["native"] and "aten::mm" in names["fp32"]
    assert "aten::_to_copy" in names["fp32"] and "aten::copy_" in names["fp32"]
    assert "aten::_to_copy" not in names["native"]


def test_the_mode_is_restored_and_bad_dtypes_are_refused(ext):
    before = ext.set_blas_fp32_dtypes(3)
    ext.set_blas_fp32_dtypes(before)
    with pytest.raises(RuntimeError, match="inside the block"):
        with cpu_ext.blas_gemm_in_fp32([torch.bfloat16]):
            assert ext.set_blas_fp32_dtypes(1) == 1  # the block's mask: bf16 only
            raise RuntimeError("inside the block")
    assert ext.set_blas_fp32_dtypes(before) == before
    with cpu_ext.blas_gemm_in_fp32(d for d in (torch.float16,)):  # any iterable, a generator too
        assert ext.set_blas_fp32_dtypes(2) == 2
    assert ext.set_blas_fp32_dtypes(before) == before
    with pytest.raises(ValueError, match="bf16 / fp16 only"):
        with cpu_ext.blas_gemm_in_fp32([torch.float32]):
            pass
    assert ext.set_blas_fp32_dtypes(before) == before
    with pytest.raises(RuntimeError, match="mask must be 0..3"):
        ext.set_blas_fp32_dtypes(4)


def test_the_default_follows_atens_native_half_gemm(ext):
    expected = {d for d in HALF if not cpu_ext.native_half_gemm(d)}
    assert cpu_ext.BLAS_FP32_DTYPES == expected
    mask = ext.set_blas_fp32_dtypes(0)
    ext.set_blas_fp32_dtypes(mask)
    assert mask == (torch.bfloat16 in expected) + 2 * (torch.float16 in expected)
    assert cpu_ext.native_half_gemm(torch.float32)


@pytest.mark.parametrize("emulated", [True, False], ids=["emulated-bf16-gemm", "native-bf16-gemm"])
def test_bf16_int8_takes_the_direct_kernel_where_the_gemm_runs_in_fp32(emulated, monkeypatch, ext):
    calls = []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(ext, name)

            def wrapped(*args):
                if name.startswith("mm"):
                    calls.append(name)
                return fn(*args)

            return wrapped

    monkeypatch.setattr(cpu_ext, "extension", lambda: Spy())
    monkeypatch.setattr(cpu_ext, "BLAS_FP32_DTYPES", frozenset({torch.bfloat16} if emulated else ()))
    q, scale = quant.quantize_int8(torch.randn(48, 64, dtype=torch.bfloat16))
    mm = quant.bind_int8_cpu(q, scale)
    x = torch.randn(quant.INT8_DIRECT_MAX_M, 64, dtype=torch.bfloat16)
    y = mm(x, None)
    torch.testing.assert_close(y, quant.int8_mm_ref(x, q, scale, None), rtol=1.6e-2, atol=1e-2)
    assert calls == (["mm_q8"] if emulated else [])  # else torch's own op
    assert quant.cpu_route("int8", torch.bfloat16, 1) == ("sparsekit mm_q8" if emulated else "aten int8 op")
    calls.clear()
    mm(torch.randn(quant.DEQUANT_ABOVE_M["int8"] + 1, 64, dtype=torch.bfloat16), None)
    assert calls == ["mm_q8_blas"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("fp32", "[torch.bfloat16, torch.float16]"), ("native", "[]"), ("auto", None)],
)
def test_the_env_sets_the_default_once_and_a_bad_value_is_refused(value, expected):
    code = (
        "import os, torch; from sparsekit.kernels import cpu_ext\n"
        "os.environ['SPARSEKIT_CPU_BLAS_GEMM'] = 'native'  # too late: read once at import\n"
        "print(sorted(cpu_ext.BLAS_FP32_DTYPES, key=str))\n"
        "half = (torch.bfloat16, torch.float16)\n"
        "print(sorted((d for d in half if not cpu_ext.native_half_gemm(d)), key=str))"
    )
    env = {**os.environ, "SPARSEKIT_CPU_BLAS_GEMM": value}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got, auto = done.stdout.strip().splitlines()
    assert got == (auto if expected is None else expected)
    env["SPARSEKIT_CPU_BLAS_GEMM"] = "bf16"
    cmd = [sys.executable, "-c", "import sparsekit.kernels"]
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "SPARSEKIT_CPU_BLAS_GEMM is 'bf16'; choose auto" in bad.stderr
