"""Per layer: SparseGPT's joint mode against prune-then-round, on the calibration tokens and held out.

    python bench/joint_quant_layers.py --out docs/data/joint_quant_layers     # about 1 minute

SmolLM2-135M fp32; the inputs of a few linear layers (dense model) on ``--sequences`` x 512 tokens
of the offline corpus (seed 0): the first half fits the Hessian, the second half is held out. Per
layer and pattern: the relative output error ||X (W - Q)^T||^2 / ||X W^T||^2 of SparseGPT alone,
SparseGPT then rounded to the grid (steps from the dense weight, as the joint mode uses), and the
joint mode, measured on the fitting tokens (what the solve minimises) and on the held-out ones.
Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sparsekit._env import environment, run_line
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.hf.data import calibration_ids
from sparsekit.hf.models import load_model
from sparsekit.kernels.quant import round_to_grid
from sparsekit.pruning import QuantGrid, sparsegpt_solve

LAYERS = ("model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj", "model.layers.12.mlp.up_proj")


def layer_inputs(model, ids: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """Each named linear's input [tokens, K] on ``ids`` (one dense forward)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, args):
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1])

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(keep(n)) for n in names]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


def rel_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return ((x @ (w - q).T).square().sum() / (x @ w.T).square().sum()).item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/joint_quant_layers")
    p.add_argument(
        "--sequences", type=int, default=16, help="calibration sequences of 512; half fit, half held out"
    )
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    args = p.parse_args(argv)
    grid = QuantGrid(args.bits, args.group or None)
    torch.set_num_threads(2)
    model, tok = load_model("smollm2", dtype=torch.float32)
    ids = calibration_ids(tok, "wiki-offline", args.sequences, 512, seed=0)
    inputs = layer_inputs(model, ids, LAYERS)
    rows = []
    for name in LAYERS:
        w = model.get_submodule(name).weight.detach().float()
        x = inputs[name]
        fit, held = x[: x.shape[0] // 2], x[x.shape[0] // 2 :]
        hessian = 2 * fit.T @ fit / fit.shape[0]
        for pattern in ("0.5", "2:4"):
            pruned = sparsegpt_solve(w, hessian, pattern).weight
            variants = {
                "SparseGPT": pruned,
                "then rounded": round_to_grid(pruned, grid.steps(w), grid.bits),
                "joint": sparsegpt_solve(w, hessian, pattern, grid=grid).weight,
            }
            for variant, q in variants.items():
                rows.append(
                    {"layer": name, "pattern": pattern, "variant": variant,
                     "fit": rel_error(fit, w, q), "held_out": rel_error(held, w, q)}
                )  # fmt: skip
    env = environment()
    head = (
        f"{run_line('bench/joint_quant_layers.py', argv, env)}; grid {grid}; {args.sequences // 2} x 512 "
        "tokens fit the Hessian, as many are held out."
    )
    lines = [
        head,
        "",
        "| layer | pattern | variant | error, fit tokens | error, held out |",
        "|---|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['layer']} | {r['pattern']} | {r['variant']} | {r['fit']:.4f} | {r['held_out']:.4f} |"
        for r in rows
    ]
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), {"environment": env, "args": vars(args), "rows": rows})
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
