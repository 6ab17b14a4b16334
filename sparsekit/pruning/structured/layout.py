"""Where the heads and channels of a LLaMA-family decoder block live, and how to cut them out.

A block is understood when it has ``self_attn.{q,k,v,o}_proj`` (nn.Linear) and
``mlp.{gate,up,down}_proj`` (nn.Linear) and the model config names ``num_attention_heads``,
``num_key_value_heads`` and ``head_dim`` (or hidden_size / heads). Query head ``h`` reads KV
head ``h // (heads / kv_heads)`` (transformers' ``repeat_kv``), so the heads of one KV group are
contiguous. Anything else is refused with ``UnsupportedArchitecture``: width pruning never guesses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsekit.arch import UnsupportedArchitecture, find_decoder_blocks

ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class BlockLayout:
    """The prunable structure of one decoder block (all widths as they are now)."""

    block: nn.Module
    attn: nn.Module
    mlp: nn.Module
    head_dim: int
    heads: int  # query heads
    kv_heads: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    @property
    def intermediate(self) -> int:
        return self.mlp.down_proj.in_features

    def linear(self, name: str) -> nn.Linear:
        return getattr(self.attn if name in ATTN_NAMES else self.mlp, name)


def head_dim_of(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def block_layouts(model: nn.Module) -> list[BlockLayout]:
    """One ``BlockLayout`` per decoder block, or ``UnsupportedArchitecture`` naming what is missing."""
    config = model.config
    _, blocks = find_decoder_blocks(model)
    head_dim = head_dim_of(config)
    layouts = []
    for index, block in enumerate(blocks):
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        missing = [n for n in ATTN_NAMES if not isinstance(getattr(attn, n, None), nn.Linear)]
        missing += [n for n in MLP_NAMES if not isinstance(getattr(mlp, n, None), nn.Linear)]
        if missing:
            raise UnsupportedArchitecture(
                f"width pruning needs LLaMA-style blocks (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj); "
                f"block {index} of {type(model).__name__} has no {', '.join(missing)}. Depth methods "
                "(shortgpt, angular) and unstructured methods still work on it"
            )
        heads, rem = divmod(attn.q_proj.out_features, head_dim)
        kv_heads, kv_rem = divmod(attn.k_proj.out_features, head_dim)
        if rem or kv_rem or kv_heads == 0 or heads % kv_heads or attn.o_proj.in_features != heads * head_dim:
            raise UnsupportedArchitecture(
                f"block {index}: q_proj {attn.q_proj.out_features} / k_proj {attn.k_proj.out_features} "
                f"outputs do not split into heads of head_dim {head_dim} with whole KV groups"
            )
        layouts.append(BlockLayout(block, attn, mlp, head_dim, heads, kv_heads))
    return layouts


# ----------------------------------------------------------------------------- cutting
def _select_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    return _new_linear(
        linear, linear.weight.data[rows], None if linear.bias is None else linear.bias.data[rows]
    )


def _select_cols(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    return _new_linear(linear, linear.weight.data[:, cols], None if linear.bias is None else linear.bias.data)


def _new_linear(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=old.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=False)
    return new


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Channel indices [len(heads) * head_dim] of the given head indices (in order)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)


def keep_heads(layout: BlockLayout, query_heads: torch.Tensor, kv_heads: torch.Tensor) -> None:
    """Keep only the given query heads and KV heads (sorted LongTensors) of one block, in place.

    Every kept KV head must keep the same number of query heads, all from its own group, so the
    result is a valid GQA layer (``num_key_value_groups`` updated on the attention module).
    """
    query_heads, kv_heads = query_heads.sort().values.cpu(), kv_heads.sort().values.cpu()
    owner = query_heads // layout.group_size
    per_group = torch.bincount(owner, minlength=layout.kv_heads)[kv_heads]
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
    attn, hd = layout.attn, layout.head_dim
    q_channels, kv_channels = head_channels(query_heads, hd), head_channels(kv_heads, hd)
    attn.q_proj = _select_rows(attn.q_proj, q_channels)
    attn.k_proj = _select_rows(attn.k_proj, kv_channels)
    attn.v_proj = _select_rows(attn.v_proj, kv_channels)
    attn.o_proj = _select_cols(attn.o_proj, q_channels)
    _set_head_counts(attn, len(query_heads), len(kv_heads))
    layout.heads, layout.kv_heads = len(query_heads), len(kv_heads)


def _set_head_counts(attn: nn.Module, heads: int, kv_heads: int) -> None:
    attn.num_key_value_groups = heads // kv_heads
    for name, value in (
        ("num_heads", heads),
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv_heads),
    ):
        if hasattr(attn, name):
            setattr(attn, name, value)


def keep_channels(layout: BlockLayout, channels: torch.Tensor) -> None:
    """Keep only the given MLP intermediate channels (LongTensor) of one block, in place."""
    channels = channels.sort().values.cpu()
    if len(channels) == 0:
        raise ValueError("cannot remove every MLP channel of a block")
    mlp = layout.mlp
    mlp.gate_proj = _select_rows(mlp.gate_proj, channels)
    mlp.up_proj = _select_rows(mlp.up_proj, channels)
    mlp.down_proj = _select_cols(mlp.down_proj, channels)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(channels)


def add_output_bias(linear: nn.Linear, delta: torch.Tensor) -> None:
    """Add ``delta`` [out] to the bias of ``linear``, creating the bias if it has none."""
    delta = delta.to(linear.weight.dtype)
    if linear.bias is None:
        linear.bias = nn.Parameter(delta.clone(), requires_grad=False)
    else:
        linear.bias.data += delta


def ensure_bias(linear: nn.Linear) -> None:
    """Give ``linear`` an all-zero bias if it has none (to match a config that asks for biases)."""
    if linear.bias is None:
        add_output_bias(linear, torch.zeros(linear.out_features, device=linear.weight.device))


# ----------------------------------------------------------------------------- widths
@dataclass
class BlockWidths:
    """The widths of one block: query heads, KV heads, MLP intermediate channels."""

    heads: int
    kv_heads: int
    intermediate: int

    def to_dict(self) -> dict[str, int]:
        return {"heads": self.heads, "kv_heads": self.kv_heads, "intermediate": self.intermediate}


def block_widths(model: nn.Module) -> list[BlockWidths]:
    return [BlockWidths(x.heads, x.kv_heads, x.intermediate) for x in block_layouts(model)]


def resize_to_widths(model: nn.Module, widths: list[dict[str, int]]) -> None:
    """Give every block of a freshly built (meta) model the stored widths: the loading half of
    adaptive width pruning. Weights are placeholders until the checkpoint is loaded into them."""
    layouts = block_layouts(model)
    if len(widths) != len(layouts):
        raise ValueError(f"checkpoint stores widths for {len(widths)} blocks, the model has {len(layouts)}")
    for layout, width in zip(layouts, widths, strict=True):
        heads, kv_heads, inter = int(width["heads"]), int(width["kv_heads"]), int(width["intermediate"])
        if kv_heads < 1 or heads < kv_heads or heads % kv_heads or inter < 1:
            raise ValueError(
                f"invalid stored block widths {width}: heads must be a multiple of kv_heads >= 1"
            )
        hd, hidden = layout.head_dim, layout.attn.q_proj.in_features
        attn, mlp = layout.attn, layout.mlp
        for name, out_f, in_f in (
            ("q_proj", heads * hd, hidden),
            ("k_proj", kv_heads * hd, hidden),
            ("v_proj", kv_heads * hd, hidden),
            ("o_proj", hidden, heads * hd),
        ):
            old = getattr(attn, name)
            setattr(attn, name, _shell(old, in_f, out_f))
        for name, out_f, in_f in (
            ("gate_proj", inter, hidden),
            ("up_proj", inter, hidden),
            ("down_proj", hidden, inter),
        ):
            setattr(mlp, name, _shell(getattr(mlp, name), in_f, out_f))
        _set_head_counts(attn, heads, kv_heads)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter


def _shell(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )
