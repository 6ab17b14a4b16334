"""Sub-block removal (BlockPruner) against an independent greedy search: at every step the
perplexity of each candidate computed from the full model's logits on a deep copy with that
sub-block removed (no stored states, no tail stand-ins), on several families; the stop rule, the
lazy search, what may not be removed (KV-sharing attention, a Mixture-of-Experts MLP) and the
option checks. Family coverage with save / reload and cached decoding: ``bench/coverage.py``'s
"blockpruner" column, run here on every family."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import sparsekit
from sparsekit.bench.coverage import FAMILIES, _kept_cols, run_cell, tiny_config, tiny_moe_config
from sparsekit.models import describe
from sparsekit.pruning.structured import StructuredConfig, skip_subblock, structured_method
from sparsekit.pruning.structured.layout import keep_channels
from sparsekit.pruning.structured.subblock import candidates
from tests.pruning.test_structured import calib, make


def _ppl(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(ids, use_cache=False).logits.float()
    return math.exp(F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1)).item())


def _reference_greedy(model, ids, steps: int, kinds=("attention", "mlp")) -> list[tuple[int, str, float]]:
    """Greedy removal by brute force: each candidate deleted on a deep copy, ppl from logits."""
    model, chosen = copy.deepcopy(model), []
    for _ in range(steps):
        scores = {}
        for cand in candidates(describe(model), kinds):
            trial = copy.deepcopy(model)
            skip_subblock(describe(trial)[cand.block], cand.kind)
            scores[(cand.block, cand.kind)] = _ppl(trial, ids)
        (block, kind), ppl = min(scores.items(), key=lambda kv: (kv[1], kv[0]))
        skip_subblock(describe(model)[block], kind)
        chosen.append((block, kind, ppl))
    return chosen


def _prune(model, ids, sparsity, method="blockpruner", **kw):
    config = StructuredConfig(sparsity=sparsity, batch_size=2, show_progress=False, **kw)
    return structured_method(method).prune(model, ids, config)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "gpt2", "opt"])
def test_each_step_takes_the_sub_block_whose_removal_gives_the_lowest_perplexity(arch):
    model = make(arch, layers=3)
    ids = calib(5, 12)  # batches of 2, 2 and 1: every predicted token counts once
    report = _prune(copy.deepcopy(model), ids, 0.45)
    steps = report.removed_subblocks
    assert len(steps) >= 2
    expected = _reference_greedy(model, ids, len(steps))
    assert [(s["block"], s["kind"]) for s in steps] == [(b, k) for b, k, _ in expected]
    assert [s["ppl"] for s in steps] == pytest.approx([p for _, _, p in expected], rel=1e-5)
    assert all(s["evaluated"] == len(candidates(describe(model))) - i for i, s in enumerate(steps))


def test_removal_stops_within_half_a_sub_block_of_the_target():
    model = make("llama", layers=4)
    report = _prune(model, calib(4, 12), 0.2)
    sizes = {s["kind"]: s["params"] for s in report.removed_subblocks}
    removed = report.block_params_before - report.block_params_after
    assert removed == sum(s["params"] for s in report.removed_subblocks)
    assert abs(removed - 0.2 * report.block_params_before) <= max(sizes.values()) / 2
    skipped = [(b.index, kind) for b in describe(model) for kind in b.skipped]
    assert sorted(skipped) == sorted((s["block"], s["kind"]) for s in report.removed_subblocks)
    assert model.config.block_widths == report.widths


def test_lazy_search_scores_fewer_candidates_and_starts_like_the_exhaustive_one():
    model = make("llama", layers=4)
    ids = calib(4, 12)
    full = _prune(copy.deepcopy(model), ids, 0.4)
    lazy = _prune(copy.deepcopy(model), ids, 0.4, subblock_search="lazy")
    assert lazy.removed_subblocks[0] == full.removed_subblocks[0]
    assert sum(s["evaluated"] for s in lazy.removed_subblocks) < sum(
        s["evaluated"] for s in full.removed_subblocks
    )


def test_kv_sharing_attention_is_never_removed():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    types = ["sliding_attention", "full_attention"] * 2
    config = tiny_config("gemma4_text", num_kv_shared_layers=2, layer_types=types)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert not any(c.kind == "attention" for c in candidates(describe(model)))  # 0-1 hand on, 2-3 read
    report = _prune(model, calib(4, 12), 0.3)
    assert {s["kind"] for s in report.removed_subblocks} == {"mlp"}


def test_a_mixture_of_experts_block_loses_attention_not_its_experts():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_moe_config("qwen3_moe")).eval()
    kinds = {(c.block, c.kind) for c in candidates(describe(model))}
    moe = [b.index for b in describe(model) if b.experts is not None]
    assert moe and not any((i, "mlp") in kinds for i in moe) and all((i, "attention") in kinds for i in moe)


def test_options_are_checked_before_any_work():
    model = make("llama", layers=2)
    with pytest.raises(ValueError, match="remove_layers is for depth"):
        _prune(model, calib(2, 8), 0.2, remove_layers=1)
    with pytest.raises(ValueError, match="subblock_search"):
        StructuredConfig(subblock_search="greedy")
    with pytest.raises(ValueError, match="does nothing with flap"):
        sparsekit.prune(model, method="flap", sparsity=0.2, calib=calib(2, 8), subblock_search="lazy")
    with pytest.raises(ValueError, match="needs calibration"):
        _prune(model, None, 0.2)


def _mlp_norms(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per block, each MLP channel's L2 norm over a sequence's tokens, averaged over sequences,
    from one forward of the whole dense model (hooks on every down projection)."""
    norms, handles = {}, []
    for block in describe(model):
        down = block.linear(block.mlp.down)
        hook = lambda _m, inp, i=block.index: norms.__setitem__(i, inp[0].double().norm(dim=1).mean(0))  # noqa: E731
        handles.append(down.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return [norms[i] for i in range(len(norms))]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_2ssp_keeps_the_largest_norm_channels_then_removes_attention_like_brute_force(arch):
    model = make(arch, layers=4)
    ids = calib(6, 12)  # 72 tokens: the second stage reads all of them (it reads 2,048)
    pruned = copy.deepcopy(model)
    report = _prune(pruned, ids, 0.5, method="2ssp")
    attn, mlp = 4 * 16 * 64 * 2 + 2 * 16 * 64 * 2, 3 * 64 * 128
    count = round(4 * 0.5 ** ((mlp / attn) / 1.5))
    assert len(report.removed_subblocks) == count > 0
    staged = copy.deepcopy(model)
    for block, dense_block, norm in zip(
        describe(pruned), describe(staged), _mlp_norms(model, ids), strict=True
    ):
        down, dense_down = (
            block.linear(block.mlp.down).weight,
            dense_block.linear(dense_block.mlp.down).weight,
        )
        expected = sorted(norm.topk(down.shape[1]).indices.tolist())
        assert _kept_cols(dense_down.detach(), down.detach()) == expected
        keep_channels(dense_block, torch.tensor(expected))
    reference = _reference_greedy(staged, ids, count, kinds=("attention",))
    assert [(s["block"], s["kind"]) for s in report.removed_subblocks] == [(b, k) for b, k, _ in reference]
    removed = report.block_params_before - report.block_params_after
    assert removed == pytest.approx(0.5 * report.block_params_before, rel=0.05)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_removes_sub_blocks_decodes_and_reloads(family):
    cell = run_cell(family, "blockpruner")
    assert cell.status == "OK", cell.detail


# one family per layout the anatomy knows (separate / fused / per-head / grouped q-k-v, Conv1D,
# parallel blocks, hybrid linear-attention and convolution blocks); bench/coverage.py runs all 30
LAYOUTS = (
    "llama",
    "qwen3",
    "gemma3_text",
    "phi3",
    "gpt_neox",
    "gpt2",
    "falcon",
    "opt",
    "qwen3_5_text",
    "lfm2",
)


@pytest.mark.parametrize("family", LAYOUTS)
def test_2ssp_on_every_layout_decodes_and_reloads(family):
    cell = run_cell(family, "2ssp")
    assert cell.status == "OK", cell.detail


def test_sub_block_removal_then_2_4_saves_compressed_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    from sparsekit.bench.coverage import calib_ids, logits, tiny_model

    model = tiny_model("llama")
    report = sparsekit.prune(
        model, method="blockpruner", sparsity=0.3, calib=calib_ids(), show_progress=False
    )
    sparsekit.prune(model, method="wanda", sparsity="2:4", calib=calib_ids(), show_progress=False)
    ids = calib_ids(2, 12)
    want = logits(model, ids)
    assert sparsekit.sparsify(model).layers
    sparsekit.save(model, tmp_path / "c")
    for loaded in (sparsekit.load(tmp_path / "c"), AutoModelForCausalLM.from_pretrained(tmp_path / "c")):
        torch.testing.assert_close(logits(loaded, ids), want, rtol=1e-5, atol=1e-5)
        assert sorted((b.index, k) for b in describe(loaded) for k in b.skipped) == sorted(
            (s["block"], s["kind"]) for s in report.removed_subblocks
        )
