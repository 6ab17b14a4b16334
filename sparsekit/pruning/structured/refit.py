"""Least-squares refit after width pruning (the refit of OSSCAR and Týr-the-Pruner).

Width pruning cuts input columns of the projections that read the removed structures: the
attention output projection (the removed heads' channels) and the MLP output projection (the
removed channels). What those columns contributed is lost; FLAP puts back only its mean (bias
compensation). The refit re-solves the kept columns so the cut projection reproduces the dense
one on calibration inputs:

    min over W', d of  sum_t || W x_t - (W' x_t[k] + d) ||^2         (x_t: the projection's input)

    W' = (W M[:, k] + lambda W[:, k]) (M[k, k] + lambda I)^-1,   d = W mu - W' mu[k]

with M the inputs' second moment X^T X / T (no bias) or their covariance X^T X / T - mu mu^T
(with the constant column d, where the method compensates with a bias: FLAP's compensation is
the special case W' = W[:, k]), k the kept columns and lambda = ``damp`` x the mean of
diag(M[k, k]). The ridge pulls W' towards the dense W[:, k] rather than towards zero, so a
large damp gives back the plain cut with FLAP's compensation (on SmolLM2, FLAP 20% adaptive, the
two ridges gave ppl 24.38 and 24.45: little difference at damp 0.01). Blocks are refitted in
order, each on the inputs the already pruned blocks before it produce (as SparseGPT's sequential
pass), so a block's refit also sees its predecessors' cuts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsekit.kernels import accumulate_gram
from sparsekit.models import BlockAnatomy, ModelAnatomy, linear_weight, set_linear_weight

from ..capture import Chunk, cast_runner, outside_autocast
from .layout import add_output_bias
from .passes import forward, on_device

DEFAULT_DAMP = 0.01  # ridge, as a fraction of the mean diagonal (SparseGPT's percdamp)


class GramStats:
    """Forward pre-hook: running X^T X [K, K], column sums [K] (float64) and token count of a linear
    layer's input [..., K]. Each call's Gram is formed in fp32 (``accumulate_gram``) and summed in
    float64, as the per-layer engine sums its statistics."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach()
        k = x.shape[-1]
        part = accumulate_gram(x, torch.zeros(k, k, dtype=torch.float32, device=x.device))
        total = x.reshape(-1, k).double().sum(0)
        if self.gram is None:
            self.gram, self.total = part.double(), total
        else:
            self.gram += part.double()
            self.total += total
        self.count += x.numel() // k


def refit_columns(
    weight: torch.Tensor,
    gram: torch.Tensor,
    total: torch.Tensor,
    count: int,
    kept: torch.Tensor,
    fit_bias: bool,
    damp: float = DEFAULT_DAMP,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The least-squares weight of a linear that keeps only input columns ``kept``.

    weight [N, K] (any float dtype): the dense weight; gram [K, K] = sum_t x_t x_t^T and total
    [K] = sum_t x_t over ``count`` calibration inputs (float64); kept LongTensor [k]. Returns
    (W' [N, k] float64, d [N] float64 or None): minimises sum_t ||W x_t - W' x_t[kept] - d||^2
    (d only when ``fit_bias``) plus lambda ||W' - W[:, kept]||^2, lambda = ``damp`` x mean(diag M[k, k])
    (see the module docstring). ``damp=0`` is the plain least-squares solution (needs full-rank
    inputs); a very large damp gives W[:, kept] back (with FLAP's compensation as d).
    """
    if count < 1:
        raise ValueError("refit needs calibration inputs: the projection saw no tokens")
    if damp < 0:
        raise ValueError(f"refit damp must be >= 0, got {damp}")
    w = weight.detach().to(device=gram.device, dtype=torch.float64)
    kept = kept.to(gram.device)
    mean = total / count
    moment = gram / count
    if fit_bias:
        moment = moment - torch.outer(mean, mean)
    system = moment[kept][:, kept].clone()
    ridge = damp * system.diagonal().mean().clamp_min(1e-12)
    system.diagonal().add_(ridge)
    # [N, k]: the dense output's correlation with the kept inputs, plus the ridge's pull towards
    # the kept dense columns (a large damp gives back the plain cut, and FLAP's compensation)
    cross = w @ moment[:, kept] + ridge * w[:, kept]
    solved = torch.linalg.solve(system, cross.T).T  # system is symmetric
    bias = w @ mean - solved @ mean[kept] if fit_bias else None
    return solved, bias


def refit_linear(
    linear: nn.Module, dense_weight: torch.Tensor, stats: GramStats, kept: torch.Tensor, fit_bias: bool, damp
) -> None:
    """Write the refitted weight [N, k] into ``linear`` (already cut to ``kept``), and add d to its
    bias when ``fit_bias`` (creating it if needed)."""
    solved, bias = refit_columns(dense_weight, stats.gram, stats.total, stats.count, kept, fit_bias, damp)
    set_linear_weight(linear, solved.to(linear.weight.device))
    if bias is not None:
        add_output_bias(linear, bias)


class _Recorded(Exception):
    """Raised once the recorded linear has its input: the rest of the block's forward is not needed."""


def _record_inputs(block: BlockAnatomy, name: str, chunks: list[Chunk], device) -> GramStats:
    """Gram statistics of linear ``name``'s input while ``block`` runs on ``chunks`` (in their
    dtype); each chunk's forward stops at that linear (for o_proj the MLP never runs)."""
    stats = GramStats()

    def record(module: nn.Module, inputs: tuple) -> None:
        stats(module, inputs)
        raise _Recorded

    with on_device(block.module, device):
        run = cast_runner(block.module, chunks[0].hidden.dtype)
        handle = run.get_submodule(name).register_forward_pre_hook(outside_autocast(record))
        try:
            with torch.no_grad():
                for chunk in chunks:
                    try:
                        chunk.run(run, block.index)
                    except _Recorded:
                        continue
                    raise RuntimeError(f"block {block.index} ran without calling {name}: nothing to refit on")
        finally:
            handle.remove()
    return stats


Stage = tuple[str, bool, Callable[[], "torch.Tensor | None"]]


def refit_pass(
    anatomy: ModelAnatomy,
    chunks: list[Chunk],
    stages: Callable[[BlockAnatomy], list[Stage]],
    fit_bias: bool,
    device,
    damp: float = DEFAULT_DAMP,
    show_progress: bool = False,
) -> None:
    """Cut and refit every block in order. ``chunks`` hold the inputs of block 0. ``stages(block)``
    lists the block's cuts in order (attention, then MLP): (output projection, whether it loses
    columns, a call that cuts and returns the projection's kept input columns [k], None where
    nothing goes). For each stage that cuts, the block runs, as cut so far, on the pruned model's
    hidden states while the projection's inputs are recorded; then the stage cuts and the
    projection is refitted (so the MLP is fitted on what the cut attention gives it). The cut
    block's outputs feed the next block."""
    for block in tqdm(list(anatomy), desc="refit", disable=not show_progress):
        for name, cuts, cut in stages(block):
            if not cuts:
                cut()
                continue
            stats = _record_inputs(block, name, chunks, device)
            dense = linear_weight(block.linear(name)).detach().clone()
            kept = cut()
            if kept is not None:
                refit_linear(block.linear(name), dense, stats, kept, fit_bias, damp)
        with on_device(block.module, device):
            outs = forward(block.module, chunks, block.index)
        for chunk, out in zip(chunks, outs, strict=True):
            chunk.hidden = out
