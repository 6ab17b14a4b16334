"""The fast SparseGPT solver (factor of H, blocked solve) against the plain reference loop."""

import pytest
import torch

from sparsekit.kernels import use_backend
from sparsekit.pruning import PLAIN_SOLVER, sparsegpt_prune, sparsegpt_prune_ref, sparsegpt_solve
from sparsekit.pruning.sparsegpt import hessian_factor, inverse_hessian_factor
from tests.conftest import TOL
from tests.kernels.conftest import _assert_close as assert_close

# odd rows, K not a multiple of the block, unstructured and N:M
CASES = [
    (63, 200, 0.5, 64),
    (1, 130, 0.5, 32),
    (17, 96, 0.9, 32),
    (9, 64, 0.0, 16),
    (33, 96, "2:4", 32),
    (7, 128, "4:8", 64),
]


def _hessian(cols, tokens=400):
    z = torch.randn(tokens, cols)
    x = z + (z @ (torch.randn(cols, 8) / cols**0.5)) @ torch.randn(8, cols)  # correlated channels
    x[:, :3] *= 30  # outlier channels
    return x.T @ x / tokens


@pytest.mark.parametrize("rows,cols,sparsity,blocksize", CASES, ids=lambda v: str(v))
def test_fast_solver_matches_plain_loop(rows, cols, sparsity, blocksize):
    weight, hessian = torch.randn(rows, cols), _hessian(cols)
    pruned, mask = sparsegpt_prune(weight, hessian, sparsity, blocksize=blocksize)
    pruned_ref, mask_ref = sparsegpt_prune_ref(weight, hessian, sparsity, blocksize=blocksize)
    assert torch.equal(mask, mask_ref)
    assert_close(pruned, pruned_ref)
    assert (pruned[~mask] == 0).all()


def test_obs_loss_and_damping_agree():
    weight, hessian = torch.randn(20, 96), _hessian(96)
    fast = sparsegpt_solve(weight, hessian, 0.5, blocksize=32)
    ref = sparsegpt_solve(weight, hessian, 0.5, blocksize=32, solver=PLAIN_SOLVER)
    assert fast.percdamp == ref.percdamp
    assert fast.obs_loss == pytest.approx(ref.obs_loss, rel=1e-5)


def test_inverse_factor_is_the_upper_cholesky_of_the_inverse():
    hessian = _hessian(150).double()
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(150, dtype=torch.float64)
    u, damp = inverse_hessian_factor(hessian.float(), 0.01)
    assert damp == 0.01 and torch.equal(u, u.triu()) and (u.diagonal() > 0).all()
    inverse = torch.linalg.inv(damped)
    classic = torch.linalg.cholesky(inverse, upper=True)  # the paper's chol(inv(chol)) route, fp64
    rel = ((u.double() - classic).norm() / classic.norm()).item()
    assert rel < 1e-5, rel
    v, _ = hessian_factor(hessian.float(), 0.01)
    assert torch.equal(v, v.triu())
    rel_v = ((v.double() @ v.double().T - damped).norm() / damped.norm()).item()
    assert rel_v < TOL[torch.float32][0], rel_v


def test_dead_channels_and_fp16_weights():
    weight, hessian = torch.randn(11, 64).half(), _hessian(64)
    hessian[5, :] = hessian[:, 5] = 0  # a channel that never fires
    pruned, mask = sparsegpt_prune(weight, hessian, "2:4", blocksize=32)
    pruned_ref, mask_ref = sparsegpt_prune_ref(weight, hessian, "2:4", blocksize=32)
    assert pruned.dtype == torch.float16 and torch.equal(mask, mask_ref)
    assert (pruned[:, 5] == 0).all()
    assert_close(pruned, pruned_ref, torch.float16)


def test_inputs_are_not_modified():
    weight, hessian = torch.randn(5, 32), _hessian(32)
    w0, h0 = weight.clone(), hessian.clone()
    sparsegpt_prune(weight, hessian, 0.5, blocksize=16)
    assert torch.equal(weight, w0) and torch.equal(hessian, h0)


def test_triton_block_solver_inside_the_solve():
    weight, hessian = torch.randn(5, 48), _hessian(48)
    for sparsity in (0.5, "2:4"):
        with use_backend("triton"):  # the kernel, under TRITON_INTERPRET=1
            pruned, mask = sparsegpt_prune(weight, hessian, sparsity, blocksize=16)
        pruned_ref, mask_ref = sparsegpt_prune_ref(weight, hessian, sparsity, blocksize=16)
        assert torch.equal(mask, mask_ref)
        assert_close(pruned, pruned_ref)
