"""Mixture-of-Experts blocks on tiny random models of every MoE family transformers 5.x has that the
issue lists: the anatomy reads the fused 3-D experts, the routed forward reproduces the family's
own experts, experts are removed (REAP / EAN / frequency) into plain checkpoints, and the weights
inside experts are pruned with routed statistics (sparsekit.bench.coverage says how each is checked)."""

from __future__ import annotations

import pytest
import torch

import sparsekit
from sparsekit.bench.coverage import MOE_CELLS, MOE_FAMILIES, calib_ids, run_cell, tiny_model
from sparsekit.models import UnsupportedArchitecture, describe, expert_matrices, routed_forward
from sparsekit.pruning.experts import pool_expert_stats
from sparsekit.pruning.method import InputStat
from sparsekit.pruning.structured import StructuredConfig
from sparsekit.pruning.structured.experts import choose_experts, experts_to_keep

EXPECTED_REFUSALS = {("llama4_text", "routed vs all tokens"): "already scaled by the router"}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_family_removes_experts_and_prunes_inside_them(family):
    dense = tiny_model(family)
    bad = []
    for column in MOE_CELLS:
        cell = run_cell(family, column, dense)
        expected = EXPECTED_REFUSALS.get((family, column))
        if cell.status == "refused" and expected and expected in cell.detail:
            continue
        if cell.status != "OK":
            bad.append(f"{column}: {cell.status} {cell.detail}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routed_forward_reproduces_the_family_experts(family):
    model = tiny_model(family)
    block = next(b for b in describe(model) if b.experts is not None)
    ex = block.experts
    experts = block.module.get_submodule(ex.experts)
    seen = {}
    handle = experts.register_forward_hook(lambda m, args, out: seen.setdefault("io", (args, out)) and None)
    with torch.no_grad():
        model(calib_ids(2, 10), use_cache=False)
    handle.remove()
    args, want = seen["io"]
    with torch.no_grad():
        got = routed_forward(experts, ex, expert_matrices(block.module, ex))(*args)
    # scale-aware: fp32 sums of |outputs| ~ 1e2 (transformers 5.25's tiny inits) differ in the last
    # bits where the family's kernel (grouped_mm by default) orders them differently
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_group_limited_removal_takes_the_same_number_from_every_group():
    scores = torch.tensor([5.0, 1.0, 4.0, 0.0, 9.0, 8.0, 7.0, 6.0])
    assert choose_experts(scores, keep=4, groups=2).tolist() == [0, 2, 4, 5]
    assert choose_experts(scores, keep=4, groups=1).tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_experts=1), "fewer than the router's top_k 2"),
        (dict(num_experts=8), "removes none"),
        (dict(num_experts=5), "multiple of 2"),
    ],
)
def test_expert_counts_that_break_routing_are_refused(kwargs, message):
    ex = next(b.experts for b in describe(tiny_model("deepseek_v3")) if b.experts)
    with pytest.raises(ValueError, match=message):
        experts_to_keep(ex, StructuredConfig(sparsity=0.0, **kwargs))


def test_expert_methods_refuse_a_dense_model_and_expert_options_do_too():
    dense = tiny_model("llama")
    with pytest.raises(UnsupportedArchitecture, match="no Mixture-of-Experts block"):
        sparsekit.prune(dense, method="reap", sparsity=0.5, calib=calib_ids(), show_progress=False)
    with pytest.raises(ValueError, match="expert_tokens act on Mixture-of-Experts blocks"):
        sparsekit.prune(
            dense, method="wanda", sparsity=0.5, calib=calib_ids(), expert_tokens="all", show_progress=False
        )


def test_an_expert_without_routed_tokens_gets_the_pooled_statistics():
    ex = next(b.experts for b in describe(tiny_model("mixtral")) if b.experts)
    collected = {f"{ex.experts}.0.gate_up": InputStat(torch.full((64,), 4.0), tokens=100)}
    collected[f"{ex.experts}.1.gate_up"] = InputStat(torch.full((64,), 1.0), tokens=10)
    counts = pool_expert_stats(ex, 0, collected, min_tokens=50)
    assert counts.tokens[:3] == [100, 10, 0] and counts.pooled == [1, 2, 3, 4, 5, 6, 7]
    pooled_mean = (4.0 * 1 + 1.0 * 1) / 110  # (sum of the values) / (sum of the tokens)
    torch.testing.assert_close(
        collected[f"{ex.experts}.2.gate_up"].value, torch.full((64,), 50 * pooled_mean)
    )
    torch.testing.assert_close(
        collected[f"{ex.experts}.1.gate_up"].value, torch.full((64,), 1 + 40 * pooled_mean)
    )
    assert collected[f"{ex.experts}.0.gate_up"].value[0] == 4.0  # enough tokens: unchanged


def test_random_expert_removal_is_a_seeded_baseline():
    kept = []
    for _ in range(2):
        model = tiny_model("mixtral")
        report = sparsekit.prune(
            model, method="random-experts", sparsity=0.5, calib=calib_ids(), show_progress=False
        )
        kept.append([b["kept"] for b in report.experts])
    assert kept[0] == kept[1] and all(len(k) == 4 for k in kept[0])
    assert len({tuple(k) for k in kept[0]}) > 1  # a different draw per block


def test_adaptive_counts_take_the_cheapest_experts_across_blocks_within_routing_floors():
    from sparsekit.pruning.structured.experts import adaptive_counts

    ex = {b.index: b.experts for b in describe(tiny_model("mixtral")) if b.experts}  # 8 experts, top_k 2
    flat = torch.ones(8)  # every expert of block 0 matters alike
    skewed = torch.tensor([10.0, 10.0, 10.0, 0.1, 0.1, 0.1, 0.1, 0.1])  # block 1: five near-idle experts
    scores = {i: (skewed if i == 1 else flat) for i in ex}
    counts = adaptive_counts(scores, keep=4, ex=ex)  # uniform would keep 4 per block
    assert sum(ex[i].num_experts - c for i, c in counts.items()) == 4 * len(ex)  # the same total removed
    assert counts[1] == 3  # its five idle experts go first, then equal costs: the blocks take turns
    assert sorted(c for i, c in counts.items() if i != 1) == [4, 4, 5]
    # a block whose experts are all near-idle still keeps the router's top_k
    scores = {i: (torch.full((8,), 1e-6) if i == 0 else torch.arange(1.0, 9.0)) for i in ex}
    scores[0][0] = 1.0  # normalised, block 0's other experts cost ~0
    assert adaptive_counts(scores, keep=6, ex=ex)[0] == 2


def test_adaptive_expert_counts_save_per_block_and_reload_through_sparsekit(tmp_path):
    import transformers

    model = tiny_model("qwen3_moe")
    first = next(b for b in describe(model) if b.experts)
    with torch.no_grad():  # block 0: seven of its eight experts nearly silent
        first.module.get_submodule(first.experts.experts).down_proj[1:] *= 0.01
    report = sparsekit.prune(
        model, method="reap", sparsity=0.5, widths="adaptive", calib=calib_ids(8, 24), show_progress=False
    )
    counts = [b["kept"] for b in report.experts]
    assert not report.uniform_widths and len(counts[0]) == 2  # down to top_k; the others keep more
    assert 0 in counts[0] and all(len(k) >= 4 for k in counts[1:])
    assert sum(len(k) for k in counts) == 4 * len(counts)  # the uniform budget: half of 8 per block
    assert [w["experts"] for w in model.config.block_widths] == [len(k) for k in counts]
    ids = calib_ids(2, 10)
    expected = model(ids, use_cache=False).logits
    sparsekit.save(model, tmp_path / "m")
    torch.testing.assert_close(sparsekit.load(tmp_path / "m")(ids, use_cache=False).logits, expected)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(loaded(ids, use_cache=False).logits, expected)
