"""Width pruning: remove attention heads and MLP intermediate channels physically (smaller
nn.Linear layers), scored on calibration activations.

Scores come from the inputs of o_proj (one channel per head dimension) and down_proj (one per
MLP channel), collected in one pass of the dense model:
- ``wanda-sp``: sum over output rows of |W[:, c]| * ||X_c||_2 (structured Wanda), summed per head;
  the same ratio of heads and channels in every block.
- ``flap`` (An et al., 2024): fluctuation Var(X_c) * ||W[:, c]||^2, averaged per head; scores are
  standardised per structure type across all blocks so heads and channels rank on one scale,
  and (``widths="adaptive"``) ranked globally, giving each block its own widths. Bias
  compensation adds W[:, removed] @ mean(X_removed) to the bias of o_proj / down_proj.

Grouped-query attention stays valid (``StructuredConfig.heads``): "group" removes whole KV groups
(a KV head with its query heads); "query" removes the same number of query heads from every
group. RoPE is untouched: kept heads keep their channels and rotary dimensions.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsekit.arch import find_decoder_blocks

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
    ATTN_NAMES,
    MLP_NAMES,
    BlockLayout,
    add_output_bias,
    block_layouts,
    block_widths,
    ensure_bias,
    head_channels,
    keep_channels,
    keep_heads,
)
from .passes import capture, compute_device, forward, on_device

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- statistics
class ChannelStats:
    """Running per-channel sum, sum of squares and count of a linear layer's input [..., K]."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.sq_sum: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        if self.sum is None:
            self.sum, self.sq_sum = x.sum(0), (x * x).sum(0)
        else:
            self.sum += x.sum(0)
            self.sq_sum += (x * x).sum(0)
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def var(self) -> torch.Tensor:
        return (self.sq_sum / self.count - self.mean**2).clamp_min(0)


@dataclass
class BlockStats:
    attn: ChannelStats  # input of o_proj
    mlp: ChannelStats  # input of down_proj


def collect_stats(layouts: list[BlockLayout], blocks: nn.ModuleList, chunks, device, show_progress: bool):
    """One dense pass through every block, recording the o_proj and down_proj input statistics."""
    stats = []
    for layout, block in tqdm(
        list(zip(layouts, blocks, strict=True)), desc="channel statistics", disable=not show_progress
    ):
        s = BlockStats(ChannelStats(), ChannelStats())
        handles = [
            layout.attn.o_proj.register_forward_pre_hook(s.attn),
            layout.mlp.down_proj.register_forward_pre_hook(s.mlp),
        ]
        try:
            with on_device(block, device):
                outs = forward(block, chunks)
        finally:
            for h in handles:
                h.remove()
        for c, o in zip(chunks, outs, strict=True):
            c.hidden = o
        stats.append(s)
    return stats


# ----------------------------------------------------------------------------- scores
def channel_scores(weight: torch.Tensor, stats: ChannelStats, kind: str) -> torch.Tensor:
    """Per-input-channel importance [K] of a layer with weight [N, K]."""
    w = weight.detach().double()
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


def head_scores(layout: BlockLayout, per_channel: torch.Tensor, kind: str) -> torch.Tensor:
    """[heads] from o_proj's per-input-channel scores: summed (wanda-sp) or averaged (flap)."""
    heads = per_channel.reshape(layout.heads, layout.head_dim)
    return heads.sum(1) if kind == "wanda-sp" else heads.mean(1)


def _linear_params(linear: nn.Linear, rows: int = 0, cols: int = 0) -> int:
    """Parameters a linear loses with ``rows`` output rows and ``cols`` input columns."""
    bias = rows if linear.bias is not None else 0
    return rows * linear.in_features + cols * linear.out_features + bias


def attention_units(layout: BlockLayout, head_scores: torch.Tensor, mode: str, block: int) -> list[Unit]:
    """Removable attention units of one block, each listed in the order it may be removed."""
    hd, g = layout.head_dim, layout.group_size
    a = layout.attn
    head_cost = _linear_params(a.q_proj, rows=hd) + _linear_params(a.o_proj, cols=hd)
    kv_cost = _linear_params(a.k_proj, rows=hd) + _linear_params(a.v_proj, rows=hd)
    if mode == "group" or g == 1:
        groups = head_scores.reshape(layout.kv_heads, g).mean(1)
        return [
            Unit(block, "attn", i, float(groups[i]), g * head_cost + kv_cost) for i in range(layout.kv_heads)
        ]
    ranked = head_scores.reshape(layout.kv_heads, g).sort(dim=1).values  # per group, ascending
    return [Unit(block, "attn", r, float(ranked[:, r].mean()), layout.kv_heads * head_cost) for r in range(g)]


def mlp_units(layout: BlockLayout, scores: torch.Tensor, block: int) -> list[Unit]:
    m = layout.mlp
    cost = (
        _linear_params(m.gate_proj, rows=1)
        + _linear_params(m.up_proj, rows=1)
        + _linear_params(m.down_proj, cols=1)
    )
    return [Unit(block, "mlp", i, float(s), cost) for i, s in enumerate(scores.tolist())]


# ----------------------------------------------------------------------------- selection
def _attention_limit(layout: BlockLayout, mode: str) -> int:
    """How many attention units may go before the block has no heads left."""
    return layout.kv_heads - 1 if (mode == "group" or layout.group_size == 1) else layout.group_size - 1


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
    ``sparsity`` of the block's parameters: heads at the ratio rounded down to whole units (a KV
    group is a third of SmolLM2's attention: removing one from every block costs far more than
    the same parameters taken from the MLP), MLP channels the rest of the budget."""
    chosen = []
    for layout, a_units, m_units, params in zip(layouts, attn, mlp, block_params, strict=True):
        total = len(a_units)
        n_attn = int(config.sparsity * total + 1e-9)
        if n_attn > _attention_limit(layout, config.heads):
            raise ValueError(
                f"sparsity {config.sparsity:g} would remove every attention head of a block ({n_attn} of "
                f"{total} units in heads={config.heads!r} mode): use a smaller sparsity, or heads='query'"
            )
        budget = config.sparsity * params - sum(u.cost for u in a_units[:n_attn])
        n_mlp = max(0, round(budget / m_units[0].cost))
        if n_mlp >= len(m_units):
            raise ValueError(f"sparsity {config.sparsity:g} would remove every MLP channel of a block")
        n_mlp = round_removal(n_mlp, len(m_units), config.channel_multiple)
        if n_mlp >= len(m_units):
            raise ValueError(f"sparsity {config.sparsity:g} would remove every MLP channel of a block")
        if config.heads == "group" or layout.group_size == 1:
            a_sel = sorted(a_units, key=lambda u: u.score)[:n_attn]
        else:
            a_sel = a_units[:n_attn]  # rounds are already in removal order
        m_sel = sorted(m_units, key=lambda u: u.score)[:n_mlp]
        chosen.append((a_sel, m_sel))
    return chosen


def select_global(
    layouts, attn: list[list[Unit]], mlp: list[list[Unit]], config: StructuredConfig, block_params: list[int]
) -> list[tuple[list[Unit], list[Unit]]]:
    """FLAP's adaptive structure: scores (standardised within each block) ranked across blocks and
    types, removed lowest first until ``sparsity`` of all block parameters is gone, which is
    FLAP's parameter-weighted threshold (each block keeps an attention unit and an MLP channel)."""
    all_attn = [u for units in attn for u in units]
    all_mlp = [u for units in mlp for u in units]
    budget = config.sparsity * sum(block_params)
    limits = [_attention_limit(x, config.heads) for x in layouts]
    chosen: list[tuple[list[Unit], list[Unit]]] = [([], []) for _ in layouts]
    removed = 0
    for unit in sorted(all_attn + all_mlp, key=lambda u: (u.score, u.index)):
        if removed >= budget:
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
def _kept_heads(layout: BlockLayout, head_scores: torch.Tensor, units: list[Unit], mode: str):
    """(query heads, kv heads) to keep in one block after removing ``units``."""
    g = layout.group_size
    if mode == "group" or g == 1:
        gone = {u.index for u in units}
        kv = torch.tensor([i for i in range(layout.kv_heads) if i not in gone], dtype=torch.long)
        q = head_channels(kv, g)  # the query heads of each kept group
        return q, kv
    rounds = len(units)
    order = head_scores.reshape(layout.kv_heads, g).argsort(dim=1)[:, rounds:]  # keep the best g - rounds
    q = (order + torch.arange(layout.kv_heads)[:, None] * g).reshape(-1).sort().values
    return q, torch.arange(layout.kv_heads)


def _one_block_config(model: nn.Module, **flags: bool):
    """A copy of the model's config cut to one block (per-layer lists sliced), with ``flags`` set."""
    config = copy.deepcopy(model.config)
    total = config.num_hidden_layers
    for k, v in list(vars(config).items()):
        if isinstance(v, list) and len(v) == total and k != "architectures":
            setattr(config, k, v[:1])
    config.num_hidden_layers = 1
    for key, value in flags.items():
        setattr(config, key, value)
    return config


def _probe_layout(model: nn.Module, **flags: bool) -> BlockLayout:
    """The layout of a one-block copy of ``model`` built on the meta device with ``flags`` set."""
    with torch.device("meta"):
        return block_layouts(type(model)(_one_block_config(model, **flags)))[0]


def bias_config_keys(model: nn.Module) -> dict[str, str]:
    """{"o_proj" | "down_proj": config key} for the biases this architecture lets a config turn on.

    Found by building a one-block copy of the model on the meta device with each flag set, so a
    family whose code hard-wires bias=False (Qwen2's o_proj, Mistral) is recognised as such."""
    found = {}
    for proj, key in (("o_proj", "attention_bias"), ("down_proj", "mlp_bias")):
        if not hasattr(model.config, key):
            continue
        try:
            layout = _probe_layout(model, **{key: True})
        except Exception:  # noqa: BLE001 - an architecture that cannot be probed gets no compensation
            continue
        if layout.linear(proj).bias is not None:
            found[proj] = key
    return found


def _conform_biases(model: nn.Module, keys: dict[str, str], layouts: list[BlockLayout]) -> None:
    """Turn the config flags on and give every linear the flag covers a (zero) bias."""
    flags = {key: True for key in keys.values()}
    probe = _probe_layout(model, **flags)
    for key in flags:
        setattr(model.config, key, True)
    for layout in layouts:
        for name in ATTN_NAMES + MLP_NAMES:
            if probe.linear(name).bias is not None:
                ensure_bias(layout.linear(name))


def _compensate(linear: nn.Linear, removed_cols: torch.Tensor, mean: torch.Tensor) -> None:
    if len(removed_cols) == 0:
        return
    w = linear.weight.data[:, removed_cols].double()
    add_output_bias(linear, (w @ mean.to(w.device)[removed_cols]).to(linear.weight.dtype))


def set_config_widths(model: nn.Module, report: StructuredReport) -> None:
    """Uniform widths go into the config (plain HF checkpoint); per-block ones into
    ``config.block_widths`` (a sparsekit checkpoint)."""
    widths = [w.to_dict() for w in block_widths(model)]
    report.widths = widths
    config = model.config
    if all(w == widths[0] for w in widths):
        head_dim = (
            config.head_dim
            if getattr(config, "head_dim", None)
            else config.hidden_size // config.num_attention_heads
        )
        config.head_dim = head_dim  # explicit: hidden_size / heads no longer gives it
        config.num_attention_heads = widths[0]["heads"]
        config.num_key_value_heads = widths[0]["kv_heads"]
        config.intermediate_size = widths[0]["intermediate"]
        if hasattr(config, "block_widths"):
            del config.block_widths
        report.uniform_widths = True
    else:
        config.block_widths = widths
        report.uniform_widths = False


class _WidthMethod(StructuredMethod):
    score_kind: str
    default_compensation: bool = False
    adaptive_ok: bool = False

    def prune(
        self, model: nn.Module, input_ids: torch.Tensor | None, config: StructuredConfig
    ) -> StructuredReport:
        check_calibration(input_ids, self.name)
        if config.widths == "adaptive" and not self.adaptive_ok:
            raise ValueError(f"{self.name} keeps the same widths in every block; widths='adaptive' is flap's")
        if config.remove_layers is not None:
            raise ValueError(f"remove_layers is for depth methods (shortgpt, angular), not {self.name}")
        layouts = block_layouts(model)  # refuses an architecture it does not understand, before any work
        _, blocks = find_decoder_blocks(model)
        check_finite_weights(blocks, find_decoder_blocks(model)[0])
        report = StructuredReport(self.name, config.sparsity, *input_ids.shape)
        report.params_before, report.block_params_before = param_count(model), block_param_count(model)
        first = layouts[0]
        report.widths_before = {
            "heads": first.heads,
            "kv_heads": first.kv_heads,
            "intermediate": first.intermediate,
        }
        compensation = (
            self.default_compensation if config.bias_compensation is None else config.bias_compensation
        )
        keys = bias_config_keys(model) if compensation else {}
        if compensation and len(keys) < 2:
            missing = [p for p in ("o_proj", "down_proj") if p not in keys]
            report.notes.append(
                f"bias compensation skipped for {', '.join(missing)}: {model.config.model_type} has no "
                "config flag that gives it a bias, so a plain checkpoint could not hold one"
            )
        device = compute_device(model, config.device)
        started = time.perf_counter()
        with torch.no_grad():
            chunks = capture(model, input_ids, config.batch_size, device)
            stats = collect_stats(layouts, blocks, chunks, device, config.show_progress)
            del chunks
            report.timings_s["statistics"] = time.perf_counter() - started
            started = time.perf_counter()
            adaptive = config.widths == "adaptive"
            heads, attn, mlp = [], [], []
            for i, (x, s) in enumerate(zip(layouts, stats, strict=True)):
                a_scores = channel_scores(x.attn.o_proj.weight, s.attn, self.score_kind)
                m_scores = channel_scores(x.mlp.down_proj.weight, s.mlp, self.score_kind)
                if adaptive:
                    a_scores, m_scores = standardize(a_scores), standardize(m_scores)
                heads.append(head_scores(x, a_scores, self.score_kind))
                attn.append(attention_units(x, heads[-1], config.heads, i))
                mlp.append(mlp_units(x, m_scores, i))
            params = [sum(p.numel() for p in b.parameters()) for b in blocks]
            select = select_global if config.widths == "adaptive" else select_uniform
            chosen = select(layouts, attn, mlp, config, params)
            for layout, s, h, (a_sel, m_sel) in zip(layouts, stats, heads, chosen, strict=True):
                self._apply(layout, s, h, a_sel, m_sel, config, keys)
            if keys:
                _conform_biases(model, keys, layouts)
            report.timings_s["select+cut"] = time.perf_counter() - started
        report.bias_compensation = bool(keys)
        set_config_widths(model, report)
        report.params_after, report.block_params_after = param_count(model), block_param_count(model)
        log.info("%s removed %.1f%% of block parameters", self.name, 100 * report.removed_fraction)
        return report

    def _apply(self, layout, stats: BlockStats, head_scores, a_sel, m_sel, config, keys) -> None:
        q_keep, kv_keep = _kept_heads(layout, head_scores, a_sel, config.heads)
        hd = layout.head_dim
        gone_q = torch.tensor(sorted(set(range(layout.heads)) - set(q_keep.tolist())), dtype=torch.long)
        gone_ch = torch.tensor(sorted(u.index for u in m_sel), dtype=torch.long)
        if "o_proj" in keys:
            _compensate(layout.attn.o_proj, head_channels(gone_q, hd), stats.attn.mean)
        if "down_proj" in keys:
            _compensate(layout.mlp.down_proj, gone_ch, stats.mlp.mean)
        if len(gone_q):
            keep_heads(layout, q_keep, kv_keep)
        if len(gone_ch):
            kept = torch.tensor(
                sorted(set(range(layout.intermediate)) - set(gone_ch.tolist())), dtype=torch.long
            )
            keep_channels(layout, kept)


@register_structured
class WandaSP(_WidthMethod):
    """Structured Wanda: |W| * ||X|| summed per head / channel, the same ratio in every block."""

    name = "wanda-sp"
    score_kind = "wanda-sp"


@register_structured
class FLAP(_WidthMethod):
    """Fluctuation-based adaptive structured pruning with bias compensation."""

    name = "flap"
    score_kind = "flap"
    default_compensation = True
    adaptive_ok = True
