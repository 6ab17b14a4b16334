"""MaskLLM's Gumbel-softmax alone: F.gumbel_softmax against the floored version, forward + backward,
at three points of the tau / scale schedule, every variant interleaved in each round.

    python bench/gumbel_softmax_speed.py --out docs/data/gumbel_softmax_speed

Gates: one SmolLM2 MLP projection's groups (576 x 1536 / 4), a prior pattern favoured by 3 (the
paper's prior strength); upstream gradient N(0, 1e-6). Prints and writes the median and the
min-max per variant (ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.hf.maskllm import PATTERNS_2_4, gumbel_softmax_floored

SCHEDULE = ((4.0, 100.0), (1.0, 300.0), (0.05, 500.0))  # (tau, scale): start, middle, end
VARIANTS = {"F.gumbel_softmax": lambda z, t: F.gumbel_softmax(z, tau=t), "floored": gumbel_softmax_floored}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/gumbel_softmax_speed")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    groups = 576 * 1536 // 4
    gate = torch.randn(groups, 6) * 0.05
    gate[torch.arange(groups), torch.randint(0, 6, (groups,))] += 3.0
    gate.requires_grad_(True)
    patterns = PATTERNS_2_4.float()
    cells = [(name, tau, scale) for name in VARIANTS for tau, scale in SCHEDULE]
    times: dict[tuple, list[float]] = {c: [] for c in cells}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for cell in cells:
            name, tau, scale = cell
            started = time.perf_counter()
            mask = VARIANTS[name](gate * scale, tau) @ patterns
            (mask * torch.randn_like(mask) * 1e-6).sum().backward()
            times[cell].append((time.perf_counter() - started) * 1e3)
            gate.grad = None
    env = environment()
    lines = ["| variant | tau | scale | median ms (min-max) |", "|---|---:|---:|---:|"]
    rows = []
    for (name, tau, scale), ts in times.items():
        ts = ts[1:]
        rows.append({"variant": name, "tau": tau, "scale": scale, "ms": ts})
        lines.append(
            f"| {name} | {tau:g} | {scale:g} | {statistics.median(ts):.1f} ({min(ts):.1f}-{max(ts):.1f}) |"
        )
    head = (
        f"`python bench/gumbel_softmax_speed.py {' '.join(sys.argv[1:])}` on {env['cpu']}, {args.threads} "
        f"threads, torch {env['torch']}, commit {env['commit']}, {env['time_utc']}; {args.rounds} rounds, "
        "variants interleaved.\n\n"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), {"environment": env, "rows": rows})
    write_text_atomic(out.with_suffix(".md"), head + "\n".join(lines) + "\n")
    print(head + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
