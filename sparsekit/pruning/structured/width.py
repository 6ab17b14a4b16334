"""Width pruning: remove attention heads and MLP intermediate channels physically (smaller
nn.Linear layers), scored on calibration activations.

Scores come from the inputs of o_proj (one channel per head dimension) and down_proj (one per
MLP channel), collected in one pass of the dense model:
- ``wanda-sp``: sum over output rows of |W[:, c]| * ||X_c||_2 (structured Wanda), summed per head;
  the same ratio of heads and channels in every block.
- ``flap`` (An et al., 2024): fluctuation Var(X_c) * ||W[:, c]||^2 (squared for the attention
  channels, as the original code does), averaged per head; with ``widths="adaptive"`` each
  block's attention and MLP scores are standardised on their own (z-scores, as the original) so
  heads and channels rank on one scale, and ranked globally, giving each block its own widths.
  Bias compensation adds W[:, removed] @ mean(X_removed) to the bias of o_proj / down_proj.

``refit=True`` (``refit.py``) then re-solves the kept columns of o_proj / down_proj by least
squares on calibration inputs, block by block, with the compensation bias solved alongside.

Grouped-query attention stays valid (``StructuredConfig.heads``): "group" removes whole KV groups
(a KV head with its query heads); "query" removes the same number of query heads from every
group. RoPE is untouched: kept heads keep their channels and rotary dimensions.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sparsekit.models import BlockAnatomy, ModelAnatomy, describe, in_out_features, linear_weight, model_dtype
from sparsekit.models.families import CONFIG_MLP_WIDTH_KEYS, family

from ..capture import outside_autocast, resolve_forward_precision
from ..distributed import World, calibration_share, current_world, sum_over_ranks_
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
from .layout import (
    add_output_bias,
    block_widths,
    ensure_bias,
    head_channels,
    keep_channels,
    keep_heads,
)
from .passes import capture, compute_device, hooked_pass
from .refit import refit_pass

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- statistics
class ChannelStats:
    """Running per-channel sum, sum of squares and count of a linear layer's input [..., K]."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.sq_sum: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
        # fp32 / fp64 inputs are summed in float64; bf16 / fp16 ones (bf16 forwards) in fp32 within
        # the call, which is exact to ~1e-7 of these sums and half the time of a float64 copy
        x = x.double() if x.element_size() >= 4 else x.float()
        total, squares = x.sum(0).double(), (x * x).sum(0).double()
        if self.sum is None:
            self.sum, self.sq_sum = total, squares
        else:
            self.sum += total
            self.sq_sum += squares
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def var(self) -> torch.Tensor:
        return (self.sq_sum / self.count - self.mean**2).clamp_min(0)


@dataclass
class BlockStats:
    attn: ChannelStats  # input of the attention output projection
    mlp: ChannelStats  # input of the MLP output projection


def collect_stats(anatomy: ModelAnatomy, chunks, device, show_progress: bool) -> list[BlockStats]:
    """One dense pass through every block, recording the inputs of the attention and MLP output
    projections (blocks without a cuttable attention or MLP record nothing for it)."""
    stats = []

    def hook_block(block: BlockAnatomy) -> list:
        s = BlockStats(ChannelStats(), ChannelStats())
        stats.append(s)
        handles = []
        if block.attention is not None:
            handles.append(
                block.linear(block.attention.o).register_forward_pre_hook(outside_autocast(s.attn))
            )
        if block.mlp is not None:
            handles.append(block.linear(block.mlp.down).register_forward_pre_hook(outside_autocast(s.mlp)))
        return handles

    hooked_pass(anatomy, chunks, device, hook_block, "channel statistics", show_progress)
    return stats


def sum_stats_over_ranks(stats: list[BlockStats], world: World) -> None:
    """Every rank ends with the channel sums, sums of squares and counts over all ranks' tokens."""
    if not world.active:
        return
    parts = [c for s in stats for c in (s.attn, s.mlp)]
    tensors = [t for c in parts if c.sum is not None for t in (c.sum, c.sq_sum)]
    for c, n in zip(parts, sum_over_ranks_(tensors, [c.count for c in parts]), strict=True):
        c.count = int(n)


# ----------------------------------------------------------------------------- scores
def channel_scores(linear: nn.Module, stats: ChannelStats, kind: str) -> torch.Tensor:
    """Per-input-channel importance [K] of a linear layer with weight [N, K]."""
    w = linear_weight(linear).detach().double()
    if kind == "wanda-sp":
        return w.abs().sum(0) * stats.sq_sum.to(w.device).sqrt()
    return stats.var.to(w.device) * (w * w).sum(0)  # flap fluctuation


@dataclass
class Unit:
    """One removable piece of one block: an attention unit or an MLP channel."""

    block: int
    kind: str  # "attn" | "mlp"
    index: int  # group (group mode), round (query mode) or channel
    score: float
    cost: int  # parameters removed with it


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """z-scores of one block's channel scores (FLAP standardises each layer's metric on its own)."""
    return (scores - scores.mean()) / scores.std().clamp_min(1e-12)


def head_scores(block: BlockAnatomy, per_channel: torch.Tensor, kind: str) -> torch.Tensor:
    """[heads] from the output projection's per-input-channel scores: summed (wanda-sp) or averaged (flap)."""
    heads = per_channel.reshape(block.attention.heads, block.attention.head_dim)
    return heads.sum(1) if kind == "wanda-sp" else heads.mean(1)


def _row_params(block: BlockAnatomy, name: str, rows: int) -> int:
    """Parameters of ``rows`` output rows of linear ``name`` (bias included)."""
    linear = block.linear(name)
    return rows * (in_out_features(linear)[0] + (linear.bias is not None))


def _col_params(block: BlockAnatomy, name: str, cols: int) -> int:
    return cols * in_out_features(block.linear(name))[1]


def attention_units(block: BlockAnatomy, head_scores: torch.Tensor, mode: str) -> list[Unit]:
    """Removable attention units of one block, each listed in the order it may be removed."""
    a = block.attention
    if a is None:
        return []
    hd, g = a.head_dim, a.group_size
    head_cost = _row_params(block, a.q, hd * a.q_width) + _col_params(block, a.o, hd)
    kv_cost = _row_params(block, a.k, hd) + _row_params(block, a.v, hd)
    if mode == "group" or g == 1:
        groups = head_scores.reshape(a.kv_heads, g).mean(1)
        return [
            Unit(block.index, "attn", i, float(groups[i]), g * head_cost + kv_cost) for i in range(a.kv_heads)
        ]
    ranked = head_scores.reshape(a.kv_heads, g).sort(dim=1).values  # per group, ascending
    return [
        Unit(block.index, "attn", r, float(ranked[:, r].mean()), a.kv_heads * head_cost) for r in range(g)
    ]


def mlp_units(block: BlockAnatomy, scores: torch.Tensor) -> list[Unit]:
    m = block.mlp
    if m is None:
        return []
    rows = sum(len(r) for r in m.producer_rows(torch.zeros(1, dtype=torch.long)).values())
    cost = _row_params(block, m.up, rows) + _col_params(block, m.down, 1)
    return [Unit(block.index, "mlp", i, float(s), cost) for i, s in enumerate(scores.tolist())]


# ----------------------------------------------------------------------------- selection
def _attention_limit(block: BlockAnatomy, mode: str) -> int:
    """How many attention units may go before the block has no heads left."""
    a = block.attention
    if a is None:
        return 0
    return a.kv_heads - 1 if (mode == "group" or a.group_size == 1) else a.group_size - 1


def round_removal(n_remove: int, total: int, multiple: int) -> int:
    """Channels to remove so the kept count is the nearest multiple of ``multiple`` (at least one)."""
    if n_remove == 0 or multiple == 1:
        return n_remove
    kept = max(multiple, round((total - n_remove) / multiple) * multiple)
    return max(0, total - min(kept, total - total % multiple if total >= multiple else total))


def select_uniform(
    layouts, attn: list[list[Unit]], mlp: list[list[Unit]], config: StructuredConfig, block_params: list[int]
) -> list[tuple[list[Unit], list[Unit]]]:
    """The same number of attention units and MLP channels removed from every block, together
    ``sparsity`` of the blocks' parameters: heads at the ratio rounded down to whole units (a KV
    group is a third of SmolLM2's attention: removing one from every block costs far more than
    the same parameters taken from the MLP), MLP channels the rest of the budget, the same count
    in every block (a hybrid's attention and mixer blocks too, so the widths stay uniform)."""
    n_attn = []
    for block, a_units in zip(layouts, attn, strict=True):
        n = int(config.sparsity * len(a_units) + 1e-9)
        if n > _attention_limit(block, config.heads):
            raise ValueError(
                f"sparsity {config.sparsity:g} would remove every attention head of a block ({n} of "
                f"{len(a_units)} units in heads={config.heads!r} mode): use a smaller sparsity, or "
                "heads='query'"
            )
        n_attn.append(n)
    budget = sum(
        config.sparsity * params - sum(u.cost for u in a_units[:n])
        for a_units, n, params in zip(attn, n_attn, block_params, strict=True)
    )
    with_mlp = [m for m in mlp if m]
    n_mlp = max(0, round(budget / sum(m[0].cost for m in with_mlp))) if with_mlp else 0
    width = min((len(m) for m in with_mlp), default=0)
    if with_mlp and n_mlp >= width:
        raise ValueError(f"sparsity {config.sparsity:g} would remove every MLP channel of a block")
    n_mlp = round_removal(n_mlp, width, config.channel_multiple)
    if with_mlp and n_mlp >= width:
        raise ValueError(f"sparsity {config.sparsity:g} would remove every MLP channel of a block")
    chosen = []
    for block, a_units, m_units, n in zip(layouts, attn, mlp, n_attn, strict=True):
        if config.heads == "group" or block.attention is None or block.attention.group_size == 1:
            a_sel = sorted(a_units, key=lambda u: u.score)[:n]
        else:
            a_sel = a_units[:n]  # rounds are already in removal order
        m_sel = sorted(m_units, key=lambda u: u.score)[:n_mlp]
        chosen.append((a_sel, m_sel))
    return chosen


def select_global(
    layouts, attn: list[list[Unit]], mlp: list[list[Unit]], config: StructuredConfig, block_params: list[int]
) -> list[tuple[list[Unit], list[Unit]]]:
    """FLAP's adaptive structure: scores (standardised within each block) ranked across blocks and
    types, removed lowest first while that brings the removed parameters nearer ``sparsity`` of
    all block parameters: FLAP's parameter-weighted threshold, which stops at the unit whose
    cumulative cost is nearest the budget, so a head (a hundred or more channels' worth) that would
    overshoot by more than it leaves short stays (each block keeps an attention unit and an MLP
    channel)."""
    all_attn = [u for units in attn for u in units]
    all_mlp = [u for units in mlp for u in units]
    budget = config.sparsity * sum(block_params)
    limits = [_attention_limit(x, config.heads) for x in layouts]
    chosen: list[tuple[list[Unit], list[Unit]]] = [([], []) for _ in layouts]
    removed = 0
    for unit in sorted(all_attn + all_mlp, key=lambda u: (u.score, u.index)):
        if removed + unit.cost - budget > budget - removed:  # stopping here is nearer the budget
            break
        a_sel, m_sel = chosen[unit.block]
        if unit.kind == "attn":
            if len(a_sel) >= limits[unit.block]:
                continue
            a_sel.append(unit)
        else:
            if len(m_sel) >= len(mlp[unit.block]) - 1:
                continue
            m_sel.append(unit)
        removed += unit.cost
    for index, (_, m_sel) in enumerate(chosen):  # kept widths to the channel multiple
        units = sorted(mlp[index], key=lambda u: u.score)
        n = round_removal(len(m_sel), len(units), config.channel_multiple)
        chosen[index] = (chosen[index][0], units[:n])
    return chosen


# ----------------------------------------------------------------------------- applying
def _budget_params(block: BlockAnatomy) -> int:
    """The parameters a block's share of the sparsity is counted on: the whole block, or only its
    MLP where its token mixer is not attention (a hybrid's linear-attention or convolution block,
    which width pruning leaves whole)."""
    if block.attention is not None or block.mlp is None:
        return sum(p.numel() for p in block.module.parameters())
    return sum(
        p.numel() for n in (*block.mlp.producers, block.mlp.down) for p in block.linear(n).parameters()
    )


def _kept_heads(block: BlockAnatomy, head_scores: torch.Tensor, units: list[Unit], mode: str):
    """(query heads, kv heads) to keep in one block after removing ``units``."""
    a = block.attention
    g = a.group_size
    if mode == "group" or g == 1:
        gone = {u.index for u in units}
        kv = torch.tensor([i for i in range(a.kv_heads) if i not in gone], dtype=torch.long)
        q = head_channels(kv, g)  # the query heads of each kept group
        return q, kv
    rounds = len(units)
    order = head_scores.reshape(a.kv_heads, g).argsort(dim=1)[:, rounds:]  # keep the best g - rounds
    q = (order + torch.arange(a.kv_heads)[:, None] * g).reshape(-1).sort().values
    return q, torch.arange(a.kv_heads)


def build_on_meta(model: nn.Module, config) -> nn.Module:
    """A model of ``model``'s class built from ``config`` on the meta device (no memory)."""
    with torch.device("meta"):
        return type(model)(config)


def _bias_flags(config) -> list[str]:
    """Config switches that may give linears a bias (``attention_bias``, ``mlp_bias``, ...)."""
    return [k for k, v in vars(config).items() if isinstance(v, bool) and not v and "bias" in k]


def compensation_targets(model: nn.Module, anatomy: ModelAnatomy) -> tuple[dict[str, str | None], list[str]]:
    """Which output projections can hold FLAP's compensation bias in a saved checkpoint:
    {"o" | "down": None (it has a bias already) or the config flag that gives it one}, and the
    roles that cannot. Flags are found by building the model on the meta device with each one
    set, so a family whose code hard-wires bias=False is recognised as such."""
    roles = {"o": [b for b in anatomy if b.attention], "down": [b for b in anatomy if b.mlp]}
    names = {"o": lambda b: b.attention.o, "down": lambda b: b.mlp.down}
    targets: dict[str, str | None] = {}
    for role, blocks in roles.items():
        if blocks and all(b.linear(names[role](b)).bias is not None for b in blocks):
            targets[role] = None
    for flag in _bias_flags(model.config):
        missing = [r for r in roles if r not in targets and roles[r]]
        if not missing:
            break
        config = copy.deepcopy(model.config)
        setattr(config, flag, True)
        try:
            probe = describe(build_on_meta(model, config))
        except Exception:  # noqa: BLE001 - a flag the model cannot be built with gives nothing
            continue
        for role in missing:
            if all(probe[b.index].linear(names[role](probe[b.index])).bias is not None for b in roles[role]):
                targets[role] = flag
    return targets, [r for r in roles if r not in targets and roles[r]]


def _conform_biases(model: nn.Module, flags: set[str], anatomy: ModelAnatomy) -> None:
    """Turn the config flags on and give every linear the flags cover a (zero) bias."""
    for flag in flags:
        setattr(model.config, flag, True)
    probe = describe(build_on_meta(model, model.config))
    for block in anatomy:
        for name, linear in probe[block.index].linears.items():
            if linear.bias is not None:
                ensure_bias(block.linear(name))


def _compensate(linear: nn.Module, removed_cols: torch.Tensor, mean: torch.Tensor) -> None:
    if len(removed_cols) == 0:
        return
    w = linear_weight(linear).data[:, removed_cols].double()
    add_output_bias(linear, (w @ mean.to(w.device)[removed_cols]).to(w.dtype))


def _uniform(values: list[int | None]) -> int | None:
    present = {v for v in values if v is not None}
    return present.pop() if len(present) == 1 else None


def _config_updates(
    model: nn.Module, anatomy: ModelAnatomy, before: dict[str, int]
) -> list[dict[str, object]] | None:
    """Candidate config values that state uniform widths (one per config key the MLP width may go
    by), or None when the widths differ between blocks or a sub-block was removed."""
    widths = block_widths(anatomy)
    if any(0 in (w.heads, w.intermediate) for w in widths):
        return None  # a removed sub-block: no plain config says it
    heads, kv = _uniform([w.heads for w in widths]), _uniform([w.kv_heads for w in widths])
    inter = _uniform([w.intermediate for w in widths])
    if (heads is None) != all(w.heads is None for w in widths) or (inter is None) != all(
        w.intermediate is None for w in widths
    ):
        return None
    updates: dict[str, object] = {}
    if heads is not None and (heads, kv) != (before.get("heads"), before.get("kv_heads")):
        head_dim = next(b.attention.head_dim for b in anatomy if b.attention)
        updates |= {"head_dim": head_dim, "num_attention_heads": heads, "num_key_value_heads": kv}
    if inter is None or inter == before.get("intermediate"):
        return [updates]
    keys = [k for k in CONFIG_MLP_WIDTH_KEYS if k in model.config.to_dict()] or ["intermediate_size"]
    extra = family(anatomy.model_type).mlp_width_config
    return [updates | {key: inter} | extra for key in keys]


def _expresses(model: nn.Module, config) -> bool:
    """Whether ``config`` builds a model with exactly ``model``'s tensor shapes."""
    try:
        built = build_on_meta(model, config).state_dict()
    except Exception:  # noqa: BLE001 - a config the class refuses does not express the widths
        return False
    own = model.state_dict()
    return built.keys() == own.keys() and all(tuple(built[k].shape) == tuple(own[k].shape) for k in own)


def set_config_widths(model: nn.Module, anatomy: ModelAnatomy, report: StructuredReport) -> None:
    """Uniform widths go into the config (a plain HF checkpoint) when the family's config can say
    them (checked by building the model from it on the meta device); otherwise per-block widths go
    into ``config.block_widths`` (a sparsekit checkpoint, loaded after ``import sparsekit``)."""
    widths = [w.to_dict() for w in block_widths(anatomy)]
    report.widths = widths
    config = model.config
    if hasattr(config, "block_widths"):
        del config.block_widths
    candidates = _config_updates(model, anatomy, report.widths_before)
    for updates in candidates or []:
        trial = copy.deepcopy(config)
        for key, value in updates.items():
            setattr(trial, key, value)
        if _expresses(model, trial):
            for key, value in updates.items():
                setattr(config, key, value)
            report.uniform_widths = True
            return
    if candidates:
        report.notes.append(
            f"{anatomy.model_type}'s config cannot state these widths (no setting of "
            f"{', '.join(dict.fromkeys(k for c in candidates for k in c))} rebuilds the cut shapes): saved "
            "as per-block widths, which load after import sparsekit"
        )
    config.block_widths = widths
    report.uniform_widths = False


class WidthMethod(StructuredMethod):
    score_kind: str
    casts_forwards = True
    attention_exponent: int = 1  # attention channel scores are raised to this power before anything else
    default_compensation: bool = False
    adaptive_ok: bool = False
    scores_from_stats: bool = True  # the scores read the activation statistics pass

    def prune(
        self, model: nn.Module, input_ids: torch.Tensor | None, config: StructuredConfig
    ) -> StructuredReport:
        check_calibration(input_ids, self.name)
        if config.widths == "adaptive" and not self.adaptive_ok:
            raise ValueError(f"{self.name} keeps the same widths in every block; widths='adaptive' is flap's")
        if config.remove_layers is not None:
            raise ValueError(f"remove_layers is for depth methods (shortgpt, angular), not {self.name}")
        anatomy = describe(model)
        anatomy.require_width(self.name)  # refuses what it does not understand, before any work
        anatomy.require_dense(self.name)
        check_finite_weights(anatomy.blocks, anatomy.blocks_path)
        report = StructuredReport(self.name, config.sparsity, *input_ids.shape)
        report.params_before, report.block_params_before = param_count(model), block_param_count(model)
        first = block_widths(anatomy)
        report.widths_before = {
            k: _uniform([getattr(w, k) for w in first]) for k in ("heads", "kv_heads", "intermediate")
        }
        mixers = [b.index for b in anatomy if b.attention is None and b.mixer is not None]
        if mixers:
            report.notes.append(
                f"blocks {mixers} mix tokens without attention ({anatomy[mixers[0]].mixer}): left whole, "
                "only their MLP channels are cut"
            )
        compensation = (
            self.default_compensation if config.bias_compensation is None else config.bias_compensation
        )
        targets, missing = compensation_targets(model, anatomy) if compensation else ({}, [])
        if missing:
            report.notes.append(
                f"bias compensation skipped for the {' and '.join(missing)} projections: "
                f"{anatomy.model_type} has no bias there and no config flag that gives it one, so a "
                "plain checkpoint could not hold it"
            )
        device = compute_device(model, config.device)
        # under torchrun the statistics (sums) are split over the ranks; the refit's pass is not
        world = World() if config.refit else current_world()
        if config.refit and current_world().active:
            report.notes.append("refit: every rank computes the statistics and the refit on all the tokens")
        started = time.perf_counter()
        with torch.no_grad():
            chunks = capture(
                model, calibration_share(input_ids, config.batch_size, world), config.batch_size, device
            )
            precision = resolve_forward_precision(config.forward_dtype, model_dtype(model), device)
            report.forward_dtype = precision.name
            precision.apply(chunks)
            inputs = [c.hidden for c in chunks] if config.refit else []  # block 0's, for the refit pass
            if self.scores_from_stats or targets:
                show = config.show_progress and world.main
                stats = collect_stats(anatomy, chunks, device, show)
                sum_stats_over_ranks(stats, world)
                report.timings_s["statistics"] = time.perf_counter() - started
            else:  # scored elsewhere (llm-pruner's gradients) and nothing to compensate: no pass
                stats = [BlockStats(ChannelStats(), ChannelStats()) for _ in anatomy]
            started = time.perf_counter()
            heads, chosen = self._select(anatomy, stats, config)
            plan = {b.index: (s, h, *sel) for b, s, h, sel in zip(anatomy, stats, heads, chosen, strict=True)}
            if config.refit:
                for chunk, x in zip(chunks, inputs, strict=True):
                    chunk.hidden = x
                del inputs
                report.timings_s["select"] = time.perf_counter() - started
                started = time.perf_counter()
                # the refit solves the bias with the weights: FLAP's compensation is not added first
                stages = lambda block: self._stages(block, *plan[block.index], config, {})  # noqa: E731
                refit_pass(anatomy, chunks, stages, bool(targets), device, show_progress=config.show_progress)
                report.timings_s["refit"] = time.perf_counter() - started
            else:
                del chunks
                for block in anatomy:
                    self._apply(block, *plan[block.index], config, targets)
                report.timings_s["select+cut"] = time.perf_counter() - started
            flags = {f for f in targets.values() if f}
            if flags:
                _conform_biases(model, flags, anatomy)
        report.bias_compensation = bool(targets)
        set_config_widths(model, anatomy, report)
        report.params_after, report.block_params_after = param_count(model), block_param_count(model)
        log.info("%s removed %.1f%% of block parameters", self.name, 100 * report.removed_fraction)
        return report

    def _select(
        self, anatomy: ModelAnatomy, stats: list[BlockStats], config: StructuredConfig
    ) -> tuple[list[torch.Tensor | None], list[tuple[list[Unit], list[Unit]]]]:
        """Score every block's heads and channels and choose what goes: (per block, the head scores
        [heads] or None; per block, the (attention units, MLP units) to remove)."""
        adaptive = config.widths == "adaptive"
        heads, attn, mlp = [], [], []
        for block, s in zip(anatomy, stats, strict=True):
            a_scores = m_scores = h = None
            if block.attention is not None:
                a_scores = channel_scores(block.linear(block.attention.o), s.attn, self.score_kind)
                a_scores = a_scores**self.attention_exponent
                a_scores = standardize(a_scores) if adaptive else a_scores
                h = head_scores(block, a_scores, self.score_kind)
            if block.mlp is not None:
                m_scores = channel_scores(block.linear(block.mlp.down), s.mlp, self.score_kind)
                m_scores = standardize(m_scores) if adaptive else m_scores
            heads.append(h)
            attn.append(attention_units(block, h, config.heads) if h is not None else [])
            mlp.append(mlp_units(block, m_scores) if m_scores is not None else [])
        params = [_budget_params(b) for b in anatomy]
        select = select_global if adaptive else select_uniform
        return heads, select(list(anatomy), attn, mlp, config, params)

    def _apply(
        self, block: BlockAnatomy, stats: BlockStats, head_scores, a_sel, m_sel, config, targets
    ) -> None:
        """Cut one block's selected heads and channels (FLAP's compensation on the roles in ``targets``)."""
        for _, _, cut in self._stages(block, stats, head_scores, a_sel, m_sel, config, targets):
            cut()

    def _stages(
        self, block: BlockAnatomy, stats: BlockStats, head_scores, a_sel, m_sel, config, targets
    ) -> list[tuple[str, bool, Callable[[], torch.Tensor | None]]]:
        """One block's cuts in order, attention then MLP: (output projection, whether anything goes,
        a call that cuts and returns the projection's kept input columns [k] in its indexing
        before the cut, or None where nothing goes)."""
        stages = []
        if block.attention is not None:
            cut = lambda: _cut_attention(block, stats, head_scores, a_sel, config, targets)  # noqa: E731
            stages.append((block.attention.o, bool(a_sel), cut))
        if block.mlp is not None:
            stages.append((block.mlp.down, bool(m_sel), lambda: _cut_mlp(block, stats, m_sel, targets)))
        return stages


def _cut_attention(block: BlockAnatomy, stats: BlockStats, head_scores, a_sel, config, targets):
    """Remove the selected attention units; the output projection's kept columns (None: none cut)."""
    a = block.attention
    q_keep, kv_keep = _kept_heads(block, head_scores, a_sel, config.heads)
    gone_q = torch.tensor(sorted(set(range(a.heads)) - set(q_keep.tolist())), dtype=torch.long)
    if "o" in targets:
        _compensate(block.linear(a.o), head_channels(gone_q, a.head_dim), stats.attn.mean)
    if not len(gone_q):
        return None
    kept = a.o_columns(q_keep)
    keep_heads(block, q_keep, kv_keep)
    return kept


def _cut_mlp(block: BlockAnatomy, stats: BlockStats, m_sel, targets):
    """Remove the selected MLP channels; the kept channels (None: none cut)."""
    m = block.mlp
    gone = torch.tensor(sorted(u.index for u in m_sel), dtype=torch.long)
    if "down" in targets:
        _compensate(block.linear(m.down), gone, stats.mlp.mean)
    if not len(gone):
        return None
    kept = torch.tensor(sorted(set(range(m.intermediate)) - set(gone.tolist())), dtype=torch.long)
    keep_channels(block, kept)
    return kept


@register_structured
class WandaSP(WidthMethod):
    """Structured Wanda: |W| * ||X|| summed per head / channel, the same ratio in every block."""

    name = "wanda-sp"
    score_kind = "wanda-sp"


@register_structured
class FLAP(WidthMethod):
    """Fluctuation-based adaptive structured pruning with bias compensation."""

    name = "flap"
    score_kind = "flap"
    # the original code squares the attention fluctuation (not the MLP's) before standardising:
    # heads' z-scores then sit closer to 0 and fewer heads go (6 of SmolLM2's 90 KV groups at 20%,
    # as the original; 15 unsquared, ppl 29.2 against 27.9)
    attention_exponent = 2
    default_compensation = True
    adaptive_ok = True
