"""Exact top-k selection along the last dim, the rule every sparsekit mask follows.

Keep exactly ``keep`` entries of each row: the largest scores win, and among equal scores
the lower column index wins. Pure torch (O(K) per row via kthvalue, no full sort).
"""

from __future__ import annotations

import math

import torch


def topk_keep_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """scores [..., K] float -> bool mask [..., K] with exactly ``keep`` True per row.

    Ties at the threshold are broken toward the lower index (stable, deterministic).
    """
    size = scores.shape[-1]
    if not 0 <= keep <= size:
        raise ValueError(f"keep must be in [0, {size}], got {keep}")
    if keep == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if keep == size:
        return torch.ones_like(scores, dtype=torch.bool)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: check the weights and activation statistics for NaN/inf")
    threshold = kth_smallest(scores, size - keep + 1)  # the keep-th largest
    above = scores > threshold
    at = scores == threshold
    room = keep - above.sum(dim=-1, keepdim=True)
    if scores.dim() == 1 and int(at.sum()) == int(room):  # no tie to break: all of them fit
        return above | at
    return above | (at & (at.cumsum(dim=-1) <= room))


def kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) along the last dim, keepdim; exact.

    A large 1-D input is first bracketed with a sample's quantiles, so ``kthvalue`` (a copy and a
    quickselect, single-threaded) runs only on the few entries inside the bracket; when the
    bracket misses (checked by counting) it falls back to the whole row. The sample is spread by
    a multiplicative hash, not a stride: a flattened [R, B] block sampled with stride B would
    see one column only (SparseGPT's blocks: every bracket missed).
    """
    size = scores.shape[-1]
    if scores.dim() != 1 or size < 1 << 16:
        return scores.kthvalue(k, dim=-1, keepdim=True).values
    picks = torch.arange(4096, dtype=torch.int64, device=scores.device).mul_(2654435761).remainder_(size)
    sample = scores[picks].sort().values
    pos = (k - 1) * sample.numel() / size  # where the answer falls in the sample
    margin = 160  # 5 standard deviations of a median rank in a 4096-sample (sqrt(4096 / 4) = 32)
    lo = sample[max(0, int(pos) - margin)]
    hi = sample[min(sample.numel() - 1, int(pos) + 1 + margin)]
    below = int((scores < lo).sum())
    inside = scores[(scores >= lo) & (scores <= hi)]
    if below < k <= below + inside.numel():
        return inside.kthvalue(k - below).values.reshape(1)
    return scores.kthvalue(k, dim=-1, keepdim=True).values


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """scores [R, K] -> bool mask [R, K] keeping the top ``n`` of every ``m`` consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{n}:{m} sparsity needs in_features % {m} == 0, got {cols}")
    grouped = scores.reshape(rows, cols // m, m)
    mask = torch.empty(grouped.shape, dtype=torch.bool, device=scores.device)
    step = rows if scores.device.type != "cpu" else NM_ROW_CHUNK
    for r0 in range(0, rows, step):
        _nm_rank_mask(grouped[r0 : r0 + step], n, mask[r0 : r0 + step])
    return mask.reshape(rows, cols)


NM_ROW_CHUNK = 256  # CPU: rows per pass, so the m compare passes run on cache-resident data


def _nm_rank_mask(grouped: torch.Tensor, n: int, out: torch.Tensor) -> None:
    """grouped [R, G, m] -> out [R, G, m] bool: rank < n, where an entry's rank in its group is how
    many entries beat it (larger, or equal at a lower index: ties keep the lower column).
    m passes of elementwise compares: no sort, no scatter."""
    m = grouped.shape[-1]
    later = torch.arange(m, device=grouped.device)
    rank = torch.zeros(grouped.shape, dtype=torch.uint8, device=grouped.device)
    for i in range(m):
        other = grouped[..., i : i + 1]
        rank += (other > grouped) | ((other == grouped) & (later > i))
    torch.lt(rank, n, out=out)


def keep_count(size: int, sparsity: float) -> int:
    """Entries kept in a group of ``size`` at ``sparsity``: size - floor(size * sparsity).

    The floor is of the decimal product the user meant: 100 * 0.29 is 28.999999999999996 in
    binary floating point and prunes 29, not 28 (a product within 1e-9 relative of an integer
    is that integer)."""
    product = size * sparsity
    nearest = round(product)
    pruned = nearest if abs(product - nearest) <= 1e-9 * max(1.0, abs(product)) else math.floor(product)
    return size - int(pruned)
