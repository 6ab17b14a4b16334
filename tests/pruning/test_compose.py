"""Issue 15's composable pieces: the ADMM update, DSnoT refinement, RIA's channel permutation and
their composition in the engine, against independent references and the papers' promises."""

import itertools

import pytest
import torch

from sparsekit.formats import parse_sparsity
from sparsekit.formats.masks import check_mask
from sparsekit.kernels.admm import admm_update, masked_lsq_ref, reconstruction_error
from sparsekit.kernels.dsnot import dsnot_refine, dsnot_refine_ref
from sparsekit.models import (
    ChannelFold,
    block_linears,
    channel_folds,
    describe,
    find_decoder_blocks,
    linear_weight,
)
from sparsekit.pruning import PruneConfig, prune_model, sparsegpt_solve, wanda_prune
from sparsekit.pruning.method import Bundle, Gram, InputStat, InputSum, SquaredNorm
from sparsekit.pruning.permute import (
    _slot_gain,
    balanced_permutation,
    channel_permutation,
    fold_indices,
    lsa_refine,
    nm_kept_score,
    permute_columns_,
    permute_rows_,
)


def _layer(rows=48, cols=96, tokens=1024, seed=0):
    """A weight with correlated inputs carrying a few outlier channels and a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ (
        0.3 * torch.randn(cols, cols, generator=g) + torch.eye(cols)
    )
    x[:, :3] *= 8
    x += 0.5 * torch.randn(cols, generator=g)
    return torch.randn(rows, cols, generator=g), x


# ----------------------------------------------------------------------------- ADMM
@pytest.mark.parametrize("sparsity", [0.5, "2:4", 0.7])
def test_admm_lowers_the_error_of_sparsegpt_and_approaches_the_exact_optimum(sparsity):
    w, x = _layer()
    h = x.T @ x
    warm = sparsegpt_solve(w, h * 2 / x.shape[0], sparsity)
    exact = reconstruction_error(w, masked_lsq_ref(w, h, warm.mask).float(), h)
    start = reconstruction_error(w, warm.weight, h)
    got = admm_update(w, h, warm.mask, warm.weight)  # the paper's 20 iterations, rho 1, damp 0.1
    assert (got[~warm.mask] == 0).all()
    assert exact <= reconstruction_error(w, got, h) < start
    undamped = admm_update(w, h, warm.mask, warm.weight, iters=300, percdamp=0.0)
    assert reconstruction_error(w, undamped, h) == pytest.approx(exact, rel=5e-3)


def test_admm_keeps_the_warm_start_when_it_cannot_improve():
    w, x = _layer(rows=8, cols=32)
    h = x.T @ x
    mask = torch.rand(8, 32, generator=torch.Generator().manual_seed(1)) > 0.5
    optimum = masked_lsq_ref(w, h, mask).float()
    got = admm_update(w, h, mask, optimum, iters=1)
    assert reconstruction_error(w, got, h) <= reconstruction_error(w, optimum, h) * (1 + 1e-6)


def test_admm_checks_its_inputs():
    w, x = _layer(rows=4, cols=16)
    h = x.T @ x
    with pytest.raises(ValueError, match="hessian must be"):
        admm_update(w, h[:8, :8], torch.ones_like(w, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        admm_update(w, h, torch.ones_like(w))
    with pytest.raises(ValueError, match="iters"):
        admm_update(w, h, torch.ones_like(w, dtype=torch.bool), iters=0)


def test_sparsegpt_update_on_a_fixed_mask():
    w, x = _layer()
    h = x.T @ x * 2 / x.shape[0]
    own = sparsegpt_solve(w, h, "2:4")
    again = sparsegpt_solve(w, h, "2:4", keep=own.mask)
    assert torch.equal(again.mask, own.mask)
    torch.testing.assert_close(again.weight, own.weight)
    _, wanda_mask = wanda_prune(w, (x.square().sum(0)).sqrt(), "2:4")
    updated = sparsegpt_solve(w, h, "2:4", keep=wanda_mask)
    assert torch.equal(updated.mask, wanda_mask) and (updated.weight[~wanda_mask] == 0).all()
    assert reconstruction_error(w, updated.weight, h) < reconstruction_error(w, w * wanda_mask, h)


# ----------------------------------------------------------------------------- DSnoT
DSNOT_CASES = [
    ((7, 64), 0.5),
    ((1, 40), 0.6),
    ((33, 96), 0.7),
    ((16, 64), "2:4"),
    ((9, 48), "4:8"),
    ((1, 8), "2:4"),
]


def _dsnot_inputs(shape, sparsity, seed=0):
    w, x = _layer(*shape, tokens=256, seed=seed)
    mean, var, norm = x.mean(0), x.var(0, unbiased=False), x.square().sum(0).sqrt()
    pruned, mask = wanda_prune(w, norm, sparsity)
    return w, pruned, mask, mean, var, norm


@pytest.mark.parametrize("shape,sparsity", DSNOT_CASES)
def test_dsnot_batched_equals_the_per_row_reference(shape, sparsity):
    w, pruned, mask, mean, var, norm = _dsnot_inputs(shape, sparsity)
    pattern = parse_sparsity(sparsity)
    nm = (pattern.keep, pattern.group) if hasattr(pattern, "group") else (None, None)
    got = dsnot_refine(w, pruned, mask, mean, var, norm, *nm, threshold=1e-4)
    want = dsnot_refine_ref(w, pruned, mask, mean, var, norm, *nm, threshold=1e-4)
    assert torch.equal(got, want)
    swapped = bool((got != mask).any())
    assert shape[0] == 1 or swapped
    assert torch.equal(got.sum(dim=1), mask.sum(dim=1))  # every row keeps its count
    check_mask(got, pattern)  # and every N:M group its N
    before = ((w - pruned) @ mean).abs()
    after = ((w - w * got) @ mean).abs()
    assert (after <= before + 1e-5).all() and (after.sum() < before.sum() or not swapped)


def test_dsnot_stops_at_the_threshold_and_the_cycle_budget():
    w, pruned, mask, mean, var, norm = _dsnot_inputs((16, 64), 0.5)
    assert torch.equal(dsnot_refine(w, pruned, mask, mean, var, norm, threshold=1e9), mask)
    one = dsnot_refine(w, pruned, mask, mean, var, norm, max_cycles=1, threshold=0.0)
    assert ((one != mask).sum(dim=1) <= 2).all()


def test_dsnot_checks_its_inputs():
    w, pruned, mask, mean, var, norm = _dsnot_inputs((4, 16), 0.5)
    with pytest.raises(ValueError, match="bool"):
        dsnot_refine(w, pruned, mask.float(), mean, var, norm)
    with pytest.raises(ValueError, match="mean must be"):
        dsnot_refine(w, pruned, mask, mean[:8], var, norm)
    with pytest.raises(ValueError, match="N:M"):
        dsnot_refine(w, pruned, mask, mean, var, norm, n=2, m=3)


# ----------------------------------------------------------------------------- permutation
def test_balanced_start_is_a_permutation_spreading_the_strong_channels():
    scores = torch.ones(4, 16)
    scores[:, :4] = 10.0  # four strong channels, all in group 0
    perm = balanced_permutation(scores, 4)
    assert torch.equal(perm.sort().values, torch.arange(16))
    assert set(perm[0::4].tolist()) == {0, 1, 2, 3}  # slot 0 of every group: a strong one
    assert nm_kept_score(scores[:, perm], 2, 4) > nm_kept_score(scores, 2, 4)


def _best_by_brute_force(scores, n, m):
    cols = scores.shape[1]
    best = 0.0
    for perm in itertools.permutations(range(cols)):
        if all(perm[i] < perm[i + 1] for g in range(0, cols, m) for i in range(g, g + m - 1)):
            best = max(best, nm_kept_score(scores[:, list(perm)], n, m))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_lsa_never_loses_and_finds_the_optimum_on_small_cases(seed):
    scores = torch.rand(3, 8, generator=torch.Generator().manual_seed(seed)) ** 3
    start = balanced_permutation(scores, 4)
    refined = lsa_refine(scores, start, 2, 4, rounds=2)
    assert nm_kept_score(scores[:, refined], 2, 4) >= nm_kept_score(scores[:, start], 2, 4) - 1e-6
    perm = channel_permutation(scores, 2, 4)
    got = nm_kept_score(scores[:, perm], 2, 4)
    assert got >= nm_kept_score(scores, 2, 4) - 1e-6
    assert got >= 0.97 * _best_by_brute_force(scores, 2, 4)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_slot_gain_is_the_kept_score_moved_by_each_swap(n, m):
    """gain[g, c] = what group g keeps more when channel ``slot`` of group c takes its slot, against
    keeping none there: recomputed here from the kept score of the modified group itself."""
    s = torch.rand(5, 6, m, generator=torch.Generator().manual_seed(n)) ** 3
    slot = 1
    gain = _slot_gain(s, slot, n)
    for g in range(6):
        for c in range(6):
            group = s[:, g].clone()
            group[:, slot] = s[:, c, slot]
            with_it = group.topk(n, dim=-1).values.sum()
            group[:, slot] = 0  # scores are non-negative: a zero is never kept above another
            without = group.topk(n, dim=-1).values.sum()
            assert gain[g, c].item() == pytest.approx(float(with_it - without), abs=1e-5)


def _gqa_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=128, attention_bias=True,  # v_proj's bias moves with its rows
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_folded_permutations_leave_the_model_function_unchanged():
    model = _gqa_llama()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    g = torch.Generator().manual_seed(3)
    for anatomy in describe(model):
        folds = channel_folds(anatomy)
        assert {f.consumer for f in folds} == {"mlp.down_proj", "self_attn.o_proj"}
        linears = block_linears(anatomy.module)
        for fold in folds:
            perms = [torch.randperm(fold.width, generator=g) for _ in range(fold.segments)]
            rows, cols = fold_indices(fold, perms)
            permute_columns_(linears[fold.consumer], cols)
            for name in fold.producers:
                permute_rows_(linears[name], rows)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-5)


def test_fold_shapes_for_gqa():
    fold = next(f for f in channel_folds(describe(_gqa_llama())[0]) if f.consumer == "self_attn.o_proj")
    assert fold == ChannelFold("self_attn.o_proj", ("self_attn.v_proj",), width=16, segments=2, repeats=2)
    rows, cols = fold_indices(fold, [torch.arange(16).flip(0), torch.arange(16)])
    assert rows.tolist()[:2] == [15, 14] and cols.tolist()[16:18] == [31, 30]  # q head 1 reads kv head 0
    assert cols.tolist()[32:34] == [32, 33]  # q head 2 reads kv head 1 (identity)


# ----------------------------------------------------------------------------- statistics
def test_bundle_collects_what_each_statistic_collects_alone():
    x = torch.randn(3, 5, 12)
    bundle = Bundle((InputSum(), SquaredNorm(), Gram()))
    value = bundle.new(12, x.device)
    bundle.accumulate(x, value)
    parts = bundle.split(InputStat(value, 15), 12)
    flat = x.reshape(-1, 12)
    torch.testing.assert_close(parts["sum"].value, flat.sum(0))
    torch.testing.assert_close(parts["sq_sum"].value, flat.square().sum(0))
    torch.testing.assert_close(parts["gram"].value, flat.T @ flat)
    assert parts["gram"].tokens == 15


# ----------------------------------------------------------------------------- the engine
def _calib():
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


RECIPES = [
    ("wanda", "2:4", dict(refine="dsnot")),
    ("wanda", "2:4", dict(update="admm")),
    ("wanda", 0.5, dict(update="sparsegpt")),
    ("ria", "2:4", dict(permute=True)),
    ("sparsegpt", "4:8", dict(permute=True, refine="dsnot", update="admm")),
    ("magnitude", 0.6, dict(refine="dsnot", update="admm")),
    ("magnitude", "2:4", dict(permute=True)),  # no calibration data at all
    ("sparsegpt", 0.5, dict(refine="dsnot", update="sparsegpt")),
]


@pytest.mark.parametrize("method,sparsity,steps", RECIPES, ids=lambda v: str(v))
def test_recipes_prune_exactly_and_keep_the_pattern_in_storage_order(method, sparsity, steps):
    model = _gqa_llama()
    config = PruneConfig(method=method, sparsity=sparsity, show_progress=False, **steps)
    report = prune_model(model, _calib() if config.needs_calibration else None, config)
    pattern = parse_sparsity(sparsity)
    for block in find_decoder_blocks(model)[1]:
        for module in block_linears(block).values():
            check_mask(linear_weight(module) != 0, pattern)  # N:M holds as stored, no run-time permutation
    assert report.overall_sparsity == pytest.approx(pattern.sparsity, abs=0.01)
    assert report.recipe.startswith(method) and all(torch.isfinite(torch.tensor(report.block_rel_errors)))
    if steps.get("permute"):
        assert len(report.permuted) == 4  # down_proj and o_proj of both blocks
        assert all(p["kept_score_after"] >= p["kept_score_before"] * (1 - 1e-6) for p in report.permuted)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_admm_lowers_the_block_errors(method):
    errors = {}
    for update in ("none", "admm"):
        model = _gqa_llama()
        config = PruneConfig(method=method, sparsity="2:4", update=update, show_progress=False)
        errors[update] = sum(prune_model(model, _calib(), config).block_rel_errors)
    assert errors["admm"] < errors["none"]


def test_permutation_rescues_strong_channels_sharing_a_group():
    """down_proj channels 0-3 made 10x stronger share one 2:4 group: without the permutation every
    row loses two of them; with it they are spread over groups and the down_proj error drops."""
    errors = {}
    for permute in (False, True):
        model = _gqa_llama()
        with torch.no_grad():
            for block in model.model.layers:
                block.mlp.down_proj.weight[:, :4] *= 10
        config = PruneConfig(method="wanda", sparsity="2:4", permute=permute, show_progress=False)
        report = prune_model(model, _calib(), config)
        errors[permute] = [r.output_rel_error for r in report.layers if r.name.endswith("down_proj")]
    assert all(p < 0.5 * u for p, u in zip(errors[True], errors[False], strict=True))


def test_bad_combinations_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="N:M"):
        PruneConfig(method="wanda", sparsity=0.5, permute=True)
    with pytest.raises(ValueError, match="solves the same mask twice"):
        PruneConfig(method="sparsegpt", sparsity="2:4", update="sparsegpt")
    with pytest.raises(ValueError, match="unknown refine"):
        PruneConfig(refine="swap")
    with pytest.raises(ValueError, match="unknown update"):
        PruneConfig(update="adam")
