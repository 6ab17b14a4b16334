"""1-bit-per-weight masks.

Layout: ``mask_bits [N, ceil(K / 8)] uint8``; bit ``j`` (LSB first) of byte ``b`` in row ``r``
is ``mask[r, 8 * b + j]``. Padding bits past K are zero. True = keep.
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """mask [N, K] bool -> mask_bits [N, ceil(K/8)] uint8."""
    if mask.dim() != 2:
        raise ValueError(f"pack_mask needs a 2-D mask [N, K], got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_mask needs a bool mask (True = keep), got {mask.dtype}")
    rows, cols = mask.shape
    pad = (-cols) % 8
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).view(rows, -1, 8)
    weights = _BIT_WEIGHTS.to(mask.device)
    return (bits * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_mask(mask_bits: torch.Tensor, shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """mask_bits [N, ceil(K/8)] uint8 -> mask [N, K] bool."""
    rows, cols = shape
    if mask_bits.dtype != torch.uint8:
        raise ValueError(f"mask_bits must be uint8, got {mask_bits.dtype}")
    if tuple(mask_bits.shape) != (rows, (cols + 7) // 8):
        raise ValueError(
            f"mask_bits shape {tuple(mask_bits.shape)} does not fit a [{rows}, {cols}] mask; "
            f"expected ({rows}, {(cols + 7) // 8})"
        )
    weights = _BIT_WEIGHTS.to(mask_bits.device)
    bits = (mask_bits.unsqueeze(-1) & weights) != 0
    return bits.reshape(rows, -1)[:, :cols]
