"""Memory of the real default model before and after ``sparsify``: parameter bytes and process RSS.

    python bench/sparse_memory.py [--dtype float32|bfloat16] [--out reports/sparse_memory.json]

SmolLM2-135M pruned 2:4 (magnitude: the bytes do not depend on the method), then swapped to
SparseLinear. RSS is read after a gc and malloc_trim, so freed dense weights are given back.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

from sparsekit._env import environment
from sparsekit.hf.models import load_model
from sparsekit.models import model_bytes
from sparsekit.nn import sparsify
from sparsekit.nn.sparsify import release_memory
from sparsekit.pruning import PruneConfig, prune_model


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _settled_rss() -> int:
    gc.collect()
    release_memory()
    return rss_bytes()


def memory_report(dtype: torch.dtype) -> dict:
    """SmolLM2 pruned 2:4: model bytes and RSS before and after sparsify, plus the swap report."""
    model, _ = load_model("smollm2", dtype=dtype)
    prune_model(model, None, PruneConfig(method="magnitude", sparsity="2:4", show_progress=False))
    before = {"model_bytes": model_bytes(model), "rss_bytes": _settled_rss()}
    report = sparsify(model)
    after = {"model_bytes": model_bytes(model), "rss_bytes": _settled_rss()}
    out = {"dtype": str(dtype).replace("torch.", ""), "before": before, "after": after, **report.to_dict()}
    out.pop("skipped")
    mib = 1 / 2**20
    print(
        f"{out['dtype']}: model {before['model_bytes'] * mib:.1f} -> {after['model_bytes'] * mib:.1f} MiB, "
        f"RSS {before['rss_bytes'] * mib:.1f} -> {after['rss_bytes'] * mib:.1f} MiB, "
        f"linear weights {report.layer_bytes_before * mib:.1f} -> {report.layer_bytes_after * mib:.1f} MiB"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="reports/sparse_memory.json")
    args = p.parse_args(argv)
    result = {"env": environment(), **memory_report(getattr(torch, args.dtype))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
