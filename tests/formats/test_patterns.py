import pytest
import torch

from sparsekit.formats import NMPattern, Unstructured, check_mask, parse_sparsity, pattern_mask


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("0.5", Unstructured(0.5)),
        (0.25, Unstructured(0.25)),
        ("50%", Unstructured(0.5)),
        ("2:4", NMPattern(2, 4)),
        (" 4 : 8 ", NMPattern(4, 8)),
        ("0", Unstructured(0.0)),
    ],
)
def test_parse_sparsity(spec, expected):
    assert parse_sparsity(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("3:2", "0 < N < M"),
        ("4:4", "0 < N < M"),
        ("0:4", "0 < N < M"),
        ("0.9x", "cannot parse"),
        ("1.0", r"\[0, 1\)"),
        (-0.1, r"\[0, 1\)"),
        ("", "cannot parse"),
        (True, "ratio"),
    ],
)
def test_parse_sparsity_rejects_bad_input(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_sparsity(spec)


def test_nm_needs_divisible_in_features():
    with pytest.raises(ValueError, match="in_features % 4 == 0"):
        pattern_mask(torch.rand(3, 10), NMPattern(2, 4))


def test_golden_2_4_mask_of_a_1x8_weight():
    weight = torch.tensor([[0.1, -0.9, 0.3, 0.2, 5.0, 4.0, -6.0, 0.0]])
    mask = pattern_mask(weight.abs(), NMPattern(keep=2, group=4))
    assert mask.tolist() == [[False, True, True, False, True, False, True, False]]


def test_ties_keep_the_lower_index():
    scores = torch.ones(2, 8)
    assert pattern_mask(scores, NMPattern(2, 4)).tolist() == [[True, True, False, False] * 2] * 2
    assert pattern_mask(scores, Unstructured(0.5)).tolist() == [[True] * 4 + [False] * 4] * 2


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_unstructured_mask_is_exact_per_row_and_per_matrix(sparsity):
    scores = torch.rand(5, 37)
    rows = pattern_mask(scores, Unstructured(sparsity), group="row")
    assert (rows.sum(1) == 37 - int(37 * sparsity)).all()
    whole = pattern_mask(scores, Unstructured(sparsity), group="matrix")
    assert whole.sum() == 185 - int(185 * sparsity)
    # the kept entries are the largest ones
    assert scores[whole].min() >= scores[~whole].max() if sparsity > 0 else whole.all()


def test_check_mask_names_the_bad_group():
    mask = torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="row 0, group 0"):
        check_mask(mask, NMPattern(2, 4))
