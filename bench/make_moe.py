"""Build a real-weight MoE from the embedded SmolLM2-135M by MoEfication, evaluate it, save it.

Mixtral without ``--shared``; Qwen2-MoE (a shared expert of the ``--shared`` channels every token
needs, plus the routed experts) with it.

    python bench/make_moe.py --out reports/moe-smollm2

Calibration: ``--nsamples`` x ``--seqlen`` tokens of the offline corpus's calibration articles
(seed 0); evaluation: the first ``--eval-tokens`` held-out tokens in windows of ``--eval-seqlen``
(calibration and evaluation articles never overlap). One build (``sparsekit.bench.moe_model.moefy``)
serves every top_k: the routers are fitted on the dense model's hidden states and ``set_top_k``
rescales the experts. Evaluates dense, the MoE at each ``--top-ks`` (at ``--temperature``) and
each ``--temperatures`` at ``--top-k``; then saves the MoE at ``--top-k`` / ``--temperature``
(safetensors + tokenizer) to ``--out``, reloads it with plain ``transformers`` and compares logits,
and writes ``--out``/report.json and report.md (``--out`` is replaced if it exists).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from sparsekit._env import environment
from sparsekit._io import atomic_dir, write_json_atomic, write_text_atomic
from sparsekit.bench.moe_model import (
    DEFAULT_TEMPERATURE,
    PARTITIONS,
    ROUTER_TARGETS,
    moefy,
    parameter_counts,
    set_temperature,
    set_top_k,
    stats_summary,
)
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model

log = logging.getLogger("make_moe")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _choose_top_k(spec: str, rows: list[dict], max_ppl: float) -> int:
    """``spec`` as an int, or for ``auto`` the smallest measured top_k with ppl <= ``max_ppl``, else
    the top_k with the lowest ppl."""
    if spec != "auto":
        return int(spec)
    within = [r["top_k"] for r in rows if r["ppl"] <= max_ppl]
    return min(within) if within else min(rows, key=lambda r: r["ppl"])["top_k"]


def _ppl(model, eval_ids: torch.Tensor, seqlen: int) -> float:
    return perplexity_of_ids(model, eval_ids, seqlen).ppl


def _reload_check(folder: Path, moe, ids: torch.Tensor) -> dict:
    """Load ``folder`` with plain ``AutoModelForCausalLM`` and compare its logits with ``moe``'s."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        a = moe(ids, use_cache=False).logits
        b = reloaded(ids, use_cache=False).logits
    return {
        "class": type(reloaded).__name__,
        "experts_implementation": reloaded.config._experts_implementation,
        "max_abs_logit_diff": (a - b).abs().max().item(),
        "allclose_1e-4": bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4)),
        "same_argmax": bool(torch.equal(a.argmax(-1), b.argmax(-1))),
    }


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def _markdown(report: dict) -> str:
    a, env = report["args"], report["env"]
    dense = report["dense"]["ppl"]
    lines = [
        f"# SmolLM2-135M MoEfied into {report['architecture'].removesuffix('ForCausalLM')}",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {env['cpu']}, {env['cpu_threads']} torch threads, device {env['device']}; torch "
        f"{env['torch']}, transformers {env['transformers']}; commit {env['commit']}; {env['time_utc']}.",
        "",
        f"Calibration {a['nsamples']} x {a['seqlen']} tokens (wiki-offline, seed {a['seed']}); evaluation "
        f"{report['eval_tokens']} held-out tokens, windows of {a['eval_seqlen']}. {a['experts']} experts of "
        f"{report['expert_channels']} channels per block (shared expert: {a['shared']} channels; "
        f"{a['partition']} partition), router fitted to "
        f"the experts' output {a['target']}, temperature {a['temperature']:g} (RMS spread of a token's "
        f"router logits on calibration tokens). Build {report['build_s']:.0f} s, save "
        f"{report['save_s']:.0f} s.",
        "",
        "| model | top_k | temperature | active params | ppl | vs dense |",
        "|---|---|---|---|---|---|",
        f"| dense | - | - | {_millions(report['dense']['params'])} | {dense:.3f} | 1.000 |",
    ]
    for row in report["rows"]:
        lines.append(
            f"| MoE | {row['top_k']} | {row['temperature']:g} | {_millions(row['active_params'])} | "
            f"{row['ppl']:.3f} | {row['ppl'] / dense:.3f} |"
        )
    s = report["stats"]
    lines += [
        "",
        f"Total MoE parameters {_millions(report['params']['total'])} (dense "
        f"{_millions(report['dense']['params'])}; routers {report['params']['router']:,}).",
        "",
        "In-sample routing statistics on the calibration tokens, mean over blocks: router recall@k (the "
        "share of each token's k experts with the largest output norm that the router picks; chance "
        "k/E) "
        + ", ".join(f"@{k}: {v:.3f}" for k, v in s["mean_recall"].items())
        + "; relative MLP output error with the router's top-k summed (uniform weights) "
        + ", ".join(f"k={k}: {v:.3f}" for k, v in s["mean_rel_error"].items())
        + f"; router R^2 {s['mean_router_r2']:.3f}; k-means cohesion gain over a random split "
        f"{s['mean_kmeans_gain']:.4f}.",
        "",
        f"Saved at top_k {a['top_k']} ({report['top_k_rule']}), temperature {a['temperature']:g}: "
        f"`{report['out']}`. Reloaded with "
        f"plain `AutoModelForCausalLM.from_pretrained`: {report['reload']['class']} "
        f"(experts implementation {report['reload']['experts_implementation']}), max |logit diff| "
        f"{report['reload']['max_abs_logit_diff']:.2e} on one {a['eval_seqlen']}-token window.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports/moe-smollm2", help="checkpoint + report folder")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument(
        "--shared",
        type=int,
        default=0,
        help="channels of each MLP kept in a shared expert (0: Mixtral, no shared expert; >0: Qwen2-MoE)",
    )
    parser.add_argument(
        "--top-k",
        default="auto",
        help="the top_k saved; auto: the smallest of --top-ks within --max-ppl-ratio of dense "
        "(else the one with the lowest ppl)",
    )
    parser.add_argument("--max-ppl-ratio", type=float, default=1.25)
    parser.add_argument("--top-ks", type=_ints, default=[1, 2, 4, 6, 7, 8], help="top_k values evaluated")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    parser.add_argument("--temperatures", type=_floats, default=[1e-4, 1e-2, 1e-1], help="also evaluated")
    parser.add_argument("--temperature-top-ks", type=_ints, default=[4], help="where --temperatures run")
    parser.add_argument("--partition", choices=PARTITIONS, default="kmeans")
    parser.add_argument("--target", choices=ROUTER_TARGETS, default="norm")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.top_k != "auto" and not args.top_k.isdigit():
        parser.error(f"--top-k must be an integer or auto, got {args.top_k!r}")
    top_k_rule = (
        f"auto: the smallest evaluated top_k with ppl <= {args.max_ppl_ratio} x dense, else the lowest ppl"
        if args.top_k == "auto"
        else "given"
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    command = " ".join(["python bench/make_moe.py", *sys.argv[1:]])

    dense, tok = load_model(args.model)
    calib = calibration_ids(tok, "wiki-offline", args.nsamples, args.seqlen, seed=args.seed)
    eval_ids = evaluation_ids(tok, "wiki-offline", max_tokens=args.eval_tokens)
    dense_ppl = _ppl(dense, eval_ids, args.eval_seqlen)
    log.info("dense ppl %.3f", dense_ppl)

    start = time.perf_counter()
    stats: list = []
    moe = moefy(
        dense, calib, args.experts, max(args.top_ks), args.temperature,
        target=args.target, partition=args.partition, seed=args.seed, shared=args.shared, stats=stats,
    )  # fmt: skip
    build_s = time.perf_counter() - start
    log.info("built in %.1f s", build_s)

    rows = []

    def measure(top_k: int, temperature: float) -> None:
        set_top_k(moe, top_k)
        set_temperature(moe, temperature)
        t0 = time.perf_counter()
        ppl = _ppl(moe, eval_ids, args.eval_seqlen)
        rows.append(
            {
                "top_k": top_k,
                "temperature": temperature,
                "ppl": ppl,
                "ppl_ratio": ppl / dense_ppl,
                "active_params": parameter_counts(moe)["active"],
                "eval_s": time.perf_counter() - t0,
            }
        )
        log.info("top_k %d temperature %g: ppl %.3f (x%.3f dense)", top_k, temperature, ppl, ppl / dense_ppl)

    for top_k in args.top_ks:
        measure(top_k, args.temperature)
    args.top_k = _choose_top_k(args.top_k, rows, dense_ppl * args.max_ppl_ratio)
    log.info("saving top_k %d", args.top_k)
    for top_k in args.temperature_top_ks:
        for temperature in args.temperatures:
            if temperature != args.temperature:
                measure(top_k, temperature)
    set_top_k(moe, args.top_k)
    set_temperature(moe, args.temperature)

    out = Path(args.out)
    start = time.perf_counter()
    with atomic_dir(out) as tmp:
        moe.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    save_s = time.perf_counter() - start
    reload = _reload_check(out, moe, eval_ids[:, : args.eval_seqlen])
    log.info("reloaded: %s", reload)

    report = {
        "command": command,
        "env": environment(),
        "args": vars(args),
        "out": str(out),
        "eval_tokens": int(eval_ids.shape[1]),
        "expert_channels": (dense.config.intermediate_size - args.shared) // args.experts,
        "architecture": type(moe).__name__,
        "dense": {"ppl": dense_ppl, "params": sum(p.numel() for p in dense.parameters())},
        "params": parameter_counts(moe),
        "build_s": build_s,
        "save_s": save_s,
        "rows": rows,
        "top_k_rule": top_k_rule,
        "reload": reload,
        "stats": stats_summary(stats),
    }
    write_json_atomic(out / "report.json", report)
    text = _markdown(report)
    write_text_atomic(out / "report.md", text)
    print(text)


if __name__ == "__main__":
    main()
