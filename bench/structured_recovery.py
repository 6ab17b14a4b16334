"""Recovery of a structurally pruned model: plain LM fine-tune vs distillation from the dense
teacher, at equal steps, on the real default model.

    python bench/structured_recovery.py --out reports/recovery      # about 25 min on 2 cores

Prunes SmolLM2-135M with flap at --sparsity (uniform widths), then trains two copies for --steps
steps each (same data, lr, batch): LM loss, and T^2 KL(teacher || student) against the dense
model. Writes recovery.json and recovery.md (ppl dense / pruned / after each, share recovered).
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import sparsekit
from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.finetune import finetune
from sparsekit.hf.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--method", default="flap")
    parser.add_argument("--sparsity", default="0.2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument(
        "--nsamples", type=int, default=32, help="calibration (and training) sequences of 512"
    )
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out", default="reports/recovery")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    dense, tokenizer = load_model(args.model)
    calib = calibration_ids(tokenizer, "wiki-offline", args.nsamples, 512, seed=0)
    train = calibration_ids(tokenizer, "wiki-offline", 256, args.seqlen, seed=1)
    eval_ids = evaluation_ids(tokenizer, "wiki-offline", max_tokens=args.eval_tokens)

    def ppl(model):
        return perplexity_of_ids(model, eval_ids, seqlen=512).ppl

    pruned = copy.deepcopy(dense)
    report = sparsekit.prune(
        pruned, method=args.method, sparsity=args.sparsity, calib=calib, show_progress=False
    )
    rows = {"dense": ppl(dense), "pruned": ppl(pruned)}
    runs = {}
    for name, teacher in (("lm", None), ("distill", dense)):
        model = copy.deepcopy(pruned)
        fr = finetune(
            model, input_ids=train, steps=args.steps, lr=args.lr, batch_size=args.batch_size, teacher=teacher
        )
        rows[name] = ppl(model)
        runs[name] = {
            "seconds": fr.seconds,
            "first_loss": fr.losses[0],
            "last_loss": fr.losses[-1],
            "trained_layers": fr.trained_layers,
        }
        logging.info("%s: ppl %.2f after %d steps (%.0f s)", name, rows[name], args.steps, fr.seconds)
    lost = rows["pruned"] - rows["dense"]
    recovered = {k: (rows["pruned"] - rows[k]) / lost for k in ("lm", "distill")}
    env = environment()
    setup = (
        f"{args.model} pruned by {args.method} at {args.sparsity} "
        f"({100 * report.removed_fraction:.1f}% of block parameters; calibration {args.nsamples} x 512 "
        f"wiki-offline); {args.steps} AdamW steps, lr {args.lr}, batch {args.batch_size} x {args.seqlen} "
        f"tokens of wiki-offline calibration text (seed 1), every block linear trained; "
        f"ppl on {eval_ids.shape[1]} held-out tokens in windows of 512"
    )
    write_json_atomic(
        Path(args.out) / "recovery.json",
        {"env": env, "setup": setup, "ppl": rows, "recovered": recovered, "runs": runs},
    )
    md = (
        "| model | ppl | share of the pruning loss recovered | train time |\n|---|---:|---:|---:|\n"
        f"| dense | {rows['dense']:.2f} | | |\n| pruned | {rows['pruned']:.2f} | | |\n"
        f"| + LM fine-tune | {rows['lm']:.2f} | {100 * recovered['lm']:.0f}% | "
        f"{runs['lm']['seconds']:.0f} s |\n"
        f"| + distillation | {rows['distill']:.2f} | {100 * recovered['distill']:.0f}% | "
        f"{runs['distill']['seconds']:.0f} s |\n\n{setup}.\n"
        f"Machine: {env['cpu']} ({env['cpu_threads']} threads), "
        f"torch {env['torch']}, commit {env['commit']}, {env['time_utc']}.\n"
    )
    write_text_atomic(Path(args.out) / "recovery.md", md)
    print(md)


if __name__ == "__main__":
    main()
