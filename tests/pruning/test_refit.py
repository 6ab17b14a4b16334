"""The least-squares refit after width pruning (``sparsekit/pruning/structured/refit.py``): the
closed form against torch.linalg.lstsq on one linear, the running Gram, lower block-output error
than the plain cut on tiny random models of several families, a plain-HF checkpoint after it,
and the option refused off the width methods."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsekit._checks import check_prune_request
from sparsekit.cli import build_parser
from sparsekit.models import describe
from sparsekit.pruning.structured import StructuredConfig, structured_method
from sparsekit.pruning.structured.refit import GramStats, refit_columns
from tests.pruning.test_structured import calib, make


def _linear_data(tokens: int = 300, features: int = 12, outputs: int = 5):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(features // 2, features, generator=g, dtype=torch.float64)
    noise = 0.1 * torch.randn(tokens, features, generator=g, dtype=torch.float64)
    offset = torch.linspace(-1, 2, features, dtype=torch.float64)  # non-zero means
    latent = torch.randn(tokens, features // 2, generator=g, dtype=torch.float64)
    x = latent @ mix + noise + offset  # correlated columns: the kept ones can stand in for the rest
    w = torch.randn(outputs, features, generator=g, dtype=torch.float64)
    return x, w, torch.tensor([0, 2, 3, 7, 8, 11])


@pytest.mark.parametrize("fit_bias", [False, True], ids=["no-bias", "bias"])
def test_refit_columns_is_the_least_squares_solution(fit_bias):
    x, w, kept = _linear_data()
    solved, bias = refit_columns(w, x.T @ x, x.sum(0), x.shape[0], kept, fit_bias, damp=0.0)
    design = x[:, kept]
    if fit_bias:
        design = torch.cat([design, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    reference = torch.linalg.lstsq(design, x @ w.T).solution  # [k (+1), N]
    torch.testing.assert_close(solved, reference[: len(kept)].T, rtol=1e-9, atol=1e-9)
    if fit_bias:
        torch.testing.assert_close(bias, reference[-1], rtol=1e-9, atol=1e-9)
    else:
        assert bias is None


def test_refit_beats_the_plain_cut_and_flap_compensation_on_its_data():
    x, w, kept = _linear_data()
    removed = torch.tensor([i for i in range(x.shape[1]) if i not in kept.tolist()])
    target = x @ w.T
    solved, bias = refit_columns(w, x.T @ x, x.sum(0), x.shape[0], kept, fit_bias=True, damp=0.0)
    flap_bias = w[:, removed] @ x[:, removed].mean(0)  # FLAP: the removed columns' mean output
    errors = {
        "cut": (target - x[:, kept] @ w[:, kept].T).pow(2).sum(),
        "flap": (target - x[:, kept] @ w[:, kept].T - flap_bias).pow(2).sum(),
        "refit": (target - x[:, kept] @ solved.T - bias).pow(2).sum(),
    }
    assert errors["refit"] < 0.9 * errors["flap"] < 0.9 * errors["cut"], errors


def test_refit_keeping_every_column_returns_the_weight():
    x, w, _ = _linear_data()
    everything = torch.arange(x.shape[1])
    solved, bias = refit_columns(w, x.T @ x, x.sum(0), x.shape[0], everything, fit_bias=True, damp=0.0)
    torch.testing.assert_close(solved, w, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bias, torch.zeros(w.shape[0], dtype=w.dtype), rtol=0, atol=1e-9)


def test_refit_columns_errors():
    x, w, kept = _linear_data()
    with pytest.raises(ValueError, match="saw no tokens"):
        refit_columns(w, x.T @ x, x.sum(0), 0, kept, fit_bias=False)
    with pytest.raises(ValueError, match="damp must be >= 0"):
        refit_columns(w, x.T @ x, x.sum(0), x.shape[0], kept, fit_bias=False, damp=-1.0)


def test_gram_stats_sums_every_call():
    g = torch.Generator().manual_seed(3)
    parts = [torch.randn(2, 7, 16, generator=g), torch.randn(1, 5, 16, generator=g)]
    stats = GramStats()
    for part in parts:
        stats(None, (part,))
    x = torch.cat([p.reshape(-1, 16) for p in parts]).double()
    assert stats.count == 19
    torch.testing.assert_close(stats.gram, x.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.total, x.sum(0), rtol=1e-6, atol=1e-6)


def _block_errors(model, dense, ids) -> float:
    """Sum over blocks of the relative squared error of each block's output against the dense model's."""
    with torch.no_grad():
        got = model(ids, output_hidden_states=True).hidden_states[1:]
        want = dense(ids, output_hidden_states=True).hidden_states[1:]
    return sum(((g - w).pow(2).sum() / w.pow(2).sum()).item() for g, w in zip(got, want, strict=True))


REFIT_CASES = [  # at 50% every case cuts heads (o_proj) as well as channels (down_proj)
    ("flap", "llama", {}),  # compensation through the config's bias flags: a bias column
    ("flap", "llama", {"heads": "query"}),
    ("flap", "llama", {"widths": "adaptive"}),
    ("wanda-sp", "llama", {}),  # no compensation: no bias column
    ("flap", "qwen2", {}),  # o_proj / down_proj cannot hold a bias: no bias column
    ("flap", "gpt2", {}),  # Conv1D weights, biases already there
]


@pytest.mark.parametrize(
    ("method", "arch", "kw"),
    REFIT_CASES,
    ids=[f"{m}-{a}-{'-'.join(k.values()) or 'group'}" for m, a, k in REFIT_CASES],
)
def test_refit_lowers_the_block_output_error_on_calibration_data(method, arch, kw):
    dense = make(arch, layers=3)
    ids = calib(16, 16)  # 256 tokens: more than the MLP's 128 channels
    errors, reports = {}, {}
    for refit in (False, True):
        model = copy.deepcopy(dense)
        config = StructuredConfig(sparsity=0.5, refit=refit, show_progress=False, **kw)
        reports[refit] = structured_method(method).prune(model, ids, config)
        errors[refit] = _block_errors(model, dense, ids)
    heads = dense.config.num_attention_heads
    assert any(w["heads"] < heads for w in reports[True].widths)  # the attention refit is exercised
    assert errors[True] < 0.8 * errors[False], errors
    assert "refit" in reports[True].timings_s
    assert reports[True].widths == reports[False].widths  # the refit changes weights, not what is cut
    assert reports[True].bias_compensation == reports[False].bias_compensation


def test_refit_adds_no_bias_where_the_architecture_cannot_hold_one():
    model = make("qwen2", layers=2)
    structured_method("flap").prune(
        model, calib(16, 16), StructuredConfig(sparsity=0.4, refit=True, show_progress=False)
    )
    assert all(
        b.linear(b.attention.o).bias is None and b.linear(b.mlp.down).bias is None for b in describe(model)
    )


def test_refit_is_refused_off_the_width_methods():
    for method, sparsity, options in (
        ("angular", None, {"remove_layers": 1}),
        ("shortgpt", None, {"remove_layers": 1}),
        ("wanda", 0.5, {}),
    ):
        with pytest.raises(ValueError, match=r"refit \(--refit\) does nothing with"):
            check_prune_request(method, sparsity, {**options, "refit": True})
    assert check_prune_request("flap", 0.2, {"refit": True}).config.refit
    assert not check_prune_request("flap", 0.2, {}).config.refit
    args = build_parser().parse_args(
        ["prune", "smollm2", "--method", "wanda-sp", "--sparsity", "0.2", "--refit"]
    )
    assert args.refit is True


def test_a_large_damp_gives_back_the_cut_with_flap_compensation():
    x, w, kept = _linear_data()
    removed = torch.tensor([i for i in range(x.shape[1]) if i not in kept.tolist()])
    solved, bias = refit_columns(w, x.T @ x, x.sum(0), x.shape[0], kept, fit_bias=True, damp=1e12)
    torch.testing.assert_close(solved, w[:, kept], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias, w[:, removed] @ x[:, removed].mean(0), rtol=1e-6, atol=1e-6)
