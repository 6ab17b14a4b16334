"""Minitron width pruning (Muralidharan et al., 2024; Sreenivas et al., 2024): the hidden size,
MLP channels and attention heads ranked by activation magnitude on calibration data.

Importance of a channel is its activation aggregated as the paper's best setting: the mean of
|x| over a sequence's tokens, then the L2 norm over sequences (its square, summed, here):
- a hidden channel: summed over the outputs of every residual-stream norm of every block;
- an MLP channel: at the input of the MLP's output projection;
- a head: the L2 norm over its channels at the input of the attention output projection (a KV
  group, with ``heads="group"``, scores the mean of its query heads).

``axes`` picks what is cut (default ``hidden,mlp``, the Minitron / Llama-3.1-Minitron-4B-Width
recipe: heads are kept). One keep ratio is shared by the chosen axes and solved so that
``sparsity`` of the decoder-block parameters goes: the hidden size is rounded to a multiple of
``channel_multiple``, heads to whole units, and the MLP width takes up what rounding left.

The hidden cut slices the hidden axis everywhere ``sparsekit.models.hidden_map`` finds it
(embedding, position embeddings, norms, every projection, the lm_head, tied or not) and writes
``hidden_size`` and ``head_dim`` to the config. Two gains are folded into weights so the cut
model computes what the dense one did on the kept channels:
- each norm's scale is multiplied by the ratio of its input's RMS (or standard deviation, for a
  mean-subtracting norm) over all channels to that over the kept ones, measured on calibration
  inputs: without it every norm output grows by about sqrt(hidden / kept);
- an embedding scaled by sqrt(hidden_size) (Gemma) is rescaled, since the config's new size
  rebuilds a smaller scale; a tied lm_head then sees the change undone by the final norm.

Minitron heals with distillation (``sparsekit finetune --distill``); the numbers in
docs/results.md show what it buys here.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsekit.models import (
    BlockAnatomy,
    HiddenMap,
    ModelAnatomy,
    UnsupportedArchitecture,
    describe,
    hidden_map,
    require_hidden_cut,
)
from sparsekit.models.families import CONFIG_MLP_WIDTH_KEYS, KV_COUNT_ATTRS, family
from sparsekit.models.hidden import embedding_gain
from sparsekit.models.modules import is_linear_like, linear_weight

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
from .channel_mixer import ChannelMixer, check_channel_independence, find_channel_mixer, keep_mixer_channels
from .layout import block_widths, keep_channels, keep_heads, keep_hidden
from .passes import capture, compute_device, hooked_pass
from .width import _expresses, _kept_heads, _uniform, attention_units, build_on_meta, set_config_widths

log = logging.getLogger(__name__)
AXES = ("hidden", "mlp", "heads")


# ----------------------------------------------------------------------------- statistics
class Importance:
    """Per channel of a tensor [b, L, n]: sum over sequences of (mean over tokens of |x|)^2."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        x = x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])
        part = x.abs().float().mean(1).double().pow(2).sum(0)  # float64 on [b, n], not on [b, L, n]
        self.value = part if self.value is None else self.value + part.to(self.value.device)


class Moments:
    """Per channel of a norm's input [..., n]: mean of x^2 and of (x - token mean)^2."""

    def __init__(self) -> None:
        self.raw: torch.Tensor | None = None
        self.centered: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        c = x - x.mean(-1, keepdim=True)
        raw, centered = (x * x).sum(0), (c * c).sum(0)
        if self.raw is None:
            self.raw, self.centered = raw, centered
        else:
            self.raw += raw.to(self.raw.device)
            self.centered += centered.to(self.centered.device)
        self.count += x.shape[0]


@dataclass
class Stats:
    hidden: Importance = field(default_factory=Importance)  # every block norm's output, summed
    norms: dict[str, Moments] = field(default_factory=dict)  # each norm's input, by qualified name
    heads: list[Importance | None] = field(default_factory=list)  # per block: o_proj's input
    mlp: list[Importance | None] = field(default_factory=list)  # per block: down_proj's input
    mixers: dict[int, Importance] = field(default_factory=dict)  # a tied channel mixer's writer input

    def sum_over_ranks(self, world: World) -> None:
        """Every statistic summed over the ranks' shares of the calibration tokens (all sums)."""
        if not world.active:
            return
        importances = [self.hidden, *(i for i in (*self.heads, *self.mlp) if i is not None)]
        importances += [self.mixers[b] for b in sorted(self.mixers)]
        moments = [self.norms[n] for n in sorted(self.norms)]
        tensors = [i.value for i in importances] + [t for m in moments for t in (m.raw, m.centered)]
        for m, n in zip(moments, sum_over_ranks_(tensors, [m.count for m in moments]), strict=True):
            m.count = int(n)


def _hooks(
    model: nn.Module,
    block: BlockAnatomy,
    prefix: str,
    hmap: HiddenMap,
    stats: Stats,
    mixer: ChannelMixer | None,
) -> list:
    handles = []
    if mixer is not None:
        imp = stats.mixers.setdefault(block.index, Importance())
        handles.append(block.linear(mixer.writer).register_forward_pre_hook(lambda m, a: imp.add(a[0])))
    for name in (n for n in hmap.norms if n.startswith(prefix + ".")):
        moments = stats.norms.setdefault(name, Moments())
        norm = model.get_submodule(name)
        handles.append(norm.register_forward_pre_hook(lambda m, args, s=moments: s.add(args[0])))
        handles.append(norm.register_forward_hook(lambda m, args, out: stats.hidden.add(out)))
    heads = Importance() if block.attention is not None else None
    mlp = Importance() if block.mlp is not None else None
    if heads is not None:
        handles.append(
            block.linear(block.attention.o).register_forward_pre_hook(lambda m, a: heads.add(a[0]))
        )
    if mlp is not None:
        handles.append(block.linear(block.mlp.down).register_forward_pre_hook(lambda m, a: mlp.add(a[0])))
    stats.heads.append(heads)
    stats.mlp.append(mlp)
    return handles


def collect(
    model: nn.Module,
    anatomy: ModelAnatomy,
    hmap: HiddenMap,
    chunks,
    device,
    progress: bool,
    mixers: dict[int, ChannelMixer] | None = None,
) -> Stats:
    """One dense pass through the blocks; the final norms' inputs are the last block's outputs."""
    stats = Stats()
    mixers = mixers or {}

    def hook_block(block: BlockAnatomy) -> list:
        return _hooks(model, block, anatomy.block_name(block.index), hmap, stats, mixers.get(block.index))

    hooked_pass(anatomy, chunks, device, hook_block, "minitron statistics", progress)
    for name in hmap.final_norms:
        moments = stats.norms.setdefault(name, Moments())
        for c in chunks:
            moments.add(c.hidden)
    return stats


# ----------------------------------------------------------------------------- sizes
def _exponents(
    anatomy: ModelAnatomy, hmap: HiddenMap, mixers: dict[int, ChannelMixer] | None = None
) -> dict[tuple[int, int, int], int]:
    """Decoder-block parameters grouped by how they scale: {(hidden, mlp, heads) exponents: count}.
    A tied channel mixer's inner axis scales with the hidden size too."""
    hidden = {(n, p) for n, p, _ in hmap.vectors}
    inner = {
        (f"{anatomy.block_name(i)}.{name}", p)
        for i, m in (mixers or {}).items()
        for name, p in (
            (m.reader, "weight"),
            (m.reader, "bias"),
            (m.conv, "weight"),
            (m.conv, "bias"),
            (m.writer, "weight"),
        )
    }
    groups: dict[tuple[int, int, int], int] = {}
    for b in anatomy:
        prefix = anatomy.block_name(b.index)
        mlp_rows = set(b.mlp.producers) if b.mlp else set()
        head_rows = set(b.attention.producers) if b.attention else set()
        for qual, p in b.module.named_parameters():
            mod, _, pname = qual.rpartition(".")
            e_h = int((f"{prefix}.{mod}", pname) in hidden) + int((f"{prefix}.{mod}", pname) in inner)
            e_m = int(mod in mlp_rows or (b.mlp is not None and mod == b.mlp.down and pname == "weight"))
            e_a = int(
                mod in head_rows or (b.attention is not None and mod == b.attention.o and pname == "weight")
            )
            key = (e_h, e_m, e_a)
            groups[key] = groups.get(key, 0) + p.numel()
    return groups


def _kept_params(groups, k_hidden: float, k_mlp: float, k_heads: float) -> float:
    return sum(n * k_hidden**h * k_mlp**m * k_heads**a for (h, m, a), n in groups.items())


def _solve(target: float, f) -> float:
    """k in [0, 1] with f(k) = target (f increasing), by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def _round_to(value: float, multiple: int, total: int) -> int:
    return int(min(total, max(multiple, round(value / multiple) * multiple)))


def _accepted_hidden(
    value: float,
    multiple: int,
    total: int,
    heads: int | None,
    accepts: Callable[[int, int | None], bool] | None,
) -> int:
    """The multiple of ``multiple`` nearest ``value`` (at most ``total``) that ``accepts`` takes (a
    Llama config refuses a hidden size that is no multiple of its head count, head_dim stated or
    not); a ValueError when none does."""
    first = _round_to(value, multiple, total)
    if accepts is None or accepts(first, heads):
        return first
    sizes = range(multiple, total, multiple)
    for size in sorted(sizes, key=lambda s: (abs(s - value), -s)):
        if accepts(size, heads):
            log.info("minitron: hidden size %d instead of %d, which the config refuses", size, first)
            return size
    raise ValueError(
        f"minitron: the model's config accepts no hidden size below {total} in steps of {multiple} "
        f"(with {heads} heads): give channel_multiple=1, or cut axes='mlp,heads'"
    )


def _config_with_hidden(model: nn.Module, attention, hidden: int):
    """A copy of the model's config with ``hidden`` as its hidden size, head_dim stated as before
    where the config has the key (may raise: a config that refuses the value)."""
    trial = copy.deepcopy(model.config)
    trial.hidden_size = hidden
    if attention is not None and "head_dim" in trial.to_dict():
        trial.head_dim = attention.head_dim
    return trial


def config_accepts(model: nn.Module, anatomy: ModelAnatomy) -> Callable[[int, int | None], bool]:
    """``accepts(hidden, heads)`` for ``plan``: the model's config with that hidden size (and head
    count; head_dim stated as it is) passes the config's own validation, the check
    ``save_pretrained`` runs."""
    a = next((b.attention for b in anatomy if b.attention is not None), None)

    def accepts(hidden: int, heads: int | None) -> bool:
        if not hasattr(model.config, "validate"):
            return True
        try:
            trial = _config_with_hidden(model, a, hidden)
            if heads is not None:
                trial.num_attention_heads = heads
            trial.validate()
        except Exception:  # noqa: BLE001 - transformers raises its own validation error types
            return False
        return True

    return accepts


@dataclass
class Plan:
    hidden: torch.Tensor | None  # kept hidden channels
    heads: list[tuple[torch.Tensor, torch.Tensor] | None]  # per block: (query heads, KV heads) kept
    mlp: list[torch.Tensor | None]  # per block: kept MLP channels
    mixers: dict[int, torch.Tensor] = field(default_factory=dict)  # per tied channel mixer: kept channels

    def with_mixers(self, stats: Stats) -> Plan:
        """Each tied mixer keeps as many inner channels as the hidden size, its top ones."""
        if self.hidden is not None:
            h = len(self.hidden)
            self.mixers = {
                i: imp.value.topk(h).indices.sort().values.cpu() for i, imp in stats.mixers.items()
            }
        return self


def _head_scores(block: BlockAnatomy, imp: Importance) -> torch.Tensor:
    a = block.attention
    return imp.value.reshape(a.heads, a.head_dim).sum(1).sqrt()


def _by_group(block: BlockAnatomy, mode: str) -> bool:
    """Heads go as whole KV groups (or one at a time in an MHA block), not one query head per group."""
    return mode == "group" or block.attention.group_size == 1


def _block_heads(block: BlockAnatomy, imp: Importance, n: int, mode: str):
    """(query heads, KV heads) kept in one block after removing its ``n`` lowest-scored units."""
    scores = _head_scores(block, imp)
    units = attention_units(block, scores, mode)
    gone = sorted(units, key=lambda u: u.score)[:n] if _by_group(block, mode) else units[:n]
    return _kept_heads(block, scores, gone, mode)


def plan(
    anatomy: ModelAnatomy,
    hmap: HiddenMap,
    stats: Stats,
    axes: tuple[str, ...],
    config,
    mixers=None,
    accepts: Callable[[int, int | None], bool] | None = None,
) -> Plan:
    """What each axis keeps: one shared keep ratio, rounded per axis, the MLP taking up the rest.
    ``accepts(hidden, heads)``: whether the model's config takes that hidden size with that many
    query heads per block (None: the heads are not cut); the hidden size is the accepted multiple of
    ``channel_multiple`` nearest the ratio's."""
    groups = _exponents(anatomy, hmap, mixers)
    target = (1 - config.sparsity) * _kept_params(groups, 1, 1, 1)
    on = {a: a in axes for a in AXES}
    k = _solve(target, lambda x: _kept_params(groups, *(x if on[a] else 1.0 for a in AXES)))
    heads: list = [None] * len(anatomy)
    k_heads = 1.0
    if on["heads"]:
        fractions = []
        for b, imp in zip(anatomy, stats.heads, strict=True):
            if b.attention is None or imp is None:
                continue
            n_units = len(attention_units(b, _head_scores(b, imp), config.heads))
            heads[b.index] = _block_heads(
                b, imp, min(int((1 - k) * n_units + 1e-9), n_units - 1), config.heads
            )
            fractions.append(len(heads[b.index][0]) / b.attention.heads)
        k_heads = sum(fractions) / len(fractions) if fractions else 1.0
    k_hidden = 1.0
    keep_hidden = None
    if on["hidden"]:
        kept_heads = _uniform([len(h[0]) for h in heads if h is not None])
        h = _accepted_hidden(k * hmap.size, config.channel_multiple, hmap.size, kept_heads, accepts)
        keep_hidden = stats.hidden.value.topk(h).indices.sort().values.cpu()
        k_hidden = h / hmap.size
    mlp = _mlp_plan(anatomy, stats, groups, target, on["mlp"], k_hidden, k_heads, config)
    return Plan(keep_hidden, heads, mlp).with_mixers(stats)


def _mlp_plan(
    anatomy, stats: Stats, groups, target: float, on: bool, k_hidden: float, k_heads: float, config
):
    """Per block, the kept MLP channels: the width that brings the kept parameters to ``target``."""
    mlp: list = [None] * len(anatomy)
    if not on:
        return mlp
    k_mlp = _solve(target, lambda x: _kept_params(groups, k_hidden, x, k_heads))
    width = min((b.mlp.intermediate for b in anatomy if b.mlp is not None), default=0)
    kept = _round_to(k_mlp * width, config.channel_multiple, width)
    for b, imp in zip(anatomy, stats.mlp, strict=True):
        if b.mlp is not None and imp is not None:
            mlp[b.index] = imp.value.topk(min(kept, b.mlp.intermediate)).indices.sort().values.cpu()
    return mlp


# ----------------------------------------------------------------------------- tied head width
def _narrower(model: nn.Module, anatomy: ModelAnatomy, hmap: HiddenMap) -> tuple[nn.Module | None, int]:
    """The model built on the meta device from its config with a narrower hidden size (heads and
    head_dim stated as before), and that size; None where the config refuses it."""
    a = next((b.attention for b in anatomy if b.attention is not None), None)
    size = hmap.size - (a.heads if a is not None else 1)  # head_dim - 1 per head where the code divides
    try:
        return build_on_meta(model, _config_with_hidden(model, a, size)), size
    except Exception:  # noqa: BLE001 - a config that refuses the size: the dry run names the family
        return None, size


def heads_follow_hidden(model: nn.Module, anatomy: ModelAnatomy, hmap: HiddenMap, narrow=None) -> bool:
    """Whether the family's code ties the attention's width to hidden_size (GPT-2, GPT-NeoX, OPT,
    Falcon and StableLM derive head_dim = hidden_size / heads; Helium sizes its output projection's
    input by hidden_size): built narrower, heads and head_dim stated as before, it comes out with
    other head widths, or with no attention sparsekit can describe. ``narrow``: ``_narrower``'s
    result when the caller has it already."""
    a = next((b.attention for b in anatomy if b.attention is not None), None)
    built, _ = narrow or _narrower(model, anatomy, hmap)
    if a is None or built is None:
        return False
    try:
        b = next((b.attention for b in describe(built) if b.attention is not None), None)
    except UnsupportedArchitecture:
        b = None
    return b is None or (b.heads, b.head_dim) != (a.heads, a.head_dim)


def tied_mixers(
    model: nn.Module, anatomy: ModelAnatomy, hmap: HiddenMap, narrow=None
) -> dict[int, ChannelMixer]:
    """Per block, a channel mixer (``channel_mixer.py``) whose inner width the family's code sizes
    by hidden_size (LFM2's convolutions): built narrower, its convolution narrows with it."""
    found = {b.index: m for b in anatomy if (m := find_channel_mixer(b, hmap.size)) is not None}
    built, size = (narrow or _narrower(model, anatomy, hmap)) if found else (None, 0)
    if built is None:
        return {}
    blocks = built.get_submodule(anatomy.blocks_path)
    return {i: m for i, m in found.items() if blocks[i].get_submodule(m.conv).in_channels == size}


def _tied_ratios(n: int, step: int, size: int) -> tuple[float, float, float]:
    kept = 1 - n * step / size
    return kept, 1.0, kept


def tied_units(anatomy: ModelAnatomy, hmap: HiddenMap, config) -> tuple[int, int]:
    """(hidden channels per removable attention unit, units that may go from every block) where
    head_dim = hidden_size / heads; refuses shapes with no unit to spare."""
    blocks = [b for b in anatomy if b.attention is not None]
    shapes = {(b.attention.heads, b.attention.kv_heads, b.attention.head_dim) for b in blocks}
    if len(shapes) != 1 or any(b.attention.heads * b.attention.head_dim != hmap.size for b in blocks):
        raise UnsupportedArchitecture(
            f"{anatomy.model_type} ties its heads' width to hidden_size, but its blocks' attention shapes "
            f"(heads, KV heads, head_dim) {sorted(shapes)} do not span hidden_size {hmap.size} alike in "
            "every block: cut axes='mlp,heads' instead"
        )
    a = blocks[0].attention
    by_group = _by_group(blocks[0], config.heads)
    limit = (a.kv_heads if by_group else a.group_size) - 1
    if limit == 0:
        raise UnsupportedArchitecture(
            f"{anatomy.model_type} ties its heads' width to hidden_size, so a hidden cut must remove heads, "
            f"and with heads={config.heads!r} its {a.heads} query / {a.kv_heads} KV heads have no unit to "
            "spare: pass heads='query' (one query head of every KV group), or cut axes='mlp,heads'"
        )
    return (a.group_size if by_group else a.kv_heads) * a.head_dim, limit


def tied_plan(
    anatomy: ModelAnatomy, hmap: HiddenMap, stats: Stats, axes: tuple[str, ...], config, mixers=None
) -> Plan:
    """The hidden cut where head_dim = hidden_size / heads: it removes whole attention units (a
    KV group with its query heads, or one query head of every group with ``heads="query"``) from
    every block, hidden channels by their own score and heads by theirs, so the kept heads times
    head_dim is the new hidden size; the MLP takes up the rest of the budget."""
    step, limit = tied_units(anatomy, hmap, config)
    blocks = [b for b in anatomy if b.attention is not None]
    groups = _exponents(anatomy, hmap, mixers)
    target = (1 - config.sparsity) * _kept_params(groups, 1, 1, 1)
    mlp_on = "mlp" in axes
    k = _solve(target, lambda x: _kept_params(groups, x, x if mlp_on else 1.0, x))
    n = min(limit, max(0, round((1 - k) * hmap.size / step)))
    if not mlp_on:  # the unit count whose kept parameters are nearest the target
        n = min(
            range(limit + 1),
            key=lambda m: abs(_kept_params(groups, *_tied_ratios(m, step, hmap.size)) - target),
        )
    h = hmap.size - n * step
    keep_hidden = stats.hidden.value.topk(h).indices.sort().values.cpu()
    heads: list = [None] * len(anatomy)
    for b in blocks:
        heads[b.index] = _block_heads(b, stats.heads[b.index], n, config.heads)
    k_cut = h / hmap.size
    mlp = _mlp_plan(anatomy, stats, groups, target, mlp_on, k_cut, k_cut, config)
    return Plan(keep_hidden, heads, mlp).with_mixers(stats)


# ----------------------------------------------------------------------------- applying
def _affine_offset(norm: nn.Module, size: int) -> float | None:
    """a in y = n(x) * (a + weight) + bias for this norm (0 for LayerNorm / RMSNorm, 1 for Gemma's
    (1 + weight)), found by probing; None when the output is not affine in the weight."""
    weight = norm.weight
    x = torch.randn(3, size, generator=torch.Generator().manual_seed(0)).to(weight)
    saved = weight.data.clone()
    try:
        with torch.no_grad():
            weight.data.zero_()
            y0 = norm(x).double()
            weight.data.fill_(1.0)
            y1 = norm(x).double()
    finally:
        weight.data.copy_(saved)
    bias = getattr(norm, "bias", None)
    if bias is not None:
        y0, y1 = y0 - bias.double(), y1 - bias.double()
    n = y1 - y0
    if n.abs().max() == 0:
        return None
    return round(float((y0 * n).sum() / (n * n).sum()), 3)


def _mean_subtracting(norm: nn.Module, size: int) -> bool:
    x = torch.randn(2, size, generator=torch.Generator().manual_seed(1)).to(norm.weight)
    with torch.no_grad():
        return bool(torch.allclose(norm(x), norm(x + 3.0), atol=1e-4, rtol=1e-3))


def scale_norm(norm: nn.Module, factor: float, size: int) -> bool:
    """Multiply the norm's output by ``factor`` through its weight and bias; False where it cannot."""
    a = _affine_offset(norm, size)
    if a is None:
        return False
    with torch.no_grad():
        norm.weight.data = ((a + norm.weight.data.double()) * factor - a).to(norm.weight.dtype)
        if getattr(norm, "bias", None) is not None:
            norm.bias.data = (norm.bias.data.double() * factor).to(norm.bias.dtype)
    return True


def norm_gain(moments: Moments, kept: torch.Tensor, size: int, centered: bool) -> float:
    """The RMS (or std) of a norm's input over the ``kept`` channels relative to that over all
    ``size``, from calibration moments: the norm's output on the kept channels shrinks by this
    factor when the others go, so its scale is multiplied by it."""
    m = (moments.centered if centered else moments.raw).double()
    ratio = (m[kept.to(m.device)].sum() / len(kept)) / (m.sum() / size)
    return float(ratio.clamp_min(1e-12).sqrt())


def _rescale_embedding(model, anatomy, hmap: HiddenMap, new_size: int) -> float:
    """Gemma-style sqrt(hidden) embedding scale: set the module's scale to the new size's and fold
    the old one into the weight; the factor the weight took (1.0 where nothing changes)."""
    if not hmap.gain_follows_size or anatomy.embedding is None:
        return 1.0
    emb = model.get_submodule(anatomy.embedding)
    old, new = hmap.embedding_gain, new_size**0.5
    for buf in emb.buffers(recurse=False):
        if buf.dim() == 0 and buf.is_floating_point() and abs(float(buf) - old) < 1e-3 * old:
            buf.fill_(new)
    for name, value in list(vars(emb).items()):
        if isinstance(value, float) and abs(value - old) < 1e-3 * old:
            setattr(emb, name, new)
    if abs(embedding_gain(emb) - new) > 1e-3 * new:
        raise UnsupportedArchitecture(
            f"{anatomy.embedding} scales its rows by {old:g} = sqrt(hidden_size) somewhere sparsekit "
            "cannot reset: a hidden cut would change the model's function"
        )
    with torch.no_grad():
        emb.weight.data *= old / new
    return old / new


def cut_hidden(
    model: nn.Module, hmap: HiddenMap, kept: torch.Tensor, stats: Stats, report, norm_gains: bool = True
) -> None:
    """The hidden cut with its norm (``norm_gains``) and embedding gains folded into weights."""
    anatomy = describe(model)
    probes = {n: _mean_subtracting(model.get_submodule(n), hmap.size) for n in stats.norms}
    keep_hidden(model, hmap, kept)
    new = len(kept)
    emb_factor = _rescale_embedding(model, anatomy, hmap, new)
    skipped = []
    for name, moments in stats.norms.items():
        factor = norm_gain(moments, kept, hmap.size, probes[name]) if norm_gains else 1.0  # undo the shrink
        if name in hmap.final_norms and anatomy.tied:
            factor /= emb_factor  # the tied lm_head carries the embedding's factor
        if not scale_norm(model.get_submodule(name), factor, new):
            skipped.append(name)
    if skipped:
        report.notes.append(
            f"norms whose output is not affine in their weight kept their scale: {skipped[:3]}"
        )


def follow_config_constants(model: nn.Module, old_config) -> list[str]:
    """Float attributes the family's code derives from its config (Gemma-4's
    ``per_layer_model_projection_scale = hidden_size**-0.5``) moved to what the new config gives, so
    the saved checkpoint behaves as the model in memory: an attribute counts when a build from
    ``old_config`` and one from the model's (new) config disagree on it, and the model still holds
    the old build's value. Where it scales a linear named like it (``<linear>_scale``), old / new is
    folded into that linear's weight and bias, so the function is kept. Returns a note per change."""
    before = dict(build_on_meta(model, old_config).named_modules())
    after = dict(build_on_meta(model, model.config).named_modules())
    notes = []
    for name, module in model.named_modules():
        if name not in before or name not in after:
            continue
        for attr, new in vars(after[name]).items():
            old = vars(before[name]).get(attr)
            if (
                not (isinstance(new, float) and isinstance(old, float))
                or old == new
                or vars(module).get(attr) != old
            ):
                continue
            setattr(module, attr, new)
            scaled = getattr(module, attr.removesuffix("_scale"), None) if attr.endswith("_scale") else None
            folded = is_linear_like(scaled) and new != 0
            if folded:
                with torch.no_grad():
                    linear_weight(scaled).mul_(old / new)
                    if getattr(scaled, "bias", None) is not None:
                        scaled.bias.mul_(old / new)
            where = f"{name}.{attr}" if name else attr
            notes.append(
                f"{where} follows the config: {old:.6g} -> {new:.6g}"
                + (f" (old / new folded into {attr.removesuffix('_scale')})" if folded else "")
            )
    return notes


def _config_update(
    model: nn.Module, anatomy: ModelAnatomy, new_hidden: int | None, tied: bool = False
) -> dict[str, object]:
    """The config values that state the cut model's widths; ``tied``: the family derives head_dim
    from hidden_size (not written where the config has no such key)."""
    widths = block_widths(anatomy)
    updates: dict[str, object] = {}
    heads = _uniform([w.heads for w in widths])
    kv = _uniform([w.kv_heads for w in widths])
    a = next((b.attention for b in anatomy if b.attention is not None), None)
    stated = model.config.to_dict()
    if a is not None:
        updates["num_attention_heads"] = heads
        if not tied or "head_dim" in stated:
            updates["head_dim"] = a.head_dim
        kv_key = next((k for k in KV_COUNT_ATTRS if k in stated), None)
        if kv_key is not None or kv != heads:
            updates[kv_key or "num_key_value_heads"] = kv
    inter = _uniform([w.intermediate for w in widths])
    if inter is not None:
        keys = [k for k in CONFIG_MLP_WIDTH_KEYS if k in stated]
        updates |= {k: inter for k in keys or ["intermediate_size"]} | family(
            anatomy.model_type
        ).mlp_width_config
    if new_hidden is not None:
        updates["hidden_size"] = new_hidden
        for key in ("word_embed_proj_dim",):
            if stated.get(key) == anatomy.hidden_size:
                updates[key] = new_hidden
    return {k: v for k, v in updates.items() if v is not None}


@register_structured
class Minitron(StructuredMethod):
    """Activation-ranked hidden size, MLP channels and heads; a plain HF checkpoint."""

    name = "minitron"
    norm_gains = True  # False: the paper's plain cut (an ablation: bench/minitron_norm_gain.py)

    def prune(self, model: nn.Module, input_ids, config: StructuredConfig) -> StructuredReport:
        check_calibration(input_ids, self.name)
        axes = config.axes_tuple
        if config.refit or config.widths == "adaptive" or config.remove_layers is not None:
            raise ValueError(
                "minitron keeps uniform widths and has no refit or layer count: drop refit, "
                "widths='adaptive' and remove_layers (distil after it instead: sparsekit finetune --distill)"
            )
        if config.bias_compensation:
            raise ValueError("minitron has no bias compensation (FLAP's); leave bias_compensation unset")
        anatomy = describe(model)
        anatomy.require_width(self.name)
        anatomy.require_dense(self.name)
        hmap = hidden_map(model)
        tied, mixers = False, {}
        if "hidden" in axes:
            require_hidden_cut(hmap, self.name)
            narrow = _narrower(model, anatomy, hmap)  # one meta build answers both questions
            tied = heads_follow_hidden(model, anatomy, hmap, narrow)
            if tied:
                tied_units(anatomy, hmap, config)  # refuses before any work where no unit can go
            mixers = tied_mixers(model, anatomy, hmap, narrow)
            for i, mixer in mixers.items():
                check_channel_independence(anatomy[i], mixer)
        if config.heads != "group" and "heads" not in axes and not tied:
            raise ValueError(
                f"heads={config.heads!r} chooses how heads go, and axes={config.axes!r} cuts none"
            )
        check_finite_weights(anatomy.blocks, anatomy.blocks_path)
        report = StructuredReport(self.name, config.sparsity, *input_ids.shape)
        report.params_before, report.block_params_before = param_count(model), block_param_count(model)
        first = block_widths(anatomy)
        report.widths_before = {
            k: _uniform([getattr(w, k) for w in first]) for k in ("heads", "kv_heads", "intermediate")
        } | {"hidden": hmap.size}
        device = compute_device(model, config.device)
        started = time.perf_counter()
        with torch.no_grad():
            world = current_world()
            chunks = capture(
                model, calibration_share(input_ids, config.batch_size, world), config.batch_size, device
            )
            stats = collect(model, anatomy, hmap, chunks, device, config.show_progress and world.main, mixers)
            stats.sum_over_ranks(world)
            del chunks
            report.timings_s["statistics"] = time.perf_counter() - started
            started = time.perf_counter()
            if tied:
                chosen = tied_plan(anatomy, hmap, stats, axes, config, mixers)
            else:
                chosen = plan(anatomy, hmap, stats, axes, config, mixers, config_accepts(model, anatomy))
            cuts_hidden = chosen.hidden is not None and len(chosen.hidden) < hmap.size
            if cuts_hidden:
                self._dry_run(model, hmap, chosen, tied, mixers)
            for b in anatomy:
                if chosen.heads[b.index] is not None:
                    keep_heads(b, *chosen.heads[b.index])
                if chosen.mlp[b.index] is not None:
                    keep_channels(b, chosen.mlp[b.index])
                if b.index in chosen.mixers:
                    keep_mixer_channels(b, mixers[b.index], chosen.mixers[b.index])
            if cuts_hidden:
                cut_hidden(model, hmap, chosen.hidden, stats, report, self.norm_gains)
                stated = model.config.to_dict()  # (Gemma-4's per-layer keys raise on getattr)
                old_config = copy.deepcopy(model.config)
                for key, value in _config_update(model, anatomy, len(chosen.hidden), tied).items():
                    if stated.get(key) != value:
                        setattr(model.config, key, value)
                report.notes += follow_config_constants(model, old_config)
            report.timings_s["select+cut"] = time.perf_counter() - started
        anatomy = describe(model, refresh=True)
        if cuts_hidden:
            report.widths = [w.to_dict() for w in block_widths(anatomy)]
        else:  # heads / MLP only: a plain config where it can say them, per-block widths otherwise
            set_config_widths(model, anatomy, report)
        report.hidden_size = (hmap.size, model.config.hidden_size)
        report.params_after, report.block_params_after = param_count(model), block_param_count(model)
        log.info("minitron removed %.1f%% of block parameters", 100 * report.removed_fraction)
        return report

    def _dry_run(
        self, model: nn.Module, hmap: HiddenMap, chosen: Plan, tied: bool, mixers: dict[int, ChannelMixer]
    ) -> None:
        """Cut a copy built on the meta device and check that the new config rebuilds its shapes,
        before the real weights are touched; refuse (naming the family) where it does not."""
        meta = build_on_meta(model, model.config)
        if {k: tuple(v.shape) for k, v in meta.state_dict().items()} != {
            k: tuple(v.shape) for k, v in model.state_dict().items()
        }:
            return  # an already-modified model: its config no longer rebuilds it (checked after)
        anatomy = describe(meta)
        for b in anatomy:
            if chosen.heads[b.index] is not None:
                keep_heads(b, *chosen.heads[b.index])
            if chosen.mlp[b.index] is not None:
                keep_channels(b, chosen.mlp[b.index])
            if b.index in chosen.mixers:
                keep_mixer_channels(b, mixers[b.index], chosen.mixers[b.index])
        keep_hidden(meta, hidden_map(meta), chosen.hidden)
        new_hidden = len(chosen.hidden)
        trial = copy.deepcopy(model.config)
        try:
            stated = trial.to_dict()
            for key, value in _config_update(meta, anatomy, new_hidden, tied).items():
                if stated.get(key) != value:
                    setattr(trial, key, value)
            expressed = _expresses(meta, trial)
        except (AttributeError, TypeError, ValueError):  # a derived, read-only config value
            expressed = False
        try:
            if expressed and hasattr(trial, "validate"):
                trial.validate()  # what save_pretrained runs: refused now, not after the cut
        except Exception as exc:  # noqa: BLE001 - transformers raises its own validation error types
            raise UnsupportedArchitecture(
                f"{anatomy.model_type}'s config refuses the cut widths (hidden {new_hidden}): {exc}. "
                "Ask for another sparsity, or cut axes='mlp,heads' instead"
            ) from exc
        if not expressed:
            raise UnsupportedArchitecture(
                f"{anatomy.model_type}'s config cannot state the cut widths (hidden {new_hidden}"
                f"{', heads removed with it' if tied else ', head_dim kept'}): its code derives a size from "
                "hidden_size. Cut axes='mlp,heads' instead"
            )
