"""Fine-tune only the routers of a MoEfied SmolLM2 (bench/make_moe.py) so its gates are peaked, as a
trained MoE's are; save it beside the original.

    python bench/make_moe.py --out reports/moe-qwen2-smollm2 --shared 768 --experts 16 \
        --top-ks 8,12,16 --top-k 8 --temperatures ""
    python bench/train_moe_router.py --model reports/moe-qwen2-smollm2 --out reports/moe-qwen2-smollm2-rt

``make_moe.py`` scales its fitted routers to a logit spread of 1e-3, so every selected expert gets a
gate weight of ~1/top_k: REAP (gate x output norm) then ranks experts exactly as EAN does. This
script distils the dense model's top-64 next-token logits into the routers alone (AdamW, every
other weight frozen) on ``--nsamples`` x ``--seqlen`` calibration tokens drawn with ``--seed``
(default 1: not the rows ``moe_table.py`` calibrates on, seed 0; evaluation articles are never
used), then reports perplexity on held-out tokens before and after and how peaked the gates are
(the mean largest renormalised top-k weight: 1/top_k when uniform). Writes the checkpoint,
``report.json`` and ``report.md`` to ``--out`` (replaced if it exists).
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
from sparsekit.bench.moe_model import gate_weights, teacher_topk, train_routers
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model

log = logging.getLogger("train_moe_router")


def _gates(moe, ids) -> dict:
    weights = gate_weights(moe, ids)  # [blocks, tokens, top_k], descending
    return {
        "top_k": int(weights.shape[-1]),
        "mean_largest": float(weights[..., 0].mean()),
        "mean_smallest": float(weights[..., -1].mean()),
        "largest_per_block": [round(float(v), 4) for v in weights[..., 0].mean(-1)],
    }


def _markdown(report: dict) -> str:
    a, b = report["before"], report["after"]
    lines = [
        f"`{report['command']}` on {report['env']['cpu']} ({report['env']['cpu_threads']} threads), torch "
        f"{report['env']['torch']}, transformers {report['env']['transformers']}, commit "
        f"{report['env']['commit']}, {report['env']['time_utc']}.",
        "",
        f"Routers only, distilled from the dense model's top-64 logits: {report['args']['steps']} steps of "
        f"{report['args']['batch']} x {report['args']['seqlen']} tokens (lr {report['args']['lr']}, "
        f"{report['args']['nsamples']} rows drawn with seed {report['args']['seed']}), "
        f"{report['train_s']:.0f} s; loss {report['losses'][0]:.4f} -> {report['losses'][-1]:.4f}.",
        "",
        "| routers | ppl | mean largest gate weight | mean smallest | uniform |",
        "|---|---:|---:|---:|---:|",
        f"| fitted (make_moe.py) | {a['ppl']:.3f} | {a['gates']['mean_largest']:.4f} | "
        f"{a['gates']['mean_smallest']:.4f} | {1 / a['gates']['top_k']:.4f} |",
        f"| trained | {b['ppl']:.3f} | {b['gates']['mean_largest']:.4f} | "
        f"{b['gates']['mean_smallest']:.4f} | {1 / b['gates']['top_k']:.4f} |",
        "",
        f"Dense SmolLM2 ppl {report['dense_ppl']:.3f}; ppl on {report['eval_tokens']} held-out tokens in "
        f"windows of {report['args']['eval_seqlen']}; gate weights on {report['gate_tokens']} held-out "
        "tokens.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="reports/moe-qwen2-smollm2", help="a bench/make_moe.py folder")
    p.add_argument("--dense", default="smollm2", help="the teacher (the model the MoE was built from)")
    p.add_argument("--out", default="reports/moe-qwen2-smollm2-rt")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-seqlen", type=int, default=512)
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"{args.model} is not a checkpoint folder: build it with python bench/make_moe.py")
    if args.steps < 1 or args.batch < 1 or args.batch > args.nsamples:
        p.error("need --steps >= 1 and 1 <= --batch <= --nsamples")
    if args.eval_tokens < 2048:
        p.error("--eval-tokens must be >= 2048 (gate weights are read on the first 2,048 held-out tokens)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    moe, tok = load_model(args.model, dtype=torch.float32)
    if not isinstance(getattr(moe.config, "moefication", None), dict):
        p.error(f"{args.model} was not built by bench/make_moe.py (no moefication in its config)")
    dense, _ = load_model(args.dense, dtype=torch.float32)
    ids = calibration_ids(tok, "wiki-offline", args.nsamples, args.seqlen, seed=args.seed)
    eval_ids = evaluation_ids(tok, "wiki-offline", max_tokens=args.eval_tokens)
    gate_ids = eval_ids[:, :2048].reshape(-1, 512)

    def measure() -> dict:
        return {"ppl": perplexity_of_ids(moe, eval_ids, args.eval_seqlen).ppl, "gates": _gates(moe, gate_ids)}

    dense_ppl = perplexity_of_ids(dense, eval_ids, args.eval_seqlen).ppl
    before = measure()
    log.info("before: %s", before)
    targets = teacher_topk(dense, ids)
    del dense
    start = time.perf_counter()
    losses = train_routers(moe, ids, targets, args.steps, args.lr, args.batch, args.seed)
    train_s = time.perf_counter() - start
    after = measure()
    log.info("after: %s", after)
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        moe.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        report = {
            "command": " ".join(
                ["python bench/train_moe_router.py", *(sys.argv[1:] if argv is None else argv)]
            ),
            "env": environment(),
            "args": vars(args),
            "dense_ppl": dense_ppl,
            "eval_tokens": int(eval_ids.numel()),
            "gate_tokens": int(gate_ids.numel()),
            "before": before,
            "after": after,
            "losses": losses,
            "train_s": train_s,
        }
        write_json_atomic(Path(tmp) / "report.json", report)
        write_text_atomic(Path(tmp) / "report.md", _markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
