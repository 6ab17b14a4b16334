"""Per-layer benchmark: dense ``F.linear`` against every sparse backend on real-model linear shapes.

Shapes come from the model configs in ``sparsekit/bench_shapes/*.json`` (no weights needed): each
shape gets a random weight pruned to the pattern, and every backend computes the same
``F.linear(x, weight_with_zeros)``. One runner, one ``setup_<backend>(case)`` factory per backend.

Columns: median time (p20..p80), speedup against the best dense baseline (eager or compiled,
whichever is faster at that shape and M), achieved GB/s (input + weight format + output bytes
over time), TFLOP/s (dense-equivalent 2*M*N*K over time), % of the measured roofline, and the
bytes of the weight format.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsekit._env import environment
from sparsekit.bench.roofline import Roofline, measure_roofline
from sparsekit.bench.timing import Rotation, Timing, copies_for, time_cpu_interleaved, time_gpu
from sparsekit.formats import NMPattern, parse_sparsity, pattern_mask
from sparsekit.kernels import use_backend
from sparsekit.kernels.cpu_ext import llc_bytes
from sparsekit.models import model_bytes

log = logging.getLogger(__name__)

SHAPES_DIR = Path(__file__).resolve().parent.parent / "bench_shapes"
_ALIASES = {"smollm2": "smollm2-135m", "default": "smollm2-135m"}

# CPU defaults finish in about a minute on two cores; the GPU defaults are the usual LLM sweep.
CPU_SHAPES = ("smollm2-135m", "llama-2-7b")
CPU_MS = (1, 16, 128)
GPU_SHAPES = ("llama-2-7b", "llama-3-8b", "llama-2-13b", "llama-2-70b")
GPU_MS = (1, 4, 16, 64, 256, 1024, 4096)
DENSE_BACKENDS = ("dense", "dense-compiled")
ALL_BACKENDS = (
    "dense",
    "dense-compiled",
    "2:4",
    "bitmap",
    "2:4-fastest",
    "bitmap-fastest",
    "masked",
    "int8",
    "int4",
    "2:4-int8",
    "int8-fastest",
    "int4-fastest",
    "2:4-int8-fastest",
    "dense-control",
    "cusparselt",
    "csr",
)


# ----------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class LinearShape:
    """One linear layer shape: y [M, n] = x [M, k] @ W [n, k].T; ``layers`` names those sharing it."""

    model: str
    layers: str
    n: int
    k: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.layers} ({self.n}x{self.k})"


def shipped_shapes() -> list[str]:
    """Names of the model configs shipped in ``sparsekit/bench_shapes``."""
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def load_shape_config(name: str) -> dict:
    """A shipped config by name ('llama-2-7b', 'smollm2'), or a model folder / hub id's config.json."""
    key = _ALIASES.get(name.lower(), name.lower())
    path = SHAPES_DIR / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if Path(name).is_dir() and (Path(name) / "config.json").is_file():
        cfg = json.loads((Path(name) / "config.json").read_text())
        cfg.setdefault("name", Path(name).name)
        return cfg
    raise ValueError(
        f"no shape config {name!r}: choose one of {', '.join(shipped_shapes())} "
        "or a model folder holding config.json"
    )


def linear_shapes(config: dict | str, dedupe: bool = True) -> list[LinearShape]:
    """A decoder block's q/k/v/o/gate/up/down shapes; layers of equal shape are merged (k_proj,v_proj)."""
    cfg = load_shape_config(config) if isinstance(config, str) else config
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    model = cfg.get("name", "model")
    raw = [
        ("q_proj", heads * head_dim, hidden),
        ("k_proj", kv_heads * head_dim, hidden),
        ("v_proj", kv_heads * head_dim, hidden),
        ("o_proj", hidden, heads * head_dim),
        ("gate_proj", inter, hidden),
        ("up_proj", inter, hidden),
        ("down_proj", hidden, inter),
    ]
    if not dedupe:
        return [LinearShape(model, name, n, k) for name, n, k in raw]
    merged: dict[tuple[int, int], list[str]] = {}
    for name, n, k in raw:
        merged.setdefault((n, k), []).append(name)
    return [LinearShape(model, ",".join(names), n, k) for (n, k), names in merged.items()]


# ----------------------------------------------------------------------------- backends
@dataclass
class Case:
    """One timed cell: a pruned weight [n, k] and an input [m, k], on ``device`` in ``dtype``."""

    shape: LinearShape
    m: int
    dtype: torch.dtype
    device: torch.device
    pattern: str
    weight: torch.Tensor  # dense with zeros
    mask: torch.Tensor
    x: torch.Tensor  # [1, m, k]
    isa: str | None = None  # CPU kernels' ISA level (None: use_cpu_isa / SPARSEKIT_CPU_ISA)


@dataclass
class Prepared:
    fn: Callable[[], torch.Tensor]
    weight_bytes: int
    impl: str
    replicate: Callable[[], Callable[[], torch.Tensor]] | None = None  # the same call on a copy of the weight
    read_bytes: int | None = None  # weight bytes a call reads, where not all it holds (a rule's dense copy)

    @property
    def bytes_read(self) -> int:
        return self.weight_bytes if self.read_bytes is None else self.read_bytes


class Unavailable(Exception):
    """This backend cannot run this case here; the message says why."""


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _module_call(module: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def fn() -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return fn


def _as_module(case: Case, fmt: str | None, cpu_rule: str = "sparse") -> Prepared:
    """The layer a model runs: nn.Linear (``fmt`` None) or SparseLinear in ``fmt``, called as a module
    (its CPU kernels at ``case.isa`` when set)."""
    from sparsekit.nn import SparseLinear
    from sparsekit.nn.cpu_rule import measured

    lin = nn.Linear(case.shape.k, case.shape.n, bias=False, device=case.device, dtype=case.dtype)
    with torch.no_grad():
        lin.weight.copy_(case.weight)
    module = lin if fmt is None else SparseLinear.from_linear(lin, mask=case.mask, format=fmt)
    if fmt is not None and case.isa:
        module.cpu_isa = case.isa
    if fmt is not None:
        module.cpu_rule = cpu_rule
    module.eval()
    blas = "cuBLAS" if case.device.type == "cuda" else "CPU BLAS"
    impl = f"SparseLinear({fmt})" if fmt else f"nn.Linear ({blas})"
    held, read = model_bytes(module), None
    if fmt is not None and case.device.type == "cpu":
        impl += f" {case.pattern}, {_cpu_route(case, fmt)}"
        if cpu_rule == "fastest":
            _module_call(module, case.x)()  # the rule decides for this M class (untimed)
            copy_bytes = module.dense_copy_bytes()
            held, read = held + copy_bytes, copy_bytes or None
            impl += (
                f", rule: fastest -> dense copy (+{copy_bytes / 1e6:.2f} MB held)"
                if copy_bytes
                else ", rule: fastest -> sparse kernel"
            )
            rule_ms = measured(module.rule_key(case.m))
            if rule_ms is not None:  # what the rule saw, beside what this table then measures
                impl += f" (rule measured sparse {rule_ms[0]:.4g} ms, dense {rule_ms[1]:.4g} ms)"
    return Prepared(
        _module_call(module, case.x),
        held,
        impl,
        replicate=lambda: _module_call(copy.deepcopy(module), case.x),
        read_bytes=read,
    )


def setup_dense(case: Case) -> Prepared:
    return _as_module(case, None)


def setup_dense_compiled(case: Case) -> Prepared:
    x = case.x
    compiled = torch.compile(F.linear, dynamic=False)
    compiled(x, case.weight)  # the compile is untimed

    def make(w: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: compiled(x, w)

    return Prepared(
        make(case.weight), _nbytes(case.weight), "torch.compile(F.linear)", lambda: make(case.weight.clone())
    )


def _check_24(case: Case) -> None:
    if not isinstance(parse_sparsity(case.pattern), NMPattern) or case.pattern.replace(" ", "") != "2:4":
        raise Unavailable("2:4 format needs --pattern 2:4")


def setup_24(case: Case) -> Prepared:
    _check_24(case)
    return _as_module(case, "2:4")


def setup_bitmap(case: Case) -> Prepared:
    return _as_module(case, "bitmap")


def setup_24_fastest(case: Case) -> Prepared:
    """2:4 with ``cpu_rule='fastest'``: dense on a kept copy where that measured faster (CPU)."""
    _check_24(case)
    return _as_module(case, "2:4", cpu_rule="fastest")


def setup_bitmap_fastest(case: Case) -> Prepared:
    return _as_module(case, "bitmap", cpu_rule="fastest")


def _repruned(case: Case, pattern: str) -> Case:
    """``case`` with its weight pruned to ``pattern`` instead, holding the cell's own input tensor:
    every row of a cell then reads the same x, as the layers of a model read one activation (a
    fresh x of equal values would cost the rows that hold it the cache misses of a second input:
    about 5% at M = 512 on EPYC-512, docs/results.md)."""
    return replace(make_case(case.shape, case.m, pattern, case.dtype, case.device), isa=case.isa, x=case.x)


def _dense_case(case: Case) -> Case:
    """The same shape, M and x with the weight unpruned (what a quantization baseline starts from)."""
    return _repruned(case, "0")


def setup_int8(case: Case) -> Prepared:
    """The unpruned weight, int8 per row (torch's weight-only int8 op on the CPU)."""
    return _as_module(_dense_case(case), "int8")


def setup_int4(case: Case) -> Prepared:
    """The unpruned weight, int4 in groups of 64 (torch's CPU int4 op)."""
    return _as_module(_dense_case(case), "int4")


def setup_24_int8(case: Case) -> Prepared:
    """The 2:4-pruned weight with int8 values (sparsekit's C++ kernel on the CPU)."""
    _check_24(case)
    return _as_module(case, "2:4-int8")


def setup_int8_fastest(case: Case) -> Prepared:
    """int8 under ``cpu_rule='fastest'`` (its dequantized copy where dense measured faster)."""
    return _as_module(_dense_case(case), "int8", cpu_rule="fastest")


def setup_int4_fastest(case: Case) -> Prepared:
    return _as_module(_dense_case(case), "int4", cpu_rule="fastest")


def setup_24_int8_fastest(case: Case) -> Prepared:
    _check_24(case)
    return _as_module(case, "2:4-int8", cpu_rule="fastest")


def setup_dense_control(case: Case) -> Prepared:
    """A second ``nn.Linear`` on the same weight, timed like any backend: the A/A control. Its
    speedup over ``dense`` is pure measurement noise (1.00x on a quiet machine); a row is only
    faster or slower than dense beyond the spread of this one."""
    return _as_module(case, None)


def setup_masked(case: Case) -> Prepared:
    return _as_module(case, "masked")


def setup_cusparselt(case: Case) -> Prepared:
    if case.device.type != "cuda":
        raise Unavailable("torch semi-structured sparsity (cuSPARSELt/CUTLASS) needs CUDA")
    if case.pattern.replace(" ", "") != "2:4":
        raise Unavailable("semi-structured sparsity is 2:4 only")
    if case.dtype not in (torch.float16, torch.bfloat16):
        raise Unavailable("semi-structured sparsity needs fp16/bf16 here")
    try:
        from torch.sparse import to_sparse_semi_structured

        w_sparse = to_sparse_semi_structured(case.weight)
    except (RuntimeError, ValueError) as exc:
        raise Unavailable(f"to_sparse_semi_structured failed: {exc}") from exc
    x = case.x
    parts = [getattr(w_sparse, a, None) for a in ("packed", "meta")]
    wbytes = _nbytes(*[p for p in parts if isinstance(p, torch.Tensor)]) or case.weight.numel() * (
        case.weight.element_size() // 2 + 1
    )
    impl = "cuSPARSELt" if "CUSPARSELT" in type(w_sparse).__name__.upper() else type(w_sparse).__name__
    return Prepared(lambda: F.linear(x, w_sparse), wbytes, impl)


def setup_csr(case: Case) -> Prepared:
    if case.device.type != "cpu":
        raise Unavailable("the CSR baseline is measured on the CPU only")
    xt = case.x.reshape(-1, case.shape.k).T.contiguous()

    def make(w_csr: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: (w_csr @ xt).T

    w_csr = case.weight.to_sparse_csr()
    wbytes = _nbytes(w_csr.values(), w_csr.col_indices(), w_csr.crow_indices())
    return Prepared(make(w_csr), wbytes, "torch CSR (MKL)", lambda: make(case.weight.to_sparse_csr()))


def _cpu_route(case: Case, fmt: str) -> str:
    """'<isa> direct|blas': which C++ kernel path a CPU SparseLinear runs for this case."""
    from sparsekit.kernels import cpu_ext
    from sparsekit.kernels.quant import cpu_route

    if fmt in ("int8", "int4"):
        return cpu_route(fmt, case.dtype, case.m)
    if fmt not in ("2:4", "bitmap", "2:4-int8"):
        return "torch"
    if cpu_ext.extension() is None:
        if case.isa:
            raise Unavailable(f"@{case.isa} needs the C++ CPU extension: {cpu_ext.build_error()}")
        return "plain-torch fallback (no C++ extension)"
    try:
        isa = cpu_ext.resolve_isa(case.isa)
    except ValueError as exc:  # an ISA this CPU lacks: a skipped cell, not a failed run
        raise Unavailable(str(exc)) from exc
    if fmt == "2:4-int8":
        return f"{isa.value} {cpu_route(fmt, case.dtype, case.m, isa)}"
    path = ("direct", "blas")[cpu_ext.choose_path(fmt, isa, case.dtype, case.m)]
    return f"{isa.value} {path}"


def parse_backend(spec: str) -> tuple[str, str | None, str | None]:
    """'bitmap=0.7@avx2' -> ('bitmap', '0.7', 'avx2'): a setup name, an optional sparsity of its own
    (the weight re-pruned to it, instead of the run's ``pattern``) and an optional CPU ISA."""
    name, _, isa = spec.partition("@")
    name, _, sparsity = name.partition("=")
    if name not in SETUPS:
        raise ValueError(
            f"unknown backend {spec!r}; choose from {', '.join(ALL_BACKENDS)} (optionally =SPARSITY, @ISA)"
        )
    return name, sparsity or None, isa or None


def setup_case(spec: str, case: Case) -> Prepared:
    """Run ``spec``'s setup on ``case``, re-pruned to the spec's own sparsity and at its ISA."""
    name, sparsity, isa = parse_backend(spec)
    if sparsity is not None:
        case = _repruned(case, sparsity)
    if isa is not None:
        case = replace(case, isa=isa)
    return SETUPS[name](case)


def expand_isas(backends: tuple[str, ...], isas: tuple[str, ...] | None) -> tuple[str, ...]:
    """Each SparseLinear backend once per ISA ('2:4' -> '2:4@avx512', '2:4@avx2'); dense and the
    library baselines stay single."""
    if not isas:
        return backends
    out: list[str] = []
    for spec in backends:
        name = parse_backend(spec)[0]
        if name in SPARSE_LINEAR_BACKENDS and "@" not in spec:
            out.extend(f"{spec}@{isa}" for isa in isas)
        else:
            out.append(spec)
    return tuple(out)


SPARSE_LINEAR_BACKENDS = (
    "2:4", "bitmap", "2:4-fastest", "bitmap-fastest", "masked", "2:4-int8", "2:4-int8-fastest",
)  # fmt: skip

SETUPS: dict[str, Callable[[Case], Prepared]] = {
    "dense": setup_dense,
    "dense-compiled": setup_dense_compiled,
    "2:4": setup_24,
    "bitmap": setup_bitmap,
    "2:4-fastest": setup_24_fastest,
    "bitmap-fastest": setup_bitmap_fastest,
    "masked": setup_masked,
    "int8": setup_int8,
    "int8-fastest": setup_int8_fastest,
    "int4-fastest": setup_int4_fastest,
    "2:4-int8-fastest": setup_24_int8_fastest,
    "dense-control": setup_dense_control,
    "int4": setup_int4,
    "2:4-int8": setup_24_int8,
    "cusparselt": setup_cusparselt,
    "csr": setup_csr,
}


def default_backends(device: torch.device | str, pattern: str) -> tuple[str, ...]:
    """CPU: eager dense and the SparseLinear CPU paths (torch.compile of a lone linear lowers to the
    same BLAS call there, at a compile per shape). GPU: eager and compiled dense, the Triton
    kernels, and torch semi-structured (2:4 only)."""
    is_24 = pattern.replace(" ", "") == "2:4"
    if torch.device(device).type == "cuda":
        out = ["dense", "dense-compiled", "2:4", "bitmap", "masked", "cusparselt"]
    else:
        out = ["dense", "2:4", "bitmap", "masked"]
    if not is_24:
        out = [b for b in out if b not in ("2:4", "cusparselt")]
    return tuple(out)


# ----------------------------------------------------------------------------- runner
@dataclass
class LayerRow:
    model: str
    layers: str
    n: int
    k: int
    m: int
    dtype: str
    pattern: str
    backend: str
    impl: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str
    weight_bytes: int
    moved_bytes: int
    gbps: float
    tflops: float
    roofline_pct: float
    speedup: float = float("nan")  # best dense median / this median
    env: dict = field(default_factory=dict)


@dataclass
class LayersResult:
    env: dict
    roofline: dict
    config: dict
    rows: list[LayerRow]
    skipped: list[str]

    def to_dict(self) -> dict:
        return {
            "env": self.env,
            "roofline": self.roofline,
            "config": self.config,
            "rows": [asdict(r) for r in self.rows],
            "skipped": self.skipped,
        }


def _row_env(env: dict) -> dict:
    keys = ("device", "torch", "triton", "commit", "time_utc", "cpu", "cpu_threads", "capability", "cuda")
    return {k: env[k] for k in keys if k in env}


def make_case(
    shape: LinearShape, m: int, pattern: str, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> Case:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(shape.n, shape.k, generator=gen) / shape.k**0.5
    mask = pattern_mask(w.abs(), parse_sparsity(pattern))
    w = (w * mask).to(device=device, dtype=dtype)
    # [1, M, K]: what a batch-1 model passes a linear (a 3-D input takes a slower path than 2-D
    # in F.linear on the CPU, so a 2-D benchmark would flatter dense)
    x = torch.randn(1, m, shape.k, generator=gen).to(device=device, dtype=dtype)
    return Case(shape, m, dtype, device, pattern, w, mask.to(device), x)


def run_layers(
    shapes: list[LinearShape],
    ms: tuple[int, ...],
    pattern: str = "2:4",
    backends: tuple[str, ...] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    cuda_graphs: bool = False,
    min_time_s: float = 0.1,
    cold: bool = True,
    show_progress: bool = True,
    pool_bytes: int | None = None,
    isas: tuple[str, ...] | None = None,
) -> LayersResult:
    """Time every backend at every (shape, M); speedups against the best dense baseline per cell.

    CPU runs use the sparse ops' torch / C++ paths (``use_backend("torch")``: never the Triton
    interpreter), each layer called as the module a model holds (``nn.Linear`` / ``SparseLinear``),
    timed round-robin (every backend sees the same contention). With ``cold`` (default) every
    backend rotates over copies of its layer adding up to ``pool_bytes`` (default twice the
    last-level cache; a model's own size reproduces what its decode streams between two uses of a
    layer), so each call reads its weight from DRAM as a decode step does (``Rotation``);
    ``cold=False`` times one cache-resident copy. On CUDA the Triton kernels run, timed with
    ``triton.testing.do_bench``
    (L2 flush; ``do_bench_cudagraph`` for M <= 64 when ``cuda_graphs``).

    Backends are names from ``SETUPS``, optionally with their own sparsity and CPU ISA:
    ``bitmap=0.7@avx2`` is the bitmap format of the weight pruned to 70% at the AVX2 kernels.
    ``isas`` ('avx512-bf16', 'avx512', 'avx2', 'scalar') repeats every SparseLinear backend once per ISA, all
    interleaved in the same rounds as dense.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    parse_sparsity(pattern)
    backends = expand_isas(tuple(backends or default_backends(device, pattern)), isas)
    for spec in backends:
        parse_backend(spec)  # raises for an unknown name
    rotate = device.type == "cpu" and cold
    pool = pool_bytes or 2 * llc_bytes()
    with use_backend("torch" if device.type == "cpu" else "auto"):
        env = environment()
        roof = measure_roofline(str(device), dtype)
        rows: list[LayerRow] = []
        skipped: list[str] = []
        cells = [(s, m) for s in shapes for m in ms]
        for shape, m in tqdm(cells, desc="layers", disable=not show_progress):
            case = make_case(shape, m, pattern, dtype, device)
            prepared: dict[str, Prepared] = {}
            for backend in backends:
                try:
                    prepared[backend] = setup_case(backend, case)
                except Unavailable as exc:
                    if backend not in {s.split(" @ ")[0] for s in skipped}:
                        log.info("skipping %s: %s", backend, exc)
                    skipped.append(f"{backend} @ {shape.label} M={m}: {exc}")
            if device.type == "cpu":
                fns = {b: _rotated(p, pool) if rotate else p.fn for b, p in prepared.items()}
                timings = time_cpu_interleaved(fns, min_time_s=min_time_s)
                for b, fn in fns.items():
                    if isinstance(fn, Rotation):
                        timings[b].method += f", weight rotated over {len(fn.fns)} copies ({pool >> 20} MiB)"
                del fns
            else:
                timings = {b: time_gpu(p.fn, cuda_graph=cuda_graphs and m <= 64) for b, p in prepared.items()}
            cell_rows = [_row(case, b, p, timings[b], roof, env) for b, p in prepared.items()]
            dense = [r.median_ms for r in cell_rows if parse_backend(r.backend)[0] in DENSE_BACKENDS]
            best = min(dense) if dense else float("nan")
            for r in cell_rows:
                r.speedup = best / r.median_ms
            rows.extend(cell_rows)
            log.debug(
                "%s M=%d: %s",
                shape.label,
                m,
                ", ".join(f"{r.backend} {r.median_ms:.3f} ms" for r in cell_rows),
            )
            del case, prepared
    config = {
        "shapes": [asdict(s) for s in shapes],
        "ms": list(ms),
        "pattern": pattern,
        "backends": list(backends),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "cuda_graphs": cuda_graphs,
        "cold": rotate,
        "isas": list(isas or ()),
        **(_cpu_kernel_config() if device.type == "cpu" else {}),
        "timer": (
            "median of interleaved repeats (p20..p80), "
            + (f"weights from DRAM (rotated over {pool / 2**20:.0f} MiB)" if rotate else "cache-resident")
            if device.type == "cpu"
            else "triton.testing.do_bench (L2 flush, median, p20..p80)"
        ),
    }
    return LayersResult(env, roof.to_dict(), config, rows, skipped)


def _cpu_kernel_config() -> dict:
    """The C++ CPU kernels' ISA levels and path thresholds, for the report."""
    from sparsekit.kernels import cpu_ext

    ext = cpu_ext.extension()
    return {
        "cpu_isa_supported": cpu_ext.supported_isa().value if ext is not None else None,
        "cpu_isa_default": cpu_ext.resolve_isa().value if ext is not None else None,
        "cpu_extension": "built" if ext is not None else f"not built: {cpu_ext.build_error()}",
        "direct_max_m": {
            f"{f} {i.value} {str(d).replace('torch.', '')}": m
            for (f, i, d), m in cpu_ext.DIRECT_MAX_M.items()
        },
    }


def _rotated(prepared: Prepared, pool_bytes: int) -> Rotation | Callable[[], torch.Tensor]:
    """``prepared`` rotated over copies of its weight adding up to ``pool_bytes``, warmed once."""
    if prepared.replicate is None:
        return prepared.fn
    n = copies_for(prepared.bytes_read, pool_bytes)  # each copy's call reads this much
    rotation = Rotation([prepared.fn] + [prepared.replicate() for _ in range(n - 1)])
    rotation.warm()
    return rotation


def _row(case: Case, backend: str, prepared: Prepared, timing: Timing, roof: Roofline, env: dict) -> LayerRow:
    m, n, k = case.m, case.shape.n, case.shape.k
    el = case.x.element_size()
    moved = m * k * el + prepared.bytes_read + m * n * el
    flops = 2.0 * m * n * k
    sec = timing.median_ms * 1e-3
    return LayerRow(
        model=case.shape.model,
        layers=case.shape.layers,
        n=n,
        k=k,
        m=m,
        dtype=str(case.dtype).replace("torch.", ""),
        pattern=case.pattern,
        backend=backend,
        impl=prepared.impl,
        median_ms=timing.median_ms,
        p20_ms=timing.p20_ms,
        p80_ms=timing.p80_ms,
        timer=timing.method,
        weight_bytes=prepared.weight_bytes,
        moved_bytes=moved,
        gbps=moved / sec / 1e9,
        tflops=flops / sec / 1e12,
        roofline_pct=100.0 * roof.bound_ms(moved, flops) / timing.median_ms,
        env=_row_env(env),
    )


# ----------------------------------------------------------------------------- reports
def layers_markdown(result: LayersResult) -> str:
    """One table per shape: time, speedup against the best dense, GB/s, TFLOP/s, % roofline, MB."""
    roof = result.roofline
    cfg = result.config
    env = result.env
    lines = [
        f"Device: {env.get('device')} ({env.get('cpu')}, {env.get('cpu_threads')} threads), "
        f"{cfg['dtype']}, pattern {cfg['pattern']}; torch {env.get('torch')}, commit {env.get('commit')}, "
        f"{env.get('time_utc')}.",
        f"Measured roofline: copy {roof['copy_gbps']:.1f} GB/s, dense matmul {roof['matmul_tflops']:.3f} "
        f"TFLOP/s ({roof['dtype']}). Speedup is against the best dense baseline at that shape and M; "
        "TFLOP/s counts the dense 2*M*N*K; GB/s counts input + the weight bytes a call reads + output "
        "bytes; weight MB is what the layer holds (under a CPU rule, its dense copy included).",
        "",
    ]
    groups: dict[tuple[str, str, int, int], list[LayerRow]] = {}
    for r in result.rows:
        groups.setdefault((r.model, r.layers, r.n, r.k), []).append(r)
    for (model, layers, n, k), rows in groups.items():
        lines += [
            f"**{model} {layers}** (N={n}, K={k})",
            "",
            "| M | backend | ms (p20..p80) | speedup | GB/s | TFLOP/s | % roofline | weight MB |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r.m} | {r.backend} | {r.median_ms:.3f} ({r.p20_ms:.3f}..{r.p80_ms:.3f}) | "
                f"{r.speedup:.2f}x | {r.gbps:.1f} | {r.tflops:.3f} | {r.roofline_pct:.0f}% | "
                f"{r.weight_bytes / 1e6:.2f} |"
            )
        lines.append("")
    if cfg.get("threads_note"):
        lines.append(f"Note: {cfg['threads_note']}.")
    if result.skipped:
        reasons = sorted({s.split(" @ ")[0] + ":" + s.split(":", 2)[-1] for s in result.skipped})
        lines.append("Skipped: " + "; ".join(reasons))
    return "\n".join(lines).rstrip() + "\n"


def write_layers_report(result: LayersResult, out: str | Path, stem: str = "layers") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` (speedup vs M per shape) to ``out``."""
    from sparsekit.bench.plots import plot_layer_speedups, write_report

    plot = lambda path: plot_layer_speedups(result.rows, path)
    return write_report(out, stem, result.to_dict(), layers_markdown(result), plot)
