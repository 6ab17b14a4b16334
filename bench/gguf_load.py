"""Loading the embedded GGUF model: a fresh conversion (``gguf_cache=False``) against the cached
copy, alternating in each round (the cache is filled before the first round).

    python bench/gguf_load.py --out docs/data/gguf_load
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.hf.models import GGUF_CACHE_ENV, load_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/gguf_load")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    times: dict[str, list[float]] = {"fresh conversion": [], "cached copy": []}
    with tempfile.TemporaryDirectory() as cache:
        os.environ[GGUF_CACHE_ENV] = cache
        started = time.perf_counter()
        load_model("smollm2", dtype=torch.float32)
        fill = time.perf_counter() - started
        for _ in range(args.rounds):
            for name, cached in (("fresh conversion", False), ("cached copy", True)):
                started = time.perf_counter()
                load_model("smollm2", dtype=torch.float32, gguf_cache=cached)
                times[name].append(time.perf_counter() - started)
    env = environment()
    lines = ["| load | median s (min-max) |", "|---|---:|"]
    lines += [f"| {n} | {statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) |" for n, t in times.items()]
    lines.append(f"| first load (conversion + writing the copy) | {fill:.2f} |")
    head = (
        f"`python bench/gguf_load.py {' '.join(sys.argv[1:])}` on {env['cpu']} "
        f"({env['cpu_threads']} threads), torch {env['torch']}, transformers {env['transformers']}, "
        f"commit {env['commit']}, {env['time_utc']}; "
        f"SmolLM2-135M Q4_1 GGUF to fp32, {args.rounds} rounds alternating.\n\n"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), {"environment": env, "seconds": times, "first_load_s": fill})
    write_text_atomic(out.with_suffix(".md"), head + "\n".join(lines) + "\n")
    print(head + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
