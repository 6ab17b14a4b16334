"""Exact selections behind every mask: N:M by rank counting and the k-th smallest, against sorts."""

import pytest
import torch

from sparsekit.kernels import topk_select
from sparsekit.kernels.topk_select import kth_smallest, nm_keep_mask, topk_keep_mask


def _nm_by_stable_sort(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    order = grouped.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (4, 8), (2, 8), (1, 2)])
@pytest.mark.parametrize("ties", [False, True])
def test_nm_matches_stable_sort(n, m, ties, monkeypatch):
    monkeypatch.setattr(topk_select, "NM_ROW_CHUNK", 7)  # several chunks, the last one short
    rows, cols = 45, 8 * m
    scores = torch.randint(0, 3, (rows, cols)).float() if ties else torch.randn(rows, cols)
    mask = nm_keep_mask(scores, n, m)
    assert torch.equal(mask, _nm_by_stable_sort(scores, n, m))
    assert (mask.reshape(rows, -1, m).sum(-1) == n).all()


def test_nm_rejects_indivisible_columns():
    with pytest.raises(ValueError, match="in_features % 4"):
        nm_keep_mask(torch.randn(3, 10), 2, 4)


@pytest.mark.parametrize("size", [10, 1 << 16, (1 << 16) + 37])
def test_kth_smallest_is_exact(size):
    scores = torch.randn(size)
    scores[::5] = 0.25  # many ties around the middle
    ordered = scores.sort().values
    for k in (1, size // 3, size // 2, size):
        assert kth_smallest(scores, k).item() == ordered[k - 1].item()


def test_topk_keep_mask_exact_count_with_ties():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    assert topk_keep_mask(scores, 2).tolist() == [[False, True, True, False, False]]


@pytest.mark.parametrize(
    "size,sparsity,kept",
    [
        (100, 0.29, 71),
        (100, 0.57, 43),
        (10, 0.7, 3),
        (4096, 0.5, 2048),
        (7, 0.5, 4),
        (3, 0.3, 3),
        (100, 0.0, 100),
    ],
)
def test_keep_count_floors_the_decimal_product(size, sparsity, kept):
    """size - floor(size * sparsity) of the decimal the user wrote: 100 * 0.29 is 28.999... in binary."""
    from fractions import Fraction

    assert topk_select.keep_count(size, sparsity) == kept
    assert kept == size - int(size * Fraction(str(sparsity)))  # the exact decimal rule, independently


def test_keep_count_agrees_with_exact_decimals_everywhere():
    from fractions import Fraction

    for size in (1, 3, 7, 64, 100, 127, 1000, 4096, 11008):
        for hundredths in range(100):
            sparsity = hundredths / 100
            assert topk_select.keep_count(size, sparsity) == size - int(size * Fraction(hundredths, 100))
