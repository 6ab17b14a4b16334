"""Sub-block removal: delete a block's attention or its MLP on its own (BlockPruner, 2SSP).

- ``blockpruner`` (Zhong et al., 2024, "BlockPruner: Fine-grained Pruning for Large Language
  Models"): every attention and every (dense) MLP sub-block is a candidate; greedily, the one
  whose removal gives the lowest calibration perplexity goes, and the search repeats on the
  pruned model until the removed parameters reach ``sparsity`` of the decoder blocks' (it stops
  at the count closest to the target: it does not take a sub-block that would overshoot by more
  than half of it). Every candidate is re-scored at every step (``subblock_search="exhaustive"``,
  the default, as the paper). ``"lazy"`` re-scores them in the order of their previous
  perplexities and stops once the next previous value is no lower than the best fresh one: a few
  evaluations per step instead of all, and the same choice wherever removing a sub-block never
  makes another removal cheaper; that does not always hold (on a tiny random Llama, removing
  block 0's attention made block 1's cheaper, and lazy took block 3's instead), so it is an
  approximation, reported as one.

- ``2ssp`` (Sandri et al., 2025, "2SSP: A Two-Stage Framework for Structured Pruning of LLMs"):
  first the same share of every block's MLP channels goes, ranked by each channel's L2 norm over
  the tokens of a calibration sequence (averaged over sequences; the dense model's activations);
  then round(L * s ** ((MLP params / attention params) / 1.5)) attention sub-blocks go by the
  greedy perplexity search above, on the first 2,048 calibration tokens (as the original). The
  MLP share is what the attention removals leave of the target.

Each candidate's perplexity is exact and cheap to get: the hidden states entering every block of
the current model are stored, so a candidate in block i reruns only blocks i.. and the model's
own tail (final norm, lm_head, any logit scaling: ``capture.tail_loss``). After a removal in
block j only the states after block j are recomputed.

A removed sub-block becomes a parameter-free stand-in (``sparsekit.models.skipped``); the model
saves as a sparsekit checkpoint with per-block widths (0 heads / 0 channels for a removed part)
that loads after ``import sparsekit``, and a Llama-family model exports to the DeciLM /
Nemotron-NAS ``block_configs`` form that vLLM runs (``sparsekit.hf.decilm``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsekit.models import BlockAnatomy, ModelAnatomy, describe
from sparsekit.models.families import KV_SHARING_ATTRS

from ..capture import Chunk, block_output_structure, tail_loss
from ..distributed import World, calibration_share, current_world
from ..engine import check_finite_weights
from .base import (
    StructuredConfig,
    StructuredMethod,
    StructuredReport,
    block_param_count,
    check_calibration,
    param_count,
    register_structured,
)
from .layout import block_widths, keep_channels, skip_subblock, subblock_skipped
from .passes import BlockStates, capture, compute_device, hooked_pass, on_device
from .width import set_config_widths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One removable sub-block: its block index, "attention" or "mlp", and its parameter count."""

    block: int
    kind: str
    params: int


def _part_params(block: BlockAnatomy, kind: str) -> int:
    part = block.attention if kind == "attention" else block.mlp
    return sum(p.numel() for p in block.module.get_submodule(part.path).parameters())


def _shares_kv(block: BlockAnatomy) -> bool:
    attn = block.module.get_submodule(block.attention.path)
    return any(bool(getattr(attn, name, False)) for name in KV_SHARING_ATTRS)


def candidates(anatomy: ModelAnatomy, kinds: tuple[str, ...] = ("attention", "mlp")) -> list[Candidate]:
    """Every sub-block still present that can go on its own: attention modules with a path of their
    own that share no keys / values with other layers, and dense MLPs (a Mixture-of-Experts layer
    loses experts instead)."""
    out = []
    for block in anatomy:
        attention = block.attention is not None and block.attention.path and not _shares_kv(block)
        if "attention" in kinds and attention:
            out.append(Candidate(block.index, "attention", _part_params(block, "attention")))
        if "mlp" in kinds and block.mlp is not None and block.mlp.path and block.experts is None:
            out.append(Candidate(block.index, "mlp", _part_params(block, "mlp")))
    return out


@dataclass
class SearchContext:
    """What the greedy search reads: the model, its anatomy, calibration ids and batch size, the
    stored block states, a real block output (the structure stand-ins return) and the device."""

    model: nn.Module
    anatomy: ModelAnatomy
    input_ids: torch.Tensor
    batch_size: int
    states: BlockStates
    template: object
    device: torch.device
    world: World = field(default_factory=World)  # active: ``input_ids`` and the states are this rank's share

    def ppl_without(self, cand: Candidate) -> float:
        """Calibration perplexity of the current model with ``cand`` removed as well."""
        with subblock_skipped(self.anatomy[cand.block], cand.kind):
            final = self.states.run_from(cand.block, self.states.inputs[cand.block])
        loss = tail_loss(
            self.model,
            self.anatomy.blocks,
            final,
            self.input_ids,
            self.batch_size,
            self.device,
            self.template,
            self.world,
        )
        return math.exp(loss)


def _evaluate(
    ctx: SearchContext, pool: list[Candidate], stale: dict, lazy: bool, bar
) -> dict[Candidate, float]:
    """Perplexity without each candidate: every one (exhaustive), or in the order of their last
    scores until the next last score is no lower than the best fresh one (lazy; never-scored first)."""
    scores: dict[Candidate, float] = {}
    order = sorted(pool, key=lambda c: stale.get((c.block, c.kind), -math.inf)) if lazy else pool
    for cand in order:
        last = stale.get((cand.block, cand.kind), -math.inf)
        if lazy and scores and last >= min(scores.values()):
            break
        scores[cand] = stale[(cand.block, cand.kind)] = ctx.ppl_without(cand)
        bar.update()
    return scores


def greedy_removal(
    ctx: SearchContext, target: float, kinds: tuple[str, ...], search: str, show_progress: bool
) -> list[dict]:
    """Remove the lowest-perplexity candidate until ``target`` parameters are gone; the steps taken
    (block, kind, params, ppl, candidates evaluated)."""
    steps: list[dict] = []
    stale: dict[tuple[int, str], float] = {}
    removed = 0
    bar = tqdm(desc=f"{search} search: perplexities evaluated", disable=not show_progress)
    while target - removed > 0:
        pool = [c for c in candidates(ctx.anatomy, kinds) if removed + c.params - target <= c.params / 2]
        if not pool:
            break
        scores = _evaluate(ctx, pool, stale, search == "lazy", bar)
        best = min(scores, key=lambda c: (scores[c], c.block, c.kind))
        skip_subblock(ctx.anatomy[best.block], best.kind)
        ctx.states.refresh_after(best.block)
        stale.pop((best.block, best.kind))
        removed += best.params
        step = {"block": best.block, "kind": best.kind, "params": best.params, "ppl": scores[best]}
        steps.append(step | {"evaluated": len(scores)})
        log.info(
            "removed block %d's %s (calibration ppl %.2f; %d of %d candidates evaluated)",
            best.block, best.kind, scores[best], len(scores), len(pool),
        )  # fmt: skip
    bar.close()
    return steps


def search_subblocks(
    model: nn.Module, input_ids: torch.Tensor, config: StructuredConfig, target: float, kinds: tuple[str, ...]
) -> list[dict]:
    """Capture, store every block's input and run the greedy search (``greedy_removal``). Under
    torchrun each rank holds its share of the calibration chunks (when there is one for every
    rank) and every perplexity is the mean over all ranks' tokens."""
    anatomy = describe(model)
    device = compute_device(model, config.device)
    world = current_world()
    if -(-input_ids.shape[0] // config.batch_size) < world.size:
        world = World()  # fewer chunks than ranks (2SSP's 2,048-token search): every rank runs them all
    mine = calibration_share(input_ids, config.batch_size, world)
    with torch.no_grad():
        chunks = capture(model, mine, config.batch_size, device)
        with on_device(anatomy.blocks[0], device):
            template = block_output_structure(anatomy.blocks[0], chunks[0], 0)
        states = BlockStates(anatomy.blocks, chunks, device)
        ctx = SearchContext(model, anatomy, mine, config.batch_size, states, template, device, world)
        show = config.show_progress and current_world().main
        return greedy_removal(ctx, target, kinds, config.subblock_search, show)


class SubblockMethod(StructuredMethod):
    """Removes attention and MLP sub-blocks by a greedy perplexity search; subclasses say which
    kinds are candidates and may cut something first (``first_stage``)."""

    kinds: tuple[str, ...] = ("attention", "mlp")
    whole_model = "forward"  # the tail (lm_head and loss) runs per candidate
    stores_block_states = True

    def first_stage(
        self, model: nn.Module, input_ids: torch.Tensor, config: StructuredConfig, report: StructuredReport
    ) -> tuple[torch.Tensor, float]:
        """(the calibration ids the search reads, the parameters it removes)."""
        return input_ids, config.sparsity * report.block_params_before

    def check(self, anatomy: ModelAnatomy, config: StructuredConfig) -> None:
        """Refuse what this method cannot do, before any work."""
        if not candidates(anatomy, self.kinds):
            raise ValueError(
                f"{self.name} found no {' or '.join(self.kinds)} sub-block it can remove on its own in "
                f"{anatomy.model_type} ({'; '.join(anatomy.width_problems()[:2]) or 'none found'})"
            )

    def prune(
        self, model: nn.Module, input_ids: torch.Tensor | None, config: StructuredConfig
    ) -> StructuredReport:
        check_calibration(input_ids, self.name)
        if config.remove_layers is not None:
            raise ValueError(f"remove_layers is for depth methods (shortgpt, angular), not {self.name}")
        anatomy = describe(model)
        anatomy.require_dense(self.name)
        check_finite_weights(anatomy.blocks, anatomy.blocks_path)
        self.check(anatomy, config)
        report = StructuredReport(self.name, config.sparsity, *input_ids.shape)
        report.params_before, report.block_params_before = param_count(model), block_param_count(model)
        report.widths_before = block_widths(anatomy)[0].to_dict()
        started = time.perf_counter()
        search_ids, target = self.first_stage(model, input_ids, config, report)
        if report.timings_s:
            started = time.perf_counter()
        report.removed_subblocks = search_subblocks(model, search_ids, config, target, self.kinds)
        report.timings_s["search"] = time.perf_counter() - started
        report.block_scores = [s["ppl"] for s in report.removed_subblocks]
        set_config_widths(model, describe(model), report)  # a plain config where the shapes are uniform
        report.params_after, report.block_params_after = param_count(model), block_param_count(model)
        log.info(
            "%s removed %d sub-blocks (%.1f%% of block parameters)",
            self.name,
            len(report.removed_subblocks),
            100 * report.removed_fraction,
        )
        return report


@register_structured
class BlockPruner(SubblockMethod):
    """Greedy removal of attention and MLP sub-blocks by calibration perplexity."""

    name = "blockpruner"


@register_structured
class TwoSSP(SubblockMethod):
    """2SSP: MLP channels cut uniformly by activation norm, then attention sub-blocks greedily."""

    name = "2ssp"
    kinds = ("attention",)
    alpha = 1.5  # the original's balance between the stages
    search_tokens = 2048  # the original's second stage reads one 2,048-token sample

    def check(self, anatomy: ModelAnatomy, config: StructuredConfig) -> None:
        super().check(anatomy, config)
        missing = [b.index for b in anatomy if b.mlp is None or b.experts is not None]
        if missing:
            raise ValueError(
                f"2ssp cuts MLP channels in every block, and blocks {missing[:4]} have no dense MLP the "
                f"anatomy understands ({'; '.join(anatomy[missing[0]].problems) or 'none'}): use blockpruner"
            )

    def attention_count(self, anatomy: ModelAnatomy, sparsity: float) -> int:
        """The original's Equation 5: round(L * s ** ((MLP params / attention params) / alpha)),
        both counted in the first block that has both."""
        first = next(b for b in anatomy if b.attention is not None and b.mlp is not None)
        attn = sum(p.numel() for p in first.module.get_submodule(first.attention.path).parameters())
        mlp = sum(p.numel() for p in first.module.get_submodule(first.mlp.path).parameters())
        return round(len(anatomy) * sparsity ** ((mlp / attn) / self.alpha))

    def first_stage(self, model, input_ids, config, report):
        anatomy = describe(model)
        pool = {c.block: c.params for c in candidates(anatomy, ("attention",))}
        count = min(self.attention_count(anatomy, config.sparsity), len(pool))
        attention = sum(sorted(pool.values())[:count])
        target = config.sparsity * report.block_params_before
        mlp_total = sum(
            sum(p.numel() for p in b.module.get_submodule(b.mlp.path).parameters()) for b in anatomy
        )
        if attention > target or attention + mlp_total < target:
            raise ValueError(
                f"2ssp cannot reach {config.sparsity:.0%} with {count} attention sub-blocks and the MLPs: "
                "choose another sparsity"
            )
        rate = (target - attention) / mlp_total  # the same share of every block's MLP
        started = time.perf_counter()
        with torch.no_grad():
            device = compute_device(model, config.device)
            chunks = capture(model, input_ids, config.batch_size, device)
            norms = mlp_channel_norms(anatomy, chunks, device, config.show_progress)
            del chunks
            for block, norm in zip(anatomy, norms, strict=True):
                keep = round(block.mlp.intermediate * (1 - rate))
                keep_channels(block, norm.topk(keep).indices.sort().values)
        report.timings_s["first stage"] = time.perf_counter() - started
        report.notes.append(
            f"2ssp: MLPs cut by {rate:.1%} in every block, then {count} attention sub-blocks searched on "
            f"the first {self.search_tokens} calibration tokens"
        )
        sequences = max(1, math.ceil(self.search_tokens / input_ids.shape[1]))
        return input_ids[:sequences], attention


def mlp_channel_norms(
    anatomy: ModelAnatomy, chunks: list[Chunk], device, show_progress: bool
) -> list[torch.Tensor]:
    """Per block, each MLP channel's L2 norm over the tokens of a sequence, averaged over the
    calibration sequences (the input of the MLP's output projection, the dense model's pass) [K]."""
    totals: list[list[torch.Tensor]] = []
    length = chunks[0].hidden.shape[1]

    def hook_block(block: BlockAnatomy) -> list:
        total: list[torch.Tensor] = []
        totals.append(total)

        def hook(_m, inputs):  # [b, L, K], or [b * L, K] (OPT)
            x = inputs[0].detach().double()
            total.append(x.reshape(-1, length, x.shape[-1]).norm(dim=1).sum(0))

        return [block.linear(block.mlp.down).register_forward_pre_hook(hook)]

    hooked_pass(anatomy, chunks, device, hook_block, "2ssp: MLP channel norms", show_progress)
    count = sum(c.hidden.shape[0] for c in chunks)
    norms = [torch.stack(total).sum(0) / count for total in totals]
    return norms
