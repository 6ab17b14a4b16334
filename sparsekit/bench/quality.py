"""Quality table: perplexity of dense and of each method at each pattern, plus prune time per phase.

One model load; each cell prunes a fresh deep copy with the same calibration tokens and is
evaluated on the same held-out tokens.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsekit.api import prune
from sparsekit.eval.perplexity import perplexity_of_ids

log = logging.getLogger(__name__)


@dataclass
class QualityRow:
    method: str
    sparsity: str
    ppl: float
    overall_sparsity: float
    prune_s: float
    timings_s: dict[str, float] = field(default_factory=dict)


def quality_table(
    model: nn.Module,
    calib_ids: torch.Tensor,
    eval_ids: torch.Tensor,
    methods: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt"),
    patterns: tuple[str, ...] = ("0.5", "4:8", "2:4"),
    eval_seqlen: int = 512,
    show_progress: bool = True,
    forward_dtype: str = "auto",
) -> list[QualityRow]:
    """Rows for dense and every (method, pattern); the model itself is left dense."""
    rows = [QualityRow("dense", "0", perplexity_of_ids(model, eval_ids, eval_seqlen).ppl, 0.0, 0.0)]
    log.info("dense ppl %.3f", rows[0].ppl)
    for pattern in patterns:
        for method in methods:
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            report = prune(
                pruned,
                method=method,
                sparsity=pattern,
                calib=calib_ids,
                show_progress=show_progress,
                forward_dtype=forward_dtype,
            )
            elapsed = time.perf_counter() - start
            ppl = perplexity_of_ids(pruned, eval_ids, eval_seqlen).ppl
            rows.append(QualityRow(method, pattern, ppl, report.overall_sparsity, elapsed, report.timings_s))
            log.info("%s %s: ppl %.3f (prune %.1f s)", method, pattern, ppl, elapsed)
            del pruned
    return rows


def quality_markdown(rows: list[QualityRow]) -> str:
    """Perplexity grid: one row per method, one column per pattern."""
    patterns = list(dict.fromkeys(r.sparsity for r in rows if r.method != "dense"))
    methods = list(dict.fromkeys(r.method for r in rows if r.method != "dense"))
    dense = next(r.ppl for r in rows if r.method == "dense")
    cell = {(r.method, r.sparsity): r for r in rows}
    lines = [
        "| method | " + " | ".join(f"ppl @ {p}" for p in patterns) + " |",
        "|---|" + "---:|" * len(patterns),
        "| dense | " + " | ".join(f"{dense:.2f}" for _ in patterns) + " |",
    ]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(f"{cell[(method, p)].ppl:.2f}" for p in patterns) + " |")
    lines += [
        "",
        "| method | pattern | prune s | forward s | statistics s | solve s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.method == "dense":
            continue
        t = r.timings_s
        lines.append(
            f"| {r.method} | {r.sparsity} | {r.prune_s:.1f} | {t.get('forward', 0):.1f} | "
            f"{t.get('statistics', 0):.1f} | {t.get('solve', 0):.1f} |"
        )
    return "\n".join(lines)
