"""Calibrating inside Mixture-of-Experts blocks: each expert judged on the tokens its router sends.

While a MoE block's calibration forwards run, its experts module computes through per-expert
``ExpertMatrix`` layers (``sparsekit.models.routed_forward``), so the engine's statistic hooks see,
for every expert, exactly the tokens routed to it (MoE-Pruner's observation), unweighted by the
gate: the routing weight scales an expert's output, not its input, so the input statistics of
its gate/up and down matrices are those of its own tokens. ``expert_tokens="all"`` instead sends
every token through every expert's matrices (what a port that ignores routing calibrates on),
without changing the block's output.

An expert that gets fewer than ``min_tokens`` routed tokens has its statistics topped up with
the layer's pooled ones (the sum over all experts, scaled to the missing token count), so a
never-routed expert is pruned by the layer's average input rather than by nothing; the report
counts them per block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from sparsekit.models import BlockAnatomy, ExpertsAnatomy, routed_forward

from .method import InputStat


@dataclass
class ExpertCounts:
    """Routed calibration tokens per expert of one block, and the experts given pooled statistics."""

    block: int
    tokens: list[int] = field(default_factory=list)
    pooled: list[int] = field(default_factory=list)


@contextmanager
def routed_experts(
    block: BlockAnatomy, module: nn.Module, linears: dict[str, nn.Module], all_tokens: bool = False
) -> Iterator[ExpertsAnatomy | None]:
    """Within the context the experts of ``module`` (the block or a copy of it) compute through the
    ``ExpertMatrix`` layers in ``linears``; the first call is checked against the experts' own
    forward, so a layout the anatomy misread fails loudly instead of calibrating wrongly."""
    ex = block.experts
    if ex is None:
        yield None
        return
    experts = module.get_submodule(ex.experts)
    native = type(experts).forward.__get__(experts)
    mine = routed_forward(experts, ex, linears, all_tokens)
    checked = []

    def forward(*args, **kwargs):
        out = mine(*args, **kwargs)
        if not checked:
            want = native(*args, **kwargs)
            err = ((out.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
            if err > 1e-2:
                raise ValueError(
                    f"block {block.index}: {ex.experts} computes something other than the routed sum of its "
                    f"experts that the anatomy read from its layout (relative difference {err:.2g}); "
                    "this MoE layout needs an entry in sparsekit/models/families.py"
                )
            checked.append(True)
        return out

    saved = experts.__dict__.get("forward")
    experts.forward = forward
    try:
        yield ex
    finally:
        if saved is None:
            experts.__dict__.pop("forward", None)
        else:
            experts.forward = saved


def pool_expert_stats(
    ex: ExpertsAnatomy, index: int, collected: dict[str, InputStat], min_tokens: int
) -> ExpertCounts:
    """Top up the statistics of experts with fewer than ``min_tokens`` routed tokens (in place in
    ``collected``, by matrix name) from the pooled statistics of all experts of the block."""
    counts = ExpertCounts(index)
    for part in ("gate_up", "down"):
        names = [f"{ex.experts}.{e}.{part}" for e in range(ex.num_experts)]
        own = [collected.get(n) for n in names]
        present = [s for s in own if s is not None and s.tokens > 0]
        if part == "gate_up":
            counts.tokens = [s.tokens if s is not None else 0 for s in own]
        if not present:
            continue
        pooled = sum(s.value.double() for s in present)
        pooled_tokens = sum(s.tokens for s in present)
        for e, (name, stat) in enumerate(zip(names, own, strict=True)):
            have = stat.tokens if stat is not None else 0
            if have >= min_tokens:
                continue
            extra = (pooled * ((min_tokens - have) / pooled_tokens)).float()
            value = extra.to(stat.value.device) + stat.value if stat is not None else extra
            collected[name] = InputStat(value, min_tokens)
            if part == "gate_up":
                counts.pooled.append(e)
    return counts
