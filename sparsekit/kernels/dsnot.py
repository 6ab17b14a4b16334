"""DSnoT's training-free mask refinement (Zhang et al., "Dynamic Sparse No Training", 2024).

Each output row i carries an expected reconstruction error e_i = sum_k (W0_ik - W_ik) E[x_k]
(W0 dense, W pruned). One cycle swaps one pruned and one kept weight per row, all rows at once:
- grow: a pruned k with W0_ik E[x_k] of the sign of e_i, the largest in size relative to Var[x_k]^p
  (growing it takes W0_ik E[x_k] out of e_i);
- prune: a kept k whose W_ik E[x_k] has the opposite sign of e_i, the least important one by its
  Wanda score |W_ik| ||X_k|| (pruning it adds W_ik E[x_k] to e_i); for N:M the least important
  kept weight of the grown weight's group, so every group keeps its count.
A row stops when |e_i| <= threshold, when a swap would not lower |e_i|, or after ``max_cycles``.
Both candidate orders are sorted once; a cycle is a few [N]-sized gathers, so the work is two
sorts of [N, K] and ``max_cycles`` vector steps: batched torch on either device.
"""

from __future__ import annotations

import torch

DSNOT_CYCLES = 50  # the paper's max cycle count
DSNOT_THRESHOLD = 0.1  # the paper's update threshold on |e_i|
DSNOT_VAR_POWER = 1.0  # the paper's power of Var[x] in the growing criterion


def _sort_by(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Per row, indices ordering by (primary, secondary) ascending, ties by column (lexicographic)."""
    order = torch.sort(secondary, dim=1, stable=True).indices
    return order.gather(1, torch.sort(primary.gather(1, order), dim=1, stable=True).indices)


def _check(weight0, weight, mask, mean, var, act_norm, n, m) -> None:
    if weight0.dim() != 2 or weight.shape != weight0.shape or mask.shape != weight0.shape:
        raise ValueError(
            f"weight0, weight and mask must share one [N, K] shape, got {tuple(weight0.shape)}, "
            f"{tuple(weight.shape)}, {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = kept), got {mask.dtype}")
    k = weight0.shape[1]
    for name, t in (("mean", mean), ("var", var), ("act_norm", act_norm)):
        if t.shape != (k,):
            raise ValueError(f"{name} must be [{k}], got {tuple(t.shape)}")
    if (n is None) != (m is None) or (m is not None and (k % m or not 0 < n < m)):
        raise ValueError(f"N:M refinement needs 0 < n < m and m dividing K={k}, got n={n}, m={m}")


def dsnot_refine(
    weight0: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    act_norm: torch.Tensor,
    n: int | None = None,
    m: int | None = None,
    max_cycles: int = DSNOT_CYCLES,
    threshold: float = DSNOT_THRESHOLD,
    var_power: float = DSNOT_VAR_POWER,
) -> torch.Tensor:
    """weight0 [N, K] dense, weight [N, K] pruned (maybe updated), mask [N, K] bool (True = kept),
    mean / var / act_norm [K] of the layer input -> the refined mask [N, K] bool, with every row's
    (or N:M group's) kept count unchanged."""
    _check(weight0, weight, mask, mean, var, act_norm, n, m)
    w0, w = weight0.detach().float(), weight.detach().float()
    rows, cols = w0.shape
    mask = mask.clone()
    mean = mean.float().reshape(1, -1)
    grow_c = w0 * mean  # taken out of e when a pruned weight grows back
    prune_c = w * mean  # added to e when a kept weight is pruned
    e = ((w0 - torch.where(mask, w, 0.0)) * mean).sum(dim=1)
    importance = w.abs() * act_norm.float().reshape(1, -1)
    dev = w0.device
    inf = torch.tensor(float("inf"), device=dev)
    # grow order: pruned entries by W0 E[x] / Var^p ascending (kept ones last)
    grow_key = grow_c / var.float().clamp_min(1e-12).reshape(1, -1).pow(var_power)
    grow = _sort_by(mask.to(torch.int8), grow_key)
    grow_lo = torch.zeros(rows, dtype=torch.long, device=dev)
    grow_hi = (~mask).sum(dim=1) - 1
    arange = torch.arange(rows, device=dev)
    if m is None:
        # prune order: kept entries, first those lowering e (W E[x] < 0) least important first, then
        # those raising it most important first (so the back is the least important riser)
        group = torch.where(mask, (prune_c >= 0).to(torch.int8), 2)
        prune = _sort_by(group, torch.where(prune_c >= 0, -importance, importance))
        prune_lo = torch.zeros(rows, dtype=torch.long, device=dev)
        prune_hi = mask.sum(dim=1) - 1
    else:
        imp = torch.where(mask, importance, inf)  # pruned weights are never pruned again
        offsets = torch.arange(m, device=dev)
    active = torch.ones(rows, dtype=torch.bool, device=dev)
    for _ in range(max_cycles):
        active &= (e.abs() > threshold) & (grow_lo <= grow_hi)
        if m is None:
            active &= prune_lo <= prune_hi
        if not bool(active.any()):
            break
        positive = e > 0
        g_slot = torch.where(positive, grow_hi, grow_lo).clamp(0, cols - 1)
        g = grow[arange, g_slot]
        if m is None:
            p_slot = torch.where(positive, prune_lo, prune_hi).clamp(0, cols - 1)
            p = prune[arange, p_slot]
        else:
            start = g - g % m
            members = start[:, None] + offsets
            p = members.gather(1, imp.gather(1, members).argmin(dim=1, keepdim=True)).squeeze(1)
        e_after = e - grow_c[arange, g] + prune_c[arange, p]
        active &= e_after.abs() < e.abs()
        rows_on = arange[active]
        mask[rows_on, g[active]] = True
        mask[rows_on, p[active]] = False
        e = torch.where(active, e_after, e)
        step = active.long()
        grow_hi -= step * positive
        grow_lo += step * ~positive
        if m is None:
            prune_lo += step * positive
            prune_hi -= step * ~positive
        else:
            imp[rows_on, p[active]] = inf
    return mask


def dsnot_refine_ref(
    weight0,
    weight,
    mask,
    mean,
    var,
    act_norm,
    n=None,
    m=None,
    max_cycles=DSNOT_CYCLES,
    threshold=DSNOT_THRESHOLD,
    var_power=DSNOT_VAR_POWER,
):
    """One row at a time with Python lists, straight from the rules above (for tests)."""
    _check(weight0, weight, mask, mean, var, act_norm, n, m)
    w0, w = weight0.double().tolist(), weight.double().tolist()
    mean_l, var_l, norm_l = mean.double().tolist(), var.double().tolist(), act_norm.double().tolist()
    out = mask.clone()
    for i in range(len(w0)):
        keep = out[i].tolist()
        was_kept = list(keep)
        cols = range(len(keep))
        e = sum((w0[i][k] - (w[i][k] if keep[k] else 0.0)) * mean_l[k] for k in cols)
        gc = [w0[i][k] * mean_l[k] for k in cols]
        pc = [w[i][k] * mean_l[k] for k in cols]
        imp = [abs(w[i][k]) * norm_l[k] for k in cols]
        key = [gc[k] / max(var_l[k], 1e-12) ** var_power for k in cols]
        grow = sorted((k for k in cols if not keep[k]), key=lambda k: key[k])
        fall = sorted((k for k in cols if keep[k] and pc[k] < 0), key=lambda k: imp[k])
        rise = sorted((k for k in cols if keep[k] and pc[k] >= 0), key=lambda k: -imp[k])
        prune = fall + rise
        pruned_again = set()
        for _ in range(max_cycles):
            if abs(e) <= threshold or not grow or (m is None and not prune):
                break
            g = grow.pop() if e > 0 else grow.pop(0)
            if m is None:
                p = prune[0] if e > 0 else prune[-1]
            else:
                # the group's weights kept from the start and still kept (grown ones stay)
                group = [k for k in range(g - g % m, g - g % m + m) if was_kept[k] and k not in pruned_again]
                p = min(group, key=lambda k: (imp[k], k))
            after = e - gc[g] + pc[p]
            if not abs(after) < abs(e):
                break
            if m is None:
                prune.remove(p)
            keep[g], keep[p] = True, False
            pruned_again.add(p)
            e = after
        out[i] = torch.tensor(keep)
    return out
