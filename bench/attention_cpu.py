"""Causal bf16 attention on the CPU: sparsekit's kernel against torch SDPA, interleaved.

    python bench/attention_cpu.py --out docs/data/attention-cpu-epyc [--rounds 9 --threads 2]

Each shape is (B, H, KV, S, D): query heads H sharing KV key heads, S tokens, head dim D. SDPA runs
as transformers' 'sdpa' attention calls it in a calibration forward (keys repeated to H heads,
``is_causal=True``), the kernel on the key heads directly (``causal_attention_cpu``). Before timing,
each shape's outputs are checked against float64 SDPA: the kernel's error may exceed bf16 SDPA's by
at most a quarter (plus 2e-3), or the script stops. Rounds alternate the order of the two; the
report gives the median ms, p20..p80 and GFLOP/s of the causal triangle (4 S (S + 1) / 2 D per
head, both products).

Needs a CPU with AVX-512 + AVX512_BF16 + VBMI2 (``avx512-bf16``); elsewhere it stops and says so.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bf16dot_report import require_avx512_bf16, write_report

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
        times = measure(shape, rounds, min_time)
        for variant in VARIANTS:
            t = times[variant]
            med = statistics.median(t)
            rows.append({
                "shape": name, "bhksd": list(shape), "variant": variant, "ms": med * 1e3,
                "p20": _quantile(t, 0.2) * 1e3, "p80": _quantile(t, 0.8) * 1e3, "gflops": flops / med / 1e9,
                "max_abs_error": errors[variant], "speedup": statistics.median(times["sdpa"]) / med,
            })  # fmt: skip
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header, "",
        "| shape (B, H, KV, S, D) | variant | ms (p20..p80) | GFLOP/s (triangle) | x SDPA "
        "| max abs error vs float64 |",
        "|---|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        spread = f"{r['ms']:.2f} ({r['p20']:.2f}..{r['p80']:.2f})"
        lines.append(
            f"| {r['shape']} {tuple(r['bhksd'])} | {r['variant']} | {spread} | {r['gflops']:.0f} "
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
    args = parser.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        parser.error(f"--shapes: unknown {unknown or 'none given'}; choose from {', '.join(SHAPES)}")
    if args.rounds < 1 or args.min_time <= 0 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1 and --min-time above 0")
    require_avx512_bf16("the attention kernel and this benchmark")
    torch.set_num_threads(args.threads)
    rows = rows_for(shapes, args.rounds, args.min_time)
    print(write_report(args.out, "attention-cpu", "attention_cpu.py", argv, rows, markdown))


if __name__ == "__main__":
    main()
