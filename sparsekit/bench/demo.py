"""``sparsekit demo``: prune, evaluate and benchmark the embedded default model, write one report.

Steps (each logged with its wall time):
  1. quality: perplexity of dense and of magnitude / Wanda / SparseGPT at 50% and 2:4
     (``quality_table``, one model load, calibration and evaluation from the offline corpus);
  2. per-layer: dense vs every sparse backend on SmolLM2-135M's and one Llama-2-7B shape;
  3. end to end: TTFT / TPOT / memory / perplexity, dense vs 2:4 sparsified;
  4. ``reports/<timestamp>/report.md`` with the tables, PNG plots and the JSONs beside it.
The default sizes fit in about 15 minutes on two CPU cores; ``quick`` shrinks everything for CI.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from sparsekit._io import write_json_atomic
from sparsekit.bench.e2e import e2e_markdown, run_e2e, write_e2e_report
from sparsekit.bench.env import environment
from sparsekit.bench.layers import layers_markdown, linear_shapes, run_layers, write_layers_report
from sparsekit.bench.plots import plot_quality
from sparsekit.bench.quality import quality_markdown, quality_table
from sparsekit.bench.timing import choose_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    model: str = "smollm2"
    corpus: str = "wiki-offline"
    nsamples: int = 16  # calibration: 16 x 256 tokens (Wanda/SparseGPT use 128 x 2048 on GPUs)
    seqlen: int = 256
    eval_tokens: int = 8192  # 16 windows of 512 held-out tokens
    eval_seqlen: int = 512
    methods: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
    patterns: tuple[str, ...] = ("0.5", "2:4")
    layer_models: tuple[str, ...] = ("smollm2-135m", "llama-2-7b")
    layer_llama_layers: str = "q_proj,k_proj,v_proj,o_proj"  # one Llama-7B shape: 4096 x 4096
    layer_ms: tuple[int, ...] = (1, 16, 64)
    e2e_prompt_len: int = 128
    e2e_new_tokens: int = 32
    e2e_batch: int = 1
    e2e_repeats: int = 3
    e2e_eval_tokens: int = 2048
    threads: int | None = None  # torch CPU threads (None: torch's default)


QUICK = DemoConfig(
    nsamples=4,
    seqlen=64,
    eval_tokens=1024,
    eval_seqlen=128,
    layer_models=("smollm2-135m",),
    layer_ms=(1, 16),
    e2e_prompt_len=32,
    e2e_new_tokens=6,
    e2e_repeats=2,
    e2e_eval_tokens=256,
)


def _demo_shapes(cfg: DemoConfig):
    shapes = []
    for name in cfg.layer_models:
        found = linear_shapes(name)
        if name.startswith("llama") and cfg.layer_llama_layers:
            found = [s for s in found if s.layers == cfg.layer_llama_layers] or found[:1]
        shapes.extend(found)
    return shapes


def default_out_dir(root: str | Path = "reports") -> Path:
    return Path(root) / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_demo(
    out: str | Path | None = None,
    quick: bool = False,
    model: nn.Module | None = None,
    tokenizer=None,
    config: DemoConfig | None = None,
    show_progress: bool = True,
) -> Path:
    """Run the demo and return the path of ``report.md``.

    ``model``/``tokenizer``: an already-loaded model (left unchanged: every step works on copies);
    otherwise ``config.model`` is loaded. ``quick`` uses tiny sizes (CI).
    """
    cfg = config or (QUICK if quick else DemoConfig())
    out_dir = Path(out) if out is not None else default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    threads, threads_note = choose_threads(cfg.threads)
    try:
        return _run(cfg, out_dir, quick, model, tokenizer, show_progress, threads, threads_note)
    finally:
        torch.set_num_threads(prev_threads)


def _run(cfg, out_dir, quick, model, tokenizer, show_progress, threads, threads_note) -> Path:
    if threads_note:
        log.info("demo: %s", threads_note)
    started = time.perf_counter()
    stages: dict[str, float] = {}
    load_avg = os.getloadavg() if hasattr(os, "getloadavg") else None

    def stage(name: str, t0: float) -> None:
        stages[name] = time.perf_counter() - t0
        log.info("demo: %s done in %.1f s (total %.1f s)", name, stages[name], time.perf_counter() - started)

    t0 = time.perf_counter()
    if model is None:
        from sparsekit.hf.models import load_model

        log.info("demo [0/3]: loading %s", cfg.model)
        model, tokenizer = load_model(cfg.model)
    if tokenizer is None:
        raise ValueError("run_demo needs the model's tokenizer with an already-loaded model")
    model.eval()
    from sparsekit.hf.data import calibration_ids, evaluation_ids

    calib = calibration_ids(tokenizer, cfg.corpus, cfg.nsamples, cfg.seqlen, seed=0)
    eval_ids = evaluation_ids(tokenizer, cfg.corpus, max_tokens=cfg.eval_tokens)
    stage("load", t0)

    # 1. quality
    t0 = time.perf_counter()
    cells = len(cfg.methods) * len(cfg.patterns)
    log.info(
        "demo [1/3]: quality: %d prune+eval cells, calibration %d x %d, eval %d tokens",
        cells,
        cfg.nsamples,
        cfg.seqlen,
        eval_ids.shape[1],
    )
    qrows = quality_table(
        model, calib, eval_ids, cfg.methods, cfg.patterns, cfg.eval_seqlen, show_progress=show_progress
    )
    env = environment()
    write_json_atomic(
        out_dir / "quality.json", {"env": env, "config": asdict(cfg), "rows": [asdict(r) for r in qrows]}
    )
    plot_quality(qrows, out_dir / "quality.png", title=f"{cfg.model}: perplexity ({cfg.corpus})")
    stage("quality", t0)

    # 2. per-layer
    t0 = time.perf_counter()
    shapes = _demo_shapes(cfg)
    log.info("demo [2/3]: per-layer: %d shapes x M %s", len(shapes), list(cfg.layer_ms))
    layers = run_layers(shapes, cfg.layer_ms, "2:4", show_progress=show_progress)
    layers.config["threads_note"] = threads_note
    write_layers_report(layers, out_dir)
    stage("layers", t0)

    # 3. end to end
    t0 = time.perf_counter()
    log.info("demo [3/3]: end to end: dense vs 2:4 sparsified")
    e2e = run_e2e(
        model,
        tokenizer,
        prompt_len=cfg.e2e_prompt_len,
        new_tokens=cfg.e2e_new_tokens,
        batch=cfg.e2e_batch,
        pattern="2:4",
        repeats=cfg.e2e_repeats,
        eval_tokens=cfg.e2e_eval_tokens,
        eval_seqlen=min(cfg.eval_seqlen, cfg.e2e_eval_tokens),
        model_label=cfg.model,
    )
    e2e.config["threads_note"] = threads_note
    write_e2e_report(e2e, out_dir)
    stage("e2e", t0)

    total = time.perf_counter() - started
    summary = {
        "env": env,
        "config": asdict(cfg),
        "quick": quick,
        "stages_s": stages,
        "total_s": total,
        "load_average_at_start": load_avg,
        "threads": threads,
        "threads_note": threads_note,
        "files": sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".")),
    }
    report = out_dir / "report.md"
    report.write_text(
        _report_markdown(cfg, env, qrows, layers, e2e, stages, total, load_avg, calib, eval_ids, threads_note)
    )
    write_json_atomic(out_dir / "demo.json", summary)
    log.info("demo: report written to %s (%.1f s)", report, total)
    return report


def _report_markdown(cfg, env, qrows, layers, e2e, stages, total, load_avg, calib, eval_ids, note) -> str:
    machine = f"{env['device']} ({env['cpu']}, {env['cpu_threads']} threads)"
    if env.get("capability"):
        machine = f"{env['device']} ({env['capability']}, CUDA {env.get('cuda')}), CPU {env['cpu']}"
    load = f"; load average at start {load_avg[0]:.1f}" if load_avg else ""
    lines = [
        "# sparsekit demo report",
        "",
        f"Machine: {machine}{load}. torch {env['torch']}, triton {env['triton']}, transformers "
        f"{env['transformers']}, Python {env['python']}; commit {env['commit']}; {env['time_utc']}.",
        *([f"Note: {note}."] if note else []),
        "",
        f"Model: {cfg.model}. Calibration: {cfg.corpus}, {calib.shape[0]} x {calib.shape[1]} tokens "
        f"(seed 0). Evaluation: held-out {cfg.corpus} split, {eval_ids.shape[1]} tokens in windows of "
        f"{cfg.eval_seqlen}.",
        "",
        "## Quality (perplexity, lower is better)",
        "",
        quality_markdown(qrows),
        "",
        "![perplexity](quality.png)",
        "",
        "## Per-layer speed (2:4 weights)",
        "",
        layers_markdown(layers),
        "![speedup vs M](layers.png)",
        "",
        "## End to end (dense vs 2:4 sparsified)",
        "",
        e2e_markdown(e2e),
        "![TTFT and TPOT](e2e.png)",
        "",
        "## Wall time",
        "",
        "| stage | s |",
        "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in stages.items()],
        f"| **total** | **{total:.1f}** |",
        "",
        "Files: quality.json, layers.json / layers.md / layers.png, e2e.json / e2e.md / e2e.png, "
        "demo.json (environment, configuration, stage times).",
    ]
    return "\n".join(lines) + "\n"
