"""Causal bf16 attention on the CPU: sparsekit's kernel against torch SDPA, interleaved.

    python bench/attention_cpu.py --out docs/data/attention-cpu-epyc [--rounds 9 --threads 2]

Each shape is (B, H, KV, S, D): query heads H sharing KV key heads, S tokens, head dim D. SDPA runs
as transformers' 'sdpa' attention calls it in a calibration forward (keys repeated to H heads,
``is_causal=True``), the kernel on the key heads directly (``causal_attention_cpu``). Before timing,
each shape's outputs are checked against float64 SDPA: the kernel's error may exceed bf16 SDPA's by
at most a quarter (plus 2e-3), or the script stops. Rounds alternate the order of the two; the
report gives the median ms, p20..p80 and GFLOP/s of the causal triangle (4 S (S + 1) / 2 D per
head, both products).

``--real-model smollm2`` adds real inputs: the q / k / v every decoder block of the model
computes under bf16 autocast on 8 x 512 offline calibration tokens (seed 0), and per block the
relative (Frobenius) and max |error| of bf16 SDPA and of the kernel against float64 SDPA.

Needs a CPU with AVX-512 + AVX512_BF16 + VBMI2 (``avx512-bf16``); elsewhere it stops and says so.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bf16dot_report import require_avx512_bf16, write_report
from torch.nn.attention import SDPBackend

from sparsekit.kernels.attention_cpu import causal_attention_cpu, causal_attention_reference

SHAPES = {  # name -> (B, H, KV, S, D)
    "smollm2-calib": (8, 9, 3, 512, 64),  # sparsekit's calibration chunk: 8 x 512 tokens
    "smollm2-2048": (1, 9, 3, 2048, 64),
    "llama-3-8b-calib": (2, 32, 8, 512, 128),
    "llama-3-8b-2048": (1, 32, 8, 2048, 128),
}
VARIANTS = ("sdpa", "kernel")


def _inputs(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, kv, s, d = shape
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, n, s, d, generator=g).bfloat16() for n in (h, kv, kv))


def _run(variant: str, q, k, v) -> torch.Tensor:
    return causal_attention_reference(q, k, v) if variant == "sdpa" else causal_attention_cpu(q, k, v)


def sdpa_backend(shape: tuple[int, ...]) -> str:
    """The backend torch's SDPA picks for the reference's call on ``shape`` (keys repeated, causal,
    bf16), e.g. FLASH_ATTENTION (its CPU flash kernel) or MATH."""
    b, h, _, s, d = shape
    q = torch.empty(b, h, s, d, dtype=torch.bfloat16)
    return SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name


def check(shape: tuple[int, ...]) -> dict:
    """The kernel's and bf16 SDPA's max |error| against float64 SDPA; exits when the kernel's is off."""
    q, k, v = _inputs(shape)
    exact = causal_attention_reference(q.double(), k.double(), v.double())
    errors = {name: (_run(name, q, k, v).double() - exact).abs().max().item() for name in VARIANTS}
    if errors["kernel"] > 1.25 * errors["sdpa"] + 2e-3:
        kernel, sdpa = errors["kernel"], errors["sdpa"]
        raise SystemExit(f"{shape}: kernel error {kernel:.3g} against bf16 SDPA's {sdpa:.3g}")
    return errors


def measure(shape: tuple[int, ...], rounds: int, min_time: float) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``rounds`` interleaved rounds of at least ``min_time`` s."""
    q, k, v = _inputs(shape)
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


def rows_for(shapes: list[str], rounds: int, min_time: float) -> list[dict]:
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        b, h, _, s, d = shape
        flops = 4 * b * h * d * s * (s + 1) / 2
        errors = check(shape)
        backends = {"sdpa": sdpa_backend(shape), "kernel": "sparsekit"}
        times = measure(shape, rounds, min_time)
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


def real_inputs(model_name: str) -> list[tuple[torch.Tensor, ...]]:
    """(q, k, v, scale) of every decoder block's attention, bf16, from one autocast forward of
    ``model_name`` on 8 x 512 offline calibration tokens."""
    from transformers.modeling_utils import AttentionInterface

    from sparsekit.hf.data import calibration_ids
    from sparsekit.hf.models import load_model

    model, tokenizer = load_model(model_name)
    ids = calibration_ids(tokenizer, "wiki-offline", 8, 512, 0)
    original = AttentionInterface._global_mapping["sdpa"]
    seen = []

    def record(module, query, key, value, attention_mask, **kwargs):
        seen.append((query.bfloat16(), key.bfloat16(), value.bfloat16(), kwargs.get("scaling")))
        return original(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("sdpa", record)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, use_cache=False)
    finally:
        AttentionInterface.register("sdpa", original)
    return seen


def real_rows(model_name: str) -> list[dict]:
    """Per block: relative and max |error| against float64 SDPA of bf16 SDPA, of the kernel, and of
    fp32 SDPA on the same bf16 inputs rounded once to bf16 (the floor: only the output's rounding)."""
    rows = []
    for block, (q, k, v, scale) in enumerate(real_inputs(model_name)):
        exact = causal_attention_reference(q.double(), k.double(), v.double(), scale)
        row = {"block": block, "shape": list(q.shape)}
        for name, out in (
            ("sdpa", causal_attention_reference(q, k, v, scale)),
            ("kernel", causal_attention_cpu(q, k, v, scale)),
            ("fp32", causal_attention_reference(q.float(), k.float(), v.float(), scale).bfloat16()),
        ):
            diff = out.double() - exact
            row[f"{name}_rel"] = (diff.norm() / exact.norm()).item()
            row[f"{name}_max"] = diff.abs().max().item()
        rows.append(row)
    return rows


def real_markdown(rows: list[dict], model_name: str) -> str:
    kernel_over = [r["kernel_rel"] / r["sdpa_rel"] for r in rows]
    median, low, high = statistics.median(kernel_over), min(kernel_over), max(kernel_over)
    lines = [
        "", f"Real inputs: {model_name}, every decoder block's q / k / v under bf16 autocast (8 x 512 "
        f"calibration tokens); kernel's relative error over SDPA's: median {median:.4f}, "
        f"range {low:.4f}-{high:.4f}.", "",
        "fp32 once: fp32 attention on the same bf16 inputs, rounded once to bf16, the error "
        "of the output's rounding alone.", "",
        "| block | SDPA rel error | kernel rel error | SDPA max abs | kernel max abs | fp32 once rel |",
        "|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['block']} | {r['sdpa_rel']:.3e} | {r['kernel_rel']:.3e} | {r['sdpa_max']:.3e} "
            f"| {r['kernel_max']:.3e} | {r['fp32_rel']:.3e} |"
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
    args = parser.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        parser.error(f"--shapes: unknown {unknown or 'none given'}; choose from {', '.join(SHAPES)}")
    if args.rounds < 1 or args.min_time <= 0 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1 and --min-time above 0")
    require_avx512_bf16("the attention kernel and this benchmark")
    torch.set_num_threads(args.threads)
    real = real_rows(args.real_model) if args.real_model else []  # a bad model name stops before timing
    rows = rows_for(shapes, args.rounds, args.min_time)
    for row in real:
        rows.append({"shape": f"{args.real_model} block {row['block']}", "variant": "real-inputs", **row})

    def full_markdown(all_rows: list[dict], header: str) -> str:
        timed = [r for r in all_rows if r["variant"] != "real-inputs"]
        text = markdown(timed, header)
        return text + (real_markdown(real, args.real_model) if real else "")

    print(write_report(args.out, "attention-cpu", "attention_cpu.py", argv, rows, full_markdown))


if __name__ == "__main__":
    main()
