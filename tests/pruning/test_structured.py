"""Structured pruning on tiny random models: depth (shortgpt, angular, repair) and width
(wanda-sp, flap) against independent references (the dense model with the removed structure
zeroed or skipped), GQA validity, errors, and plain-transformers save/load."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import transformers

import sparsekit
from sparsekit.bench.coverage import zeroed_reference
from sparsekit.models import describe
from sparsekit.pruning.structured import (
    StructuredConfig,
    remove_blocks,
    structured_method,
)
from sparsekit.pruning.structured.depth import contiguous_runs, fold_map, least_squares_map
from tests.conftest import tiny_config


def make(model_type: str = "llama", layers: int = 2, **overrides):
    config = tiny_config(model_type)
    config.num_hidden_layers = layers
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = [config.layer_types[0]] * layers
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random biases so bias handling is visible
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def calib(n: int = 4, length: int = 16, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def prune(model, method, **kw):
    return structured_method(method).prune(model, calib(), StructuredConfig(show_progress=False, **kw))


# ----------------------------------------------------------------------------- width
WIDTH_CASES = [
    ("llama", {}),  # GQA 4 heads / 2 KV
    ("llama", {"num_key_value_heads": 4}),  # MHA
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", {}),  # q/k/v biases, o_proj none
    ("qwen3", {}),  # q_norm / k_norm over head_dim, explicit head_dim
    ("mistral", {}),
    ("gemma", {}),
]


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
@pytest.mark.parametrize("heads", ["group", "query"])
@pytest.mark.parametrize(
    ("arch", "overrides"), WIDTH_CASES, ids=[f"{a}-{'-'.join(o) or 'base'}" for a, o in WIDTH_CASES]
)
def test_width_pruned_model_equals_dense_with_structure_zeroed(method, heads, arch, overrides):
    dense = make(arch, **overrides)
    model = copy.deepcopy(dense)
    report = prune(model, method, sparsity=0.5, heads=heads)
    assert 0.4 < report.removed_fraction < 0.6, report.removed_fraction
    assert report.widths[0]["heads"] < dense.config.num_attention_heads
    assert report.params_after < report.params_before
    ids = calib(2, 12)
    ref = zeroed_reference(dense, model)
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-4, atol=1e-4)
    for block in describe(model):  # a valid GQA layer
        a = block.attention
        assert a.heads % a.kv_heads == 0
        assert block.module.self_attn.num_key_value_groups == a.heads // a.kv_heads
        assert block.module.self_attn.q_proj.out_features == model.config.num_attention_heads * a.head_dim
        if heads == "query" and dense.config.num_key_value_heads < dense.config.num_attention_heads:
            assert a.kv_heads == dense.config.num_key_value_heads  # KV heads all kept


def test_flap_compensation_moves_output_towards_dense():
    dense = make("llama", attention_bias=True, mlp_bias=True)
    ids = calib()
    errors = {}
    for comp in (False, True):
        model = copy.deepcopy(dense)
        prune(model, "flap", sparsity=0.4, bias_compensation=comp)
        errors[comp] = (logits(model, ids) - logits(dense, ids)).pow(2).mean().item()
    assert errors[True] < errors[False], errors


def test_compensation_skipped_with_a_note_where_the_config_cannot_hold_a_bias():
    model = make("qwen2")
    report = prune(model, "flap", sparsity=0.3)
    assert not report.bias_compensation
    assert any("bias compensation skipped" in n for n in report.notes)
    assert all(b.module.self_attn.o_proj.bias is None for b in describe(model))


def test_adaptive_widths_differ_per_block_and_hit_the_budget():
    model = make("llama", layers=4, intermediate_size=256)
    report = prune(model, "flap", sparsity=0.3, widths="adaptive")
    assert not report.uniform_widths
    assert len({w["intermediate"] for w in report.widths}) > 1
    assert report.removed_fraction == pytest.approx(0.3, abs=0.02)
    assert model.config.block_widths == report.widths
    logits(model, calib())  # runs


def test_global_selection_removes_the_lowest_scores_across_blocks_by_cost():
    from sparsekit.pruning.structured.width import Unit, select_global

    layouts = list(describe(make("llama", layers=2)))
    attn = [[Unit(b, "attn", i, 10.0, 100) for i in range(2)] for b in range(2)]
    # block 0's channels all score below block 1's: the budget comes out of block 0 first
    mlp = [
        [Unit(0, "mlp", i, -1.0 + i / 1000, 10) for i in range(128)],
        [Unit(1, "mlp", i, 1.0 + i / 1000, 10) for i in range(128)],
    ]
    config = StructuredConfig(sparsity=0.25, channel_multiple=1)
    chosen = select_global(layouts, attn, mlp, config, [2000, 2000])
    assert [len(a) for a, _ in chosen] == [0, 0]
    assert len(chosen[0][1]) == 100 and len(chosen[1][1]) == 0  # 1000 params = 100 channels of 10
    assert {u.index for u in chosen[0][1]} == set(range(100))  # the lowest of block 0


def test_global_selection_stops_nearest_the_budget_as_flaps_threshold():
    """FLAP's AL-AM threshold is the position whose cumulative cost is nearest the budget: a head
    that would overshoot by more than stopping leaves short is not removed, nor anything after it."""
    from sparsekit.pruning.structured.width import Unit, select_global

    layouts = list(describe(make("llama", layers=2)))
    config = StructuredConfig(sparsity=0.25, channel_multiple=1)  # budget 1000 of 4000
    mlp = [[Unit(b, "mlp", i, float(i), 10) for i in range(128)] for b in range(2)]
    # after 96 channels (960 params) the next unit is a head of 100: 1060 is further than 960
    attn = [[Unit(0, "attn", 0, 47.5, 100), Unit(0, "attn", 1, 99.0, 100)], []]
    chosen = select_global(layouts, attn, mlp, config, [2000, 2000])
    assert [len(a) for a, _ in chosen] == [0, 0]
    assert [len(m) for _, m in chosen] == [48, 48]
    # a head of 60 there lands nearer (1020 against 960): it goes, and then nothing more (1030)
    attn = [[Unit(0, "attn", 0, 47.5, 60), Unit(0, "attn", 1, 99.0, 60)], []]
    chosen = select_global(layouts, attn, mlp, config, [2000, 2000])
    assert [len(a) for a, _ in chosen] == [1, 0]
    assert [len(m) for _, m in chosen] == [48, 48]


@pytest.mark.parametrize(
    "bad",
    [
        dict(method="wanda-sp", sparsity=0.9, heads="group"),  # would remove every KV group
        dict(method="wanda-sp", sparsity=0.3, widths="adaptive"),
        dict(method="flap", sparsity=0.3, remove_layers=1),
    ],
)
def test_width_errors(bad):
    method = bad.pop("method")
    with pytest.raises(ValueError):
        prune(make("llama"), method, **bad)


def test_width_refuses_an_attention_it_does_not_understand():
    model = make("llama")
    attn = model.model.layers[1].self_attn
    attn.k_proj = torch.nn.Linear(64, 24, bias=False)  # 24 rows: not whole heads of 16
    with pytest.raises(sparsekit.pruning.UnsupportedArchitecture, match="block 1: self_attn: q/k/v outputs"):
        prune(model, "flap", sparsity=0.2)


def test_structured_config_errors():
    for bad in (dict(sparsity=1.0), dict(sparsity="2:4"), dict(heads="all"), dict(remove_layers=-1)):
        with pytest.raises(ValueError):
            StructuredConfig(**bad)


# ----------------------------------------------------------------------------- depth
def test_remove_blocks_matches_skipping_them_and_keeps_the_kv_cache_valid():
    dense = make("llama", layers=4)
    model = copy.deepcopy(dense)
    remove_blocks(model, [1, 2])
    assert model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    ref = copy.deepcopy(dense)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[0], ref.model.layers[3]])
    ref.config.num_hidden_layers = 2
    ids = calib(1, 10)
    torch.testing.assert_close(logits(model, ids), logits(ref, ids))
    # greedy generation with the KV cache equals greedy decoding by full recomputation
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    seq = ids
    for _ in range(5):
        seq = torch.cat([seq, logits(model, seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def _identity_blocks(model, indices):
    with torch.no_grad():
        for i in indices:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()


def test_shortgpt_removes_the_blocks_that_change_nothing():
    model = make("llama", layers=5)
    _identity_blocks(model, [1, 3])
    report = prune(model, "shortgpt", remove_layers=2)
    assert report.removed_blocks == [1, 3]
    assert report.block_scores[1] == pytest.approx(0.0, abs=1e-6)
    assert model.config.num_hidden_layers == 3
    assert report.removed_fraction == pytest.approx(0.4)


@pytest.mark.parametrize("tokens", ["all", "last"])
def test_angular_removes_the_contiguous_run_with_the_smallest_angle(tokens):
    model = make("llama", layers=6)
    _identity_blocks(model, [2, 3, 4])
    report = prune(model, "angular", remove_layers=3, tokens=tokens)
    assert report.removed_blocks == [2, 3, 4]
    assert len(report.block_scores) == 4  # starts 0..3
    assert report.block_scores[2] == pytest.approx(0.0, abs=1e-3)


def test_depth_errors():
    with pytest.raises(ValueError, match="would leave none"):
        prune(make("llama", layers=2), "shortgpt", remove_layers=2)
    gemma2 = transformers.AutoModelForCausalLM.from_config(
        transformers.Gemma2Config(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
        )
    )
    with pytest.raises(ValueError, match="straight to the residual"):
        prune(gemma2, "angular", remove_layers=1, repair=True)


def test_least_squares_map_matches_lstsq():
    torch.manual_seed(0)
    m = [torch.randn(3, 20, 8), torch.randn(2, 20, 8)]
    y = [torch.randn(3, 20, 8), torch.randn(2, 20, 8)]
    t_true = torch.randn(8, 8)
    target = [yi + mi @ t_true for mi, yi in zip(m, y, strict=True)]
    t = least_squares_map(m, y, target, damp=0.0, normalized=False)
    torch.testing.assert_close(t.float(), t_true, rtol=1e-4, atol=1e-4)
    weighted = least_squares_map(m, y, target, damp=0.0)  # a consistent system: same solution
    torch.testing.assert_close(weighted.float(), t_true, rtol=1e-4, atol=1e-4)
    a = torch.cat([x.reshape(-1, 8) for x in m]).double()
    b = torch.cat([(ti - yi).reshape(-1, 8) for ti, yi in zip(target, y, strict=True)]).double()
    torch.testing.assert_close(t, torch.linalg.lstsq(a, b).solution, rtol=1e-6, atol=1e-6)


def test_fold_map_transforms_the_output():
    lin = torch.nn.Linear(6, 4)
    x, t = torch.randn(5, 6), torch.randn(4, 4)
    expected = lin(x) @ t
    fold_map(lin, t)
    torch.testing.assert_close(lin(x), expected.detach(), rtol=1e-5, atol=1e-5)


def test_repair_lowers_the_error_on_calibration_data():
    dense = make("llama", layers=5)
    ids = calib(8, 16)
    errors = {}
    for repair in (False, True):
        model = copy.deepcopy(dense)
        structured_method("shortgpt").prune(
            model, ids, StructuredConfig(remove_layers=2, repair=repair, show_progress=False)
        )
        with torch.no_grad():
            got = model(ids, output_hidden_states=True).hidden_states[-1]
            want = dense(ids, output_hidden_states=True).hidden_states[-1]
        errors[repair] = (got - want).pow(2).mean().item()
    assert errors[True] < errors[False], errors


def test_contiguous_runs():
    assert contiguous_runs([5, 1, 2, 7, 6]) == [(1, 3), (5, 8)]


# ----------------------------------------------------------------------------- save / load
_PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert "sparsekit" not in sys.modules
ids = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(model(ids, use_cache=False).logits, sys.argv[3])
"""


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("flap", {}),
        ("flap", {"refit": True}),
        ("wanda-sp", {"heads": "query"}),
        ("angular", {"remove_layers": 1}),
    ],
)
def test_uniform_structured_model_loads_in_plain_transformers(tmp_path, method, kw):
    model = make("llama", layers=3, attention_bias=True, tie_word_embeddings=True)
    prune(model, method, sparsity=0.3, **kw)
    model.save_pretrained(tmp_path / "m")
    ids = calib(2, 10)
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            _PLAIN_LOAD,
            str(tmp_path / "m"),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "out.pt"),
        ],
        check=True,
    )
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), logits(model, ids))


def test_adaptive_widths_round_trip_through_sparsekit_and_from_pretrained(tmp_path):
    model = make("llama", layers=3, intermediate_size=256)
    prune(model, "flap", sparsity=0.3, widths="adaptive", heads="query")
    sparsekit.save(model, tmp_path / "m")
    ids = calib(2, 10)
    expected = logits(model, ids)
    torch.testing.assert_close(logits(sparsekit.load(tmp_path / "m"), ids), expected)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(logits(loaded, ids), expected)


def test_stacked_structured_then_2_4_saves_compressed(tmp_path):
    from sparsekit.nn import SparseLinear, sparsify

    model = make("llama", layers=2)
    sparsekit.prune(model, method="flap", sparsity=0.3, calib=calib(), show_progress=False)
    sparsekit.prune(model, method="wanda", sparsity="2:4", calib=calib(), show_progress=False)
    sparsify(model, format="auto")
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 14
    sparsekit.save(model, tmp_path / "m")
    ids = calib(2, 10)
    torch.testing.assert_close(logits(sparsekit.load(tmp_path / "m"), ids), logits(model, ids))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "opt", "gpt2"])
def test_depth_pruning_keeps_every_family_generating(arch):
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    report = prune(model, "angular", remove_layers=1)
    assert model.config.num_hidden_layers == 1 and len(report.removed_blocks) == 1
    ids = calib(1, 6)
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    seq = ids
    for _ in range(3):
        seq = torch.cat([seq, logits(model, seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)
