"""The C++ CPU kernels (2:4 and bitmap GEMMs): build, ISA level, and which path runs at which M.

The extension is one translation unit joined from ``csrc/cpu_common.cpp``, ``csrc/sparse24_cpu.cpp``
and ``csrc/bitmap_cpu.cpp``, built once per machine with the system C++ compiler (the same one
torch.compile's CPU backend needs) on first use and cached by torch under
``~/.cache/torch_extensions`` (a cold build takes about half a minute on two cores). It is
compiled for baseline x86-64 with the AVX2 and AVX-512 kernels under per-function target
attributes, so one binary holds every ISA path and the cache is keyed only by the sources, torch
and the flags. Where it cannot build, the callers fall back to plain torch (logged once);
``SPARSEKIT_CPU_EXT=0`` forces that.

ISA (``resolve_isa``): an explicit ``isa=`` argument, else ``use_cpu_isa`` / ``SPARSEKIT_CPU_ISA``
(``_backend.CpuIsa``); ``auto`` is the best level this CPU runs. Asking for a level the CPU lacks
is an error naming the fix, never an illegal instruction.

Path (``choose_path``): ``direct`` (x against the compressed rows; decode and small batches) up
to ``DIRECT_MAX_M[format, isa, dtype]`` rows of x, ``blas`` (decompressed tiles + ATen's GEMM)
above; both can be forced with ``path=``. The table comes from ``bench/cpu_paths.py`` on the
Xeon of docs/results.md (the largest M at which direct still won, per format, ISA and dtype).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ._backend import CpuIsa, cpu_isa_is_default, current_cpu_isa

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")  # shipped as package data
CPP_SOURCES = tuple(
    CSRC / name
    for name in ("cpu_common.cpp", "sparse24_cpu.cpp", "bitmap_cpu.cpp", "attention_cpu.cpp", "ops_cpu.cpp")
)
FUNCTIONS = [
    "mm24",
    "mm24_q8",
    "mm_q8",
    "mm_q4",
    "mm_q8_blas",
    "mm_q4_blas",
    "mm24_q8_blas",
    "decompress24_rows",
    "mm_bitmap",
    "decompress_bitmap_rows",
    "causal_attention_bf16",
    "causal_attention_f32",
    "cpu_isa_supported",
    "set_blas_fp32_dtypes",
    "register_ops",
]
# the dispatcher ops ``register_ops`` defines in namespace sparsekit (ops_cpu.cpp), each with the
# index of its argument whose rows are y's columns (the fake's output width)
ROUTED_OPS = {"mm24_routed": 1, "bitmap_routed": 2, "q8_routed": 1, "mm24_q8_routed": 1}
ISA_LEVEL = {CpuIsa.SCALAR: 0, CpuIsa.AVX2: 1, CpuIsa.AVX512: 2, CpuIsa.AVX512_BF16: 3}
_LEVEL_ISA = {level: isa for isa, level in ISA_LEVEL.items()}
PATHS = ("auto", "direct", "blas")
# bytes of decompressed (or dequantized) weight rows per GEMM call on every blas path: 2:4, bitmap
# and the quantized formats (the C++ TILE_BYTES; bench/blas_tiles.py measures others)
BLAS_TILE_BYTES = 8 << 20

# largest M (rows of x) for the direct path; above it, decompressed tiles + BLAS. Measured with
# bench/cpu_paths.py (docs/data/cpu-paths*.md: SmolLM2 shapes, 1 thread, weights from DRAM): the
# largest M of {1, 4, 8, 16, 32, 64} at which direct beat blas on the geometric mean over shapes.
# The scalar rows come from docs/data/cpu-paths-scalar.md, measured after the scalar decompress
# was made branch-free (the scalar rows of cpu-paths.md predate that). fp16 was not measured: it
# takes bf16's value (same kernels, another conversion).
_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16
_MEASURED = {
    ("2:4", CpuIsa.AVX512): (32, 16),  # (fp32, bf16)
    ("2:4", CpuIsa.AVX2): (16, 8),
    ("2:4", CpuIsa.SCALAR): (1, 1),
    ("bitmap", CpuIsa.AVX512): (16, 16),
    ("bitmap", CpuIsa.AVX2): (16, 8),
    ("bitmap", CpuIsa.SCALAR): (4, 4),
}


Limits = dict[tuple[str, CpuIsa, torch.dtype], int]


def _per_dtype(limits: dict[tuple[str, CpuIsa], tuple[int, int]]) -> Limits:
    """{(format, isa): (fp32 limit, bf16 limit)} -> {(format, isa, dtype): limit}; fp16 takes bf16's."""
    return {
        (fmt, isa, dtype): pair[i]
        for (fmt, isa), pair in limits.items()
        for i, dtypes in enumerate(((_F32,), (_BF16, _F16)))
        for dtype in dtypes
    }


DIRECT_MAX_M: Limits = _per_dtype(_MEASURED)
# A CPU with AMX runs the blas path's bf16 GEMM on its tile unit, so the blas path wins sooner:
# bench/cpu_paths.py on Xeon-AMX with 8 MiB tiles (docs/data/cpu-paths-amx.md) moved bitmap bf16
# at AVX-512 from 16 to 8 (blas at M = 16: 0.73-0.84x dense, direct 0.56-0.85x). Its other AVX-512
# crossovers matched the table above; its forced-avx2 rows (an AVX2 kernel beside an AMX GEMM)
# describe no real CPU and are not used.
_MEASURED_AMX = {("bitmap", CpuIsa.AVX512, _BF16): 8, ("bitmap", CpuIsa.AVX512, _F16): 8}


# AMD Zen 4 runs each 512-bit instruction as two 256-bit halves, so the direct kernels' AVX-512 FMAs
# run at half a Xeon's rate while ATen's GEMM (bf16: vdpbf16ps) stays fast: bench/cpu_paths.py on
# EPYC-512 (docs/data/cpu-paths-epyc.md at 1 thread, cpu-paths-epyc-2t.md at 2, both alike for
# AVX-512) puts every AVX-512 crossover lower. 2:4 bf16 at M = 16 on the down projection
# (576x1536): direct 0.56x dense, blas 0.87x. Its forced-avx2 rows are not used (an AVX2-only AMD
# CPU is another core).
_MEASURED_ZEN4 = _per_dtype({("2:4", CpuIsa.AVX512): (16, 8), ("bitmap", CpuIsa.AVX512): (4, 4)})


def _cpuinfo_fields(cpuinfo: str) -> dict[str, str]:
    """The first processor's fields of a Linux /proc/cpuinfo ({} where unreadable)."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
    except OSError:
        pass
    return fields


def has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU reports AMX for bf16 (Linux /proc/cpuinfo; False where unreadable)."""
    return "amx_bf16" in _cpuinfo_fields(cpuinfo).get("flags", "").split()


def _amd_family_25(cpuinfo: str, avx512: bool) -> bool:
    """AMD family 0x19 (Zen 3 and Zen 4) with AVX-512 (only Zen 4 has it) or AVX2 alone (Zen 3)."""
    fields = _cpuinfo_fields(cpuinfo)
    flags = fields.get("flags", "").split()
    return (
        fields.get("vendor_id") == "AuthenticAMD"
        and fields.get("cpu family") == "25"
        and ("avx512f" in flags if avx512 else "avx2" in flags and "avx512f" not in flags)
    )


def is_zen4(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """AMD family 0x19 with AVX-512: Zen 4 (False where unreadable)."""
    return _amd_family_25(cpuinfo, avx512=True)


def is_zen3(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """AMD family 0x19 with AVX2 and no AVX-512: Zen 3 (False where unreadable)."""
    return _amd_family_25(cpuinfo, avx512=False)


# An AVX2-only Zen 3 (EPYC, 2 threads and 1: docs/data/cpu-paths-zen3-2t.md, cpu-paths-zen3.md), its
# bf16 blas GEMM in fp32 (BLAS_FP32_DTYPES: ATen has no native bf16 GEMM there): the AVX2 direct
# kernels lose to the tiles sooner in fp32 (2:4 from M = 8: 1.04x dense against 1.06x; bitmap from
# 16) and later in bf16 (bitmap direct 2.69x dense at M = 16 against 2.24x). Same at both thread
# counts. Intel CPUs without AVX-512 were not measured and keep the table above. 2:4 again after its
# AVX2 kernel lost the lane-crossing gather (commit b277f04; 1.1-1.9x faster at M = 1-8,
# docs/data/kernel-ab-avx2-24.md): direct ahead of the tiles up to M = 16 in fp32 and 32 in bf16
# (docs/data/cpu-paths-zen3-24-2t.md, 2 threads; 1 thread not rerun).
_MEASURED_ZEN3 = _per_dtype({("2:4", CpuIsa.AVX2): (16, 32), ("bitmap", CpuIsa.AVX2): (8, 16)})


# The AVX-512 + BF16 level's own bf16 direct kernels (vdpbf16ps, x kept bf16): bench/cpu_paths.py on
# EPYC-512 at 2 threads. 2:4: docs/data/cpu-paths-epyc-bf16dot.md (M up to 128) had direct ahead of
# blas at every M; cpu-paths-epyc-bf16dot-large.md (M 64-512) had it ahead at 64 and behind from
# 128. bitmap (50%): cpu-paths-epyc-bf16dot-bitmap.md, ahead up to 16 (AVX-512's kernel: 4). Not
# measured on an Intel CPU with AVX512_BF16 and VBMI2 (Sapphire Rapids and later: there the level
# takes AVX-512's crossovers).
_MEASURED_ZEN4_BF16DOT = {("2:4", CpuIsa.AVX512_BF16, _BF16): 64, ("bitmap", CpuIsa.AVX512_BF16, _BF16): 16}


def _with_bf16_level(table: dict) -> dict:
    """``table`` plus the AVX-512 + BF16 level's rows: AVX-512's, whose kernels it runs."""
    inherited = {(f, CpuIsa.AVX512_BF16, d): m for (f, isa, d), m in table.items() if isa is CpuIsa.AVX512}
    return {**table, **inherited}


THIS_CPU_IS_ZEN4 = is_zen4()  # read once: the limits below and the quantized binds depend on it
if has_amx():
    DIRECT_MAX_M.update(_MEASURED_AMX)
elif THIS_CPU_IS_ZEN4:
    DIRECT_MAX_M.update(_MEASURED_ZEN4)
elif is_zen3():
    DIRECT_MAX_M.update(_MEASURED_ZEN3)
DIRECT_MAX_M.update(_with_bf16_level(DIRECT_MAX_M))
if THIS_CPU_IS_ZEN4:
    DIRECT_MAX_M.update(_MEASURED_ZEN4_BF16DOT)


def _build_flags() -> list[str]:
    # baseline x86-64: the scalar path must run on any x86-64 CPU, whatever the compiler's default
    arch = ["-march=x86-64", "-mtune=generic"] if platform.machine() in ("x86_64", "AMD64") else []
    return ["-O3", "-fopenmp", *arch]


def compile_sources(
    sources: list[str], prefix: str = "sparsekit_cpu_kernels", functions: list[str] | None = None
):
    """The C++ ``sources`` built with sparsekit's flags as the module ``<prefix>_<hash>`` (the hash
    of the sources, torch and the flags: the binary depends on nothing else, no -march=native),
    binding ``functions`` (default ``FUNCTIONS``), its blas GEMM dtypes set from
    ``BLAS_FP32_DTYPES``. Raises what the build raises."""
    from torch.utils.cpp_extension import load_inline

    flags = _build_flags()
    digest = hashlib.sha1(torch.__version__.encode() + " ".join(flags).encode())
    for text in sources:
        digest.update(text.encode())
    module = load_inline(
        name=f"{prefix}_{digest.hexdigest()[:10]}",
        cpp_sources=sources,
        functions=FUNCTIONS if functions is None else functions,
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
    )
    if hasattr(module, "set_blas_fp32_dtypes"):  # a build of older sources may lack it
        module.set_blas_fp32_dtypes(_dtype_mask(BLAS_FP32_DTYPES))
    return module


class _ExtensionLoader:
    """Builds the C++ extension once per process on first use; remembers why when it cannot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.module = None
        self.error: str | None = None  # why the build failed (None: not tried yet, or built)
        self._tried = False

    def get(self):
        if self._tried:
            return self.module
        if os.environ.get("SPARSEKIT_CPU_EXT", "1") == "0":
            return None
        with self._lock:
            if not self._tried:
                self.module = self._build()
                self._tried = True
        return self.module

    def _build(self):
        try:
            module = compile_sources([p.read_text() for p in CPP_SOURCES])
        except Exception as e:  # no compiler, no ninja, exotic platform: stay correct, lose speed
            self.error = f"{type(e).__name__}: {e}"
            log.warning("sparsekit CPU extension did not build (%s); using the plain torch paths", e)
            return None
        _register_routed_ops(module)
        return module


def _register_routed_ops(module) -> None:
    """The build's dispatcher ops (``ROUTED_OPS``) with their fakes, once per process."""
    module.register_ops("sparsekit")
    for name, rows_arg in ROUTED_OPS.items():

        def fake(x, *args, _rows_arg=rows_arg):
            return x.new_empty((*x.shape[:-1], args[_rows_arg - 1].shape[0]))

        torch.library.register_fake(f"sparsekit::{name}", fake)


def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether ATen runs ``dtype``'s CPU GEMM natively: oneDNN takes bf16 with AVX-512 (BW, VL, DQ)
    or AMX, fp16 with AVX512-FP16 or AMX. Elsewhere ATen's fallback loop runs it several times
    slower than fp32 (an AVX2-only Zen 3 at 1536 x 576: bf16 3.9x at M = 16, 8.9x at M = 512;
    docs/data/cpu-rule-layers-zen3-before-2t.json)."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


BLAS_GEMM_MODES = ("auto", "fp32", "native")


def _blas_fp32_dtypes_from_env() -> frozenset[torch.dtype]:
    value = os.environ.get("SPARSEKIT_CPU_BLAS_GEMM", "auto")
    half = (torch.bfloat16, torch.float16)
    if value == "auto":
        return frozenset(d for d in half if not native_half_gemm(d))
    if value in BLAS_GEMM_MODES:
        return frozenset(half if value == "fp32" else ())
    raise ValueError(
        f"SPARSEKIT_CPU_BLAS_GEMM is {value!r}; choose auto (bf16 / fp16 blas GEMMs in fp32 where ATen "
        "has no native GEMM in them), fp32 (always) or native (never)"
    )


# half-precision dtypes whose blas paths (decompressed / dequantized tiles + ATen GEMM) widen x and
# each tile to fp32 and round y once; SPARSEKIT_CPU_BLAS_GEMM (read once at import) sets it: auto
# (default: those ATen has no native GEMM for on this CPU), fp32 or native
BLAS_FP32_DTYPES = _blas_fp32_dtypes_from_env()
_MASK_BITS = {torch.bfloat16: 1, torch.float16: 2}


def _dtype_mask(dtypes: Iterable[torch.dtype]) -> int:
    chosen = set(dtypes)
    unknown = chosen - set(_MASK_BITS)
    if unknown:
        names = sorted(map(str, unknown))
        raise ValueError(f"the blas GEMM can run in fp32 for bf16 / fp16 only, got {names}")
    return sum(_MASK_BITS[d] for d in chosen)


@contextmanager
def blas_gemm_in_fp32(dtypes: Iterable[torch.dtype]) -> Iterator[None]:
    """Within the block, the blas paths of layers in exactly ``dtypes`` (of bf16, fp16) run their GEMM
    in fp32, the others natively (the default is ``BLAS_FP32_DTYPES``): for tests and A/B benchmarks.
    Process-wide; a no-op without the C++ extension."""
    mask = _dtype_mask(dtypes)
    ext = extension()
    if ext is None:
        yield
        return
    before = ext.set_blas_fp32_dtypes(mask)
    try:
        yield
    finally:
        ext.set_blas_fp32_dtypes(before)


_LOADER = _ExtensionLoader()


def extension():
    """The compiled extension, building it on first use; None where it cannot build."""
    return _LOADER.get()


def build_error() -> str | None:
    """Why the extension did not build (None when it built, or has not been tried)."""
    return _LOADER.error


@torch.compiler.assume_constant_result
def extension_built() -> bool:
    """Whether the C++ extension built (building it on first use): what torch.compile asks while it
    traces a layer (a constant of the process; tracing ``extension()`` would enter its lock)."""
    return extension() is not None


@torch.compiler.assume_constant_result
def _best_level() -> int:
    ext = extension()
    return int(ext.cpu_isa_supported()) if ext is not None else ISA_LEVEL[CpuIsa.SCALAR]


def supported_isa() -> CpuIsa:
    """The best ISA level this CPU runs (CPUID, through the extension); SCALAR without the extension."""
    return _LEVEL_ISA[_best_level()]


def resolve_isa(isa: CpuIsa | str | None = None) -> CpuIsa:
    """The concrete ISA a CPU kernel runs: ``isa`` if given, else ``use_cpu_isa`` / SPARSEKIT_CPU_ISA;
    ``auto`` becomes the best this CPU runs. Raises a ValueError naming the fix for a level the CPU lacks."""
    requested = current_cpu_isa() if isa is None else CpuIsa.of(isa)
    best = supported_isa()
    if requested is CpuIsa.AUTO:
        return best
    if ISA_LEVEL[requested] > ISA_LEVEL[best]:
        source = "SPARSEKIT_CPU_ISA" if isa is None and cpu_isa_is_default() else "the requested ISA"
        lower = ", ".join(i.value for i, level in reversed(ISA_LEVEL.items()) if level <= ISA_LEVEL[best])
        raise ValueError(
            f"{source} is {requested.value!r}, but this CPU (or a build without the C++ extension) runs "
            f"at most {best.value!r}; choose one of {lower} or 'auto'"
        )
    return requested


def choose_path(fmt: str, isa: CpuIsa, dtype: torch.dtype, m: int, path: str = "auto") -> int:
    """0 (direct) or 1 (blas) for ``m`` rows of x; ``path`` 'direct' / 'blas' forces one."""
    if path not in PATHS:
        raise ValueError(f"unknown CPU kernel path {path!r}; choose one of {', '.join(PATHS)}")
    if path != "auto":
        return int(path == "blas")
    return int(m > DIRECT_MAX_M.get((fmt, isa, dtype), 8))


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB when unknown."""
    best = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = size_file.read_text().strip().upper()
            best = max(best, int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1))
        except (OSError, ValueError):
            continue
    return best or 32 * 2**20


def cpu_model() -> str:
    """This CPU's model name (Linux /proc/cpuinfo), else what ``platform`` reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_level(isa: CpuIsa) -> int:
    return ISA_LEVEL[isa]


def route_args(
    fmt: str,
    dtype: torch.dtype,
    k: int,
    direct_max_m: Callable[[CpuIsa], int] | None = None,
    isa: CpuIsa | str | None = None,
) -> tuple[int, int, int]:
    """The route arguments of a ``ROUTED_OPS`` op or a bound call (ISA level, elements of x up to
    which the direct kernel runs, blas tile bytes) for format ``fmt`` in ``dtype`` with K = ``k`` at
    ``isa`` (None: ``use_cpu_isa`` / SPARSEKIT_CPU_ISA); ``direct_max_m(isa)`` replaces
    ``DIRECT_MAX_M``'s rows.
    Callers pass x's K (under torch.compile a size that may be symbolic: the product stays a size
    expression instead of specializing the graph on K)."""
    chosen = resolve_isa(isa)
    rows = DIRECT_MAX_M.get((fmt, chosen, dtype), 8) if direct_max_m is None else direct_max_m(chosen)
    return ISA_LEVEL[chosen], rows * k, BLAS_TILE_BYTES


__all__ = [
    "BLAS_FP32_DTYPES",
    "BLAS_GEMM_MODES",
    "CPP_SOURCES",
    "compile_sources",
    "DIRECT_MAX_M",
    "PATHS",
    "blas_gemm_in_fp32",
    "build_error",
    "choose_path",
    "cpu_model",
    "extension",
    "extension_built",
    "isa_level",
    "native_half_gemm",
    "resolve_isa",
    "route_args",
    "supported_isa",
]
