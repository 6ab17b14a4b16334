"""Cutting heads and MLP channels out of decoder blocks, by what the model anatomy says.

The anatomy (``sparsekit.models.describe``) says which rows of which projection belong to each
query head and KV head (separate q/k/v, or a fused projection in its family's row layout), which
columns of the output projection they feed, which q/k norms span all heads, and which rows of
gate/up (or a fused gate_up) make each MLP channel. Query head ``h`` reads KV head
``h // (heads / kv_heads)`` (transformers' ``repeat_kv``), so the heads of one KV group are
contiguous. Layers are cut in place (their class, hooks and attributes kept).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sparsekit.models import (
    BlockAnatomy,
    HiddenMap,
    ModelAnatomy,
    SkippedAttention,
    SkippedMLP,
    describe,
    head_channels,
    is_conv1d,
    linear_weight,
    set_submodule,
)
from sparsekit.models.families import HEAD_COUNT_ATTRS, KV_COUNT_ATTRS, MLP_WIDTH_ATTRS


# ----------------------------------------------------------------------------- cutting one layer
def select_rows(linear: nn.Module, rows: torch.Tensor) -> None:
    """Keep output rows ``rows`` of a linear (or Conv1D) in place."""
    rows = rows.to(linear.weight.device)
    weight = linear_weight(linear).data[rows]
    _set_weight(linear, weight)
    if linear.bias is not None:
        linear.bias = nn.Parameter(
            linear.bias.data[rows].contiguous(), requires_grad=linear.bias.requires_grad
        )


def select_cols(linear: nn.Module, cols: torch.Tensor) -> None:
    """Keep input columns ``cols`` of a linear (or Conv1D) in place."""
    _set_weight(linear, linear_weight(linear).data[:, cols.to(linear.weight.device)])


def _set_weight(linear: nn.Module, weight: torch.Tensor) -> None:
    """Give ``linear`` the [out, in] ``weight`` and matching feature counts."""
    grad = linear.weight.requires_grad
    out_f, in_f = weight.shape
    if is_conv1d(linear):
        linear.weight = nn.Parameter(weight.T.contiguous(), requires_grad=grad)
        linear.nf = out_f
    else:
        linear.weight = nn.Parameter(weight.contiguous(), requires_grad=grad)
        linear.in_features, linear.out_features = in_f, out_f


def add_output_bias(linear: nn.Module, delta: torch.Tensor) -> None:
    """Add ``delta`` [out] to the bias of ``linear``, creating the bias if it has none."""
    delta = delta.to(device=linear.weight.device, dtype=linear.weight.dtype)
    if linear.bias is None:
        linear.bias = nn.Parameter(delta.clone(), requires_grad=False)
    else:
        linear.bias.data += delta


def ensure_bias(linear: nn.Module) -> None:
    """Give ``linear`` an all-zero bias if it has none (to match a config that asks for biases)."""
    if linear.bias is None:
        add_output_bias(linear, torch.zeros(linear_weight(linear).shape[0], device=linear.weight.device))


# ----------------------------------------------------------------------------- heads
def check_gqa(block: BlockAnatomy, query_heads: torch.Tensor, kv_heads: torch.Tensor) -> None:
    """Every kept KV head must keep the same (non-zero) number of its own query heads."""
    a = block.attention
    owner = query_heads // a.group_size
    per_group = torch.bincount(owner, minlength=a.kv_heads)[kv_heads]
    if (
        len(kv_heads) == 0
        or not torch.isin(owner, kv_heads).all()
        or per_group.min() != per_group.max()
        or per_group.min() == 0
    ):
        raise ValueError(
            f"head selection {query_heads.tolist()} over KV heads {kv_heads.tolist()} is not a valid GQA "
            "layer: each kept KV head needs the same (non-zero) number of its own query heads"
        )


def keep_heads(block: BlockAnatomy, query_heads: torch.Tensor, kv_heads: torch.Tensor) -> None:
    """Keep only the given query heads and KV heads (LongTensors) of one block's attention, in place:
    the q/k/v rows (separate or fused), the output projection's columns, all-heads q/k norms and
    per-head parameters (attention sinks), and the module's head counts."""
    query_heads, kv_heads = query_heads.sort().values.cpu(), kv_heads.sort().values.cpu()
    check_gqa(block, query_heads, kv_heads)
    a = block.attention
    for name, rows in a.producer_rows(query_heads, kv_heads).items():
        select_rows(block.linear(name), rows)
    select_cols(block.linear(a.o), a.o_columns(query_heads))
    for norm in a.norms:
        _cut_norm(
            block.module.get_submodule(norm.path),
            norm.kind,
            query_heads if norm.role == "q" else kv_heads,
            a.head_dim,
        )
    attn = block.module.get_submodule(a.path) if a.path else block.module
    for pname in a.head_params:
        param = getattr(attn, pname)
        setattr(
            attn,
            pname,
            nn.Parameter(
                param.data[query_heads.to(param.device)].contiguous(), requires_grad=param.requires_grad
            ),
        )
    set_head_counts(attn, a.heads, a.head_dim, len(query_heads), len(kv_heads))
    a.heads, a.kv_heads = len(query_heads), len(kv_heads)
    block.refresh_linears()


def _cut_norm(norm: nn.Module, kind: str, heads: torch.Tensor, head_dim: int) -> None:
    if kind == "per_head":
        return
    if kind == "head_list":
        norm_list = norm  # a ModuleList, one norm per head
        kept = [norm_list[i] for i in heads.tolist()]
        for _ in range(len(norm_list)):
            del norm_list[0]
        norm_list.extend(kept)
        return
    index = head_channels(heads, head_dim) if kind == "all_heads" else heads
    for pname in ("weight", "bias"):
        param = getattr(norm, pname, None)
        if isinstance(param, nn.Parameter):
            setattr(
                norm,
                pname,
                nn.Parameter(
                    param.data[index.to(param.device)].contiguous(), requires_grad=param.requires_grad
                ),
            )
    shape = getattr(norm, "normalized_shape", None)
    if isinstance(shape, tuple) and shape:
        norm.normalized_shape = (len(index),) if kind == "all_heads" else (len(heads), *shape[1:])
    for attr in ("hidden_size", "dim"):
        if isinstance(getattr(norm, attr, None), int) and kind == "all_heads":
            setattr(norm, attr, len(index))


def set_head_counts(attn: nn.Module, old_heads: int, head_dim: int, heads: int, kv_heads: int) -> None:
    """The head counts an attention module keeps as attributes (and in its own config copy, for
    families whose forward reads the config), after a cut."""
    attn.num_key_value_groups = heads // kv_heads
    for names, value in ((HEAD_COUNT_ATTRS, heads), (KV_COUNT_ATTRS, kv_heads)):
        for name in names:
            if isinstance(getattr(attn, name, None), int):
                setattr(attn, name, value)
    if getattr(attn, "split_size", None) == old_heads * head_dim:  # GPT-2: [q | k | v] split width
        attn.split_size = heads * head_dim
    config = getattr(attn, "config", None)
    if config is not None and hasattr(config, "num_attention_heads"):
        config = copy.copy(config)
        config.num_attention_heads = heads
        if hasattr(config, "num_key_value_heads"):
            config.num_key_value_heads = kv_heads
        attn.config = config


# ----------------------------------------------------------------------------- channels
def keep_channels(block: BlockAnatomy, channels: torch.Tensor) -> None:
    """Keep only the given MLP intermediate channels (LongTensor) of one block, in place."""
    channels = channels.sort().values.cpu()
    if len(channels) == 0:
        raise ValueError("cannot remove every MLP channel of a block")
    m = block.mlp
    for name, rows in m.producer_rows(channels).items():
        select_rows(block.linear(name), rows)
    select_cols(block.linear(m.down), channels)
    module = block.module.get_submodule(m.path) if m.path else block.module
    for attr in MLP_WIDTH_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, len(channels))
    m.intermediate = len(channels)
    block.refresh_linears()


# ----------------------------------------------------------------------------- widths
@dataclass
class BlockWidths:
    """The widths of one block: query heads, KV heads (None: no attention the anatomy cuts, as in a
    hybrid model's linear-attention layers), MLP intermediate channels and routed experts (None:
    not a MoE block)."""

    heads: int | None
    kv_heads: int | None
    intermediate: int | None
    experts: int | None = None

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if v is not None}


def block_widths(model: nn.Module | ModelAnatomy) -> list[BlockWidths]:
    anatomy = model if isinstance(model, ModelAnatomy) else describe(model)
    out = []
    for b in anatomy:
        a = b.attention
        heads = 0 if "attention" in b.skipped else (a.heads if a else None)
        kv_heads = 0 if "attention" in b.skipped else (a.kv_heads if a else None)
        inter = 0 if "mlp" in b.skipped else (b.mlp.intermediate if b.mlp else None)
        out.append(BlockWidths(heads, kv_heads, inter, b.experts.num_experts if b.experts else None))
    return out


def skip_subblock(block: BlockAnatomy, kind: str) -> nn.Module:
    """Replace the block's attention ("attention") or MLP ("mlp") by a parameter-free stand-in
    (``sparsekit.models.skipped``) that adds zero to the residual stream; returns the removed module."""
    if kind not in ("attention", "mlp"):
        raise ValueError(f"sub-block kind {kind!r}: choose attention or mlp")
    part = block.attention if kind == "attention" else block.mlp
    if part is None or not part.path:
        raise ValueError(
            f"block {block.index} has no {kind} module the anatomy can remove on its own "
            f"({'; '.join(block.problems) or 'not found'})"
        )
    if kind == "mlp" and block.experts is not None:
        raise ValueError(f"block {block.index}: its MLP is a Mixture-of-Experts layer; remove experts")
    old = block.module.get_submodule(part.path)
    index = getattr(old, "layer_idx", None)
    if kind == "attention":
        stand_in: nn.Module = SkippedAttention(index if isinstance(index, int) else block.index)
    else:
        stand_in = SkippedMLP()
    set_submodule(block.module, part.path, stand_in)
    block.skipped[kind] = part.path
    if kind == "attention":
        block.attention = None
    else:
        block.mlp = None
    block.refresh_linears()
    return old


@contextmanager
def subblock_skipped(block: BlockAnatomy, kind: str) -> Iterator[None]:
    """The sub-block removed for the duration, then put back (anatomy included)."""
    part = block.attention if kind == "attention" else block.mlp
    old = skip_subblock(block, kind)
    try:
        yield
    finally:
        set_submodule(block.module, block.skipped.pop(kind), old)
        if kind == "attention":
            block.attention = part
        else:
            block.mlp = part
        block.refresh_linears()


def first_heads(group_size: int, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A valid GQA selection of ``heads`` query heads over the first ``kv_heads`` KV heads."""
    per_group = heads // kv_heads
    q = [j * group_size + r for j in range(kv_heads) for r in range(per_group)]
    return torch.tensor(q, dtype=torch.long, device="cpu"), torch.arange(kv_heads, device="cpu")


def resize_to_widths(model: nn.Module, widths: list[dict[str, int]]) -> None:
    """Give every block of a freshly built (meta) model the stored widths: the loading half of
    adaptive width pruning. Cuts the first heads / channels; the checkpoint's weights replace them."""
    anatomy = describe(model)
    if len(widths) != len(anatomy):
        raise ValueError(f"checkpoint stores widths for {len(widths)} blocks, the model has {len(anatomy)}")
    for block, width in zip(anatomy, widths, strict=True):
        a, m = block.attention, block.mlp
        if int(width.get("heads", -1)) == 0 and int(width.get("kv_heads", 0)) == 0 and a is not None:
            skip_subblock(block, "attention")
        elif "heads" in width and a is not None:
            heads, kv_heads = int(width["heads"]), int(width["kv_heads"])
            if (
                kv_heads < 1
                or heads < kv_heads
                or heads % kv_heads
                or kv_heads > a.kv_heads
                or heads > a.heads
            ):
                raise ValueError(
                    f"invalid stored block widths {width}: heads must be a multiple of kv_heads >= 1, "
                    f"at most the model's {a.heads} / {a.kv_heads}"
                )
            if (heads, kv_heads) != (a.heads, a.kv_heads):
                keep_heads(block, *first_heads(a.group_size, heads, kv_heads))
        if "intermediate" in width and m is not None and int(width["intermediate"]) == 0:
            skip_subblock(block, "mlp")
        elif "intermediate" in width and m is not None:
            inter = int(width["intermediate"])
            if not 1 <= inter <= m.intermediate:
                raise ValueError(
                    f"invalid stored block widths {width}: intermediate must be in [1, {m.intermediate}]"
                )
            if inter != m.intermediate:
                keep_channels(block, torch.arange(inter, device="cpu"))
        if "experts" in width and block.experts is not None:
            _resize_experts(block, int(width["experts"]), width)


# ----------------------------------------------------------------------------- cutting experts
def _resize_experts(block: BlockAnatomy, count: int, width: dict) -> None:
    ex = block.experts
    if not ex.top_k <= count <= ex.num_experts or count % ex.groups:
        raise ValueError(
            f"invalid stored block widths {width}: experts must be in [{ex.top_k}, {ex.num_experts}] "
            f"(the router's top_k to the model's count) and a multiple of the {ex.groups} expert groups"
        )
    if count != ex.num_experts:
        keep_experts(block, torch.arange(count, device="cpu"))


def keep_experts(block: BlockAnatomy, kept: torch.Tensor) -> None:
    """Keep only the experts ``kept`` (sorted LongTensor) of one MoE block, in place: the fused 3-D
    expert tensors and their biases, the router's per-expert rows, the modules' expert counts."""
    ex = block.experts
    experts = block.module.get_submodule(ex.experts)
    names = [
        n for n, p in experts.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == ex.num_experts
    ]
    _slice(experts, names, kept)
    router = block.module.get_submodule(ex.router)
    _slice(router, list(ex.router_rows), kept)
    _slice(block.module.get_submodule(ex.moe) if ex.moe else block.module, list(ex.moe_rows), kept)
    if isinstance(router, nn.Linear):
        router.out_features = len(kept)
    for path, attrs in ex.counts.items():
        module = block.module.get_submodule(path) if path else block.module
        for attr in attrs:
            setattr(module, attr, len(kept))
    ex.num_experts = len(kept)


def _slice(module: nn.Module, names: list[str], kept: torch.Tensor) -> None:
    for name in names:
        tensor = getattr(module, name)
        index = kept.to(tensor.device)
        if isinstance(tensor, nn.Parameter):
            setattr(
                module,
                name,
                nn.Parameter(tensor.data[index].contiguous(), requires_grad=tensor.requires_grad),
            )
        else:
            module._buffers[name] = tensor[index].contiguous()


# ----------------------------------------------------------------------------- hidden size
_HIDDEN_SIZE_ATTRS = ("hidden_size", "embedding_dim", "embed_dim", "dim")


def keep_hidden(model: nn.Module, hmap: HiddenMap, channels: torch.Tensor) -> None:
    """Keep only hidden channels ``channels`` (LongTensor) everywhere ``hmap`` lists them, in place:
    the embedding's and lm_head's columns (a tied lm_head shares the cut embedding), position
    embeddings, every norm, the input columns of every reading linear and the output rows and bias
    of every writing one. Module attributes holding the old width follow (``in_features``,
    ``normalized_shape``, ``embedding_dim``); attention modules keep theirs (they size heads)."""
    channels = channels.sort().values.cpu()
    anatomy = describe(model)
    tied = anatomy.tied
    for name in hmap.reads:
        select_cols(model.get_submodule(name), channels)
    for name in hmap.writes:
        select_rows(model.get_submodule(name), channels)
    linears = set(hmap.reads) | set(hmap.writes)
    for name, pname, dim in hmap.vectors:
        if name in linears:
            continue
        module = model.get_submodule(name)
        param = getattr(module, pname)
        kept = param.data.index_select(dim, channels.to(param.device)).contiguous()
        setattr(module, pname, nn.Parameter(kept, requires_grad=param.requires_grad))
        shape = getattr(module, "normalized_shape", None)
        if isinstance(shape, tuple) and shape == (hmap.size,):
            module.normalized_shape = (len(channels),)
        for attr in _HIDDEN_SIZE_ATTRS:
            if getattr(module, attr, None) == hmap.size:
                setattr(module, attr, len(channels))
    if tied and anatomy.embedding and anatomy.lm_head:
        model.get_submodule(anatomy.lm_head).weight = model.get_submodule(anatomy.embedding).weight
    for block in anatomy:
        block.refresh_linears()
