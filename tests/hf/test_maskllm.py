"""MaskLLM: the prior leads the initial logits, samples are soft 2:4 masks whose gradient reaches
the logits, and the result is an ordinary model with exact 2:4 zeros (API, CLI)."""

import copy

import pytest
import torch
from torch import nn

from sparsekit.hf.maskllm import (
    PATTERNS_2_4,
    LearnedMask24Linear,
    MaskLLMSettings,
    _Anneal,
    learn_masks,
    one_shot_prior,
    prior_logits,
)
from sparsekit.hf.trainer import TrainConfig
from sparsekit.nn.sparsify import sparse_candidates
from tests.conftest import tiny_model


def _ids(n=16, seqlen=32):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(5))


def _is_2_4(w):
    return bool(((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all())


def test_the_six_patterns_are_every_way_to_keep_two_of_four():
    assert PATTERNS_2_4.sum(-1).tolist() == [2] * 6 and len({tuple(p.tolist()) for p in PATTERNS_2_4}) == 6


def test_prior_pattern_leads_most_groups():
    # strength 3 shifts the prior's logit by 3 noise std over the half-overlapping patterns: it
    # leads most groups at the start, not all (the paper's initialisation)
    prior = PATTERNS_2_4[torch.randint(0, 6, (4096,), generator=torch.Generator().manual_seed(0))].bool()
    gate = prior_logits(prior.view(64, 256), 4096, MaskLLMSettings(), torch.Generator().manual_seed(1))
    agree = (PATTERNS_2_4[gate.argmax(-1)].bool() == prior).all(-1).float().mean()
    assert 0.8 < agree < 1.0
    stronger = prior_logits(prior, 4096, MaskLLMSettings(prior_strength=10), torch.Generator().manual_seed(1))
    assert (PATTERNS_2_4[stronger.argmax(-1)].bool() == prior).all()
    flat = prior_logits(None, 32, MaskLLMSettings(), torch.Generator().manual_seed(1))
    assert flat.std() < 0.02  # no prior: the logits are the small noise alone


def test_soft_masks_keep_two_per_group_and_pass_gradient_to_the_logits():
    linear = nn.Linear(16, 8)
    gate = prior_logits(None, 32, MaskLLMSettings(), torch.Generator().manual_seed(0))
    layer = LearnedMask24Linear(linear, gate, _Anneal(4.0, 100.0), update_weights=False).train()
    mask = layer.soft_mask()
    torch.testing.assert_close(mask.view(8, 4, 4).sum(-1), torch.full((8, 4), 2.0))
    layer(torch.randn(3, 16)).square().sum().backward()
    assert layer.gate.grad is not None and layer.gate.grad.abs().sum() > 0
    assert not layer.weight.requires_grad
    hard = layer.eval().to_linear()
    assert _is_2_4(hard.weight) and torch.equal(hard.weight, linear.weight * layer.hard_mask())


def test_learned_masks_are_exact_2_4_on_the_dense_weights():
    model = tiny_model("llama")
    dense = {n: m.weight.detach().clone() for n, m in sparse_candidates(model).items()}
    config = TrainConfig(steps=8, lr=1e-3, batch_size=4, precision="fp32", show_progress=False)
    report = learn_masks(model, _ids(), config, prior="wanda")
    assert report.layers == 14 and 0 < report.changed_from_prior < 0.5
    for name, module in sparse_candidates(model).items():
        assert type(module) is nn.Linear and _is_2_4(module.weight), name
        kept = module.weight != 0
        assert torch.equal(module.weight[kept], dense[name][kept]), name  # frozen weights, masked
    assert all(not p.requires_grad for p in model.parameters())


def test_prior_masks_leave_the_dense_weights_untouched():
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    masks = one_shot_prior(model, _ids(), "sparsegpt", show_progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(_is_2_4(m.float()) and m.float().mean() == 0.5 for m in masks.values())


@pytest.mark.parametrize("update", ["none", "admm"])
def test_starting_from_the_prior_weights_makes_its_mask_the_one_shot_model(update):
    """start="prior": where the prior keeps a weight it holds the one-shot value (SparseGPT's update,
    ADMM on top), where it prunes the dense one; so W * M_prior is the one-shot model exactly."""
    from sparsekit.pruning import PruneConfig, prune_model

    model, ids = tiny_model("llama"), _ids()
    dense = {n: m.weight.detach().clone() for n, m in sparse_candidates(model).items()}
    one_shot = copy.deepcopy(model)
    prune_model(
        one_shot, ids, PruneConfig(method="sparsegpt", sparsity="2:4", update=update, show_progress=False)
    )
    masks = one_shot_prior(model, ids, "sparsegpt", False, start="prior", update=update)
    reference = sparse_candidates(one_shot)
    for name, m in sparse_candidates(model).items():
        kept = masks[name]
        assert torch.equal(m.weight * kept, reference[name].weight), name
        assert torch.equal(m.weight[~kept], dense[name][~kept]), name
        assert not torch.equal(m.weight[kept], dense[name][kept]), name  # the update moved kept weights


def test_trained_weights_move_at_their_fraction_of_the_lr_and_stay_2_4():
    """update_weights: the weights train in their own optimizer group at weight_lr_scale x lr, so
    Adam moves each by at most steps * lr * scale (the logits at the full lr)."""
    model, lr, steps, scale = tiny_model("llama"), 1e-3, 3, 0.1
    config = TrainConfig(steps=steps, lr=lr, batch_size=4, precision="fp32", show_progress=False)
    dense_start = copy.deepcopy(model)
    one_shot_prior(dense_start, _ids(), "sparsegpt", False, start="prior")  # the weights training starts from
    settings = MaskLLMSettings(update_weights=True, weight_lr_scale=scale)
    learn_masks(model, _ids(), config, prior="sparsegpt", settings=settings, start="prior")
    before = sparse_candidates(dense_start)
    moved = 0.0
    for name, module in sparse_candidates(model).items():
        assert _is_2_4(module.weight), name
        kept = module.weight != 0
        moved = max(moved, float((module.weight - before[name].weight).detach()[kept].abs().max()))
    assert 0 < moved <= steps * lr * scale * 1.01, moved


def test_the_prior_calibrates_on_its_own_tokens_when_given(monkeypatch):
    import sparsekit.hf.maskllm as maskllm

    seen = []
    real = maskllm.one_shot_prior
    monkeypatch.setattr(
        maskllm, "one_shot_prior", lambda model, ids, *a: seen.append(ids.shape) or real(model, ids, *a)
    )
    config = TrainConfig(steps=1, lr=1e-3, batch_size=4, precision="fp32", show_progress=False)
    learn_masks(tiny_model("llama"), _ids(16, 32), config, prior="magnitude", prior_ids=_ids(8, 24))
    learn_masks(tiny_model("llama"), _ids(16, 32), config, prior="magnitude")
    assert seen == [torch.Size([8, 24]), torch.Size([16, 32])]


def test_prior_options_are_checked_before_any_work():
    from sparsekit.hf.maskllm import check_prior

    with pytest.raises(ValueError, match="start must be one of"):
        check_prior("sparsegpt", "sparse", "none")
    with pytest.raises(ValueError, match="prior='none' has no one-shot weights"):
        check_prior("none", "prior", "none")
    with pytest.raises(ValueError, match="admmm"):
        check_prior("sparsegpt", "dense", "admmm")
    with pytest.raises(ValueError, match="use it with start='prior'"):
        check_prior("sparsegpt", "dense", "admm")


def test_prune_api_routes_maskllm_and_refuses_what_it_cannot_do():
    import sparsekit

    with pytest.raises(ValueError, match="sparsity='2:4'"):
        sparsekit.prune(tiny_model("llama"), method="maskllm", sparsity=0.5, calib=_ids())
    with pytest.raises(ValueError, match="does not take"):
        sparsekit.prune(tiny_model("llama"), method="maskllm", sparsity="2:4", calib=_ids(), owl_m=5)
    with pytest.raises(ValueError, match="needs update_weights=True"):
        sparsekit.prune(
            tiny_model("llama"), method="maskllm", sparsity="2:4", calib=_ids(), weight_lr_scale=0.5
        )
    model = tiny_model("llama")
    report = sparsekit.prune(model, method="maskllm", sparsity="2:4", calib=_ids(), steps=2, batch_size=4,
                             precision="fp32", show_progress=False)  # fmt: skip
    assert report.kind == "maskllm" and report.train["steps"] == 2
    assert all(_is_2_4(m.weight) for m in sparse_candidates(model).values())


def test_cli_prune_maskllm_saves_a_compressed_2_4_model(tmp_path, capsys):
    from sparsekit.cli import main
    from sparsekit.hf.checkpoint import load
    from tests.tiny_folder import save_tiny_model

    dense = save_tiny_model(tmp_path / "dense")
    out = tmp_path / "ml"
    argv = ["prune", str(dense), "--method", "maskllm", "--sparsity", "2:4", "--steps", "3",
            "--nsamples", "8", "--seqlen", "32", "--batch-size", "4", "--device", "cpu",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "maskllm: learned the 2:4 masks of 14 layers" in capsys.readouterr().out
    formats = {m.format for m in load(out).modules() if hasattr(m, "format") and hasattr(m, "dense_weight")}
    assert formats == {"2:4"}
    assert main([*argv[:-2], "--allocation", "owl", "--out", str(tmp_path / "x")]) != 0
    assert "--allocation does nothing with --method maskllm" in capsys.readouterr().err
    out = tmp_path / "ml-prior"
    assert (
        main(
            [*argv[:-2], "--start", "prior", "--prior-update", "admm", "--update-weights", "--out", str(out)]
        )
        == 0
    )
    assert {m.format for m in load(out).modules() if hasattr(m, "dense_weight")} == {"2:4"}
    assert main(["prune", str(dense), "--method", "wanda", "--start", "prior", "--device", "cpu"]) != 0
    assert "--start does nothing without --method maskllm" in capsys.readouterr().err


def test_learning_recovers_a_hidden_2_4_mask_from_a_wrong_prior():
    """y = x (W * M_true)^T; the logits start from a random (wrong) prior and must find M_true."""
    from sparsekit.hf.maskllm import MaskLLMJob

    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(16, 32, generator=g))
    truth = PATTERNS_2_4[torch.randint(0, 6, (128,), generator=g)].view(16, 32).bool()
    prior = PATTERNS_2_4[torch.randint(0, 6, (128,), generator=g)].view(16, 32).bool()
    model = nn.Sequential(linear)
    job = MaskLLMJob({"0": prior}, MaskLLMSettings(weight_reg=0.0))
    job.prepare(model, {"0": linear})
    layer = model[0]
    opt = torch.optim.Adam([layer.gate], lr=5e-3)
    steps = 300
    for step in range(steps):
        job.before_step(step, steps)
        x = torch.randn(64, 32, generator=g)
        loss = (layer(x) - x @ (linear.weight * truth).T).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    learned = layer.hard_mask()
    start = (prior == truth).view(-1, 4).all(-1).float().mean()
    found = (learned == truth).view(-1, 4).all(-1).float().mean()
    assert start < 0.4 and found > 0.95, (float(start), float(found))


def test_cli_maskllm_refuses_a_device_it_would_not_use(tmp_path, capsys):
    from sparsekit.cli import main

    other = "cpu" if torch.cuda.is_available() else "cuda"  # not where the trainer computes
    argv = ["prune", "smollm2", "--method", "maskllm", "--sparsity", "2:4", "--device", other]
    assert main(argv) != 0
    assert "--device does nothing with --method maskllm" in capsys.readouterr().err


def test_floored_gumbel_softmax_draws_like_torch_and_never_goes_subnormal():
    from sparsekit.hf.maskllm import LOG_FLOOR, gumbel_softmax_floored

    logits = torch.randn(512, 6) * 3
    torch.manual_seed(1)
    ours = gumbel_softmax_floored(logits, 1.0)
    torch.manual_seed(1)
    ref = torch.nn.functional.gumbel_softmax(logits, tau=1.0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-12)  # same noise, same probabilities
    gate = (logits * 500).requires_grad_(True)  # the schedule's end: tau 0.05, scale 500
    p = gumbel_softmax_floored(gate, 0.05)
    (p * torch.randn_like(p)).sum().backward()
    tiny = torch.finfo(torch.float32).tiny
    assert torch.allclose(p.sum(-1), torch.ones(512))
    assert p.min() >= torch.exp(torch.tensor(LOG_FLOOR)) / 6 * 0.99
    nonzero = gate.grad[gate.grad != 0].abs()
    assert nonzero.numel() and nonzero.min() >= tiny  # gradients are normal floats or exact zeros
