"""The decode-step breakdown: every linear and attention module is attributed, the split adds up,
and a delay put into one kind of layer shows up in that layer's row and nowhere else."""

import time

import pytest
import torch

from sparsekit.bench.breakdown import CATEGORIES, consistency_rows, decode_breakdown, decode_breakdowns
from sparsekit.bench.e2e import sparsified_copy
from tests.conftest import tiny_model


def _prompt(n=8):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(0))


def test_groups_count_every_linear_and_the_split_adds_up():
    model = tiny_model("llama")  # 2 blocks: q,o 64x64; k,v 32x64; gate,up 128x64; down 64x128; lm_head 128x64
    b = decode_breakdown(model, _prompt(), new_tokens=4, rounds=2)
    groups = {g.key: g.count for g in b.groups}
    assert groups == {
        "linear 64x64 dense": 4,
        "linear 32x64 dense": 4,
        "linear 128x64 dense": 4,
        "linear 64x128 dense": 2,
        "lm_head 128x64 dense": 1,
    }
    assert b.steps == 2 * 3 and b.hooks == 15 + 2  # 15 linears, 2 attention modules
    assert all(b.categories[c] >= 0 for c in CATEGORIES if c != "rest")
    assert sum(b.categories.values()) == pytest.approx(b.step_ms, rel=0.3)  # medians of a sum, not a sum


def test_a_delay_in_one_layer_kind_lands_in_its_row():
    model = tiny_model("llama")
    for block in model.model.layers:
        block.mlp.down_proj.register_forward_hook(lambda *a: time.sleep(0.002))
    b = decode_breakdown(model, _prompt(), new_tokens=3, rounds=2)
    by_key = {g.key: g.ms_per_step for g in b.groups}
    assert by_key["linear 64x128 dense"] >= 2 * 2.0  # two down_proj per step, 2 ms each
    assert by_key["linear 64x64 dense"] < 2.0
    assert b.categories["attention"] < 2.0 and b.categories["linears"] >= 4.0


def test_sparsified_models_are_split_by_format_and_interleaved():
    model = tiny_model("llama")
    sparse, _ = sparsified_copy(model, "2:4")
    out = decode_breakdowns({"dense": model, "2:4": sparse}, _prompt(), new_tokens=3, rounds=2)
    keys = {g.key for g in out["2:4"].groups}
    assert "linear 64x64 2:4" in keys and "lm_head 128x64 dense" in keys  # the head stays dense
    assert out["2:4"].hooks == out["dense"].hooks == 17


def test_layers_alone_run_one_copy_per_layer_interleaved_and_compare():
    model = tiny_model("llama")
    b = decode_breakdown(model, _prompt(), new_tokens=3, rounds=2)
    assert set(b.layers_alone) == {g.key for g in b.groups}
    assert all(v > 0 for v in b.layers_alone.values())
    rows = consistency_rows(b)
    total = next(r for r in rows if r["what"] == "all linears + lm_head")
    assert total["per_layer_ms"] == pytest.approx(sum(b.layers_alone.values()))
    assert total["ratio"] == pytest.approx(total["per_layer_ms"] / total["in_model_ms"])
    assert rows[-1]["per_layer_ms"] == b.plain_step_ms > 0


def test_layers_alone_holds_distinct_weights_per_layer():
    from sparsekit.bench.breakdown import LayersAlone, LinearGroup

    alone = LayersAlone([LinearGroup(32, 64, "2:4", 3, False)], 1, torch.float32, "cpu")
    (fns,) = alone.calls.values()
    held = [
        next(c.cell_contents for c in f.__closure__ if isinstance(c.cell_contents, torch.nn.Module))
        for f in fns
    ]
    assert len({m.values.data_ptr() for m in held}) == 3 and all(m.format == "2:4" for m in held)
    alone.step()
    assert len(alone.samples["linear 32x64 2:4"]) == 1
