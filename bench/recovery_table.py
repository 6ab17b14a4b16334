"""Healing pruned SmolLM2-135M at equal steps and tokens: full fine-tuning vs distillation vs
mask-preserving LoRA, on a FLAP 20% model and a SparseGPT 2:4 model; and MaskLLM's learned 2:4
masks against the one-shot 2:4 baselines, in one table.

    python bench/recovery_table.py --out docs/data/recovery_table --steps 100

Every row is trained with the same data (``--nsamples`` x ``--seqlen`` tokens of the offline corpus,
seed 1, read in the trainer's seeded order), steps, batch and schedule, from a fresh copy of its
base model. Pruning calibration: --calib-nsamples (32) x 512 tokens (seed 0). Columns: perplexity
on ``--eval-tokens`` held-out tokens (windows of 512), ``wiki_lambada`` / ``wiki_continuation``
accuracy (``--items`` per task), the share of zeros in the decoder-block linears after training,
training seconds and tokens/s. ``--rows`` picks rows by substring (comma-separated, or one part
of a row's name). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

import sparsekit
from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.maskllm import MaskLLMSettings, learn_masks
from sparsekit.hf.models import load_model
from sparsekit.hf.trainer import TrainConfig, train
from sparsekit.nn.sparsify import sparse_candidates


def zeros_share(model) -> float:
    layers = sparse_candidates(model).values()
    return sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)


def base_model(name: str, dense, calib):
    """A fresh copy of ``dense`` pruned as the row's base names it."""
    model = copy.deepcopy(dense)
    if name == "FLAP 20%":
        sparsekit.prune(model, method="flap", sparsity=0.2, calib=calib, show_progress=False)
    elif name == "SparseGPT 2:4":
        sparsekit.prune(model, method="sparsegpt", sparsity="2:4", calib=calib, show_progress=False)
    elif name == "SparseGPT+ADMM 2:4":
        sparsekit.prune(
            model, method="sparsegpt", sparsity="2:4", calib=calib, update="admm", show_progress=False
        )
    elif name == "SparseGPT+permute+ADMM 2:4":
        sparsekit.prune(model, method="sparsegpt", sparsity="2:4", calib=calib, permute=True, update="admm",
                        show_progress=False)  # fmt: skip
    return model


def rows_to_run(args) -> list[tuple[str, str, str]]:
    """(row name, base, job) in table order."""
    rows = [("dense", "dense", "none")]
    for base in ("SparseGPT 2:4", "FLAP 20%"):
        rows += [(f"{base}", base, "none"), (f"{base} + fine-tune", base, "lm"),
                 (f"{base} + distill", base, "distill"),
                 (f"{base} + LoRA r{args.lora_rank}", base, "lora")]  # fmt: skip
        if base == "SparseGPT 2:4":
            rows.append(("MaskLLM 2:4 (SparseGPT prior)", "dense", "maskllm"))
    rows.append(("SparseGPT+permute+ADMM 2:4", "SparseGPT+permute+ADMM 2:4", "none"))
    # MaskLLM started from the one-shot SparseGPT+ADMM weights, against fine-tuning that model on the
    # same calibration sequences, steps and batch
    admm = "SparseGPT+ADMM 2:4"
    rows += [(admm, admm, "none"), (f"{admm} + fine-tune on the MaskLLM tokens", admm, "lm-maskllm-data"),
             ("MaskLLM 2:4 (SparseGPT+ADMM start, weights frozen)", "dense", "maskllm-admm"),
             ("MaskLLM 2:4 (SparseGPT+ADMM start, weights trained)", "dense",
              "maskllm-admm-train")]  # fmt: skip
    # a --rows that is part of one row's name picks by it whole (names hold commas); else split at commas
    whole = args.rows.strip()
    wanted = (
        [whole] if whole and any(whole in r[0] for r in rows) else [w.strip() for w in args.rows.split(",")]
    )
    wanted = [w for w in wanted if w]
    return [r for r in rows if not wanted or r[0] == "dense" or any(w in r[0] for w in wanted)]


def _write(args, results, env: dict) -> None:
    """The table so far (rewritten after every row: a cut-short run keeps its rows)."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), {"environment": env, "args": vars(args), "rows": results})
    tokens = args.steps * args.batch_size * args.seqlen
    maskllm_data = (
        f"the {args.calib_nsamples} x 512 calibration sequences"
        if args.maskllm_data == "calib"
        else "the same training sequences"
    )
    head = (
        f"`python bench/recovery_table.py {' '.join(sys.argv[1:])}` on {env['cpu']} ({env['cpu_threads']} "
        f"threads), torch {env['torch']}, transformers {env['transformers']}, commit {env['commit']}, "
        f"{env['time_utc']}. Training: {args.steps} steps x {args.batch_size} x {args.seqlen} tokens "
        f"({tokens:,} tokens) of {args.nsamples} sequences (MaskLLM: {args.maskllm_steps or args.steps} "
        f"steps x {args.batch_size} of {maskllm_data}, "
        "weights frozen unless the row says trained: then at 0.1x the logits' lr), "
        f"cosine lr with {max(1, args.steps // 20)} warm-up steps, fp32; lr {args.lr:g} "
        f"(LoRA {10 * args.lr:g}, MaskLLM {args.maskllm_lr:g}). Perplexity on {args.eval_tokens} held-out "
        f"tokens, windows of 512; {args.items} items per task.\n\n"
    )
    lines = ["| model | ppl | wiki_lambada | wiki_continuation | zeros in block linears | params (M) | "
             "train s | tokens/s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        acc = r["accuracy"]
        rate = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        lines.append(
            f"| {r['name']} | {r['ppl']:.2f} | {acc.get('wiki_lambada', float('nan')):.3f} | "
            f"{acc.get('wiki_continuation', float('nan')):.3f} | {r['zeros']:.3f} | "
            f"{r['params'] / 1e6:.1f} | "
            f"{r['seconds']:.0f} | {rate} |"
        )
    write_text_atomic(out.with_suffix(".md"), head + "\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/recovery_table")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-5, help="fine-tune / distill lr (LoRA: 10x)")
    p.add_argument("--maskllm-lr", type=float, default=5e-4)
    p.add_argument("--maskllm-steps", type=int, default=None, help="default: --steps")
    p.add_argument(
        "--maskllm-data",
        choices=("calib", "train"),
        default="calib",
        help="what MaskLLM trains on: the pruning calibration sequences, or the other rows' training "
        "sequences (its prior always calibrates on the calibration sequences)",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--nsamples", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--rows", default="")
    p.add_argument("--calib-nsamples", type=int, default=32, help="pruning calibration sequences of 512")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    dense, tok = load_model("smollm2", dtype=torch.float32)
    calib = calibration_ids(tok, "wiki-offline", args.calib_nsamples, 512, seed=0)
    ids = calibration_ids(tok, "wiki-offline", args.nsamples, args.seqlen, seed=1)
    eval_ids = evaluation_ids(tok, "wiki-offline", max_tokens=args.eval_tokens)
    maskllm_ids = calib if args.maskllm_data == "calib" else ids
    bases: dict = {}

    def config(lr: float, steps: int = args.steps, **kw) -> TrainConfig:
        return TrainConfig(steps=steps, lr=lr, batch_size=args.batch_size, schedule="cosine",
                           warmup=max(1, steps // 20), precision="fp32", log_every=10, **kw)  # fmt: skip

    results = []
    env = environment()  # at the start: the commit that runs
    for name, base, job in rows_to_run(args):
        if base not in bases:  # pruned once, on first use
            bases[base] = base_model(base, dense, calib)
        model = copy.deepcopy(bases[base])
        start, report = time.perf_counter(), None
        if job == "lm":
            report = train(model, ids, config(args.lr)).to_dict()
        elif job == "distill":
            report = train(model, ids, config(args.lr), teacher=dense).to_dict()
        elif job == "lora":
            report = train(model, ids, config(10 * args.lr, lora_rank=args.lora_rank)).to_dict()
        elif job == "lm-maskllm-data":
            report = train(model, maskllm_ids, config(args.lr, args.maskllm_steps or args.steps)).to_dict()
        elif job.startswith("maskllm"):
            steps = args.maskllm_steps or args.steps
            admm = "admm" in job
            settings = MaskLLMSettings(seed=0, update_weights=job.endswith("-train"))
            report = learn_masks(
                model, maskllm_ids, config(args.maskllm_lr, steps), prior="sparsegpt", settings=settings,
                start="prior" if admm else "dense", prior_update="admm" if admm else "none", prior_ids=calib,
            ).train  # fmt: skip
        seconds = time.perf_counter() - start
        model.eval()
        ppl = perplexity_of_ids(model, eval_ids, seqlen=512).ppl
        acc = sparsekit.zero_shot(model, ["wiki_lambada", "wiki_continuation"], tok, limit=args.items)
        accs = {t: s.main[1] for t, s in acc.scores.items()}
        row = {"name": name, "job": job, "ppl": ppl, "accuracy": accs, "zeros": zeros_share(model),
               "params": sum(p.numel() for p in model.parameters()), "seconds": seconds if report else 0.0,
               "tokens_per_s": report["tokens_per_s"] if report else None,
               "losses": report["losses"] if report else None}  # fmt: skip
        results.append(row)
        logging.info("%s: ppl %.3f, acc %s, zeros %.3f, %.0f s", name, ppl, accs, row["zeros"], seconds)
        del model
        _write(args, results, env)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
