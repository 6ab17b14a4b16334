"""``sparsekit demo``: prune, evaluate and benchmark the embedded default model, write one report.

Steps (each logged with its wall time):
  1. compare: every method family (unstructured, N:M, structured depth and width) pruned from the
     same model with the same calibration, each with perplexity, zero-shot accuracy through
     lm-evaluation-harness (offline wiki_lambada / wiki_continuation), parameters and bytes, and
     TTFT / TPOT with all variants' generations interleaved; a Pareto plot of accuracy vs decode speed;
  2. end to end: dense vs the SparseGPT 2:4 model in fp32 and bf16 (TTFT / TPOT interleaved,
     the bandwidth floor beside each row);
  3. per-layer: dense vs every sparse backend on SmolLM2-135M's linear shapes (weights from DRAM);
  4. ``reports/<timestamp>/report.md`` with the tables, PNG plots and the JSONs beside it.
Default sizes: under 10 minutes on two CPU cores (``DemoConfig``); ``FULL`` (``--full``) is the
run behind docs/results.md; ``QUICK`` shrinks everything for CI.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.bench.compare import (
    DEMO_VARIANTS,
    FULL_VARIANTS,
    Variant,
    compare_markdown,
    compare_variants,
    depth,
    plot_pareto,
    quantized,
    rows_to_dicts,
    unstructured,
    width,
)
from sparsekit.bench.e2e import e2e_markdown, run_e2e, write_e2e_report
from sparsekit.bench.layers import layers_markdown, linear_shapes, run_layers, write_layers_report
from sparsekit.bench.timing import choose_threads
from sparsekit.kernels.dtypes import parse_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    model: str = "smollm2"
    corpus: str = "wiki-offline"
    nsamples: int = 8  # calibration: 8 x 256 tokens (Wanda/SparseGPT use 128 x 2048 on GPUs)
    seqlen: int = 256
    eval_tokens: int = 4096  # 8 windows of 512 held-out tokens
    eval_seqlen: int = 512
    variants: tuple[Variant, ...] = DEMO_VARIANTS
    tasks: tuple[str, ...] = ("wiki_lambada", "wiki_continuation")
    task_limits: dict[str, int] = field(default_factory=lambda: {"wiki_lambada": 40, "wiki_continuation": 20})
    layer_models: tuple[str, ...] = ("smollm2-135m",)
    layer_llama_layers: str = "q_proj,k_proj,v_proj,o_proj"  # one Llama-7B shape: 4096 x 4096
    layer_ms: tuple[int, ...] = (1, 16)
    layer_pool_mib: int | None = None  # weights rotated over copies adding up to this (None: 2 x LLC)
    prompt_len: int = 128
    new_tokens: int = 16
    rounds: int = 3
    e2e_method: str = "sparsegpt"  # the end-to-end stage: dense vs this method's 2:4 model
    e2e_dtypes: tuple[str, ...] = ("fp32", "bf16")
    threads: int | None = None  # torch CPU threads (None: torch's default)


FULL = DemoConfig(
    nsamples=32,
    seqlen=512,
    eval_tokens=8192,
    variants=FULL_VARIANTS,
    task_limits={"wiki_lambada": 150, "wiki_continuation": 100},
    layer_models=("smollm2-135m", "llama-2-7b"),
    layer_ms=(1, 16, 64),
    rounds=5,
)

QUICK = DemoConfig(
    nsamples=4,
    seqlen=64,
    eval_tokens=1024,
    eval_seqlen=128,
    variants=(
        DEMO_VARIANTS[0],
        unstructured("magnitude", "2:4"),
        depth("angular", 2),
        width("flap", 0.2),
        quantized(unstructured("magnitude", "2:4"), "int8"),
    ),
    task_limits={"wiki_lambada": 4, "wiki_continuation": 2},
    layer_ms=(1,),
    layer_pool_mib=8,  # a smoke run: a few copies, not a cold-cache measurement
    prompt_len=16,
    new_tokens=4,
    rounds=2,
    e2e_method="magnitude",
    e2e_dtypes=("fp32",),
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


def _config_dict(cfg: DemoConfig) -> dict:
    return asdict(replace(cfg, variants=())) | {"variants": [v.name for v in cfg.variants]}


def _run(cfg, out_dir, quick, model, tokenizer, show_progress, threads, threads_note) -> Path:
    from sparsekit.bench.e2e import prompt_ids
    from sparsekit.hf.data import calibration_ids, evaluation_ids

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
    calib = calibration_ids(tokenizer, cfg.corpus, cfg.nsamples, cfg.seqlen, seed=0)
    eval_ids = evaluation_ids(tokenizer, cfg.corpus, max_tokens=cfg.eval_tokens)
    prompts, prompt_source = prompt_ids(tokenizer, 1, cfg.prompt_len)
    stage("load", t0)

    # 1. every method family, quality and speed
    t0 = time.perf_counter()
    log.info(
        "demo [1/3]: %d variants (%s); calibration %d x %d, ppl on %d tokens, tasks %s",
        len(cfg.variants),
        ", ".join(v.name for v in cfg.variants),
        cfg.nsamples,
        cfg.seqlen,
        eval_ids.shape[1],
        cfg.task_limits,
    )
    rows = compare_variants(
        model,
        tokenizer,
        cfg.variants,
        calib,
        eval_ids,
        cfg.eval_seqlen,
        cfg.tasks,
        cfg.task_limits,
        prompts,
        cfg.new_tokens,
        cfg.rounds,
        show_progress=show_progress,
    )
    env = environment()
    setup = (
        f"model {cfg.model}; calibration {cfg.corpus} {calib.shape[0]} x {calib.shape[1]} tokens (seed 0); "
        f"ppl on {eval_ids.shape[1]} held-out tokens in windows of {cfg.eval_seqlen}; zero-shot through "
        f"lm-evaluation-harness, first items per task {cfg.task_limits}; generation batch 1, "
        f"{cfg.prompt_len}-token prompt ({prompt_source}), {cfg.new_tokens} new tokens, greedy, fp32 eager, "
        f"{cfg.rounds} rounds with every variant interleaved in each round"
    )
    write_json_atomic(
        out_dir / "compare.json",
        {"env": env, "setup": setup, "config": _config_dict(cfg), "rows": rows_to_dicts(rows)},
    )
    compare_md = compare_markdown(rows)
    write_text_atomic(out_dir / "compare.md", compare_md + f"\n\n{setup}.\n")
    plot_pareto(rows, out_dir / "pareto.png", title=f"{cfg.model}: quality vs decode speed")
    stage("compare", t0)

    # 2. end to end in every dtype: dense vs the best one-shot 2:4 model, with the bandwidth floor
    t0 = time.perf_counter()
    log.info("demo [2/3]: end to end, dense vs %s 2:4 in %s", cfg.e2e_method, ", ".join(cfg.e2e_dtypes))
    e2e = run_e2e(
        model,
        tokenizer,
        input_ids=prompts,
        new_tokens=cfg.new_tokens,
        eval_ids=eval_ids,
        eval_seqlen=cfg.eval_seqlen,
        repeats=cfg.rounds,
        method=cfg.e2e_method,
        calib_ids=calib,
        dtypes=tuple(parse_dtype(d) for d in cfg.e2e_dtypes),
        model_label=cfg.model,
        show_progress=show_progress,
    )
    e2e.config["threads_note"] = threads_note
    write_e2e_report(e2e, out_dir)
    stage("e2e", t0)

    # 3. per-layer
    t0 = time.perf_counter()
    shapes = _demo_shapes(cfg)
    log.info("demo [3/3]: per-layer: %d shapes x M %s", len(shapes), list(cfg.layer_ms))
    pool = None if cfg.layer_pool_mib is None else cfg.layer_pool_mib << 20
    layers = run_layers(shapes, cfg.layer_ms, "2:4", show_progress=show_progress, pool_bytes=pool)
    layers.config["threads_note"] = threads_note
    write_layers_report(layers, out_dir)
    stage("layers", t0)

    total = time.perf_counter() - started
    summary = {
        "env": env,
        "config": _config_dict(cfg),
        "quick": quick,
        "stages_s": stages,
        "total_s": total,
        "load_average_at_start": load_avg,
        "threads": threads,
        "threads_note": threads_note,
        "files": sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".")),
    }
    report = out_dir / "report.md"
    write_text_atomic(
        report,
        _report_markdown(cfg, env, compare_md, setup, e2e, layers, stages, total, load_avg, threads_note),
    )
    write_json_atomic(out_dir / "demo.json", summary)
    log.info("demo: report written to %s (%.1f s)", report, total)
    return report


def _report_markdown(cfg, env, compare_md, setup, e2e, layers, stages, total, load_avg, note) -> str:
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
        "## Every method family: quality, size and speed",
        "",
        compare_md,
        "",
        f"Setup: {setup}.",
        "",
        "![accuracy and perplexity vs decode speedup](pareto.png)",
        "",
        f"## End to end: dense vs {cfg.e2e_method} 2:4 in {', '.join(cfg.e2e_dtypes)}",
        "",
        e2e_markdown(e2e),
        "![TTFT and TPOT](e2e.png)",
        "",
        "## Per-layer speed (2:4 weights)",
        "",
        layers_markdown(layers),
        "![speedup vs M](layers.png)",
        "",
        "## Wall time",
        "",
        "| stage | s |",
        "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in stages.items()],
        f"| **total** | **{total:.1f}** |",
        "",
        "Files: compare.json / compare.md / pareto.png, e2e.json / e2e.md / e2e.png, "
        "layers.json / layers.md / layers.png, "
        "demo.json (environment, configuration, stage times).",
    ]
    return "\n".join(lines) + "\n"
