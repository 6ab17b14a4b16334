"""sparsekit against llm-compressor (the maintained peer) on the same model, tokens and machine, in one run.

    python bench/vs_llmcompressor.py --setup --out docs/data/vs_llmcompressor

``--setup`` creates llm-compressor's own virtual environment (``--venv``, default ``.venv-llmc``:
torch 2.13.0 and llmcompressor 0.14.0.1 from PyPI; it pins transformers <= 5.17, so it never
shares sparsekit's) when it is missing. Protocol (issue 28): SmolLM2-135M in fp32, 64 x 512
calibration tokens of the offline corpus (seed 0), perplexity on 32,768 held-out tokens in
windows of 512, 2 threads. Per config (method x sparsity), in turn: llm-compressor's one-shot
modifier run by ``bench/llmcompressor_driver.py`` in its venv on the dense model saved as
safetensors and the same calibration ids (attention mask all ones), its pruned decoder weights
loaded back here; then sparsekit with its default calibration forwards (bf16 where the CPU has
fast bf16 matmuls) and with fp32 forwards (``forward_dtype="float32"``). Every row is evaluated by
the same perplexity code on the same tokens; prune time is each tool's own one-shot call (model
load excluded). ``--rows`` picks configs (e.g. ``sparsegpt/2:4 wanda/0.5``; ``wanda+owl/0.7``: OWL's
allocation, M 5 and lambda 0.08, in both tools). ``--seeds 0 1 2 3`` repeats every config on that
many calibration draws (both tools get the same ids per seed) and adds a summary: per tool the
median ppl over seeds with its range, and the median of the per-seed ratio to llm-compressor (a
2:4 choice flips on rounding-level differences, so one seed cannot rank tools by a few percent).
Writes <out>.json and <out>.md after every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import sparsekit
from sparsekit._env import environment, run_line
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model

CONFIGS = [
    "sparsegpt/0.5", "sparsegpt/2:4", "wanda/0.5", "wanda/2:4",
    "wanda/0.7", "wanda+owl/0.7", "sparsegpt+owl/0.7",
]  # fmt: skip
PINS = ("torch==2.13.0", "llmcompressor==0.14.0.1")
DRIVER = Path(__file__).with_name("llmcompressor_driver.py")
log = logging.getLogger("vs_llmcompressor")


def setup_venv(venv: Path) -> Path:
    """llm-compressor's own environment (created with ``PINS`` when missing) -> its python."""
    python = venv / "bin" / "python"
    if python.is_file():
        return python
    log.info("creating %s with %s (a few minutes, network needed)", venv, " ".join(PINS))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for pin in PINS:
        subprocess.run([str(python), "-m", "pip", "install", "-q", pin], check=True)
    return python


def decoder_sparsity(model) -> float:
    """Share of zeros over the weights of every linear layer inside the decoder blocks."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total


def run_llmcompressor(python: Path, dense, folder: Path, calib_file: Path, method: str, sparsity: str):
    """(pruned copy of ``dense``, the driver's report)."""
    out, report = folder / "llmc.safetensors", folder / "llmc.json"
    command = [
        str(python), str(DRIVER), "--model", str(folder / "dense"), "--calib", str(calib_file),
        "--method", method, "--sparsity", sparsity, "--out", str(out), "--report", str(report),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(done.stderr[-20000:])
    if done.returncode:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        raise RuntimeError(f"llm-compressor failed (exit {done.returncode}): {last[0]}")
    state = load_file(str(out))
    model = copy.deepcopy(dense)
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown or not state:
        raise RuntimeError(f"llm-compressor's weights do not match the model: {unknown[:3]}")
    model.load_state_dict(state, strict=False)
    return model, json.loads(report.read_text())


def run_sparsekit(dense, calib: torch.Tensor, method: str, sparsity: str, forward_dtype: str):
    model = copy.deepcopy(dense)
    method, _, allocation = method.partition("+")
    start = time.perf_counter()
    report = sparsekit.prune(
        model, method=method, sparsity=sparsity, calib=calib, forward_dtype=forward_dtype,
        allocation=allocation or "uniform", show_progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    return model, {"prune_s": seconds, "timings_s": report.timings_s, "forward_dtype": report.forward_dtype}


def _markdown(head: str, rows: list[dict]) -> str:
    lines = [
        head,
        "",
        "| config | seed | tool | calibration forwards | ppl | prune s | decoder sparsity |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ppl = "failed" if r.get("error") else f"{r['ppl']:.3f}"
        lines.append(
            f"| {r['config']} | {r.get('seed', '-')} | {r['tool']} | {r.get('forward_dtype', '-')} | {ppl} | "
            f"{r.get('prune_s', 0):.1f} | {r.get('sparsity', 0):.4f} |"
        )
    lines += _seed_summary(rows)
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["", *(f"- {r['config']}, {r['tool']}: {r['error']}" for r in failed)]
    timed = [r for r in rows if r.get("timings_s")]
    if timed:
        lines += ["", "sparsekit's phases (s):", ""]
        seed = lambda r: f", seed {r['seed']}" if "seed" in r else ""  # noqa: E731
        lines += [
            f"- {r['config']}{seed(r)} ({r['forward_dtype']} forwards): "
            + ", ".join(f"{k} {v:.1f}" for k, v in r["timings_s"].items())
            for r in timed
        ]
    return "\n".join(lines) + "\n"


def _variant(row: dict) -> str:
    return f"{row['tool']} ({row['forward_dtype']})" if row.get("forward_dtype") else row["tool"]


def _seed_summary(rows: list[dict]) -> list[str]:
    """Per config and tool over the seeds: median ppl (min-max), median prune s, and the median of
    the per-seed ppl ratio to llm-compressor on the same calibration ids. Empty for one seed."""
    scored = [r for r in rows if "seed" in r and not r.get("error")]
    if len({r["seed"] for r in scored}) < 2:
        return []
    lines = [
        "",
        "Over the seeds (median, range in brackets; ratio: per seed, ppl / llm-compressor's ppl on the "
        "same ids):",
        "",
        "| config | tool | seeds | ppl median [min-max] | ratio to llm-compressor median [min-max] "
        "| prune s median |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for config in dict.fromkeys(r["config"] for r in scored):
        mine = [r for r in scored if r["config"] == config]
        peer = {r["seed"]: r["ppl"] for r in mine if r["tool"].startswith("llm-compressor")}
        for variant in dict.fromkeys(_variant(r) for r in mine):
            got = [r for r in mine if _variant(r) == variant]
            ppl = [r["ppl"] for r in got]
            ratios = [r["ppl"] / peer[r["seed"]] for r in got if r["seed"] in peer]
            ratio = (
                f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]" if ratios else "-"
            )
            lines.append(
                f"| {config} | {variant} | {len(got)} | {statistics.median(ppl):.2f} [{min(ppl):.2f}-"
                f"{max(ppl):.2f}] | {ratio} | {statistics.median(r.get('prune_s', 0) for r in got):.1f} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/vs_llmcompressor")
    p.add_argument("--venv", default=".venv-llmc", help="llm-compressor's virtual environment")
    p.add_argument("--setup", action="store_true", help="create --venv when it is missing")
    p.add_argument("--rows", nargs="+", default=CONFIGS, metavar="METHOD/SPARSITY")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="calibration draws, each run by every tool"
    )
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    args = p.parse_args(argv)
    unknown = [r for r in args.rows if r not in CONFIGS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {' '.join(CONFIGS)}")
    venv = Path(args.venv)
    if not (venv / "bin" / "python").is_file() and not args.setup:
        p.error(f"{venv} has no python: pass --setup to create llm-compressor's environment there")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    python = setup_venv(venv)
    dense, tok = load_model("smollm2", dtype=torch.float32)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    eval_ids = evaluation_ids(tok, "wiki-offline", max_tokens=args.eval_tokens)
    env = environment()
    head = (
        f"{run_line('bench/vs_llmcompressor.py', argv, env)} (llm-compressor in its own venv); "
        f"SmolLM2-135M fp32, calibration {args.nsamples} x {args.seqlen} (seeds "
        f"{' '.join(map(str, args.seeds))}), ppl on {eval_ids.shape[1]} "
        "held-out tokens in windows of 512."
    )
    out = Path(args.out)
    rows = [{"config": "dense", "tool": "-", "ppl": perplexity_of_ids(dense, eval_ids, 512).ppl}]

    def add(row: dict, model) -> None:
        row["ppl"] = perplexity_of_ids(model, eval_ids, 512).ppl
        row["sparsity"] = decoder_sparsity(model)
        rows.append(row)
        log.info("%s", {k: v for k, v in row.items() if k != "timings_s"})
        write_json_atomic(out.with_suffix(".json"), {"environment": env, "args": vars(args), "rows": rows})
        write_text_atomic(out.with_suffix(".md"), _markdown(head, rows))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dense.save_pretrained(folder / "dense")
        tok.save_pretrained(folder / "dense")
        for seed in args.seeds:
            calib = calibration_ids(tok, "wiki-offline", args.nsamples, args.seqlen, seed=seed)
            calib_file = folder / "calib.pt"
            torch.save(calib.clone(), calib_file)
            for config in args.rows:
                method, sparsity = config.split("/")
                try:
                    model, info = run_llmcompressor(python, dense, folder, calib_file, method, sparsity)
                    tool = f"llm-compressor {info['llmcompressor']}"
                    add({"config": config, "seed": seed, "tool": tool, **info}, model)
                except RuntimeError as exc:  # its failure is a result too: recorded, the run goes on
                    log.error("%s", exc)
                    failed = {"config": config, "seed": seed, "tool": "llm-compressor", "ppl": float("nan")}
                    rows.append({**failed, "error": str(exc)})
                for forward_dtype in ("auto", "float32"):
                    model, info = run_sparsekit(dense, calib, method, sparsity, forward_dtype)
                    add(
                        {
                            "config": config,
                            "seed": seed,
                            "tool": f"sparsekit {sparsekit.__version__}",
                            **info,
                        },
                        model,
                    )
                del model
    print(_markdown(head, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
