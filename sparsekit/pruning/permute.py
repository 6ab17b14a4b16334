"""RIA's input-channel permutation for N:M sparsity (Zhang et al., 2024), folded into the model.

N:M keeps the best N of every M consecutive input channels, so which channels share a group
matters: two large channels in one 2:4 group cost each other nothing, four large ones lose two.
A permutation P of the input channels (W -> W[:, P]) chooses the groups. The search, on the
method's scores S [R, K] (the kept score sum over rows of the top N of each group is the
objective):
1. balanced start: channels sorted by their score sum are dealt out so that group g takes one
   channel from each of the M quantiles (zig-zag, as the paper);
2. for each slot of a group in turn, a linear assignment (scipy's Hungarian solver) moves the
   channels in that slot between groups to maximise the kept score with the other slots fixed;
   with a_gr the N-th largest of group g's other entries in row r, placing channel c there keeps
   sum_r max(0, S_rc - a_gr) more, so the [G, G] gain matrix is one broadcast per slot. Each
   round can only raise the objective.
Folding: permuting a layer's input channels is free at run time only where the producer of those
channels can permute its outputs to match (``sparsekit.models.ChannelFold``): down_proj's input is
act(gate) * up, so gate_proj and up_proj rows take the same permutation; o_proj's input is
attention over v_proj's heads, so v_proj rows take one permutation per KV head, shared by the
query heads that read it. Layers reading the residual stream (q/k/v, gate/up) are not permuted.
"""

from __future__ import annotations

import logging

import torch
from scipy.optimize import linear_sum_assignment

from sparsekit.models import ChannelFold, linear_weight, set_linear_weight

from .method import InputStat

log = logging.getLogger(__name__)

LSA_MAX_GROUPS = 512  # assignment problems are split into blocks of at most this many groups


def nm_kept_score(scores: torch.Tensor, n: int, m: int) -> float:
    """scores [R, K] -> sum over rows and groups of the top ``n`` of each ``m`` consecutive entries."""
    rows, cols = scores.shape
    return float(scores.reshape(rows, cols // m, m).topk(n, dim=-1).values.sum())


def balanced_permutation(scores: torch.Tensor, m: int) -> torch.Tensor:
    """scores [R, K] -> perm [K] (new column j reads old column perm[j]): the channels ranked by
    score sum, quantile q filling slot q of every group, every other quantile reversed."""
    cols = scores.shape[1]
    groups = cols // m
    order = scores.sum(dim=0).argsort(descending=True, stable=True)
    perm = torch.empty(cols, dtype=torch.long, device=scores.device)
    for q in range(m):
        chunk = order[q * groups : (q + 1) * groups]
        perm[q::m] = chunk.flip(0) if q % 2 else chunk
    return perm


def _slot_gain(s: torch.Tensor, slot: int, n: int) -> torch.Tensor:
    """s [R, G, m] grouped scores -> gain [G, G] of putting group c's ``slot`` channel into group g:
    sum_r max(0, cand_rc - nth_rg) = (sum_r cand_rc - sum_r nth_rg + sum_r |cand_rc - nth_rg|) / 2,
    the last term an L1 distance between columns (``torch.cdist``, no [R, G, G] intermediate)."""
    others = torch.cat([s[..., :slot], s[..., slot + 1 :]], dim=-1)
    nth = others.topk(n, dim=-1).values[..., -1].double()  # [R, G]
    cand = s[..., slot].double()  # [R, G]
    l1 = torch.cdist(nth.T.contiguous(), cand.T.contiguous(), p=1)  # [G (g), G (c)]
    return (l1 + cand.sum(0)[None, :] - nth.sum(0)[:, None]).mul_(0.5)


def lsa_refine(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int, rounds: int = 1) -> torch.Tensor:
    """Improve ``perm`` [K] by ``rounds`` passes of one linear assignment per slot (see module doc)."""
    perm = perm.clone()
    groups = scores.shape[1] // m
    for _ in range(rounds):
        for slot in range(m):
            for b0 in range(0, groups, LSA_MAX_GROUPS):
                b1 = min(b0 + LSA_MAX_GROUPS, groups)
                cols = perm[b0 * m : b1 * m]
                s = scores[:, cols].reshape(scores.shape[0], b1 - b0, m)
                gain = _slot_gain(s, slot, n)
                _, pick = linear_sum_assignment(gain.cpu().numpy(), maximize=True)
                slot_channels = cols[slot::m].clone()
                perm[b0 * m + slot : b1 * m : m] = slot_channels[torch.as_tensor(pick, device=perm.device)]
    return perm


def channel_permutation(scores: torch.Tensor, n: int, m: int, rounds: int = 1) -> torch.Tensor:
    """scores [R, K] (non-negative importance) -> perm [K] for N:M grouping; never worse than the
    identity in ``nm_kept_score`` (falls back to it)."""
    if scores.dim() != 2 or scores.shape[1] % m:
        raise ValueError(f"need scores [R, K] with K a multiple of m={m}, got {tuple(scores.shape)}")
    scores = scores.float()
    perm = lsa_refine(scores, balanced_permutation(scores, m), n, m, rounds)
    identity = torch.arange(scores.shape[1], device=scores.device)
    if nm_kept_score(scores[:, perm], n, m) < nm_kept_score(scores, n, m):
        return identity
    return perm


def fold_indices(fold: ChannelFold, perms: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One permutation [width] per producer segment -> (producer row order, consumer column order)."""
    width = fold.width
    producer = torch.cat([s * width + p for s, p in enumerate(perms)])
    consumer = torch.cat(
        [(s * fold.repeats + r) * width + p for s, p in enumerate(perms) for r in range(fold.repeats)]
    )
    return producer, consumer


def fold_permutation(
    fold: ChannelFold, scores: torch.Tensor, n: int, m: int
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The consumer's scores [R, K_in] -> (producer rows, consumer columns, kept score before, after)."""
    rows = scores.shape[0]
    perms = []
    for s in range(fold.segments):
        # the query heads reading one KV head share its permutation: stack their columns as rows
        seg = scores[:, s * fold.repeats * fold.width : (s + 1) * fold.repeats * fold.width]
        stacked = seg.reshape(rows, fold.repeats, fold.width).transpose(0, 1).reshape(-1, fold.width)
        perms.append(channel_permutation(stacked, n, m))
    producer, consumer = fold_indices(fold, perms)
    return producer, consumer, nm_kept_score(scores, n, m), nm_kept_score(scores[:, consumer], n, m)


def permute_rows_(module, index: torch.Tensor) -> None:
    """A producer's output channels (weight rows, bias) reordered in place."""
    weight = linear_weight(module).detach()
    set_linear_weight(module, weight[index.to(weight.device)])
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.data.copy_(bias.data[index.to(bias.device)])


def permute_columns_(module, index: torch.Tensor) -> None:
    """A consumer's input channels (weight columns) reordered in place."""
    weight = linear_weight(module).detach()
    set_linear_weight(module, weight[:, index.to(weight.device)])


def permute_stats(stats: dict[str, InputStat], index: torch.Tensor) -> dict[str, InputStat]:
    """Input statistics of a consumer in the permuted channel order ([K] vectors and the [K, K] Gram)."""
    out = {}
    for name, stat in stats.items():
        value = stat.value
        idx = index.to(value.device)
        value = value[idx][:, idx] if value.dim() == 2 else value[idx]
        out[name] = InputStat(value.contiguous(), stat.tokens)
    return out
