"""CPU path of sparse24_mm: the direct decode kernel, blocked decompress + GEMM, the torch fallback.

Every path must reproduce ``sparse24_mm_ref`` (dense-with-zeros) at the TOL table's tolerance,
and the CPU decompress must equal the reference decompress bit for bit.
"""

import pytest
import torch

from sparsekit.kernels import compress_24, decompress_24, sparse24_cpu, sparse24_mm, sparse24_mm_ref
from sparsekit.kernels.sparse24 import decompress_24_ref
from sparsekit.kernels.topk_select import nm_keep_mask
from tests.conftest import extension_must_build, require_cpu_extension

NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# M=1/7 take the direct kernel, M=33 the blocked GEMM; K = 4 * odd leaves a half-filled meta byte;
# K = 1028 and N = 300 leave a tail after the 64-column vector loop and cross a ROW_BLOCK boundary
SHAPES = [(1, 40, 64), (1, 576, 576), (7, 123, 260), (7, 17, 12), (1, 300, 1028), (33, 50, 136), (4, 3, 4)]


def _params(shapes, dtypes):
    return [pytest.param(m, n, k, d, id=f"M{m}-N{n}-K{k}-{NAMES[d]}") for (m, n, k) in shapes for d in dtypes]


def _weight_24(n, k, dtype):
    w = torch.randn(n, k)
    return (w * nm_keep_mask(w.abs(), 2, 4)).to(dtype)


@pytest.fixture(params=["ext", "fallback"])
def cpu_path(request, monkeypatch, torch_backend):
    """Run once with the compiled extension, once with the plain-torch fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(sparse24_cpu, "extension", lambda: None)
    else:
        require_cpu_extension()
    return request.param


def test_extension_builds_where_it_can():
    """A broken build must fail the suite, not turn every extension test into a skip."""
    if not extension_must_build():
        pytest.skip("no C++ compiler, not x86-64, or SPARSEKIT_CPU_EXT=0: the extension cannot build here")
    assert sparse24_cpu.extension() is not None, sparse24_cpu.build_error()


@pytest.mark.parametrize(("m", "n", "k", "dtype"), _params(SHAPES, DTYPES))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_cpu_mm_matches_ref(m, n, k, dtype, with_bias, cpu_path, assert_close):
    values, meta = compress_24(_weight_24(n, k, dtype))
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    y = sparse24_mm(x, values, meta, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close(y, sparse24_mm_ref(x, values, meta, bias))


@pytest.mark.parametrize("m", [1, 5, 8, 9, 16, 40])
def test_cpu_mm_every_m(m, cpu_path, assert_close):
    """Each row-block size of the direct kernel (1..8 rows per pass) and the switch to blocked."""
    values, meta = compress_24(_weight_24(70, 200, torch.float32))
    x = torch.randn(m, 200)
    assert_close(sparse24_mm(x, values, meta), sparse24_mm_ref(x, values, meta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [3, 13, 16])
def test_cpu_mm_across_weight_tiles(m, dtype, cpu_path, assert_close):
    """N = 700 rows at K = 200 span several ~32 KiB weight tiles, each re-read for every 8 rows of x."""
    values, meta = compress_24(_weight_24(700, 200, dtype))
    x = torch.randn(m, 200, dtype=dtype)
    bias = torch.randn(700, dtype=dtype)
    assert_close(sparse24_mm(x, values, meta, bias), sparse24_mm_ref(x, values, meta, bias))


def test_cpu_mm_batched_noncontiguous(cpu_path, assert_close):
    values, meta = compress_24(_weight_24(33, 136, torch.bfloat16))
    x = torch.randn(136, 2, 3, dtype=torch.bfloat16).permute(1, 2, 0)  # [2, 3, 136], not contiguous
    y = sparse24_mm(x, values, meta)
    assert y.shape == (2, 3, 33)
    assert_close(y, sparse24_mm_ref(x, values, meta))


@pytest.mark.parametrize(("n", "k", "dtype"), [(n, k, d) for (_, n, k) in SHAPES for d in DTYPES])
def test_cpu_decompress_exact(n, k, dtype, cpu_path):
    w = _weight_24(n, k, dtype)
    values, meta = compress_24(w)
    assert torch.equal(decompress_24(values, meta), decompress_24_ref(values, meta))
    assert torch.equal(decompress_24(values, meta), w)


def test_decompress_rows_block(cpu_path):
    w = _weight_24(50, 136, torch.float32)
    values, meta = compress_24(w)
    out = torch.empty(20, 136)
    sparse24_cpu.decompress_rows(values, meta, 17, 37, out)
    assert torch.equal(out, w[17:37])


def test_cpu_compile_inductor(torch_backend, assert_close):
    """The custom op stays opaque to inductor: fullgraph compiles and runs the CPU kernel."""
    values, meta = compress_24(_weight_24(48, 96, torch.float32))
    x = torch.randn(1, 96)
    fn = torch.compile(lambda x: sparse24_mm(x, values, meta).relu(), fullgraph=True)
    assert_close(fn(x), sparse24_mm_ref(x, values, meta).relu())


def test_fast_path_on_avx2_and_avx512():
    """Where the CPU has AVX2 + FMA (or AVX-512) the extension must build with a vector path (it is the
    point)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read().split()
    except OSError:
        pytest.skip("/proc/cpuinfo is unreadable (not Linux), so this CPU's flags are unknown; runs on Linux")
    if not ("avx2" in flags and "fma" in flags):
        pytest.skip(
            "no AVX2 + FMA on this CPU, so the extension runs its scalar loop; this check runs on any "
            "x86-64 CPU with AVX2 + FMA (Haswell / Zen 1 and later, every CI machine so far)"
        )
    assert sparse24_cpu.has_fast_path()


def test_decompress_traces_without_graph_break():
    """Under torch.compile the CPU decompress is the traceable torch form, never the C++ call."""
    w = _weight_24(40, 72, torch.float32)
    values, meta = compress_24(w)
    fn = torch.compile(lambda v, m: decompress_24(v, m) * 2, fullgraph=True, backend="eager")
    assert torch.equal(fn(values, meta), w * 2)
