"""Removing whole experts from Mixture-of-Experts blocks (REAP, EAN, frequency).

Scores come from one pass of the dense model over the calibration tokens, each MoE block's
experts computed through their routed tokens (``sparsekit.models.routed_forward``); under
torchrun each rank passes its share of the calibration chunks and the per-expert sums are added
over the ranks before any decision, so every rank removes the same experts as one process would:
- ``reap`` (Lasby et al., 2025, "REAP: Router-weighted Expert Activation Pruning"): the mean over
  the tokens routed to an expert of its routing weight times the norm of its output;
- ``ean`` (expert activation norm): the same mean without the routing weight;
- ``frequency``: how many tokens the router sends to the expert;
- ``random-experts``: a seeded random choice (the baseline).
An expert that gets no token scores 0. The lowest-scoring experts of every MoE block go, the
same number in each (``sparsity``: the fraction of experts; or ``num_experts`` kept), so the
result is an ordinary checkpoint of the same family; a group-limited router (DeepSeek-V3,
GLM-4.5: ``n_group``) loses the same number from every group. Removing an expert slices the
fused 3-D expert tensors and their biases, the router's rows (weight, bias,
``e_score_correction_bias``), the modules' own expert counts and the config's.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsekit.models import (
    ExpertsAnatomy,
    UnsupportedArchitecture,
    describe,
    expert_matrices,
    routed_forward,
)
from sparsekit.models.experts import EXPERT_COUNT_ATTRS

from ..distributed import World, all_reduce_sum_, calibration_share, current_world
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
from .layout import block_widths, keep_experts
from .passes import capture, compute_device, forward, on_device

log = logging.getLogger(__name__)


class ExpertScores:
    """Per-expert sums over the routed calibration tokens of one MoE block (kept on the compute
    device while the pass runs: no host sync per expert)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self._sums: torch.Tensor | None = None  # [3, E] float64: tokens, sum ||y||, sum w * ||y||

    def observe(self, e: int, weights: torch.Tensor | None, y: torch.Tensor) -> None:
        if self._sums is None:
            self._sums = torch.zeros(3, self.num_experts, dtype=torch.float64, device=y.device)
        norms = y.detach().double().norm(dim=-1)
        w = norms.new_ones(()) if weights is None else weights.detach().double()
        self._sums[0, e] += len(norms)
        self._sums[1, e] += norms.sum()
        self._sums[2, e] += (w * norms).sum()

    def sums(self, device: torch.device) -> torch.Tensor:
        """[3, E] float64 (zeros if no token was seen): what ranks add up."""
        if self._sums is None:
            self._sums = torch.zeros(3, self.num_experts, dtype=torch.float64, device=device)
        return self._sums

    def _row(self, i: int) -> torch.Tensor:
        if self._sums is None:
            return torch.zeros(self.num_experts, dtype=torch.float64)
        return self._sums[i].cpu()

    @property
    def tokens(self) -> torch.Tensor:
        return self._row(0)

    def score(self, kind: str, block: int = 0) -> torch.Tensor:
        if kind == "frequency":
            return self.tokens
        if kind == "random":  # the baseline: a seeded draw per block, independent of the data
            return torch.rand(
                self.num_experts, generator=torch.Generator().manual_seed(block), dtype=torch.float64
            )
        return self._row(2 if kind == "reap" else 1) / self.tokens.clamp_min(1)


def _score_pass(anatomy, chunks, device, show_progress: bool) -> dict[int, ExpertScores]:
    """One dense pass through every block; MoE blocks record per-expert routed outputs."""
    scores: dict[int, ExpertScores] = {}
    for block in tqdm(list(anatomy), desc="expert scores", disable=not show_progress):
        ex = block.experts
        with on_device(block.module, device):
            if ex is None:
                outs = forward(block.module, chunks, block.index)
            else:
                scores[block.index] = s = ExpertScores(ex.num_experts)
                experts = block.module.get_submodule(ex.experts)
                matrices = expert_matrices(block.module, ex)
                experts.forward = routed_forward(experts, ex, matrices, observe=s.observe)
                try:
                    outs = forward(block.module, chunks, block.index)
                finally:
                    experts.__dict__.pop("forward", None)
        for c, o in zip(chunks, outs, strict=True):
            c.hidden = o
    return scores


def _sum_over_ranks(scores: dict[int, ExpertScores], world: World, device: torch.device) -> None:
    """Every rank ends with the sums over all ranks' tokens (blocks in index order on every rank)."""
    if world.active:
        all_reduce_sum_([scores[i].sums(device) for i in sorted(scores)])


# ----------------------------------------------------------------------------- choosing
def experts_to_keep(ex: ExpertsAnatomy, config: StructuredConfig) -> int:
    """How many experts every MoE block keeps; refuses what would break routing."""
    total = ex.num_experts
    keep = config.num_experts if config.num_experts is not None else total - round(config.sparsity * total)
    if keep >= total:
        raise ValueError(
            f"keeping {keep} of {total} experts removes none: give a larger sparsity (the fraction of "
            "experts to remove) or a smaller num_experts"
        )
    if keep < ex.top_k:
        raise ValueError(
            f"keeping {keep} experts leaves fewer than the router's top_k {ex.top_k}: keep at least "
            f"{ex.top_k}"
        )
    if ex.groups > 1:
        if (total - keep) % ex.groups:
            raise ValueError(
                f"the router routes by {ex.groups} groups of experts, so the same number must go from every "
                f"group: remove a multiple of {ex.groups} (keep {keep - (keep % ex.groups) or ex.groups} or "
                f"{keep + ex.groups - keep % ex.groups})"
            )
        if ex.topk_group * (keep // ex.groups) < ex.top_k:
            raise ValueError(
                f"with {keep // ex.groups} experts per group and {ex.topk_group} groups chosen per token, "
                f"fewer than top_k {ex.top_k} experts are reachable: keep more experts"
            )
    return keep


def choose_experts(scores: torch.Tensor, keep: int, groups: int) -> torch.Tensor:
    """Indices of the experts to keep (sorted): the highest scores, the same number per group
    (ties to the lower index)."""
    total = len(scores)
    per_group, keep_per_group = total // groups, keep // groups
    kept = []
    for g in range(groups):
        part = scores[g * per_group : (g + 1) * per_group]
        order = sorted(range(per_group), key=lambda i: (-float(part[i]), i))[:keep_per_group]
        kept += [g * per_group + i for i in order]
    return torch.tensor(sorted(kept), dtype=torch.long)


def _removal_units(score: torch.Tensor, groups: int, floor: int) -> list[tuple[float, int]]:
    """The removals one block allows, cheapest first: (cost, experts removed so far after it).

    One unit removes the next-lowest expert of every group (``groups`` experts; 1 without groups),
    costing the mean of their scores normalised by the block's mean score (REAP / EAN scores differ
    in scale from block to block; within a block only their ratios matter). Units stop where the
    block would keep fewer than ``floor`` experts."""
    norm = score / score.mean().clamp_min(1e-30) if float(score.mean()) > 0 else score
    per_group = len(score) // groups
    ranked = [sorted(norm[g * per_group : (g + 1) * per_group].tolist()) for g in range(groups)]
    units = []
    for j in range(per_group):
        removed = (j + 1) * groups
        if len(score) - removed < floor:
            break
        units.append((sum(r[j] for r in ranked) / groups, removed))
    return units


def adaptive_counts(
    scores: dict[int, torch.Tensor], keep: int, ex: dict[int, ExpertsAnatomy]
) -> dict[int, int]:
    """Per-block expert counts that remove as many experts in all as ``keep`` per block would,
    cheapest normalised scores first across blocks (``_removal_units``); every block keeps at least
    the experts its routing needs (top_k, and top_k reachable from the groups a token may use)."""
    budget = sum(ex[b].num_experts - keep for b in scores)
    candidates = []
    for b, score in scores.items():
        a = ex[b]
        floor = a.top_k
        if a.groups > 1:  # topk_group * (kept per group) >= top_k
            floor = max(floor, a.groups * -(-a.top_k // a.topk_group))
        candidates += [(cost, removed, b) for cost, removed in _removal_units(score, a.groups, floor)]
    removed = dict.fromkeys(scores, 0)
    taken = 0
    for _cost, after, b in sorted(candidates):  # equal costs: blocks take turns
        if taken >= budget:
            break
        if after != removed[b] + ex[b].groups:  # a block's units go in order (costs never decrease)
            continue
        if taken + ex[b].groups > budget:
            continue
        removed[b] = after
        taken += ex[b].groups
    return {b: ex[b].num_experts - removed[b] for b in scores}


def set_block_expert_counts(model: nn.Module, anatomy, report: StructuredReport) -> None:
    """Per-block expert counts go into ``config.block_widths`` (a sparsekit checkpoint that loads
    after ``import sparsekit``); the config's own expert count stays the largest one a block had."""
    widths = [w.to_dict() for w in block_widths(anatomy)]
    report.widths = widths
    report.uniform_widths = False
    model.config.block_widths = widths
    counts = [w["experts"] for w in widths if "experts" in w]
    report.notes.append(
        f"adaptive: {min(counts)}-{max(counts)} experts per MoE block (saved as per-block widths, which "
        "load after import sparsekit)"
    )


def set_config_experts(model: nn.Module, before: int, after: int, report: StructuredReport) -> None:
    """Write the new expert count to the config key(s) the family uses, and check that the config
    rebuilds exactly the cut shapes (the checkpoint then loads in plain transformers)."""
    config = model.config
    keys = [k for k in EXPERT_COUNT_ATTRS if getattr(config, k, None) == before]
    if not keys:
        raise UnsupportedArchitecture(
            f"{config.model_type}'s config has none of {', '.join(EXPERT_COUNT_ATTRS)} = {before}: "
            "the new expert count has nowhere to go"
        )
    for key in keys:
        setattr(config, key, after)
    trial = copy.deepcopy(config)
    with torch.device("meta"):
        built = type(model)(trial).state_dict()
    own = model.state_dict()
    bad = [k for k in own if k not in built or tuple(built[k].shape) != tuple(own[k].shape)]
    if bad:
        raise UnsupportedArchitecture(
            f"after setting {', '.join(keys)} = {after}, {config.model_type}'s config does not rebuild "
            f"the cut shapes ({bad[0]}); this family needs an entry in sparsekit/models/families.py"
        )
    report.notes.append(f"config {', '.join(keys)}: {before} -> {after} experts per MoE block")


class _ExpertMethod(StructuredMethod):
    score_kind: str

    def prune(
        self, model: nn.Module, input_ids: torch.Tensor | None, config: StructuredConfig
    ) -> StructuredReport:
        check_calibration(input_ids, self.name)
        if config.remove_layers is not None:
            raise ValueError(f"remove_layers is for depth methods (shortgpt, angular), not {self.name}")
        anatomy = describe(model)
        anatomy.require_dense(self.name)
        moe = [b for b in anatomy if b.experts is not None]
        if not moe:
            problems = [p for b in anatomy for p in b.problems if "MoE" in p]
            raise UnsupportedArchitecture(
                f"{self.name} removes experts, and {anatomy.model_type} has no Mixture-of-Experts block the "
                f"anatomy understands{': ' + problems[0] if problems else ''}"
            )
        totals = {b.experts.num_experts for b in moe}
        if len(totals) > 1:
            raise UnsupportedArchitecture(f"MoE blocks with different expert counts {sorted(totals)}")
        keep = [experts_to_keep(b.experts, config) for b in moe][0]
        check_finite_weights(anatomy.blocks, anatomy.blocks_path)
        report = StructuredReport(self.name, config.sparsity, *input_ids.shape)
        report.params_before, report.block_params_before = param_count(model), block_param_count(model)
        device = compute_device(model, config.device)
        world = current_world()
        started = time.perf_counter()
        with torch.no_grad():
            chunks = capture(
                model, calibration_share(input_ids, config.batch_size, world), config.batch_size, device
            )
            scores = _score_pass(anatomy, chunks, device, config.show_progress and world.main)
            del chunks
            _sum_over_ranks(scores, world, device)
        report.timings_s["score"] = time.perf_counter() - started
        before = moe[0].experts.num_experts
        ranked = {b.index: scores[b.index].score(self.score_kind, b.index) for b in moe}
        counts = dict.fromkeys(ranked, keep)
        if config.widths == "adaptive":
            counts = adaptive_counts(ranked, keep, {b.index: b.experts for b in moe})
        for block in moe:
            s, score = scores[block.index], ranked[block.index]
            kept = choose_experts(score, counts[block.index], block.experts.groups)
            report.experts.append(
                {
                    "block": block.index,
                    "kept": kept.tolist(),
                    "tokens": s.tokens.long().tolist(),
                    "scores": [round(float(v), 6) for v in score],
                }
            )
            keep_experts(block, kept)
        if len(set(counts.values())) > 1:
            set_block_expert_counts(model, anatomy, report)
        else:
            set_config_experts(model, before, next(iter(counts.values())), report)
        report.params_after, report.block_params_after = param_count(model), block_param_count(model)
        log.info("%s kept %s of %d experts per MoE block", self.name, sorted(set(counts.values())), before)
        return report


@register_structured
class REAP(_ExpertMethod):
    """Router-weighted expert activation: mean of gate weight x ||expert output|| over routed tokens."""

    name = "reap"
    score_kind = "reap"


@register_structured
class EAN(_ExpertMethod):
    """Expert activation norm: mean ||expert output|| over routed tokens (gate-free)."""

    name = "ean"
    score_kind = "ean"


@register_structured
class RandomExperts(_ExpertMethod):
    """A seeded random choice per block: the baseline every expert score must beat."""

    name = "random-experts"
    score_kind = "random"


@register_structured
class Frequency(_ExpertMethod):
    """Routed-token count."""

    name = "frequency"
    score_kind = "frequency"
