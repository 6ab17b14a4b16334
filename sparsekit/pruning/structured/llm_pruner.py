"""LLM-Pruner (Ma et al., 2023): coupled structures ranked by a first- or second-order Taylor
estimate of the loss change, the same ratio removed from the blocks in between.

Groups are the structures that must go together: a KV group with its query heads (q rows, k and
v rows, o columns; ``heads="query"`` ranks query heads within their group, their KV head's share
split between them) and an MLP channel (its gate and up rows, its down column). The salience of
a weight w with gradient g of the mean calibration loss is

- ``element1`` (the original's ``param_first``): |w g| summed over the group's weights;
- ``element2`` (``param_mix``): |w g - 1/2 w^2 F| summed, F the diagonal Fisher estimate
  (per-sequence squared gradients averaged over the calibration sequences);
- ``vector`` (``vectorize``): per layer of the group, |sum of w g over the structure's row or
  column|, summed over its rows / columns and layers.

As the paper, the first four and the last two blocks are left whole; the blocks in between lose
the same share of heads (rounded down to whole units) and MLP channels, sized so that
``sparsity`` of all decoder-block parameters goes. Gradients come from one backward per
calibration batch (per sequence for ``element2``), one block on the compute device at a time
(``passes.block_gradients``), so a model larger than the device still prunes.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import nn

from sparsekit.models import BlockAnatomy, ModelAnatomy, describe, is_conv1d, linear_weight, model_device

from .base import StructuredConfig, register_structured
from .passes import block_gradients, compute_device, on_device
from .width import BlockStats, WidthMethod, _budget_params, attention_units, mlp_units, select_uniform

KEEP_FIRST, KEEP_LAST = 4, 2  # the paper prunes blocks 4 .. L-3 (LLaMA-7B: 4-29 of 32)


def taylor_saliences(
    model: nn.Module,
    linears: list[nn.Module],
    input_ids: torch.Tensor,
    batch_size: int,
    importance: str,
    device: torch.device | None = None,
) -> dict[nn.Module, torch.Tensor]:
    """Per linear (each inside a decoder block), the salience [out, in] (float64, on the host) of
    each weight: w g (element1, vector) or w g - 1/2 w^2 F (element2); g the gradient of the mean
    loss over every predicted token of ``input_ids`` [n, L], from ``block_gradients`` (one block on
    ``device`` at a time). Every ``requires_grad`` flag and ``.grad`` is restored afterwards."""
    device = device if device is not None else model_device(model)
    anatomy = describe(model)
    owner = {id(m): b.index for b in anatomy for m in b.module.modules()}
    per_block: dict[int, list[nn.Module]] = {}
    for m in linears:
        per_block.setdefault(owner[id(m)], []).append(m)
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    watched = {id(m.weight) for m in linears}
    shapes = {m: tuple(m.weight.shape) for m in linears}
    grad = {m: torch.zeros(shapes[m], dtype=torch.float64) for m in linears}
    fisher = (
        {m: torch.zeros(shapes[m], dtype=torch.float64) for m in linears} if importance == "element2" else {}
    )
    share = (input_ids.numel() - input_ids.shape[0]) / (input_ids.shape[1] - 1)  # sequences' share

    def consume(index: int, block: nn.Module) -> None:
        for m in per_block.get(index, ()):
            g = m.weight.grad.detach().cpu()
            grad[m].add_(g)  # float64 accumulator: no float64 copy of g
            if fisher:  # one sequence per batch: its own mean loss's gradient is g * n
                fisher[m].add_((g.double() * share) ** 2 / len(input_ids))

    step = 1 if importance == "element2" else batch_size
    try:
        for p in params:
            p.requires_grad_(id(p) in watched)
            p.grad = None
        block_gradients(model, input_ids, step, device, consume)
    finally:
        for p, flag in zip(params, was, strict=True):
            p.grad = None
            p.requires_grad_(flag)
    out = {}
    for index, ms in per_block.items():
        with on_device(anatomy[index].module, device):
            for m in ms:
                w = linear_weight(m).detach().double().cpu()
                g = grad.pop(m)
                g = g.T if is_conv1d(m) else g  # Conv1D: [in, out]
                if fisher:
                    f = fisher.pop(m)
                    out[m] = w * g - 0.5 * w * w * (f.T if is_conv1d(m) else f)
                else:
                    out[m] = w * g
    return out


def _per_row(salience: torch.Tensor, vector: bool) -> torch.Tensor:
    """[out]: each output row's salience, |sum| (vector) or sum of || (element)."""
    return salience.sum(1).abs() if vector else salience.abs().sum(1)


def _per_col(salience: torch.Tensor, vector: bool) -> torch.Tensor:
    return salience.sum(0).abs() if vector else salience.abs().sum(0)


def head_importance(block: BlockAnatomy, sal: dict[str, torch.Tensor], vector: bool) -> torch.Tensor:
    """[heads]: each query head's own rows of the q/k/v producers and its o columns, plus its share
    (1 / group size) of its KV head's rows, so a KV group's heads sum to the whole group's."""
    a = block.attention
    rows = {n: _per_row(sal[n], vector) for n in a.producers}
    cols = _per_col(sal[a.o], vector)
    empty = torch.zeros(0, dtype=torch.long)
    scores = []
    for h in range(a.heads):
        kv = torch.tensor([h // a.group_size])
        shared = {n: set(r.tolist()) for n, r in a.producer_rows(empty, kv).items()}
        total = cols[a.o_columns(torch.tensor([h])).to(cols.device)].sum()
        for n, r in a.producer_rows(torch.tensor([h]), kv).items():
            own = [i for i in r.tolist() if i not in shared.get(n, ())]
            total = total + rows[n][own].sum() + rows[n][sorted(shared.get(n, ()))].sum() / a.group_size
        scores.append(total)
    return torch.stack(scores)


def channel_importance(block: BlockAnatomy, sal: dict[str, torch.Tensor], vector: bool) -> torch.Tensor:
    """[intermediate]: each MLP channel's gate and up rows and its down column."""
    m = block.mlp
    every = torch.arange(m.intermediate)
    total = _per_col(sal[m.down], vector).clone()
    for n, r in m.producer_rows(every).items():  # a fused [gate | up] gives each channel two rows
        total += _per_row(sal[n], vector)[r.to(total.device)].reshape(-1, m.intermediate).sum(0)
    return total


def pruned_range(blocks: int) -> range:
    """The blocks LLM-Pruner cuts: all but the first four and the last two (all, if that is none)."""
    inner = range(KEEP_FIRST, blocks - KEEP_LAST)
    return inner if len(inner) else range(blocks)


@register_structured
class LLMPruner(WidthMethod):
    """Taylor importance of coupled groups (heads with their KV group, MLP channels), uniform
    ratio in blocks 4 .. L-3."""

    name = "llm-pruner"
    score_kind = "taylor"
    scores_from_stats = False  # gradients score it; the statistics pass runs only for compensation
    whole_model = "backward"

    def prune(self, model, input_ids, config):
        anatomy = describe(model)
        anatomy.require_width(self.name)
        started = time.perf_counter()
        if input_ids is not None and input_ids.dim() == 2:  # the base checks it again, with the message
            self._saliences(model, anatomy, input_ids, config)
        gradients = time.perf_counter() - started
        report = super().prune(model, input_ids, config)
        report.timings_s = {"gradients": gradients, **report.timings_s}
        return report

    def _saliences(
        self, model: nn.Module, anatomy: ModelAnatomy, input_ids, config: StructuredConfig
    ) -> None:
        """Per block in the pruned range: {linear name: salience}; kept until ``_select``."""
        names = {
            b.index: [*b.attention.producers, b.attention.o, *b.mlp.producers, b.mlp.down]
            for b in anatomy
            if b.index in pruned_range(len(anatomy)) and b.attention is not None and b.mlp is not None
        }
        linears = [anatomy[i].linear(n) for i, ns in names.items() for n in ns]
        device = compute_device(model, config.device)
        sal = taylor_saliences(model, linears, input_ids, config.batch_size, config.importance, device)
        self.saliences = {i: {n: sal[anatomy[i].linear(n)] for n in ns} for i, ns in names.items()}

    def _select(self, anatomy: ModelAnatomy, stats: list[BlockStats], config: StructuredConfig):
        vector = config.importance == "vector"
        inside = [anatomy[i] for i in sorted(self.saliences)]
        heads = [head_importance(b, self.saliences[b.index], vector) for b in inside]
        outside = {b.index: torch.zeros(b.attention.heads) for b in anatomy if b.attention is not None}
        attn = [attention_units(b, h, config.heads) for b, h in zip(inside, heads, strict=True)]
        mlp = [mlp_units(b, channel_importance(b, self.saliences[b.index], vector)) for b in inside]
        params = [_budget_params(b) for b in anatomy]
        share = config.sparsity * sum(params) / sum(params[b.index] for b in inside)
        if share >= 1:
            raise ValueError(
                f"sparsity {config.sparsity:g} of all block parameters is {share:.0%} of blocks "
                f"{inside[0].index}..{inside[-1].index} (LLM-Pruner leaves the first {KEEP_FIRST} and last "
                f"{KEEP_LAST} whole): ask for less"
            )
        chosen = select_uniform(
            inside, attn, mlp, replace(config, sparsity=share), [params[b.index] for b in inside]
        )
        by_block = {b.index: (h, c) for b, h, c in zip(inside, heads, chosen, strict=True)}
        del self.saliences
        return (
            [by_block[b.index][0] if b.index in by_block else outside.get(b.index) for b in anatomy],
            [by_block[b.index][1] if b.index in by_block else ([], []) for b in anatomy],
        )
