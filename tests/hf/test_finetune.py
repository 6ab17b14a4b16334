"""Sparse recovery fine-tuning on a tiny model: the loss goes down and every mask stays exact."""

import torch

from sparsekit.hf.finetune import finetune
from sparsekit.models import block_linears, find_decoder_blocks, linear_weight
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

    def weights():
        blocks = find_decoder_blocks(model)[1]
        return {(i, name): m for i, b in enumerate(blocks) for name, m in block_linears(b).items()}

    before = {key: linear_weight(m).detach().clone() for key, m in weights().items()}
    assert len(before) == 8
    ids = torch.randint(0, 128, (8, 32))
    report = finetune(model, input_ids=ids, steps=10, lr=3e-3, batch_size=4)
    assert report.masks_exact and sum(report.losses[-3:]) < sum(report.losses[:3])
    after = weights()
    assert set(after) == set(before)
    for key, module in after.items():
        assert not isinstance(module, SparseLinear)
        w, w0 = linear_weight(module).detach(), before[key]
        assert torch.equal(w[w0 == 0], torch.zeros_like(w[w0 == 0])), key  # every pruned weight stays zero
        assert not torch.equal(w[w0 != 0], w0[w0 != 0]), key  # and the kept ones trained


def test_distill_loss_is_zero_for_the_teacher_itself_and_matches_kl():
    from sparsekit.hf.finetune import distill_loss

    t = torch.randn(2, 5, 11)
    assert distill_loss(t, t).item() < 1e-6
    s = torch.randn(2, 5, 11)
    p = torch.softmax(t, -1)
    expected = (p * (p.log() - torch.log_softmax(s, -1))).sum(-1).mean()
    torch.testing.assert_close(distill_loss(s, t), expected)
    torch.testing.assert_close(distill_loss(s, t, 2.0), 4 * distill_loss(s / 2, t / 2))


def test_distillation_heals_a_structurally_pruned_model_towards_its_teacher():
    import copy

    from sparsekit.pruning.structured import StructuredConfig, structured_method

    teacher = tiny_model("llama")
    with torch.no_grad():  # confident logits, so pruning opens a clear gap
        teacher.lm_head.weight.mul_(20)
    student = copy.deepcopy(teacher)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    structured_method("flap").prune(student, ids, StructuredConfig(sparsity=0.4, show_progress=False))

    from sparsekit.hf.finetune import distill_loss

    def gap(m):
        with torch.no_grad():
            return distill_loss(m(ids).logits, teacher(ids).logits).item()

    before = gap(student)
    report = finetune(student, input_ids=ids, steps=40, lr=3e-4, batch_size=4, teacher=teacher)
    assert report.loss == "distill" and report.masks_exact and report.trained_layers == 14
    assert sum(report.losses[-5:]) < sum(report.losses[:5])
    assert gap(student) < 0.7 * before, (gap(student), before)
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
