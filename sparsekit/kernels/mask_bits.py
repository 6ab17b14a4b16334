"""1-bit-per-weight masks.

Layout: ``mask_bits [N, ceil(K / 8)] uint8``; bit ``j`` (LSB first) of byte ``b`` in row ``r``
is ``mask[r, 8 * b + j]``. Padding bits past K are zero. True = keep.
No module-level tensors: these run under fake-tensor tracing (torch.compile, opcheck) too.
"""

from __future__ import annotations

import torch


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """mask [N, K] bool -> mask_bits [N, ceil(K/8)] uint8."""
    if mask.dim() != 2:
        raise ValueError(f"pack_mask needs a 2-D mask [N, K], got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"pack_mask needs a bool mask (True = keep), got {mask.dtype}")
    rows, cols = mask.shape
    pad = (-cols) % 8
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).view(rows, -1, 8)
    return (bits << _shifts(mask.device)).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(mask_bits: torch.Tensor, cols: int) -> torch.Tensor:
    """mask_bits [N, ceil(K/8)] uint8 -> mask [N, cols] bool, unchecked (for kernels' torch paths)."""
    bits = (mask_bits.unsqueeze(-1) >> _shifts(mask_bits.device)) & 1
    return bits.reshape(mask_bits.shape[0], -1)[:, :cols].bool()


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
    return unpack_bits(mask_bits, cols)
