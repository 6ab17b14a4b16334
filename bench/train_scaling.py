"""The trainer on 1 process against 2 (torchrun, Gloo, one thread each) at equal global batch, on
SmolLM2-135M pruned to 50% (magnitude): loss curves, tokens per second, the parameter + gradient +
optimizer shards each process holds, and peak resident memory.

    python bench/train_scaling.py --out docs/data/train_scaling --steps 12 --rounds 2

Rounds alternate 1 and 2 processes (1, 2, 1, 2, ...); the first 2 steps of each run are warm-up
and not timed. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import sparsekit
    from sparsekit.hf.data import calibration_ids
    from sparsekit.hf.models import load_model
    from sparsekit.hf.trainer import TrainConfig, train

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model, tok = load_model("smollm2", dtype=torch.float32)
    sparsekit.prune(model, method="magnitude", sparsity=0.5, show_progress=False)
    ids = calibration_ids(tok, "wiki-offline", 64, args.seqlen, seed=1)
    config = TrainConfig(
        steps=args.steps, lr=2e-5, batch_size=args.batch_size, precision=args.precision, show_progress=False
    )
    stamps: list[float] = []
    import sparsekit.hf.trainer as trainer

    real_step = trainer.Trainer._step

    def timed(self, *a):
        out = real_step(self, *a)
        stamps.append(time.perf_counter())
        return out

    trainer.Trainer._step = timed
    report = train(model, ids, config)
    if dist.get_rank() == 0:
        per_step = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]  # steps 3.. (2 warm-up)
        tokens = args.batch_size * args.seqlen
        result = report.to_dict() | {
            "step_seconds": per_step,
            "timed_tokens_per_s": tokens / statistics.median(per_step),
        }
        Path(args.result).write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, args: argparse.Namespace, result: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
           str(_free_port()), __file__, "--worker", "--result", str(result), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen),
           "--precision", args.precision]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/train_scaling")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    from sparsekit._env import environment
    from sparsekit._io import write_json_atomic, write_text_atomic

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as scratch:  # each run's report; all of them land in <out>.json
        for r in range(args.rounds):
            for n in (1, 2):
                runs[n].append(run(n, args, Path(scratch) / f"{n}-{r}.json"))
                print(f"round {r + 1}: {n} process(es): {runs[n][-1]['timed_tokens_per_s']:.0f} tokens/s")
    one, two = runs[1][0], runs[2][0]
    diff = max(abs(a - b) / abs(a) for a, b in zip(one["losses"], two["losses"], strict=True))
    rate = {n: [r["timed_tokens_per_s"] for r in rs] for n, rs in runs.items()}
    rows = []
    for n in (1, 2):
        rs = runs[n]
        rows.append(
            f"| {n} | {statistics.median(rate[n]):.0f} ({min(rate[n]):.0f}-{max(rate[n]):.0f}) | "
            f"{rs[0]['state_mb_per_process']:.0f} | {statistics.median(r['peak_rss_mb'] for r in rs):.0f} | "
            f"{rs[0]['losses'][0]:.4f} -> {rs[0]['losses'][-1]:.4f} |"
        )
    speedup = statistics.median(rate[2]) / statistics.median(rate[1])
    env = environment()
    head = (
        f"`python bench/train_scaling.py {' '.join(sys.argv[1:])}` on {env['cpu']}, torch {env['torch']}, "
        f"commit {env['commit']}, {env['time_utc']}. SmolLM2-135M at 50% (magnitude), {args.steps} steps of "
        f"{args.batch_size} x {args.seqlen} tokens (global), {args.precision}, one thread per process, "
        f"{args.rounds} rounds alternating; tokens/s from steps 3.. (median, range over rounds).\n\n"
    )
    table = (
        "| processes | tokens/s | param + grad + AdamW shards per process (MiB) "
        "| peak RSS per process (MiB) | loss |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"2 processes / 1: {speedup:.2f}x tokens/s; largest relative loss difference over the "
        f"{args.steps} steps: {diff:.2e}.\n"
    )
    write_json_atomic(out.with_suffix(".json"), {"environment": env, "args": vars(args), "runs": runs,
                                                 "speedup": speedup, "max_rel_loss_diff": diff})  # fmt: skip
    write_text_atomic(out.with_suffix(".md"), head + table)
    print(head + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
