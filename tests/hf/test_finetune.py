"""Sparse recovery fine-tuning on a tiny model: the loss goes down and every mask stays exact."""

import torch

from sparsekit.arch import block_linears, find_decoder_blocks, linear_weight
from sparsekit.hf.finetune import finetune
from sparsekit.nn import SparseLinear, sparsify
from sparsekit.pruning import PruneConfig, prune_model
from tests.conftest import tiny_model


def _pruned(arch="llama"):
    model = tiny_model(arch)
    prune_model(model, None, PruneConfig(method="magnitude", sparsity="2:4", show_progress=False))
    return model


def test_finetune_sparsified_model_lowers_loss_and_keeps_formats():
    model = _pruned()
    sparsify(model)
    masks = {n: m.mask().clone() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    ids = torch.randint(0, 128, (8, 32))
    calls = []
    report = finetune(
        model, input_ids=ids, steps=20, lr=3e-3, batch_size=4, evaluate=lambda m: calls.append(m) or 1.0
    )
    assert len(report.losses) == 20 and report.masks_exact
    assert sum(report.losses[-5:]) < sum(report.losses[:5])
    assert report.ppl_before == report.ppl_after == 1.0 and len(calls) == 2
    after = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert set(after) == set(masks) and {m.format for m in after.values()} == {"2:4"}
    for n, m in after.items():
        assert not bool((m.mask() & ~masks[n]).any()), n  # nothing pruned came back
    assert all(not p.requires_grad for p in model.parameters())


def test_finetune_pruned_dense_model_keeps_zeros():
    model = _pruned("gpt2")
    zeros = {
        id(m): linear_weight(m) == 0 for b in find_decoder_blocks(model)[1] for m in block_linears(b).values()
    }
    ids = torch.randint(0, 128, (8, 32))
    report = finetune(model, input_ids=ids, steps=10, lr=3e-3, batch_size=4)
    assert report.masks_exact and sum(report.losses[-3:]) < sum(report.losses[:3])
    for block in find_decoder_blocks(model)[1]:
        for module in block_linears(block).values():
            assert not isinstance(module, SparseLinear)
            assert (linear_weight(module) == 0).float().mean() >= 0.5
    assert len(zeros) == 8
