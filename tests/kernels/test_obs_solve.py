"""obs_block_solve: the Triton kernel (interpreter) and the blocked torch path against the plain loop."""

import pytest
import torch

from sparsekit.kernels import obs_block_solve, obs_block_solve_ref
from sparsekit.kernels.obs_solve import nm_keep_rows, obs_block_solve_torch
from sparsekit.kernels.topk_select import nm_keep_mask

# rows odd / 1, block widths that are not powers of two (the kernel pads to BLOCK_B)
CASES = [
    ((7, 24), dict(sparsity=0.5)),
    ((1, 24), dict(sparsity=0.9)),
    ((5, 20), dict(sparsity=0.0)),
    ((5, 16), dict(n=2, m=4)),
    ((3, 32), dict(n=4, m=8)),
]


def _ids(case):
    (rows, width), pattern = case
    pat = f"{pattern['n']}of{pattern['m']}" if "n" in pattern else f"s{pattern['sparsity']}"
    return f"R{rows}-B{width}-{pat}"


def _block(rows, width):
    a = torch.randn(width, 2 * width)
    h = a @ a.T / width + 0.1 * torch.eye(width)
    hinv = torch.linalg.cholesky(torch.linalg.inv(h.double()), upper=True).float()
    return torch.randn(rows, width), hinv


def _check(got, want, assert_close):
    q, err, mask = got
    q_ref, err_ref, mask_ref = want
    assert torch.equal(mask, mask_ref)
    assert_close(q, q_ref)
    assert_close(err, err_ref)
    assert (q[~mask] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_triton_matches_ref(triton_backend, assert_close, case):
    (rows, width), pattern = case
    w, hinv = _block(rows, width)
    _check(obs_block_solve(w, hinv, **pattern), obs_block_solve_ref(w, hinv, **pattern), assert_close)


@pytest.mark.parametrize(
    "case", CASES + [((63, 128), dict(sparsity=0.5)), ((33, 128), dict(n=2, m=4))], ids=_ids
)
def test_torch_matches_ref(torch_backend, assert_close, case):
    (rows, width), pattern = case
    w, hinv = _block(rows, width)
    want = obs_block_solve_ref(w, hinv, **pattern)
    _check(obs_block_solve(w, hinv, **pattern), want, assert_close)
    _check(obs_block_solve_torch(w, hinv, **pattern, sub_block=8), want, assert_close)


def test_inputs_are_not_modified():
    w, hinv = _block(5, 16)
    w0 = w.clone()
    obs_block_solve_torch(w, hinv, sparsity=0.5)
    assert torch.equal(w, w0)


def test_nm_rank_rule_equals_the_stable_sort():
    s = torch.randint(0, 3, (8, 50)).float()  # many ties
    assert torch.equal(nm_keep_rows(s, 4).T, nm_keep_mask(s.T.contiguous(), 4, 8))


FIXED = [(7, 24), (1, 16), (33, 128)]


@pytest.mark.parametrize("shape", FIXED, ids=lambda s: f"R{s[0]}-B{s[1]}")
def test_fixed_mask_triton_and_torch_match_ref(triton_backend, assert_close, shape):
    """A given keep-mask: only the OBS update runs, on exactly that mask, in every path."""
    rows, width = shape
    w, hinv = _block(rows, width)
    mask = torch.rand(rows, width) > 0.6
    want = obs_block_solve_ref(w, hinv, mask=mask)
    assert torch.equal(want[2], mask)
    _check(obs_block_solve(w, hinv, mask=mask), want, assert_close)
    _check(obs_block_solve_torch(w, hinv, mask=mask, sub_block=8), want, assert_close)


def test_fixed_mask_of_its_own_choice_reproduces_the_solve(assert_close):
    w, hinv = _block(9, 32)
    chosen = obs_block_solve_ref(w, hinv, n=2, m=4)
    _check(obs_block_solve_ref(w, hinv, mask=chosen[2]), chosen, assert_close)


def test_fixed_mask_is_checked():
    w, hinv = _block(3, 8)
    with pytest.raises(ValueError, match="exactly one"):
        obs_block_solve_ref(w, hinv, sparsity=0.5, mask=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="fixed mask must be bool"):
        obs_block_solve_ref(w, hinv, mask=torch.ones(3, 7, dtype=torch.bool))


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_unstructured_ties_follow_the_reference_order(torch_backend, assert_close, sparsity):
    """Integer weights and an equal diagonal: the threshold is tied across columns, and the
    transposed path must break the tie in the reference's row-major order."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-2, 3, (9, 16), generator=g).float()
    hinv = torch.eye(16) * 0.5 + torch.triu(torch.rand(16, 16, generator=g) * 0.01, diagonal=1)
    _check(
        obs_block_solve(w, hinv, sparsity=sparsity),
        obs_block_solve_ref(w, hinv, sparsity=sparsity),
        assert_close,
    )
