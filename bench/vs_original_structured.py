"""sparsekit's FLAP, Wanda-sp and ShortGPT against the original code (CASIA-IVA-Lab/FLAP, and
icip-cas/ShortGPT from the ShortGPT authors' lab) on one model, the same calibration tokens and one
machine, in one run (issue 28).

    python bench/vs_original_structured.py --original reports/original --out docs/data/vs_original_structured

FLAP's code runs only on multi-head attention with 128-channel heads, so both tools prune SmolLM2
re-expressed in that shape (``bench/mha_head128.py``: the same logits; its zero channels count as
parameters for both, as FLAP's own accounting counts a head as 4 x hidden x 128). Protocol as the
other issue-28 tables: fp32, 64 x 512 calibration tokens of the offline corpus (``--seeds``),
perplexity on 32,768 held-out tokens in windows of 512, 2 threads. Per row (method / ratio): the
original code through ``bench/original_driver.py`` (a subprocess; ``--method flap`` is its default
WIFV score with the AL-AM adaptive structure and bias compensation, ``wanda-sp`` its uniform
structured Wanda; mask-only mode, its result loaded into a transformers Llama with the
compensation biases), then sparsekit's counterparts (``SPARSEKIT``: the default bf16 forwards and
fp32 ones, with and without ``refit=True``, Wanda-sp also at the original's size). Each row gives
ppl, the prune call's time (model load excluded) and sparsekit's phases, and the decoder-block
parameters removed, counted the same way for both (a live head 4 x hidden x 128, a live MLP
channel 3 x hidden).
``shortgpt/RATIO`` rows remove round(RATIO x 30) whole blocks of SmolLM2 as it ships (the
authors' class driven as its ``run_shortgpt.py`` drives it, each calibration window one
``eval_importance`` call; the depth rows need no re-expression), then sparsekit's ``shortgpt`` with
fp32 and with its default forwards; they report the removed blocks.
``--original DIR`` holds the checkouts (``DIR/flap``, ``DIR/shortgpt``, cloned at ``ORIGINAL``'s
pinned commits when missing; ``--original-from`` points the clones elsewhere). Writes <out>.json
and <out>.md after every row.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from mha_head128 import checked_mha
from safetensors.torch import load_file
from vs_llmcompressor import fetch_original, run_driver

import sparsekit
from sparsekit._env import environment, run_line
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model
from sparsekit.pruning.structured.base import block_param_count
from sparsekit.pruning.structured.depth import remove_blocks

ORIGINAL = {
    "flap": ("https://github.com/CASIA-IVA-Lab/FLAP", "3bb57db3449dd2fa04a5c2192de80e87e33be2b1"),
    "shortgpt": ("https://github.com/icip-cas/ShortGPT", "9a2ee8dfe9e28d0bee430e83c140b787c02ddd6c"),
}
ROWS = ["flap/0.2", "wanda-sp/0.2", "shortgpt/0.2"]
DEPTH = ("shortgpt",)  # rows that remove whole blocks of the model as it ships
# sparsekit's counterparts of each original method: (label, prune options, size). Size "ratio"
# prunes the row's ratio of block parameters; "original" the share the original code removed on
# that row, with no rounding of MLP widths (channel_multiple 1, as the original), so both tools
# cut the same number of heads and channels (the original's Wanda-sp ratio counts heads and
# channels, not parameters: at 0.2 it removes 15.55% of SmolLM2's). Default forwards: bf16 mixed
# precision where the CPU has bf16 matmuls ("auto"); "model" keeps them fp32, as the original code on
# a CPU.
SPARSEKIT = {
    "flap": [
        ("flap adaptive, fp32 forwards", {"widths": "adaptive", "forward_dtype": "model"}, "ratio"),
        ("flap adaptive", {"widths": "adaptive"}, "ratio"),
        ("flap adaptive + refit", {"widths": "adaptive", "refit": True}, "ratio"),
    ],
    "wanda-sp": [
        ("wanda-sp at 20% of parameters", {}, "ratio"),
        ("wanda-sp, fp32 forwards", {"forward_dtype": "model", "channel_multiple": 1}, "original"),
        ("wanda-sp", {"channel_multiple": 1}, "original"),
        ("wanda-sp + refit", {"channel_multiple": 1, "refit": True}, "original"),
    ],
    "shortgpt": [
        ("shortgpt, fp32 forwards", {"forward_dtype": "model"}, "ratio"),
        ("shortgpt", {}, "ratio"),
    ],
}
DRIVER = Path(__file__).with_name("original_driver.py")
HEAD = 128  # FLAP's fixed head width
log = logging.getLogger("vs_original_structured")


def live_widths(model) -> list[tuple[int, int]]:
    """Per decoder block: (heads with any nonzero q row, MLP channels with any nonzero up row). A
    physically cut model and a mask-only one of the same cut give the same counts."""
    out = []
    for layer in model.model.layers:
        q = layer.self_attn.q_proj.weight.detach()
        heads = int((q.reshape(-1, HEAD * q.shape[1]) != 0).any(1).sum())
        channels = int((layer.mlp.up_proj.weight.detach() != 0).any(1).sum())
        out.append((heads, channels))
    return out


def block_params(model) -> int:
    """Decoder-block linear parameters by FLAP's accounting: 4 x hidden x 128 per live head, 3 x hidden
    per live MLP channel."""
    hidden = model.config.hidden_size
    return sum(h * 4 * hidden * HEAD + c * 3 * hidden for h, c in live_widths(model))


def with_biases(dense, state: dict[str, torch.Tensor]):
    """A transformers copy of ``dense`` with biases on every projection (zero but o_proj's and
    down_proj's, which ``state`` gives) and ``state``'s decoder tensors; rotary buffers skipped."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(dense.config)
    config.attention_bias, config.mlp_bias = True, True
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    full = dense.state_dict() | {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = model.load_state_dict(full, strict=False)
    if unexpected:
        raise RuntimeError(f"the original code's tensors do not fit the model: {unexpected[:3]}")
    with torch.no_grad():
        for name in missing:
            if not name.endswith(".bias"):
                raise RuntimeError(f"the original code left {name} out")
            model.get_parameter(name).zero_()
    return model


def without_blocks(dense, removed: list[int], state: dict[str, torch.Tensor]):
    """A copy of ``dense`` without the ``removed`` blocks, checked to hold exactly ``state`` (the
    original code's decoder tensors after its own deletion)."""
    model = copy.deepcopy(dense)
    remove_blocks(model, removed)
    own = model.state_dict()
    if set(state) != {k for k in own if ".layers." in k}:
        raise RuntimeError(f"the original code's blocks do not fit after removing {removed}")
    differ = [k for k, v in state.items() if not torch.equal(v, own[k])]
    if differ:
        raise RuntimeError(f"the original code's kept blocks differ from the dense ones: {differ[:3]}")
    return model


def run_original(checkout: Path, dense, folder: Path, calib_file: Path, method: str, ratio: str):
    """(dense pruned by the original code, its report); ``dense`` is the model the row prunes, saved
    in ``folder / model_folder(method)``."""
    out, report = folder / "original.safetensors", folder / "original.json"
    impl = "shortgpt" if method in DEPTH else "flap"
    command = [
        sys.executable, str(DRIVER), "--code", str(checkout), "--impl", impl,
        "--model", str(folder / model_folder(method)), "--calib", str(calib_file), "--method", method,
        "--sparsity", ratio, "--out", str(out), "--report", str(report),
    ]  # fmt: skip
    run_driver(command, "the original code")
    info = json.loads(report.read_text())
    if method in DEPTH:
        return without_blocks(dense, info["removed_blocks"], load_file(str(out))), info
    return with_biases(dense, load_file(str(out))), info


def model_folder(method: str) -> str:
    """Where the dense model a row prunes is saved: SmolLM2 as it ships for the depth rows, its
    MHA 9 x 128 re-expression for FLAP's code."""
    return "source" if method in DEPTH else "dense"


def target_sparsity(size: str, ratio: str, original: dict | None) -> float | None:
    """What sparsekit is asked for: the row's ratio ("ratio"), or the share of block parameters the
    original code removed on the row ("original"; None when the original failed)."""
    if size == "ratio":
        return float(ratio)
    return None if original is None else original["removed"]


def run_sparsekit(dense, calib: torch.Tensor, method: str, sparsity: float, options: dict):
    """(the pruned copy, {prune_s, its phases, forward dtype[, removed blocks]})."""
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    report = sparsekit.prune(
        model, method=method, sparsity=sparsity, calib=calib, show_progress=False, **options
    )
    seconds = time.perf_counter() - start
    info = {"prune_s": seconds, "phases_s": report.timings_s, "forward_dtype": report.forward_dtype}
    return model, info | ({"removed_blocks": report.removed_blocks} if method in DEPTH else {})


def _markdown(head: str, rows: list[dict]) -> str:
    lines = [
        head,
        "",
        "| row | seed | tool | forwards | ppl | prune s | sparsekit's phases (s) | block params removed | "
        "heads kept | MLP channels kept | blocks removed |",
        "|---|---:|---|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        ppl = "failed" if r.get("error") else f"{r['ppl']:.2f}"
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r.get("phases_s", {}).items()) or "-"
        dtype = {"bfloat16": "bf16", "float32": "fp32"}.get(
            r.get("forward_dtype", ""), r.get("forward_dtype", "-")
        )
        dtype = "fp32" if r["tool"].startswith("original") else dtype
        lines.append(
            f"| {r['row']} | {r.get('seed', '-')} | {r['tool']} | {dtype} | {ppl} | "
            f"{r.get('prune_s', 0):.1f} | {phases} | {r.get('removed', 0):.2%} | {r.get('heads', '-')} | "
            f"{r.get('channels', '-')} | {' '.join(map(str, r.get('removed_blocks', []))) or '-'} |"
        )
    lines += _ratios(rows)
    failed = [r for r in rows if r.get("error")]
    lines += [f"- {r['row']}, {r['tool']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def _ratios(rows: list[dict]) -> list[str]:
    """Each sparsekit row against the original on the same row and seed (ratios below 1: lower or faster)."""
    out = []
    for ref in (r for r in rows if r["tool"].startswith("original") and not r.get("error")):
        for r in rows:
            if r["tool"].startswith("sparsekit") and (r["row"], r.get("seed")) == (ref["row"], ref["seed"]):
                out.append(
                    f"- {r['row']}, seed {r['seed']}, {r['tool']}: ppl {r['ppl'] / ref['ppl']:.3f}x the "
                    f"original's, time {r['prune_s'] / ref['prune_s']:.2f}x, block params removed "
                    f"{r['removed']:.2%} against {ref['removed']:.2%}"
                )
    return (
        ["", "sparsekit against the original code (the issue's targets: ppl <= 1x, time <= 0.5x):", "", *out]
        if out
        else []
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/vs_original_structured")
    p.add_argument(
        "--original", required=True, metavar="DIR", help="where the checkouts are (DIR/flap, DIR/shortgpt)"
    )
    p.add_argument("--original-from", metavar="URL", help="clone the checkouts from URL/flap, URL/shortgpt")
    p.add_argument("--rows", nargs="+", default=ROWS, metavar="METHOD/RATIO")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    args = p.parse_args(argv)
    for row in args.rows:
        method, _, ratio = row.partition("/")
        if method not in SPARSEKIT:
            p.error(f"unknown row {row!r}: methods {' '.join(SPARSEKIT)}, e.g. flap/0.2")
        try:
            if not 0 < float(ratio) < 1:
                raise ValueError
        except ValueError:
            p.error(f"row {row!r} needs a ratio in (0, 1) after the '/', e.g. {method}/0.2")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    methods = {row.partition("/")[0] for row in args.rows}
    needed = {"shortgpt" if m in DEPTH else "flap" for m in methods}
    checkouts = fetch_original(
        Path(args.original), args.original_from, pins={k: v for k, v in ORIGINAL.items() if k in needed}
    )
    source, tok = load_model("smollm2", dtype=torch.float32)
    dense, gap = checked_mha(source, HEAD)
    eval_ids = evaluation_ids(tok, "wiki-offline", max_tokens=args.eval_tokens)
    env = environment()
    head = (
        f"{run_line('bench/vs_original_structured.py', argv, env)}; the original code ("
        + ", ".join(f"{k} at {v[1][:12]}" for k, v in ORIGINAL.items() if k in needed)
        + ") via bench/original_driver.py; SmolLM2-135M (the width rows: re-expressed as 9 heads "
        f"x 128, MHA, logits within {gap:.1e} of the source), fp32, calibration {args.nsamples} x "
        f"{args.seqlen} (seeds {' '.join(map(str, args.seeds))}), ppl on {eval_ids.shape[1]} held-out "
        "tokens in windows of 512."
    )
    total, depth_total = block_params(dense), block_param_count(source)
    out = Path(args.out)
    rows = [{"row": "dense", "tool": "-", "ppl": perplexity_of_ids(dense, eval_ids, 512).ppl, "removed": 0.0}]

    def add(row: dict, model) -> None:
        row["ppl"] = perplexity_of_ids(model, eval_ids, 512).ppl
        if row["row"].partition("/")[0] in DEPTH:
            row["removed"] = 1 - block_param_count(model) / depth_total
        else:
            widths = live_widths(model)
            row |= {
                "removed": 1 - block_params(model) / total,
                "heads": sum(h for h, _ in widths),
                "channels": sum(c for _, c in widths),
            }
        rows.append(row)
        log.info("%s", row)
        write_json_atomic(out.with_suffix(".json"), {"environment": env, "args": vars(args), "rows": rows})
        write_text_atomic(out.with_suffix(".md"), _markdown(head, rows))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dense.save_pretrained(folder / "dense")
        source.save_pretrained(folder / "source")
        for seed in args.seeds:
            calib = calibration_ids(tok, "wiki-offline", args.nsamples, args.seqlen, seed=seed)
            calib_file = folder / "calib.pt"
            torch.save(calib.clone(), calib_file)
            for row in args.rows:
                method, _, ratio = row.partition("/")
                model_in = source if method in DEPTH else dense
                checkout = checkouts["shortgpt" if method in DEPTH else "flap"]
                original = None
                try:
                    model, info = run_original(checkout, model_in, folder, calib_file, method, ratio)
                    original = {"row": row, "seed": seed, "tool": f"original {info['code']}", **info}
                    add(original, model)
                except RuntimeError as exc:
                    log.error("%s", exc)
                    rows.append(
                        {"row": row, "seed": seed, "tool": "original", "ppl": float("nan"), "error": str(exc)}
                    )
                for label, options, size in SPARSEKIT[method]:
                    tool = f"sparsekit {label}" + (", at the original's size" if size == "original" else "")
                    sparsity = target_sparsity(size, ratio, original)
                    if sparsity is None:
                        rows.append({"row": row, "seed": seed, "tool": tool, "ppl": float("nan"),
                                     "error": "the original code failed: no size to match"})  # fmt: skip
                        continue
                    model, info = run_sparsekit(model_in, calib, method, sparsity, options)
                    add({"row": row, "seed": seed, "tool": tool, "sparsity": sparsity, **info}, model)
                    del model
    print(_markdown(head, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
