"""OWL allocation and the RIA score, against their papers' definitions."""

import pytest
import torch

from sparsekit.pruning import OWL, PruneConfig, Uniform, outlier_ratio, prune_model, ria_prune, ria_scores
from tests.conftest import tiny_model


def test_owl_spreads_around_the_target_and_favours_outlier_blocks():
    ratios = [0.010, 0.030, 0.020, 0.050]
    s = OWL(lam=0.08).block_sparsities(0.7, ratios)
    assert sum(s) / len(s) == pytest.approx(0.7, abs=1e-12)  # the overall target is exact
    assert max(s) - min(s) == pytest.approx(2 * 0.08)  # spread 2 lambda
    assert s[3] == min(s) and s[0] == max(s)  # most outliers: pruned least
    # linear in the ratio: the independent formula of the OWL reference code
    lo, hi = min(ratios), max(ratios)
    keep = [(r - lo) / (hi - lo) * 0.16 for r in ratios]
    keep = [k - sum(keep) / 4 + 0.3 for k in keep]
    assert s == pytest.approx([1 - k for k in keep])
    assert Uniform().block_sparsities(0.7, ratios) == [0.7] * 4
    assert OWL().block_sparsities(0.5, [0.02] * 3) == pytest.approx([0.5] * 3)  # no spread: uniform


def test_owl_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="smaller --owl-lambda"):
        OWL(lam=0.4).block_sparsities(0.9, [0.0, 1.0])
    with pytest.raises(ValueError, match="unstructured"):
        PruneConfig(method="wanda", sparsity="2:4", allocation="owl")
    with pytest.raises(ValueError, match="unknown allocation"):
        PruneConfig(allocation="owls")


def test_outlier_ratio_counts_entries_above_m_times_the_block_mean():
    a = torch.ones(10, 10)
    b = torch.ones(10, 10)
    b[0, :5] = 100.0  # mean over both = (195 + 500) / 200 = 3.475; outliers: > 5 * 3.475
    assert outlier_ratio([a, b], 5.0) == pytest.approx(5 / 200)
    assert outlier_ratio([a], 5.0) == 0.0


def test_ria_score_is_relative_to_row_and_column_times_root_norm():
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    act = torch.rand(8) + 0.5
    expected = torch.empty(6, 8)
    for i in range(6):
        for j in range(8):
            expected[i, j] = (abs(w[i, j]) / w[i].abs().sum() + abs(w[i, j]) / w[:, j].abs().sum()) * act[
                j
            ] ** 0.5
    torch.testing.assert_close(ria_scores(w, act), expected)
    pruned, mask = ria_prune(w, act, 0.5)
    assert (mask.sum(1) == 4).all() and torch.equal(pruned, w * mask)
    kept = ria_scores(w, act)[mask].reshape(6, 4).min(1).values
    dropped = ria_scores(w, act)[~mask].reshape(6, 4).max(1).values
    assert (kept >= dropped).all()
    _, nm = ria_prune(w, act, "2:4")
    assert (nm.reshape(6, 2, 4).sum(-1) == 2).all()


def _calib():
    return torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))


def test_owl_in_the_engine_gives_per_block_sparsities_with_the_overall_target():
    model = tiny_model("llama")
    report = prune_model(
        model, _calib(), PruneConfig(method="wanda", sparsity=0.6, allocation="owl", show_progress=False)
    )
    assert len(report.block_sparsities) == 2 and report.block_sparsities[0] != report.block_sparsities[1]
    assert sum(report.block_sparsities) / 2 == pytest.approx(0.6)
    assert report.overall_sparsity == pytest.approx(0.6, abs=0.01)
    per_block = {}
    for layer in report.layers:
        per_block.setdefault(layer.name.split(".")[2], []).append(layer.sparsity)
    for index, sparsities in per_block.items():
        assert all(abs(s - report.block_sparsities[int(index)]) < 0.02 for s in sparsities)
    assert "allocation" in report.timings_s


def test_ria_and_owl_with_magnitude_and_sparsegpt_run_in_the_engine():
    for method in ("ria", "sparsegpt", "magnitude"):
        model = tiny_model("llama")
        report = prune_model(
            model,
            _calib(),
            PruneConfig(method=method, sparsity=0.5, allocation="owl", blocksize=16, show_progress=False),
        )
        assert report.overall_sparsity == pytest.approx(0.5, abs=0.01), method
