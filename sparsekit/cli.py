"""Command line: ``sparsekit prune | eval | ...``. argparse lives here only."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("sparsekit")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose {', '.join(_DTYPES)}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", type=_dtype, default=torch.float32, help="compute dtype (default float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model")


def write_json_atomic(path: str | Path, data: object) -> None:
    """Write JSON to a temp file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def load_any(spec: str, dtype: torch.dtype, device: str, trust_remote_code: bool = False):
    """A model spec (hub id, folder, GGUF, 'smollm2') or a sparsekit checkpoint -> (model, tokenizer)."""
    from sparsekit.hf.models import load_model

    return load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def cmd_prune(args: argparse.Namespace) -> int:
    from sparsekit.api import perplexity, prune
    from sparsekit.formats import parse_sparsity

    parse_sparsity(args.sparsity)  # fail on a bad pattern before the model loads
    if args.out and Path(args.out).exists():
        raise FileExistsError(f"{args.out} exists; remove it or pick another --out")
    # the model stays on the CPU; blocks visit --device one at a time, so it may exceed device memory
    model, tokenizer = load_any(args.model, args.dtype, "cpu", args.trust_remote_code)
    report = prune(
        model,
        device=args.device,
        method=args.method,
        sparsity=args.sparsity,
        calib=args.calib,
        tokenizer=tokenizer,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        blocksize=args.blocksize,
        percdamp=args.percdamp,
        batch_size=args.batch_size,
    )
    summary = report.to_dict()
    print(
        f"pruned {len(report.layers)} linear layers with {args.method} to {report.overall_sparsity:.3f} "
        f"sparsity ({report.sparsity}); calib {report.calib}, {report.nsamples} x {report.seqlen} tokens"
    )
    print("time per phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings_s.items()))
    for note in report.notes:
        print("note:", note)
    if args.eval:
        model.to(args.device)
        result = perplexity(
            model,
            args.eval_dataset,
            seqlen=args.eval_seqlen,
            tokenizer=tokenizer,
            max_tokens=args.eval_tokens,
        )
        summary["perplexity"] = result.to_dict()
        print(f"perplexity {result.ppl:.3f} on {result.dataset} ({result.windows} x {result.seqlen} tokens)")
    if args.out:
        save_pruned(model.cpu(), tokenizer, args.out, summary)
        print(f"saved to {args.out}")
    return 0


def save_pruned(model, tokenizer, out: str, summary: dict) -> None:
    """Save the pruned model (HF format, zeros kept) and its prune report."""
    out_dir = Path(out)
    tmp = Path(
        tempfile.mkdtemp(dir=out_dir.parent if out_dir.parent.exists() else None, prefix=".sparsekit-")
    )
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    write_json_atomic(tmp / "prune_report.json", summary)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or pick another --out")
    os.replace(tmp, out_dir)


def cmd_eval(args: argparse.Namespace) -> int:
    from sparsekit.api import perplexity

    model, tokenizer = load_any(args.model, args.dtype, args.device, args.trust_remote_code)
    result = perplexity(
        model,
        args.dataset,
        seqlen=args.seqlen,
        tokenizer=tokenizer,
        max_tokens=args.max_tokens,
        show_progress=True,
    )
    print(
        f"perplexity {result.ppl:.3f} on {result.dataset}: {result.windows} windows x {result.seqlen} tokens"
    )
    if args.json:
        write_json_atomic(args.json, result.to_dict())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsekit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a causal LM one-shot")
    p.add_argument(
        "model", help="hub id, local folder, folder/file.gguf, or 'smollm2' (the embedded default)"
    )
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default="wanda")
    p.add_argument("--sparsity", default="0.5", help="0.5, 50%%, 2:4, 4:8 ...")
    p.add_argument("--calib", default="wiki-offline", help="wiki-offline | wikitext2 | c4 | dolly | PATH")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening (fraction of mean diag)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per block forward")
    p.add_argument("--eval", action="store_true", help="print perplexity after pruning")
    p.add_argument("--eval-dataset", default="wiki-offline")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=None, help="cap on evaluation tokens")
    p.add_argument("--out", help="directory to save the pruned model to")
    _add_model_args(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity of a model or a pruned checkpoint")
    p.add_argument("model")
    p.add_argument("--dataset", default="wiki-offline")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--json", help="write the result as JSON here")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ConnectionError, ImportError) as exc:
        print(f"sparsekit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
