"""Shortened LLaMA's two depth criteria against independent references: the calibration
perplexity of the model with each block actually deleted, and |W * dL/dW| from one full-batch
autograd gradient; on several families (tensor and tuple block outputs)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import sparsekit
from sparsekit.models import describe
from sparsekit.pruning.structured import StructuredConfig, remove_blocks, structured_method
from tests.pruning.test_structured import calib, logits, make

FAMILIES = ["llama", "qwen3", "gemma", "gpt2", "opt"]


def _ppl_without(model, index: int, ids: torch.Tensor) -> float:
    """exp(mean next-token NLL) of the model with block ``index`` deleted, from its logits."""
    cut = copy.deepcopy(model)
    remove_blocks(cut, [index])
    out = logits(cut, ids)
    nll = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(nll.item())


def _taylor_reference(model, ids: torch.Tensor) -> list[float]:
    out = model(ids, use_cache=False).logits
    loss = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
    blocks = describe(model).blocks
    scores = []
    for block in blocks:
        params = list(block.parameters())
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        terms = [(p.detach().double() * g.double()).abs().sum() for p, g in zip(params, grads, strict=True)]
        scores.append(float(sum(terms)))
    return scores


def _prune(model, method, ids, **kw):
    config = StructuredConfig(show_progress=False, batch_size=2, **kw)
    return structured_method(method).prune(model, ids, config)


@pytest.mark.parametrize("arch", FAMILIES)
def test_ppl_scores_are_the_perplexity_with_each_block_deleted(arch):
    model = make(arch, layers=4)
    ids = calib(5, 12)  # batches of 2, 2 and 1: the mean is over every predicted token
    expected = [_ppl_without(model, i, ids) for i in range(4)]
    report = _prune(copy.deepcopy(model), "shortened-ppl", ids, remove_layers=2)
    assert report.block_scores == pytest.approx(expected, rel=1e-5)
    assert report.removed_blocks == sorted(sorted(range(4), key=expected.__getitem__)[:2])


@pytest.mark.parametrize("arch", FAMILIES)
def test_taylor_scores_match_full_batch_autograd_and_keep_the_ends(arch):
    model = make(arch, layers=8)
    ids = calib(5, 12)
    expected = _taylor_reference(copy.deepcopy(model), ids)
    pruned = copy.deepcopy(model)
    flags = {n: p.requires_grad for n, p in pruned.named_parameters()}
    report = _prune(pruned, "shortened-taylor", ids, remove_layers=2)
    assert report.block_scores == pytest.approx(expected, rel=1e-4)
    assert report.removed_blocks == sorted(sorted(range(4, 6), key=expected.__getitem__)[:2])
    assert all(p.grad is None and p.requires_grad == flags[n] for n, p in pruned.named_parameters())
    assert pruned.config.num_hidden_layers == 6


def test_a_block_that_adds_nothing_keeps_the_dense_ppl_and_scores_zero():
    model = make("llama", layers=8)
    with torch.no_grad():  # block 5 adds nothing to the residual stream
        model.model.layers[5].self_attn.o_proj.weight.zero_()
        model.model.layers[5].mlp.down_proj.weight.zero_()
    ids = calib(4, 12)
    out = logits(model, ids)
    dense = math.exp(F.cross_entropy(out[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).item())
    ppl = _prune(copy.deepcopy(model), "shortened-ppl", ids, remove_layers=1)
    assert ppl.block_scores[5] == pytest.approx(dense, rel=1e-6)  # skipping it changes nothing
    taylor = _prune(copy.deepcopy(model), "shortened-taylor", ids, remove_layers=1)
    assert taylor.block_scores[5] == 0.0 and taylor.removed_blocks == [5]


def test_repair_and_errors():
    model = make("llama", layers=6)
    ids = calib(4, 12)
    report = _prune(model, "shortened-ppl", ids, remove_layers=2, repair=True)
    assert report.repaired_blocks and model.config.num_hidden_layers == 4
    with pytest.raises(ValueError, match="leaving 2 to remove, fewer than the 3"):
        _prune(make("llama", layers=8), "shortened-taylor", ids, remove_layers=3)
    with pytest.raises(ValueError, match="tokens.*does nothing with shortened-ppl"):
        sparsekit.prune(
            make("llama", layers=4), method="shortened-ppl", sparsity=0.25, calib=ids, tokens="last"
        )
