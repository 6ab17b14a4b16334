"""LLM-Pruner against an independent reference: full-batch autograd gradients (and per-sequence
ones for the Fisher term), group importances summed over explicit index sets of a Llama's
separate q/k/v/o and gate/up/down weights, the kept channels and KV groups the top ones in blocks
4 .. L-3 and the other blocks untouched. One family per layout is cut and checked against the
dense model with the removed structures zeroed (``bench/coverage.py``'s "llm-pruner" column runs
all 30)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sparsekit
from sparsekit.bench.coverage import _kept_cols, run_cell
from sparsekit.models import describe
from sparsekit.pruning.structured import StructuredConfig, structured_method
from sparsekit.pruning.structured.llm_pruner import channel_importance, head_importance, taylor_saliences
from tests.pruning.test_structured import calib, make
from tests.pruning.test_subblock import LAYOUTS


def _grads(model, ids):
    """{parameter name: gradient} of the mean next-token loss over every predicted token of ids."""
    out = model(ids, use_cache=False).logits
    loss = F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
    names = [n for n, p in model.named_parameters() if n.endswith("proj.weight")]
    params = dict(model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names]), strict=True))


def _reference(model, ids, layer: int, importance: str):
    """(head scores [heads], channel scores [intermediate]) of one Llama block, from first principles."""
    params = dict(model.named_parameters())
    grads = _grads(model, ids)
    fisher = {}
    if importance == "element2":
        for seq in ids:
            for n, g in _grads(model, seq[None]).items():
                fisher[n] = fisher.get(n, 0) + g.double() ** 2 / len(ids)
    p = f"model.layers.{layer}."

    def sal(name):
        w, g = params[p + name].detach().double(), grads[p + name].double()
        return w * g - 0.5 * w * w * fisher[p + name] if importance == "element2" else w * g

    def part(name, index, dim):
        s = sal(name).index_select(dim, index)
        if importance == "vector":
            return s.sum(1 - dim).abs().sum()
        return s.abs().sum()

    heads, kv, hd, inter = 4, 2, 16, 128
    head = []
    for h in range(heads):
        rows, kv_rows = torch.arange(h * hd, (h + 1) * hd), torch.arange((h // 2) * hd, (h // 2 + 1) * hd)
        own = part("self_attn.q_proj.weight", rows, 0) + part("self_attn.o_proj.weight", rows, 1)
        shared = part("self_attn.k_proj.weight", kv_rows, 0) + part("self_attn.v_proj.weight", kv_rows, 0)
        head.append(own + shared / (heads // kv))
    chan = [
        sum(part(f"mlp.{n}_proj.weight", torch.tensor([c]), 0) for n in ("gate", "up"))
        + part("mlp.down_proj.weight", torch.tensor([c]), 1)
        for c in range(inter)
    ]
    return torch.stack(head), torch.stack(chan)


@pytest.mark.parametrize("importance", ["element1", "element2", "vector"])
def test_group_importances_match_autograd_by_index_sets(importance):
    model = make("llama", layers=8)
    ids = calib(4, 12)
    block = describe(model)[5]
    names = [f"self_attn.{n}_proj" for n in "qkvo"] + [f"mlp.{n}_proj" for n in ("gate", "up", "down")]
    sal = taylor_saliences(model, [block.linear(n) for n in names], ids, batch_size=2, importance=importance)
    by_name = {n: sal[block.linear(n)] for n in names}
    vector = importance == "vector"
    want_heads, want_channels = _reference(copy.deepcopy(model), ids, 5, importance)
    torch.testing.assert_close(head_importance(block, by_name, vector), want_heads, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(
        channel_importance(block, by_name, vector), want_channels, rtol=1e-4, atol=1e-9
    )
    assert all(p.grad is None for p in model.parameters())


def test_blocks_4_to_l_minus_3_keep_their_most_important_channels_and_the_rest_stay_whole():
    model = make("llama", layers=8)
    ids = calib(4, 12)
    pruned = copy.deepcopy(model)
    config = StructuredConfig(sparsity=0.15, batch_size=2, show_progress=False)
    report = structured_method("llm-pruner").prune(pruned, ids, config)
    assert list(report.timings_s)[0] == "gradients"
    dense, cut = describe(model), describe(pruned)
    for i in range(8):
        d, c = dense[i].linear("mlp.down_proj").weight, cut[i].linear("mlp.down_proj").weight
        if i not in (4, 5):
            assert torch.equal(d, c), f"block {i} is outside 4 .. L-3 and must stay whole"
            continue
        _, scores = _reference(copy.deepcopy(model), ids, i, "element1")
        kept = _kept_cols(d.detach(), c.detach())
        assert kept == sorted(scores.topk(len(kept)).indices.tolist())
        assert len(kept) < 128
    removed = report.block_params_before - report.block_params_after
    assert removed == pytest.approx(0.15 * report.block_params_before, rel=0.1)


def test_options_and_limits_are_checked():
    model = make("llama", layers=8)
    with pytest.raises(ValueError, match="importance is llm-pruner"):
        sparsekit.prune(model, method="flap", sparsity=0.2, calib=calib(2, 8), importance="vector")
    with pytest.raises(ValueError, match="importance"):
        StructuredConfig(importance="taylor")
    with pytest.raises(ValueError, match="ask for less"):
        structured_method("llm-pruner").prune(
            model, calib(2, 8), StructuredConfig(sparsity=0.9, show_progress=False, batch_size=2)
        )


@pytest.mark.parametrize("family", LAYOUTS)
def test_every_layout_cuts_consistently(family):
    cell = run_cell(family, "llm-pruner")
    assert cell.status == "OK", cell.detail
