"""Stand-ins for removed sub-blocks: a decoder block without its attention or without its MLP.

Sub-block removal (BlockPruner, 2SSP) deletes the attention or the MLP of a block and keeps the
rest. Plain transformers has no per-layer switch for that, so the removed module is replaced by
one of these; the block's own forward then adds zero to the residual stream. Neither holds a
parameter. ``SkippedAttention`` still advances the KV cache by one [b, 1, L, 1] zero per call
(L new tokens): generation reads positions and masks from the cache's length, which a layer that
never wrote to it would report as 0.
"""

from __future__ import annotations

import torch
from torch import nn

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class SkippedAttention(nn.Module):
    """A removed attention sub-block: returns (zeros like hidden_states [b, L, H], None)."""

    def __init__(self, layer_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor, None]:
        hidden = _hidden(args, kwargs)
        cache = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        if cache is not None and hasattr(cache, "update") and self.layer_idx is not None:
            stub = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
            cache.update(stub, stub, self.layer_idx)
        return torch.zeros_like(hidden), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


class SkippedMLP(nn.Module):
    """A removed MLP sub-block: returns zeros like its input [b, L, H]."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(_hidden(args, kwargs))


SKIPPED_KINDS: dict[str, type[nn.Module]] = {"attention": SkippedAttention, "mlp": SkippedMLP}


def skipped_parts(block: nn.Module) -> dict[str, str]:
    """{"attention" | "mlp": path relative to the block} of the sub-blocks removed from ``block``."""
    found = {}
    for name, module in block.named_modules():
        for kind, cls in SKIPPED_KINDS.items():
            if isinstance(module, cls):
                found[kind] = name
    return found
