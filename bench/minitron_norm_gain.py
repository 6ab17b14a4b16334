"""What folding the norm gains into a Minitron hidden cut buys on the real default model: ppl with
and without it, at a hidden-only cut and at the default hidden + MLP cut.

    python bench/minitron_norm_gain.py --out reports/minitron_norm_gain      # about 5 min on 2 cores

Without the gains every norm over the residual stream divides by the RMS of fewer channels, so its
output grows by about sqrt(hidden / kept); with them each norm's scale takes the calibration RMS
ratio of kept to all channels (``sparsekit/pruning/structured/minitron.py``).
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
from sparsekit.hf.models import load_model
from sparsekit.pruning.structured import Minitron


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out", default="reports/minitron_norm_gain")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dense, tokenizer = load_model(args.model)
    calib = calibration_ids(tokenizer, "wiki-offline", args.nsamples, 512, seed=0)
    eval_ids = evaluation_ids(tokenizer, "wiki-offline", max_tokens=args.eval_tokens)
    rows = [{"cut": "dense", "ppl": perplexity_of_ids(dense, eval_ids, seqlen=512).ppl}]
    for axes, sparsity in (("hidden", 0.1), ("hidden,mlp", 0.2)):
        for gains in (True, False):
            method = Minitron()
            method.norm_gains = gains
            model = copy.deepcopy(dense)
            report = sparsekit.prune(
                model, method=method, sparsity=sparsity, axes=axes, calib=calib, show_progress=False
            )
            rows.append(
                {
                    "cut": f"{axes} {sparsity:.0%}",
                    "norm_gains": gains,
                    "hidden": report.hidden_size,
                    "removed_fraction": report.removed_fraction,
                    "ppl": perplexity_of_ids(model, eval_ids, seqlen=512).ppl,
                }
            )
            logging.info("%s", rows[-1])
    env = environment()
    write_json_atomic(Path(args.out) / "minitron_norm_gain.json", {"env": env, "rows": rows})
    lines = ["| cut | hidden | norm gains | ppl |", "|---|---|---|---:|"]
    for r in rows:
        hidden = "-" if "hidden" not in r else f"{r['hidden'][0]} -> {r['hidden'][1]}"
        gains = "-" if "norm_gains" not in r else ("folded in" if r["norm_gains"] else "none")
        lines.append(f"| {r['cut']} | {hidden} | {gains} | {r['ppl']:.2f} |")
    md = "\n".join(lines) + (
        f"\n\n{args.model}; calibration wiki-offline {args.nsamples} x 512 (seed 0); ppl on "
        f"{eval_ids.shape[1]} held-out tokens in windows of 512. Machine: {env['cpu']} "
        f"({env['cpu_threads']} threads), torch {env['torch']}, commit {env['commit']}, {env['time_utc']}.\n"
    )
    write_text_atomic(Path(args.out) / "minitron_norm_gain.md", md)
    print(md)


if __name__ == "__main__":
    main()
