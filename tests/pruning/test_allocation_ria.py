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


def test_owl_ratios_match_a_hand_computed_example_from_the_papers_definition():
    """D_l = share of a layer's Wanda scores above M x their mean (all its linears together);
    D min-max scaled to [0, 2 lambda], shifted to mean 1 - target: the layer's keep ratio."""
    a = torch.tensor([1.0] * 9 + [11.0])  # mean 2, threshold 4: one outlier of 10 -> D = 0.1
    b = torch.tensor([1.0] * 8 + [6.0, 6.0])  # mean 2, threshold 4: two of 10 -> D = 0.2
    c = torch.ones(10)  # mean 1, threshold 2: none -> D = 0
    ratios = [outlier_ratio([a[:4], a[4:]], 2.0), outlier_ratio([b], 2.0), outlier_ratio([c], 2.0)]
    assert ratios == pytest.approx([0.1, 0.2, 0.0])
    # scaled: [0.08, 0.16, 0], mean 0.08; keep = scaled - 0.08 + 0.3 = [0.30, 0.38, 0.22]
    assert OWL(lam=0.08, m=2.0).block_sparsities(0.7, ratios) == pytest.approx([0.70, 0.62, 0.78])


def test_owl_scores_the_dense_model_on_dense_inputs():
    """The engine's block sparsities equal OWL's formula over ratios recomputed here from the dense
    model's own forward (hooks on every linear of each block, fp32)."""
    from sparsekit.bench.coverage import tiny_model as tiny

    model = tiny("llama", layers=4)
    ids = _calib()
    sq: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:

            def hook(m, args, out, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sq[name] = sq.get(name, 0) + (x * x).sum(0)

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    ratios = []
    for index in range(4):
        scores = [
            model.get_submodule(n).weight.detach().abs().double() * sq[n].sqrt()
            for n in sq
            if n.startswith(f"model.layers.{index}.")
        ]
        ratios.append(outlier_ratio(scores, 3.0))
    assert len(set(ratios)) == 4, ratios  # distinct, so the scaling is not just the two ends
    report = prune_model(
        model,
        ids,
        PruneConfig(
            method="wanda", sparsity=0.6, allocation=OWL(m=3.0), forward_dtype="model", show_progress=False
        ),
    )
    assert report.block_sparsities == pytest.approx(OWL(m=3.0).block_sparsities(0.6, ratios), abs=1e-6)
