"""On paper, not measured: the memory and time of distilling a 20%-width-pruned Llama-3.1-8B into
shape with this trainer (FSDP2 per block, bf16 compute, fp32 master weights and AdamW state,
activation checkpointing) on 8 H100-80GB, with the teacher sharded beside the student or with
top-k teacher logits read from disk.

    python bench/train_estimate.py --out docs/data/train_estimate

Every number is arithmetic on the stated shapes and assumptions (printed with the table); the
tokens/s assumes a model-FLOPs utilisation (--mfu, default 0.40) that no run here measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GiB = 2**30

LLAMA_31_8B = dict(
    layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256
)


def block_params(c: dict, width: float = 1.0) -> float:
    """Parameters of one decoder block with the MLP and heads kept at ``width`` (Minitron-style)."""
    q = c["hidden"] * c["heads"] * c["head_dim"] * width
    kv = 2 * c["hidden"] * c["kv_heads"] * c["head_dim"] * width
    o = q
    mlp = 3 * c["hidden"] * c["intermediate"] * width
    return q + kv + o + mlp + 2 * c["hidden"]


def model_params(c: dict, width: float = 1.0) -> tuple[float, float]:
    """(all parameters, decoder-block parameters); untied embedding and lm_head."""
    blocks = c["layers"] * block_params(c, width)
    return blocks + 2 * c["vocab"] * c["hidden"] + c["hidden"], blocks


def estimate(args) -> dict:
    c = LLAMA_31_8B
    teacher_n, teacher_blocks = model_params(c)
    # 20% of the decoder-block parameters removed by narrowing MLP channels and heads alike
    student_n, student_blocks = model_params(c, width=0.8)
    ranks, tokens = args.ranks, args.micro_batch * args.seqlen
    # the trainer trains the decoder-block weights; embeddings and lm_head stay frozen (fp32 shards only)
    per_rank = {
        "student fp32 shards (all weights)": 4 * student_n / ranks,
        "fp32 gradients of the block weights": 4 * student_blocks / ranks,
        "AdamW state of the block weights (2 x fp32)": 8 * student_blocks / ranks,
        "two gathered bf16 blocks (current + prefetch)": 2 * 2 * student_blocks / c["layers"],
        "checkpointed block inputs (bf16)": 2 * tokens * c["hidden"] * c["layers"],
        "one block's activations in recompute (bf16, ~34 x hidden per token)": 2 * 34 * tokens * c["hidden"],
        "student logits + grad (fp32, full vocabulary)": 2 * 4 * tokens * c["vocab"],
    }
    teacher = {
        "teacher bf16 shards (the CLI loads the teacher in the compute dtype)": 2 * teacher_n / ranks,
        "teacher logits (fp32)": 4 * tokens * c["vocab"],
    }
    topk = {"top-k values + indices (fp32 + int32) for one micro-batch": 8 * tokens * args.topk}
    attn = 2 * 2 * c["layers"] * args.seqlen * c["heads"] * c["head_dim"] / 2  # causal: half the scores
    student_flops = 8 * student_n + 4 * attn  # fwd + bwd + recompute (2+4+2 per param), attention alike
    teacher_flops = 2 * teacher_n + attn
    peak = args.h100_tflops * 1e12 * args.mfu
    tok_s_teacher = ranks * peak / (student_flops + teacher_flops)
    tok_s_topk = ranks * peak / student_flops
    return {
        "assumptions": {**vars(args), "shapes": c, "width": 0.8},
        "teacher_params": teacher_n,
        "student_params": student_n,
        "per_rank_bytes": per_rank,
        "teacher_path_extra_bytes": teacher,
        "topk_path_extra_bytes": topk,
        "topk_disk_bytes_per_token": 8 * args.topk,
        "flops_per_token": {"student train": student_flops, "teacher forward": teacher_flops},
        "tokens_per_s": {"teacher beside the student": tok_s_teacher, "top-k logits from disk": tok_s_topk},
    }


def markdown(e: dict) -> str:
    a = e["assumptions"]
    base = sum(e["per_rank_bytes"].values())
    lines = [
        "On paper (arithmetic, not a measurement): distilling Llama-3.1-8B "
        f"({e['teacher_params'] / 1e9:.2f} B "
        f"parameters) into a 20%-width-pruned student ({e['student_params'] / 1e9:.2f} B) on {a['ranks']} "
        f"H100-80GB with `sparsekit finetune --distill` under torchrun: micro-batch {a['micro_batch']} x "
        f"{a['seqlen']} tokens per rank, activation checkpointing, bf16 compute, fp32 master weights, "
        "gradients and AdamW state for the decoder-block weights (what the trainer trains; embeddings "
        "and lm_head frozen). `python bench/train_estimate.py`.",
        "",
        "| per rank | GiB |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v / GiB:.2f} |" for k, v in e["per_rank_bytes"].items()]
    lines += [f"| **student total** | **{base / GiB:.1f}** |"]
    lines += [f"| + {k} | {v / GiB:.2f} |" for k, v in e["teacher_path_extra_bytes"].items()]
    lines += [f"| + {k} | {v / GiB:.3f} |" for k, v in e["topk_path_extra_bytes"].items()]
    t = e["tokens_per_s"]
    f = e["flops_per_token"]
    lines += [
        "",
        f"FLOPs per token: student training {f['student train'] / 1e9:.0f} G (forward, backward and the "
        f"checkpoint recompute), teacher forward {f['teacher forward'] / 1e9:.0f} G. At {a['mfu']:.0%} of "
        f"{a['h100_tflops']:.0f} TFLOP/s bf16 per H100: about "
        f"{t['teacher beside the student']:,.0f} tokens/s "
        f"on {a['ranks']} GPUs with the teacher beside the student, {t['top-k logits from disk']:,.0f} with "
        f"top-{a['topk']} logits from disk ({e['topk_disk_bytes_per_token']} bytes per token on disk, "
        f"{e['topk_disk_bytes_per_token'] * 1e9 / 1e12:.1f} TB per billion tokens). A billion tokens: "
        f"{1e9 / t['teacher beside the student'] / 3600:.1f} h with the teacher.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/train_estimate")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--mfu", type=float, default=0.40, help="assumed model-FLOPs utilisation")
    p.add_argument("--h100-tflops", type=float, default=989.0, help="dense bf16 peak per GPU")
    args = p.parse_args()
    e = estimate(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(e, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(e))
    print(markdown(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
