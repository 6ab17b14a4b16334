"""The GPU suite: one command for a bare CUDA machine (torch, triton, transformers, pytest; no network).

    make gpu-bench                                   # installs sparsekit --no-deps, then runs this
    python bench/gpu_suite.py --out reports/gpu      # the same, sparsekit already importable
    python bench/gpu_suite.py --dry-run --out DIR    # every stage on the CPU at toy sizes (CI runs it)

Stages, each logged with its wall time; a stage that fails is recorded and the next one still runs:
  1. ``tests``: the CUDA kernel tests (tests/gpu: every Triton kernel in fp16, bf16 and fp32
     against its torch reference, SparseLinear on CUDA) -> kernel-tests.xml / kernel-tests.txt;
  2. ``layers``: the per-layer table, dense cuBLAS (eager and torch.compile'd) vs 2:4 Triton,
     bitmap, masked and cuSPARSELt, on Llama-2-7B, Llama-3-8B and Llama-2-70B linear shapes,
     M = 1..4096, fp16 (every backend) and bf16 (dense, compiled, 2:4, cuSPARSELt), L2 flushed,
     CUDA graphs for M <= 64 -> layers-fp16.*, layers-bf16.*;
  3. ``e2e``: random-weight Llama-2-7B and Llama-3-8B built from the shipped shape configs, bf16,
     magnitude 2:4 + sparsify, dense vs sparse generations interleaved, eager and compiled (CUDA
     graphs for decode) -> e2e-<model>.*;
  4. ``results-gpu.md``: the environment, what ran, and every table, ready to commit as
     docs/results-gpu.md.
Planned to fit 20 minutes on one H100 (stage budgets in ``--budget``); a stage past its budget
stops between cells and says so. ``--dry-run`` never claims a GPU figure: the report says it ran
on the CPU at toy sizes, the tests are only collected (they need CUDA), and no number in it is a
GPU number.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("gpu_suite")

GPU_LAYER_SHAPES = ("llama-2-7b", "llama-3-8b", "llama-2-70b")
GPU_MS = (1, 4, 16, 64, 256, 1024, 4096)
BF16_BACKENDS = ("dense", "dense-compiled", "2:4", "cusparselt")
E2E_MODELS = ("llama-2-7b", "llama-3-8b")


def _env() -> dict:
    from sparsekit._env import environment

    env = environment()
    try:
        env["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    return env


def stage_tests(out: Path, dry_run: bool) -> dict:
    """The CUDA kernel tests; on a dry run only collected (they need CUDA and would all skip)."""
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    cmd += ["--collect-only"] if dry_run else ["-rs", f"--junitxml={out / 'kernel-tests.xml'}"]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    text = proc.stdout + proc.stderr
    (out / "kernel-tests.txt").write_text(text)
    tail = [line for line in text.strip().splitlines() if line.strip()][-1:] or [""]
    return {"returncode": proc.returncode, "summary": tail[0], "collected_only": dry_run}


def stage_layers(out: Path, dry_run: bool, budget_s: float) -> dict:
    from sparsekit.bench.layers import linear_shapes, run_layers, write_layers_report

    device = "cpu" if dry_run else "cuda"
    names = ("smollm2-135m",) if dry_run else GPU_LAYER_SHAPES
    ms = (1, 4) if dry_run else GPU_MS
    shapes = [s for name in names for s in linear_shapes(name)]
    runs = {"fp16": (torch.float16, None), "bf16": (torch.bfloat16, BF16_BACKENDS)}
    if dry_run:
        runs = {"fp32": (torch.float32, ("dense", "2:4"))}
    done, started = {}, time.perf_counter()
    for tag, (dtype, backends) in runs.items():
        if time.perf_counter() - started > budget_s:
            done[tag] = "skipped: the layers budget was spent"
            continue
        result = run_layers(
            shapes,
            ms,
            "2:4",
            backends,
            dtype,
            device,
            cuda_graphs=not dry_run,
            min_time_s=0.0 if dry_run else 0.1,
            cold=not dry_run,
        )
        paths = write_layers_report(result, out, stem=f"layers-{tag}")
        done[tag] = {
            "rows": len(result.rows),
            "skipped": sorted(set(result.skipped))[:20],
            "md": paths["md"].name,
        }
    return done


def stage_e2e(out: Path, dry_run: bool, budget_s: float) -> dict:
    from sparsekit.bench.e2e import run_e2e, write_e2e_report
    from sparsekit.bench.random_model import random_model

    done, started = {}, time.perf_counter()
    for name in E2E_MODELS:
        if time.perf_counter() - started > budget_s:
            done[name] = "skipped: the e2e budget was spent"
            continue
        if dry_run:
            model = random_model(name, torch.float32, "cpu", num_layers=2, shrink=16)
        else:
            model = random_model(name, torch.bfloat16, "cuda")
        vocab = model.config.vocab_size
        prompt = torch.randint(
            0, vocab, (1, 16 if dry_run else 128), generator=torch.Generator().manual_seed(0)
        )
        result = run_e2e(
            model,
            input_ids=prompt,
            new_tokens=4 if dry_run else 64,
            eval_tokens=0,
            repeats=2 if dry_run else 5,
            method="magnitude",
            compile=not dry_run,
            model_label=model.config.name_or_path,
            show_progress=False,
        )
        paths = write_e2e_report(result, out, stem=f"e2e-{name}")
        done[name] = {
            "rows": {
                r.variant: {"tpot_ms": r.tpot_ms, "ttft_ms": r.ttft_ms, "decode_x": r.decode_speedup}
                for r in result.rows
            },
            "md": paths["md"].name,
        }
        del model, result
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return done


def write_results(out: Path, env: dict, stages: dict, dry_run: bool) -> Path:
    """results-gpu.md: environment, stage outcomes and every table, in the order they ran."""
    from sparsekit._io import write_text_atomic

    head = "# GPU results" if not dry_run else "# GPU suite: DRY RUN on the CPU (toy sizes; no GPU figures)"
    lines = [
        head,
        "",
        f"`python bench/gpu_suite.py --out {out}{' --dry-run' if dry_run else ''}` "
        f"(what `make gpu-bench` runs), commit {env.get('commit')}, {env.get('time_utc')}.",
        "",
        f"Device: {env.get('device')} {env.get('capability') or ''} CUDA {env.get('cuda')}; "
        f"CPU {env.get('cpu')}; torch {env.get('torch')}, triton {env.get('triton')}, "
        f"transformers {env.get('transformers')}.",
    ]
    if env.get("nvidia_smi"):
        lines += ["", "```", env["nvidia_smi"], "```"]
    lines += ["", "| stage | wall s | outcome |", "|---|---:|---|"]
    for name, st in stages.items():
        outcome = st["error"] if "error" in st else json.dumps(st.get("result"))[:300]
        lines.append(f"| {name} | {st['seconds']:.1f} | {outcome.replace('|', '/')} |")
    for md in sorted(out.glob("*.md")):
        if md.name != "results-gpu.md":
            lines += ["", f"## {md.stem}", "", md.read_text()]
    path = out / "results-gpu.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports/gpu", help="folder for every report (created)")
    parser.add_argument("--dry-run", action="store_true", help="every stage on the CPU at toy sizes")
    parser.add_argument("--stages", default="tests,layers,e2e", help="comma-separated subset")
    parser.add_argument(
        "--budget",
        default="tests=300,layers=540,e2e=420",
        help="seconds per stage before it stops between cells",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_suite: no CUDA device here; run with --dry-run to check the suite on the CPU",
            file=sys.stderr,
        )
        return 2
    budgets = {k: float(v) for k, v in (item.split("=") for item in args.budget.split(","))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = _env()
    stages: dict[str, dict] = {}
    runners = {
        "tests": lambda: stage_tests(out, args.dry_run),
        "layers": lambda: stage_layers(out, args.dry_run, budgets.get("layers", 540)),
        "e2e": lambda: stage_e2e(out, args.dry_run, budgets.get("e2e", 420)),
    }
    for name in args.stages.split(","):
        if name not in runners:
            raise SystemExit(f"unknown stage {name!r}; choose from {', '.join(runners)}")
        log.info("stage %s", name)
        t0 = time.perf_counter()
        try:
            stages[name] = {"result": runners[name]()}
        except Exception as exc:  # record and go on: one broken stage must not lose the others' reports
            log.error("stage %s failed: %s", name, exc)
            stages[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        stages[name]["seconds"] = time.perf_counter() - t0
        log.info("stage %s: %.1f s", name, stages[name]["seconds"])
    from sparsekit._io import write_json_atomic

    write_json_atomic(out / "suite.json", {"env": env, "dry_run": args.dry_run, "stages": stages})
    path = write_results(out, env, stages, args.dry_run)
    print(f"wrote {path}")
    failed = [n for n, st in stages.items() if "error" in st or st.get("result", {}).get("returncode", 0)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
