"""Family x method coverage: every decoder-only family of the installed transformers that the
issue lists, each pruned by every method family, saved and reloaded, checked against
independent references (sparsekit.bench.coverage says how each cell is checked).

    python bench/coverage.py --out reports/coverage          # the whole table (about 10 min, 2 CPUs)
    python bench/coverage.py --families llama,gpt2 --columns "wanda 2:4,flap uniform"

Writes <out>.json (every cell with its status, reason and seconds, and the environment) and
<out>.md (the tables: dense families x every method; MoE families x expert removal, pruning inside
experts with routed statistics, stacking). Exits 1 when a cell FAILs (a refusal with a reason
is not a failure).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import warnings
from pathlib import Path

from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.bench.coverage import CELLS, FAMILIES, MOE_CELLS, MOE_FAMILIES, coverage_table, run_coverage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/coverage", help="path prefix of the .json and .md files")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated model_types")
    p.add_argument("--columns", default=",".join(CELLS), help="comma-separated columns: " + ", ".join(CELLS))
    p.add_argument("--moe-families", default=",".join(MOE_FAMILIES), help="MoE model_types ('' for none)")
    args = p.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    columns = [c for c in args.columns.split(",") if c]
    unknown = [c for c in columns if c not in CELLS]
    if unknown:
        p.error(f"unknown column(s) {unknown}; choose from {', '.join(CELLS)}")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    moe = [f for f in args.moe_families.split(",") if f]
    cells = run_coverage(families, columns)
    moe_cells = run_coverage(moe, tuple(MOE_CELLS)) if moe else []
    table = coverage_table(cells)
    if moe_cells:
        table += "\n\n## Mixture-of-Experts families\n\n" + coverage_table(moe_cells)
    cells = cells + moe_cells
    env = environment()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), {"environment": env, "cells": [vars(c) for c in cells]})
    machine = f"{env.get('cpu')}, torch {env.get('torch')}, transformers {env.get('transformers')}"
    command = " ".join(
        shlex.quote(a) for a in ["python", "bench/coverage.py", *(sys.argv[1:] if argv is None else argv)]
    )
    header = (
        f"# Family x method coverage\n\n`{command}` on {machine}, "
        f"commit {env.get('commit')}, {env.get('time_utc')}.\n\n"
    )
    write_text_atomic(out.with_suffix(".md"), header + table + "\n")
    print(table)
    return 1 if any(c.status == "FAIL" for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
