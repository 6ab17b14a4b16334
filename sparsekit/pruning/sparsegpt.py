"""SparseGPT: blocked OBS solver with lazy batch updates (Frantar & Alistarh, 2023).

H = 2/n X^T X [K, K]; damp by ``percdamp`` of mean(diag H); U = upper Cholesky factor of H^-1.
Columns are solved block by block (``blocksize``): inside a block ``obs_block_solve`` prunes
and propagates the error; the rest of the matrix gets one GEMM per block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsekit.formats import NMPattern, Pattern, parse_sparsity
from sparsekit.kernels import obs_block_solve, obs_block_solve_ref

from .magnitude import _check_weight

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6


class HessianNotPositiveDefinite(ValueError):
    """Cholesky failed even after raising the dampening."""


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # [N, K] pruned, input dtype
    mask: torch.Tensor  # [N, K] bool, True = kept
    percdamp: float  # dampening actually used (raised when Cholesky failed)
    obs_loss: float  # sum over columns of (w - q)^2 / Hinv_ii^2 / 2: the OBS estimate of ||dW X||^2


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """hessian [K, K] -> (upper Cholesky factor of (H + damp I)^-1, fp32; percdamp used).

    Dampening starts at ``percdamp`` * mean(diag H) and is multiplied by 10 while Cholesky fails.
    """
    if not torch.isfinite(hessian).all():
        raise ValueError("Hessian has NaN/inf: the calibration activations overflowed; run in fp32")
    h = hessian.float()
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = percdamp
    for _ in range(MAX_DAMP_RETRIES):
        factor, info = torch.linalg.cholesky_ex(h + (damp * mean_diag) * eye)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0:
                return upper, damp
        log.warning("Cholesky failed at percdamp=%g; raising dampening to %g", damp, damp * 10)
        damp *= 10
    raise HessianNotPositiveDefinite(
        f"Hessian is not positive definite even with percdamp={damp / 10:g}: the calibration data "
        "is too small or degenerate for this layer; use more calibration samples or a larger percdamp"
    )


BlockSolver = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def sparsegpt_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: str | float | Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    block_solver: BlockSolver = obs_block_solve,
) -> SparseGPTResult:
    """Prune weight [N, K] with its Hessian [K, K]; returns weights, mask and diagnostics."""
    pattern = parse_sparsity(sparsity)
    _check_weight(weight)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"hessian must be [{cols}, {cols}] for a weight with in_features={cols}, got "
            f"{tuple(hessian.shape)}"
        )
    nm = isinstance(pattern, NMPattern)
    if nm:
        pattern.check_columns(cols)
        if blocksize % pattern.group:
            raise ValueError(f"blocksize {blocksize} must be a multiple of M={pattern.group}")
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv, damp_used = inverse_hessian_factor(h, percdamp)
    del h
    mask = torch.ones_like(w, dtype=torch.bool)
    kwargs = dict(n=pattern.keep, m=pattern.group) if nm else dict(sparsity=pattern.sparsity)
    obs_loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        q, err, block_mask = block_solver(w[:, i1:i2], hinv[i1:i2, i1:i2], **kwargs)
        obs_loss += 0.5 * (err.square() * torch.diagonal(hinv)[i1:i2].square()).sum().item()
        w[:, i1:i2] = q
        mask[:, i1:i2] = block_mask
        if i2 < cols:
            w[:, i2:].addmm_(err, hinv[i1:i2, i2:], alpha=-1.0)
    w[:, dead] = 0.0
    return SparseGPTResult((w * mask).to(weight.dtype), mask, damp_used, obs_loss)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: str | float | Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K], hessian [K, K] (2/n X^T X) -> (pruned [N, K] same dtype, mask bool, True = kept)."""
    result = sparsegpt_solve(weight, hessian, sparsity, blocksize, percdamp)
    return result.weight, result.mask


def sparsegpt_prune_ref(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: str | float | Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain version (per-column loop over the whole block), kept for tests and benchmarks."""
    result = sparsegpt_solve(weight, hessian, sparsity, blocksize, percdamp, block_solver=obs_block_solve_ref)
    return result.weight, result.mask
