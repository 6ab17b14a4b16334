"""SparseGPT's joint sparsification + quantization (``wbits``) against pruning and then rounding.

    python bench/joint_quant.py --out docs/data/joint_quant               # about 12 min on 2 cores

SmolLM2-135M fp32, 32 x 512 calibration tokens of the offline corpus (seed 0), perplexity on 32,768
held-out tokens in windows of 512. Per pattern (``--patterns``) and grid (``--bits``, ``--group``;
symmetric, steps from the dense weight's max |w| per row or per group of inputs, zeros exact):
SparseGPT alone; SparseGPT then round-to-nearest on the same grid (prune-then-quantize); SparseGPT
with the grid inside its sweep (joint, the SparseGPT paper's 50% + 4-bit mode). Dense and dense
rounded to the grid give the quantization-only cost. Every row prunes a fresh copy with the same
tokens. ``--store FORMAT`` (e.g. ``int4``, ``2:4-int8``) adds what a user saves: the plain SparseGPT
model and the joint one each stored in that quantized format (``sparsekit.sparsify``): the format
quantizes the first with its own grid and keeps the joint one's grid exactly (``grid_steps``).
Writes <out>.json and <out>.md after every row.
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
from sparsekit._env import environment, run_line
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.formats.weight import weight_format
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model
from sparsekit.kernels.quant import round_to_grid
from sparsekit.models import block_linears, find_decoder_blocks, linear_weight, set_linear_weight
from sparsekit.pruning import QuantGrid

log = logging.getLogger("joint_quant")


def round_model_(model, grid: QuantGrid, steps_from=None) -> None:
    """Every decoder-block linear rounded to ``grid`` in place, steps from ``steps_from``'s weights
    (the dense model, as the joint mode) or from the model's own."""
    _, blocks = find_decoder_blocks(model)
    ref_blocks = find_decoder_blocks(steps_from)[1] if steps_from is not None else blocks
    with torch.no_grad():
        for block, ref in zip(blocks, ref_blocks, strict=True):
            refs = block_linears(ref)
            for name, module in block_linears(block).items():
                w = linear_weight(module)
                step = grid.steps(linear_weight(refs[name]))
                set_linear_weight(module, round_to_grid(w, step, grid.bits).to(w.dtype))


def _markdown(head: str, rows: list[dict]) -> str:
    lines = [head, "", "| pattern | grid | method | ppl | prune s |", "|---|---|---|---:|---:|"]
    lines += [
        f"| {r['pattern']} | {r['grid']} | {r['row']} | {r['ppl']:.2f} | {r.get('prune_s', 0):.1f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/joint_quant")
    p.add_argument("--patterns", nargs="+", default=["0.5", "2:4"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64, help="inputs per grid step; 0: one step per output row")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--forward-dtype", default="auto")
    p.add_argument("--store", metavar="FORMAT", help="also store both models in this quantized format")
    args = p.parse_args(argv)
    if args.store:
        weight_format(args.store)  # an unknown name fails here, before the model loads
    grid = QuantGrid(args.bits, args.group or None)  # refuses bad values before the model loads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    dense, tok = load_model("smollm2", dtype=torch.float32)
    calib = calibration_ids(tok, "wiki-offline", args.nsamples, args.seqlen, seed=0)
    eval_ids = evaluation_ids(tok, "wiki-offline", max_tokens=args.eval_tokens)
    env = environment()
    head = (
        f"{run_line('bench/joint_quant.py', argv, env)}; SmolLM2-135M fp32, calibration "
        f"{args.nsamples} x {args.seqlen} "
        f"(seed 0), forward dtype {args.forward_dtype}, ppl on {eval_ids.shape[1]} held-out tokens "
        "(windows of 512)."
    )
    out = Path(args.out)
    rows: list[dict] = []

    def add(model, **row) -> None:
        row["ppl"] = perplexity_of_ids(model, eval_ids, 512).ppl
        rows.append(row)
        log.info("%s", row)
        write_json_atomic(out.with_suffix(".json"), {"environment": env, "args": vars(args), "rows": rows})
        write_text_atomic(out.with_suffix(".md"), _markdown(head, rows))

    add(dense, pattern="-", grid="-", row="dense")
    rounded = copy.deepcopy(dense)
    round_model_(rounded, grid)
    add(rounded, pattern="-", grid=str(grid), row="dense, rounded")
    del rounded
    common = dict(method="sparsegpt", calib=calib, forward_dtype=args.forward_dtype, show_progress=False)
    for pattern in args.patterns:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        sparsekit.prune(model, sparsity=pattern, **common)
        seconds = time.perf_counter() - start
        add(model, pattern=pattern, grid="-", row="SparseGPT", prune_s=seconds)
        if args.store:
            stored = copy.deepcopy(model)
            sparsekit.sparsify(stored, format=args.store)
            add(stored, pattern=pattern, grid=args.store, row=f"SparseGPT, stored as {args.store}")
            del stored
        round_model_(model, grid, steps_from=dense)
        add(model, pattern=pattern, grid=str(grid), row="SparseGPT, then rounded", prune_s=seconds)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        sparsekit.prune(model, sparsity=pattern, wbits=grid.bits, wgroup=grid.group, **common)
        add(
            model, pattern=pattern, grid=str(grid), row="SparseGPT joint", prune_s=time.perf_counter() - start
        )
        if args.store:
            sparsekit.sparsify(model, format=args.store)
            add(model, pattern=pattern, grid=str(grid), row=f"SparseGPT joint, stored as {args.store}")
        del model
    print(_markdown(head, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
