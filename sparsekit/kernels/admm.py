"""Weight update under a fixed mask by ADMM (Boža, "Fast and Optimal Weight Update for Pruned
Large Language Models", 2024), and the exact per-row least squares it approximates.

Problem: given the dense weight W0 [N, K], the input Gram H = X^T X [K, K] and a keep-mask M,
minimise ||(W0 - W) X||^2 = tr((W0 - W) H (W0 - W)^T) over W with W = 0 where M is False.

ADMM splits W (free) from Z (masked) with the scaled dual U and penalty rho:
    W <- (H + rho I)^-1 (H W0 + rho (Z - U))      one [K, K] @ [K, N] GEMM per iteration
    Z <- (W + U) * M
    U <- U + W - Z
in coordinates where every input channel has unit norm (W * ||X_k||, H / ||X_j|| ||X_k||), as the
paper does, so one rho suits every layer. (H + rho I)^-1 is formed once per layer; an iteration is
two GEMMs, so on a GPU the loop is cuBLAS-bound and there is nothing for a custom kernel to fuse.
Z starts from a warm solution (SparseGPT's), and the result is kept only where it lowers the
undamped objective, so the update never makes a layer worse on its calibration data.
"""

from __future__ import annotations

import torch

ADMM_ITERS = 20  # the paper's budget for the fixed-mask update
ADMM_RHO = 1.0  # penalty in unit-norm coordinates (the paper's value)
ADMM_DAMP = 0.1  # ridge on the normalised H, a fraction of its mean diagonal (the paper's percdamp)


def reconstruction_error(weight0: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W0 - W) H (W0 - W)^T) for weights [N, K] and H [K, K]: ||(W0 - W) X||^2 when H = X^T X."""
    delta = weight0.float() - weight.float()
    return float(((delta @ hessian.float()) * delta).sum())


def _check(weight0: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor) -> None:
    rows, cols = weight0.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"hessian must be [{cols}, {cols}] for weight {tuple(weight0.shape)}, got {tuple(hessian.shape)}"
        )
    if mask.shape != weight0.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool {tuple(weight0.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(
            "hessian holds NaN or Inf: the calibration activations overflowed (try float32 forwards)"
        )


def admm_update(
    weight0: torch.Tensor,
    hessian: torch.Tensor,
    mask: torch.Tensor,
    start: torch.Tensor | None = None,
    iters: int = ADMM_ITERS,
    rho: float = ADMM_RHO,
    percdamp: float = ADMM_DAMP,
) -> torch.Tensor:
    """weight0 [N, K] dense, hessian [K, K] (X^T X at any positive scale), mask [N, K] bool
    (True = kept), start [N, K] (warm solution on the mask; default W0 * M) -> W [N, K] fp32,
    zero off the mask: the better of ``start`` and the ADMM iterate in the undamped objective."""
    _check(weight0, hessian, mask)
    if iters < 1 or not rho > 0 or not percdamp >= 0:
        raise ValueError(f"need iters >= 1, rho > 0, percdamp >= 0; got {iters}, {rho}, {percdamp}")
    w0 = weight0.detach().float()
    h = hessian.detach().float()
    start = (w0 * mask) if start is None else start.detach().float() * mask
    norm = torch.diagonal(h).clamp_min(0).sqrt()
    dead = norm == 0
    norm = torch.where(dead, torch.ones_like(norm), norm)
    hn = h / norm[:, None] / norm[None, :]
    hn.diagonal().add_(percdamp * hn.diagonal().mean())
    w0n = (w0 * norm).T.contiguous()  # [K, N]
    target = hn @ w0n
    hn.diagonal().add_(rho)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hn))
    target = inverse @ target  # (H + rho I)^-1 H W0
    del hn
    keep = mask.T.contiguous() & ~dead[:, None]
    z = (start * norm).T.contiguous() * keep
    u = torch.zeros_like(z)
    for _ in range(iters):
        w = torch.addmm(target, inverse, z - u, alpha=rho)  # W = (H + rho I)^-1 (H W0 + rho (Z - U))
        w.add_(u)  # W + U
        u.copy_(w).sub_(torch.mul(w, keep, out=z))  # Z = (W + U) M, U = (W + U) - Z
    result = (z.T / norm).contiguous()
    if reconstruction_error(w0, result, h) > reconstruction_error(w0, start, h):
        return start.contiguous()
    return result


def masked_lsq_ref(weight0: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The exact minimiser, one row at a time (for tests): with S the kept columns of a row,
    w_S = w0_S + H_SS^-1 H_S,~S w0_~S and w_~S = 0. float64; rows of all-kept stay dense."""
    _check(weight0, hessian, mask)
    w0 = weight0.detach().double()
    h = hessian.detach().double()
    out = torch.zeros_like(w0)
    for i in range(w0.shape[0]):
        kept, dropped = mask[i], ~mask[i]
        h_ss = h[kept][:, kept]
        rhs = h[kept][:, dropped] @ w0[i, dropped]
        out[i, kept] = w0[i, kept] + torch.linalg.solve(h_ss, rhs)
    return out
