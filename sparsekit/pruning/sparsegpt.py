"""SparseGPT: blocked OBS solver with lazy batch updates (Frantar & Alistarh, 2023).

H = 2/n X^T X [K, K]; damp by ``percdamp`` of mean(diag H); U = upper Cholesky factor of H^-1.
Columns are solved block by block (``blocksize``): inside a block ``obs_block_solve`` prunes
and propagates the error; the rest of the matrix gets one GEMM per block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sparsekit.formats import NMPattern, Pattern, parse_sparsity
from sparsekit.kernels import obs_block_solve, obs_block_solve_ref
from sparsekit.kernels._backend import use_triton
from sparsekit.kernels.obs_solve import obs_block_solve_t_, one_thread
from sparsekit.kernels.quant import symmetric_steps

from .magnitude import _check_weight
from .method import Gram, InputStat, LayerResult, PruningMethod, register_method

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


def _lower_triangular_inverse_(lower: torch.Tensor, out: torch.Tensor, leaf: int = 1024) -> None:
    """out[:] = L^-1 for lower-triangular L [K, K] (out's upper triangle must be zero), recursively:
    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]], the off-diagonal block from two
    triangular solves: K^3/3 flops in all, as LAPACK's trtri (a solve against I costs K^3)."""
    size = lower.shape[0]
    if size <= leaf:
        eye = torch.eye(size, dtype=lower.dtype, device=lower.device)
        out.copy_(torch.linalg.solve_triangular(lower, eye, upper=False))
        return
    h = size // 2
    a, b, c = lower[:h, :h], lower[h:, :h], lower[h:, h:]
    _lower_triangular_inverse_(a, out[:h, :h], leaf)
    _lower_triangular_inverse_(c, out[h:, h:], leaf)
    b_ainv = torch.linalg.solve_triangular(a, b, upper=False, left=False)
    out[h:, :h] = torch.linalg.solve_triangular(c, b_ainv, upper=False).neg_()


def hessian_factor(
    hessian: torch.Tensor, percdamp: float, dead: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """hessian [K, K] -> (upper-triangular V [K, K] fp32 with H + damp I = V V^T; percdamp used).

    One Cholesky of the reversed matrix: with J the reversal permutation and J H J = L L^T,
    H = (J L J)(J L J)^T and J L J is upper triangular. V^-1 is the upper Cholesky factor of H^-1.
    ``dead`` [K] bool: channels that never fire get H_ii = 1 (in the copy; the input is untouched).
    Dampening starts at ``percdamp`` * mean(diag H) and is multiplied by 10 while Cholesky fails.
    """
    if not torch.isfinite(hessian).all():
        raise ValueError("Hessian has NaN/inf: the calibration activations overflowed; run in fp32")
    reversed_h = hessian.float().flip(0, 1)  # a copy: the damping below never touches the input
    diagonal = torch.diagonal(reversed_h)
    if dead is not None:
        diagonal[dead.flip(0)] = 1.0
    mean_diag = diagonal.mean()
    damp, added = percdamp, 0.0
    for _ in range(MAX_DAMP_RETRIES):
        diagonal.add_(damp * mean_diag - added)
        added = damp * mean_diag
        lower, info = torch.linalg.cholesky_ex(reversed_h)
        if info.item() == 0:
            return lower.flip(0, 1), damp
        log.warning("Cholesky failed at percdamp=%g; raising dampening to %g", damp, damp * 10)
        damp *= 10
    raise HessianNotPositiveDefinite(
        f"Hessian is not positive definite even with percdamp={damp / 10:g}: the calibration data "
        "is too small or degenerate for this layer; use more calibration samples or a larger percdamp"
    )


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """hessian [K, K] -> (upper Cholesky factor U of (H + damp I)^-1, i.e. U^T U = H^-1, fp32; percdamp used).

    One Cholesky of the reversed matrix and one triangular inverse (2K^3/3 flops) instead of
    Cholesky, inverse and a second Cholesky (4K^3/3): U = V^-1 with V from ``hessian_factor``,
    upper triangular with a positive diagonal, hence the (unique) upper Cholesky factor of H^-1.
    """
    upper_v, damp = hessian_factor(hessian, percdamp)
    lower = upper_v.flip(0, 1)
    inverse = torch.zeros_like(lower)
    _lower_triangular_inverse_(lower, inverse)
    return inverse.flip(0, 1), damp


class SparseGPTSolver:
    """How the column blocks are solved; both give the same result (see tests)."""

    def solve(self, wt, hessian, dead, percdamp, blocksize, kwargs):
        """wt = W^T [K, N] fp32 (pruned in place) -> (mask^T [K, N], err^2 per column, diag(U), damp)."""
        raise NotImplementedError


class HessianFactorSolver(SparseGPTSolver):
    """The fast solve from H's own Cholesky factor (``_solve_with_hessian_factor``); the block solve
    runs the Triton kernel on CUDA and the transposed in-place CPU path elsewhere."""

    def solve(self, wt, hessian, dead, percdamp, blocksize, kwargs):
        factor, damp = hessian_factor(hessian.detach(), percdamp, dead)
        return (*_solve_with_hessian_factor(wt, factor, blocksize, kwargs), damp)


class PlainSolver(SparseGPTSolver):
    """The paper's loop on U = chol(H^-1) with the per-column reference block solve (for tests and
    for benchmarking against the way the reference code works)."""

    def solve(self, wt, hessian, dead, percdamp, blocksize, kwargs):
        h = hessian.detach().float().clone()
        h[dead, dead] = 1.0
        factor, damp = inverse_hessian_factor(h, percdamp)
        del h
        return (*_solve_with_inverse_factor(wt, factor, blocksize, kwargs, obs_block_solve_ref), damp)


def _solve_with_inverse_factor(wt, hinv, blocksize, kwargs, block_solver):
    """The paper's loop: U = chol(H^-1) upper; after block b, W[:, later] -= E_b U[b, later]."""
    cols = wt.shape[0]
    kwargs = dict(kwargs)
    keep_t = kwargs.pop("keep_t", None)  # a fixed keep-mask^T [K, N]
    step_t, bits = kwargs.pop("step_t", None), kwargs.pop("bits", 0)  # joint quantization grid^T
    maskt = torch.ones_like(wt, dtype=torch.bool)
    err_sq = torch.zeros(cols, dtype=torch.float64, device=wt.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        kw = kwargs if keep_t is None else {"mask": keep_t[i1:i2].T}
        if step_t is not None:
            kw = {**kw, "step": step_t[i1:i2].T, "bits": bits}
        q, err, block_mask = block_solver(wt[i1:i2].T, hinv[i1:i2, i1:i2], **kw)
        wt[i1:i2], maskt[i1:i2] = q.T, block_mask.T
        err_sq[i1:i2] = err.square().sum(dim=0)
        if i2 < cols:
            wt[i2:].addmm_(hinv[i1:i2, i2:].T, err.T, alpha=-1.0)
    return maskt, err_sq, torch.diagonal(hinv)


def _solve_with_hessian_factor(wt, upper_v, blocksize, kwargs):
    """The same solve from V (H = V V^T), never forming H^-1's factor U = V^-1 off the diagonal.

    With E the scaled errors and Q the pruned weights, the paper's loop gives (W0 - Q) = E U,
    so E = (W0 - Q) V. For block b that means: the weights the block solve starts from,
    W0_b - sum_{a<b} E_a U_ab, equal W0_b + S_b U_bb with S_b = sum_{a<b} (W0 - Q)_a V_ab.
    S is accumulated by one GEMM per block (as the paper's lazy update) and U_bb = V_bb^-1 is a
    [B, B] triangular inverse per block; the in-block solve is unchanged.
    """
    cols = wt.shape[0]
    kwargs = dict(kwargs)
    keep_t = kwargs.pop("keep_t", None)  # a fixed keep-mask^T [K, N]
    step_t, bits = kwargs.pop("step_t", None), kwargs.pop("bits", 0)  # joint quantization grid^T
    cpu_fast = not use_triton(wt, upper_v) or step_t is not None  # the Triton block solve has no grid
    maskt = torch.ones_like(wt, dtype=torch.bool)
    err_sq = torch.zeros(cols, dtype=torch.float64, device=wt.device)
    acc = torch.empty_like(wt)  # S^T [K, N]; rows past the first block are set (beta=0) by block 0
    u_diag = torch.empty(cols, dtype=wt.dtype, device=wt.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        v_block = upper_v[i1:i2, i1:i2]
        eye = torch.eye(i2 - i1, dtype=wt.dtype, device=wt.device)
        with one_thread(wt.device):  # latency-bound small ops, see obs_solve.one_thread
            u_block = torch.linalg.solve_triangular(v_block, eye, upper=True)
            u_diag[i1:i2] = torch.diagonal(u_block)
            if i1 == 0:
                start = wt[i1:i2].clone()
            else:
                start = torch.addmm(wt[i1:i2], u_block.T, acc[i1:i2])  # (W0_b + S_b U_bb)^T
            if cpu_fast:  # q lands in ``start``, no transposes
                fixed = None if keep_t is None else keep_t[i1:i2]
                grid = {} if step_t is None else {"step_t": step_t[i1:i2], "bits": bits}
                errt, maskt[i1:i2] = obs_block_solve_t_(start, u_block, **kwargs, maskt=fixed, **grid)
            else:
                kw = kwargs if keep_t is None else {"mask": keep_t[i1:i2].T}
                q, err, block_mask = obs_block_solve(start.T, u_block, **kw)
                start, errt, maskt[i1:i2] = q.T, err.T, block_mask.T
            err_sq[i1:i2] = errt.square().sum(dim=1)
            wt[i1:i2].sub_(start)  # (W0 - Q)_b^T, for the GEMM
        if i2 < cols:
            acc[i2:].addmm_(upper_v[i1:i2, i2:].T, wt[i1:i2], beta=0.0 if i1 == 0 else 1.0)
        with one_thread(wt.device):
            wt[i1:i2] = start
    return maskt, err_sq, u_diag


FACTOR_SOLVER = HessianFactorSolver()
PLAIN_SOLVER = PlainSolver()


@dataclass(frozen=True)
class QuantGrid:
    """A symmetric ``bits``-bit weight grid, one step per output row (``group`` None) or per group of
    ``group`` inputs, from the dense weight's max |w| (``symmetric_steps``): zeros stay exact, so
    the pruned weights remain zero. bits 8 per row is the int8 format's scale."""

    bits: int
    group: int | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"wbits must be 2..8, got {self.bits}")
        if self.group is not None and self.group < 1:
            raise ValueError(f"wgroup must be >= 1 inputs, got {self.group}")

    def steps(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [N, K] -> step [N, K] fp32."""
        return symmetric_steps(weight, self.bits, self.group)

    def __str__(self) -> str:
        return f"w{self.bits}" + (f"g{self.group}" if self.group else "")


def check_hessian(hessian: torch.Tensor) -> None:
    """A Hessian must be finite, symmetric and have a non-negative diagonal (it is 2/n X^T X)."""
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(
            "hessian holds NaN or Inf: the calibration activations overflowed (try float32 forwards)"
        )
    scale = hessian.abs().amax().clamp_min(1e-30)
    # symmetry on up to 256 evenly spread rows against the same columns: a non-symmetric input
    # (a wrong statistic, an overwritten triangle) shows in any of them, at 1/16 the cost of H - H^T
    idx = torch.linspace(0, hessian.shape[0] - 1, min(hessian.shape[0], 256), device=hessian.device).long()
    asym = float((hessian[idx] - hessian[:, idx].T).abs().amax() / scale)
    if asym > 1e-4:
        raise ValueError(
            f"hessian is not symmetric (max |H - H^T| / max |H| = {asym:.2g}); "
            "pass 2/n X^T X of the layer inputs"
        )
    if bool((torch.diagonal(hessian) < 0).any()):
        raise ValueError("hessian has negative diagonal entries, so it is not X^T X; pass 2/n X^T X")


def sparsegpt_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: str | float | Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    solver: SparseGPTSolver = FACTOR_SOLVER,
    keep: torch.Tensor | None = None,
    grid: QuantGrid | None = None,
) -> SparseGPTResult:
    """Prune weight [N, K] with its Hessian [K, K]; returns weights, mask and diagnostics.

    ``solver``: ``FACTOR_SOLVER`` (default, from H's own reversed Cholesky factor, no inverse) or
    ``PLAIN_SOLVER`` (the paper's loop on U = chol(H^-1) with the per-column reference).
    ``keep`` [N, K] bool: a fixed mask (True = kept), chosen elsewhere; the solve then only
    updates the kept weights (OBS), and ``sparsity`` is not used to choose.
    ``grid``: the paper's joint sparsification and quantization, every kept weight rounded to its
    symmetric grid (steps from the dense weight, ``QuantGrid``) inside the same sweep, so later
    columns compensate the rounding as well as the pruning; the result holds the grid values.
    """
    pattern = parse_sparsity(sparsity)
    _check_weight(weight)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"hessian must be [{cols}, {cols}] for a weight with in_features={cols}, got "
            f"{tuple(hessian.shape)}"
        )
    check_hessian(hessian)
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0 (a fraction of mean(diag H)), got {percdamp}")
    nm = isinstance(pattern, NMPattern) and keep is None
    if keep is not None and (keep.shape != weight.shape or keep.dtype != torch.bool):
        raise ValueError(
            f"keep must be a bool mask {tuple(weight.shape)}, got {keep.dtype} {tuple(keep.shape)}"
        )
    if nm:
        pattern.check_columns(cols)
        if blocksize % pattern.group:
            raise ValueError(f"blocksize {blocksize} must be a multiple of M={pattern.group}")
    # work on W^T [K, N]: a column block of W is a contiguous row block
    wt = weight.new_empty((cols, rows), dtype=torch.float32).copy_(weight.detach().T)  # always a copy
    dead = torch.diagonal(hessian) == 0
    if dead.any():
        wt[dead] = 0.0
    if keep is not None:
        kwargs = dict(keep_t=keep.T.contiguous().to(wt.device))
    elif nm:
        kwargs = dict(n=pattern.keep, m=pattern.group)
    else:
        kwargs = dict(sparsity=pattern.sparsity)
    if grid is not None:
        kwargs.update(step_t=grid.steps(weight).T.contiguous().to(wt.device), bits=grid.bits)
    maskt, err_sq, u_diag, damp_used = solver.solve(wt, hessian, dead, percdamp, blocksize, kwargs)
    obs_loss = 0.5 * (err_sq * u_diag.double().square()).sum().item()
    if dead.any():
        wt[dead] = 0.0
    mask = maskt.T.contiguous()
    pruned = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device).copy_(wt.T)  # q is masked
    return SparseGPTResult(pruned, mask, damp_used, obs_loss)


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
    result = sparsegpt_solve(weight, hessian, sparsity, blocksize, percdamp, solver=PLAIN_SOLVER)
    return result.weight, result.mask


@register_method
class SparseGPT(PruningMethod):
    """OBS pruning with weight update from H = 2/n X^T X (``config.blocksize``, ``config.percdamp``)."""

    updates_weights = True
    name = "sparsegpt"
    statistic = Gram()

    def solve_cost(self, rows: int, cols: int) -> float:
        return float(rows) * cols * cols  # the blocked OBS updates; the Cholesky adds cols^3 / 3

    def __init__(self, solver: SparseGPTSolver = FACTOR_SOLVER) -> None:
        self.solver = solver

    def prune(self, weight: torch.Tensor, stat: InputStat | None, config) -> LayerResult:
        hessian = stat.value * (2.0 / max(stat.tokens, 1))
        result = sparsegpt_solve(
            weight, hessian, config.sparsity, config.blocksize, config.percdamp, solver=self.solver,
            grid=config.quant_grid,
        )  # fmt: skip
        return LayerResult(result.weight, result.mask, result.percdamp)

    def channel_scores(self, weight: torch.Tensor, stat: InputStat | None) -> torch.Tensor:
        """|W| sqrt(H_kk): the OBS saliency w^2 / [H^-1]_kk^2 with H^-1 taken as diagonal (square root)."""
        return weight.detach().abs().float() * torch.diagonal(stat.value).clamp_min(0).sqrt().reshape(1, -1)

    def __repr__(self) -> str:
        return f"SparseGPT(solver={type(self.solver).__name__})"
