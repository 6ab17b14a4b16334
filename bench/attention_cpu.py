"""Causal attention on the CPU: sparsekit's kernels (bf16, fp32) against torch SDPA, interleaved.

    python bench/attention_cpu.py --out docs/data/attention-cpu-epyc [--rounds 9 --threads 2]
    python bench/attention_cpu.py --dtype fp32 --out docs/data/attention-cpu-fp32-zen3

Each shape is (B, H, KV, S, D): query heads H sharing KV key heads, S tokens, head dim D. SDPA runs
as transformers' 'sdpa' attention calls it in a calibration forward (keys repeated to H heads,
``is_causal=True``), the kernel on the key heads directly (``causal_attention_cpu``). Before timing,
each shape's outputs are checked against float64 SDPA: the kernel's error may exceed SDPA's in the
same dtype by at most a quarter plus 2e-3 in bf16, twice plus 1e-6 in fp32, or the script stops.
Rounds alternate the order of the two; the report gives the median ms, p20..p80 and GFLOP/s of the
causal triangle (4 S (S + 1) / 2 D per head, both products).

``--real-model smollm2`` adds real inputs: the q / k / v every decoder block of the model
computes (under bf16 autocast for ``--dtype bf16``, in fp32 for fp32) on 8 x 512 offline
calibration tokens (seed 0), and per block the relative (Frobenius) and max |error| of SDPA and of
the kernel against float64 SDPA.

``--dtype bf16`` (the default) needs a CPU with AVX-512 + AVX512_BF16 + VBMI2 (``avx512-bf16``),
``fp32`` one with AVX2 + FMA; elsewhere it stops and says so.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bf16dot_report import require_avx512_bf16, write_report
from torch.nn.attention import SDPBackend

from sparsekit.kernels import cpu_ext
from sparsekit.kernels._backend import CpuIsa
from sparsekit.kernels.attention_cpu import causal_attention_cpu, causal_attention_reference

SHAPES = {  # name -> (B, H, KV, S, D)
    "smollm2-calib": (8, 9, 3, 512, 64),  # sparsekit's calibration chunk: 8 x 512 tokens
    "smollm2-2048": (1, 9, 3, 2048, 64),
    "llama-3-8b-calib": (2, 32, 8, 512, 128),
    "llama-3-8b-2048": (1, 32, 8, 2048, 128),
}
VARIANTS = ("sdpa", "kernel")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# the kernel's max |error| against float64 may exceed SDPA's by this factor plus this constant
TOLERANCE = {torch.bfloat16: (1.25, 2e-3), torch.float32: (2.0, 1e-6)}


def _inputs(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, kv, s, d = shape
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, n, s, d, generator=g).to(dtype) for n in (h, kv, kv))


def require_isa(dtype: torch.dtype) -> None:
    """Exit naming the reason unless this CPU runs ``dtype``'s kernel."""
    if dtype == torch.bfloat16:
        require_avx512_bf16("the bf16 attention kernel and this benchmark")
        return
    if cpu_ext.extension() is None:
        raise SystemExit(f"sparsekit's C++ CPU extension did not build here ({cpu_ext.build_error()})")
    if cpu_ext.supported_isa() is CpuIsa.SCALAR:
        raise SystemExit("this CPU runs no AVX2: the fp32 attention kernel needs AVX2 + FMA")


def _run(variant: str, q, k, v) -> torch.Tensor:
    return causal_attention_reference(q, k, v) if variant == "sdpa" else causal_attention_cpu(q, k, v)


def sdpa_backend(shape: tuple[int, ...], dtype: torch.dtype) -> str:
    """The backend torch's SDPA picks for the reference's call on ``shape`` (keys repeated, causal,
    ``dtype``), e.g. FLASH_ATTENTION (its CPU flash kernel) or MATH."""
    b, h, _, s, d = shape
    q = torch.empty(b, h, s, d, dtype=dtype)
    return SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name


def check(shape: tuple[int, ...], dtype: torch.dtype) -> dict:
    """The kernel's and SDPA's max |error| against float64 SDPA; exits when the kernel's is off."""
    q, k, v = _inputs(shape, dtype)
    exact = causal_attention_reference(q.double(), k.double(), v.double())
    errors = {name: (_run(name, q, k, v).double() - exact).abs().max().item() for name in VARIANTS}
    factor, floor = TOLERANCE[dtype]
    if errors["kernel"] > factor * errors["sdpa"] + floor:
        kernel, sdpa = errors["kernel"], errors["sdpa"]
        raise SystemExit(f"{shape}: kernel error {kernel:.3g} against {dtype} SDPA's {sdpa:.3g}")
    return errors


def measure(
    shape: tuple[int, ...], dtype: torch.dtype, rounds: int, min_time: float
) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``rounds`` interleaved rounds of at least ``min_time`` s."""
    q, k, v = _inputs(shape, dtype)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for name in VARIANTS:
        _run(name, q, k, v)  # warm-up
    for r in range(rounds):
        for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            calls, started = 0, time.perf_counter()
            while True:
                _run(name, q, k, v)
                calls += 1
                elapsed = time.perf_counter() - started
                if elapsed >= min_time:
                    break
            times[name].append(elapsed / calls)
    return times


def _quantile(values: list[float], p: float) -> float:
    """The ``p`` decile (0.2: p20) of ``values``; the value itself when there is one."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[int(p * 10) - 1]


def rows_for(shapes: list[str], dtype: torch.dtype, rounds: int, min_time: float) -> list[dict]:
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        b, h, _, s, d = shape
        flops = 4 * b * h * d * s * (s + 1) / 2
        errors = check(shape, dtype)
        backends = {"sdpa": sdpa_backend(shape, dtype), "kernel": "sparsekit"}
        times = measure(shape, dtype, rounds, min_time)
        for variant in VARIANTS:
            t = times[variant]
            med = statistics.median(t)
            rows.append({
                "shape": name, "bhksd": list(shape), "variant": variant, "backend": backends[variant],
                "ms": med * 1e3,
                "p20": _quantile(t, 0.2) * 1e3, "p80": _quantile(t, 0.8) * 1e3, "gflops": flops / med / 1e9,
                "max_abs_error": errors[variant], "speedup": statistics.median(times["sdpa"]) / med,
            })  # fmt: skip
    return rows


def real_inputs(model_name: str, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]]:
    """(q, k, v, scale) of every decoder block's attention in ``dtype``, from one forward of
    ``model_name`` (under bf16 autocast for bf16) on 8 x 512 offline calibration tokens."""
    from transformers.modeling_utils import AttentionInterface

    from sparsekit.hf.data import calibration_ids
    from sparsekit.hf.models import load_model

    model, tokenizer = load_model(model_name)
    ids = calibration_ids(tokenizer, "wiki-offline", 8, 512, 0)
    original = AttentionInterface._global_mapping["sdpa"]
    seen = []

    def record(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.to(dtype), key.to(dtype), value.to(dtype), kwargs.get("scaling")))
        return original(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("sdpa", record)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            model(ids, use_cache=False)
    finally:
        AttentionInterface.register("sdpa", original)
    return seen


def real_rows(model_name: str, dtype: torch.dtype) -> list[dict]:
    """Per block: relative and max |error| against float64 SDPA of SDPA, of the kernel, and (bf16)
    of fp32 SDPA on the same bf16 inputs rounded once to bf16 (the floor: the output's rounding)."""
    rows = []
    for block, (q, k, v, scale) in enumerate(real_inputs(model_name, dtype)):
        exact = causal_attention_reference(q.double(), k.double(), v.double(), scale)
        row = {"block": block, "shape": list(q.shape)}
        outs = [
            ("sdpa", causal_attention_reference(q, k, v, scale)),
            ("kernel", causal_attention_cpu(q, k, v, scale)),
        ]
        if dtype == torch.bfloat16:
            once = causal_attention_reference(q.float(), k.float(), v.float(), scale).bfloat16()
            outs.append(("fp32", once))
        for name, out in outs:
            diff = out.double() - exact
            row[f"{name}_rel"] = (diff.norm() / exact.norm()).item()
            row[f"{name}_max"] = diff.abs().max().item()
        rows.append(row)
    return rows


def real_markdown(rows: list[dict], model_name: str) -> str:
    kernel_over = [r["kernel_rel"] / r["sdpa_rel"] for r in rows]
    median, low, high = statistics.median(kernel_over), min(kernel_over), max(kernel_over)
    once = "fp32_rel" in rows[0]
    how = "under bf16 autocast" if once else "in fp32"
    lines = [
        "", f"Real inputs: {model_name}, every decoder block's q / k / v {how} (8 x 512 "
        f"calibration tokens); kernel's relative error over SDPA's: median {median:.4f}, "
        f"range {low:.4f}-{high:.4f}.", "",
    ]  # fmt: skip
    if once:
        lines += [
            "fp32 once: fp32 attention on the same bf16 inputs, rounded once to bf16, the error "
            "of the output's rounding alone.", "",
        ]  # fmt: skip
    lines += [
        "| block | SDPA rel error | kernel rel error | SDPA max abs | kernel max abs |"
        + (" fp32 once rel |" if once else ""),
        "|---:|---:|---:|---:|---:|" + ("---:|" if once else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['block']} | {r['sdpa_rel']:.3e} | {r['kernel_rel']:.3e} | {r['sdpa_max']:.3e} "
            f"| {r['kernel_max']:.3e} |" + (f" {r['fp32_rel']:.3e} |" if once else "")
        )
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header, "",
        "| shape (B, H, KV, S, D) | variant | backend | ms (p20..p80) | GFLOP/s (triangle) | x SDPA "
        "| max abs error vs float64 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        spread = f"{r['ms']:.2f} ({r['p20']:.2f}..{r['p80']:.2f})"
        lines.append(
            f"| {r['shape']} {tuple(r['bhksd'])} | {r['variant']} | {r.get('backend', '-')} | {spread} "
            f"| {r['gflops']:.0f} "
            f"| {r['speedup']:.2f} | {r['max_abs_error']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for attention-cpu.{json,md}")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (median over them)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per variant and round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--real-model", default=None, help="also check every block's real inputs (smollm2)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="which kernel: bf16 or fp32")
    args = parser.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        parser.error(f"--shapes: unknown {unknown or 'none given'}; choose from {', '.join(SHAPES)}")
    if args.rounds < 1 or args.min_time <= 0 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1 and --min-time above 0")
    dtype = DTYPES[args.dtype]
    require_isa(dtype)
    torch.set_num_threads(args.threads)
    real = (
        real_rows(args.real_model, dtype) if args.real_model else []
    )  # a bad model name stops before timing
    rows = rows_for(shapes, dtype, args.rounds, args.min_time)
    for row in real:
        rows.append({"shape": f"{args.real_model} block {row['block']}", "variant": "real-inputs", **row})

    def full_markdown(all_rows: list[dict], header: str) -> str:
        timed = [r for r in all_rows if r["variant"] != "real-inputs"]
        text = markdown(timed, header)
        return text + (real_markdown(real, args.real_model) if real else "")

    print(write_report(args.out, "attention-cpu", "attention_cpu.py", argv, rows, full_markdown))


if __name__ == "__main__":
    main()
