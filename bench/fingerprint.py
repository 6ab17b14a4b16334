"""Fingerprint pruning results on the real model: mask hashes, perplexity, checkpoint tensor hashes.

Run it before and after a refactor that must not change behaviour, then compare the two JSON
files: identical mask and checkpoint hashes mean identical pruning and identical files.

    python bench/fingerprint.py --out /tmp/before.json   # on the old commit
    python bench/fingerprint.py --out /tmp/after.json    # on the new one
    python bench/fingerprint.py --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

CASES = [(m, s, {}) for m in ("magnitude", "wanda", "sparsegpt") for s in ("0.5", "2:4")]
# the steps and structured methods that ask the model description for blocks, folds, heads, channels
CASES += [
    ("wanda", "2:4", {"permute": True}),
    ("wanda", "0.7", {"allocation": "owl"}),
    ("flap", "0.2", {}),
    ("flap", "0.2", {"widths": "adaptive"}),
    ("wanda-sp", "0.2", {}),
    ("shortgpt", "0.1", {}),
    ("angular", "0.1", {"repair": True}),
]
STRUCTURED = ("flap", "wanda-sp", "shortgpt", "angular")


def _hash(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(nsamples: int, seqlen: int, eval_tokens: int) -> dict:
    import sparsekit
    from sparsekit.hf.checkpoint import read_state
    from sparsekit.hf.models import load_model

    torch.set_num_threads(2)
    base, tok = load_model("smollm2")
    out = {}
    for method, sparsity, steps in CASES:
        model = copy.deepcopy(base)
        calibrated = method != "magnitude" or "allocation" in steps
        data = {"tokenizer": tok, "nsamples": nsamples, "seqlen": seqlen} if calibrated else {}
        dtype = {} if method in STRUCTURED or not calibrated else {"forward_dtype": "float32"}
        sparsekit.prune(
            model, method=method, sparsity=sparsity, show_progress=False, **data, **dtype, **steps
        )
        masks = [m.weight != 0 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        ppl = sparsekit.perplexity(
            model, "wiki-offline", tokenizer=tok, seqlen=512, max_tokens=eval_tokens
        ).ppl
        ck = None
        if method not in STRUCTURED:
            with tempfile.TemporaryDirectory() as d:
                sparsekit.sparsify(model)
                sparsekit.save(model, Path(d) / "ck")
                state, _ = read_state(Path(d) / "ck")
                ck = _hash(state[k] for k in sorted(state))
        else:
            state = model.state_dict()
            ck = _hash(state[k] for k in sorted(state))
        label = " ".join([method, sparsity, *(f"{k}={v}" for k, v in steps.items())])
        out[label] = {
            "masks": _hash(masks),
            "weights": _hash(weights),
            "ppl": round(ppl, 4),
            "checkpoint": ck,
        }
        print(label, out[label], flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--compare", nargs=2)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096)
    args = p.parse_args()
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        same = True
        for case in a:
            diff = {
                k: (a[case][k], b.get(case, {}).get(k))
                for k in a[case]
                if a[case][k] != b.get(case, {}).get(k)
            }
            same &= not diff
            print(f"{case}: {'identical' if not diff else diff}")
        return 0 if same else 1
    result = fingerprint(args.nsamples, args.seqlen, args.eval_tokens)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
