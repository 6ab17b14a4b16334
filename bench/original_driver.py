"""Run one prune with the papers' original code (locuslab/wanda, luuyin/OWL) on a local checkout.

Called by ``bench/vs_llmcompressor.py --original`` in a subprocess of sparsekit's own venv, so the
compatibility shims below never touch the process that runs sparsekit. The original code is
imported from ``--code`` (a git checkout the caller fetched); nothing of it is vendored here.

    python bench/original_driver.py --code CHECKOUT --impl wanda --model DIR --calib calib.pt \
        --method sparsegpt --sparsity 2:4 --out pruned.safetensors --report result.json

``--impl wanda``: ``lib.prune.prune_wanda`` / ``prune_sparsegpt`` of locuslab/wanda;
``--impl owl``: ``lib.prune_all.prune_wanda_outlier`` / ``prune_sparsegpt_outlier`` of luuyin/OWL
(``--method wanda+owl`` / ``sparsegpt+owl``, M ``--owl-m`` and lambda ``--owl-lamda``). The
calibration windows are the caller's ids (the code's own C4 loader is replaced); everything else
is the original functions as written. Shims, each for an API the 2023 code predates:

- transformers 5 decoder layers take ``position_embeddings`` (cos, sin) from the model's rotary
  module instead of computing them; a forward pre-hook on each decoder layer computes them from
  the ``position_ids`` the original code passes (transformers' own call already has them).
- ``model.hf_device_map`` (set by accelerate's ``device_map=``) is read unconditionally: an empty
  map, the single-device case; ``model.seqlen``: the calibration window length.
- ``torch.cuda.synchronize`` is a no-op where torch has no CUDA (the SparseGPT class calls it
  for its timer).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import time
from types import SimpleNamespace

ENTRY = {
    ("wanda", "wanda"): ("lib.prune", "prune_wanda"),
    ("wanda", "sparsegpt"): ("lib.prune", "prune_sparsegpt"),
    ("owl", "wanda+owl"): ("lib.prune_all", "prune_wanda_outlier"),
    ("owl", "sparsegpt+owl"): ("lib.prune_all", "prune_sparsegpt_outlier"),
}


def _pattern(sparsity: str) -> tuple[float, int, int]:
    """'0.5' -> (0.5, 0, 0); '2:4' -> (0.5, 2, 4): the original code's (ratio, prune_n, prune_m)."""
    if ":" in sparsity:
        n, m = (int(v) for v in sparsity.split(":"))
        return 1 - n / m, n, m
    return float(sparsity), 0, 0


def _rope_hook(rotary):
    """A forward pre-hook adding ``position_embeddings`` from ``position_ids`` when the call lacks it."""
    import torch

    def hook(module, args, kwargs):
        if kwargs.get("position_embeddings") is not None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        kwargs["position_embeddings"] = rotary(hidden, position_ids=positions)
        return args, kwargs

    return hook


def _calibration_loader(ids):
    """The original ``get_loaders`` replaced: (list of (input [1, L], target [1, L]), None)."""

    def get_loaders(name, nsamples=128, seed=0, seqlen=2048, tokenizer=None):
        if nsamples > ids.shape[0]:
            raise SystemExit(f"the original code asked for {nsamples} windows; the file has {ids.shape[0]}")
        windows = []
        for row in ids[:nsamples]:
            target = row.unsqueeze(0).clone()
            target[:, :-1] = -100
            windows.append((row.unsqueeze(0), target))
        return windows, None

    return get_loaders


def _commit(code: str) -> str:
    done = subprocess.run(["git", "-C", code, "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown (not a git checkout)"


def main() -> int:
    from driver_io import driver_arguments, load_calibration_ids, write_outputs

    p = driver_arguments(__doc__.splitlines()[0])
    p.add_argument("--code", required=True, help="a checkout of locuslab/wanda or luuyin/OWL")
    p.add_argument("--impl", required=True, choices=("wanda", "owl"))
    p.add_argument("--owl-m", type=float, default=5.0)
    p.add_argument("--owl-lamda", type=float, default=0.08)
    args = p.parse_args()
    if (args.impl, args.method) not in ENTRY:
        known = sorted(m for i, m in ENTRY if i == args.impl)
        p.error(f"--impl {args.impl} has no method {args.method!r}: {known}")
    if not os.path.isdir(os.path.join(args.code, "lib")):
        p.error(f"--code {args.code} has no lib/ folder: pass a checkout of the original repository")

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    ids = load_calibration_ids(args.calib)
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    sys.path.insert(0, os.path.abspath(args.code))
    module_name, function = ENTRY[(args.impl, args.method)]
    module = importlib.import_module(module_name)
    module.get_loaders = _calibration_loader(ids)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    model.seqlen = ids.shape[1]
    model.hf_device_map = {}
    for layer in model.model.layers:
        layer.register_forward_pre_hook(_rope_hook(model.model.rotary_emb), with_kwargs=True)
    ratio, prune_n, prune_m = _pattern(args.sparsity)
    options = SimpleNamespace(
        nsamples=ids.shape[0], seed=0, sparsity_ratio=ratio, use_variant=False,
        Hyper_m=args.owl_m, Lamda=args.owl_lamda, model=args.model,
    )  # fmt: skip
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the original prints per layer: kept, off stdout
        getattr(module, function)(options, model, None, torch.device("cpu"), prune_n=prune_n, prune_m=prune_m)
    seconds = time.perf_counter() - start

    report = {
        "prune_s": seconds,
        "code": f"{args.impl}@{_commit(args.code)[:12]}",
        "entry": f"{module_name}.{function}",
        "torch": torch.__version__,
    }
    write_outputs(model, args.out, args.report, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
