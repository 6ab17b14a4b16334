"""The model anatomy: what it finds in each family, the fused q/k/v row layouts, per-block inputs
of hybrid and sliding-window models, and refusals that name the module."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsekit
from sparsekit.bench.coverage import CELLS, FAMILIES, calib_ids, tiny_config, tiny_model
from sparsekit.models import UnsupportedArchitecture, describe
from sparsekit.pruning.capture import capture_block_inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_described(family):
    anatomy = describe(tiny_model(family))
    assert len(anatomy) == 4 and anatomy.model_type == family
    assert not anatomy.width_problems(), anatomy.width_problems()
    for block in anatomy:
        assert block.mlp is not None and block.mlp.intermediate > 0
        a = block.attention
        if a is None:  # a hybrid's other token mixer, kept whole
            assert block.mixer and family in ("qwen3_5_text", "lfm2")
            continue
        assert a.heads % a.kv_heads == 0 and a.head_dim > 0
        assert set(a.producers) <= set(block.linears) and a.o in block.linears


@pytest.mark.parametrize(
    ("family", "layout", "q_width"),
    [
        ("gpt_neox", "per_head", 1),
        ("phi3", "concat", 1),
        ("gpt2", "concat", 1),
        ("falcon", "concat", 1),
        ("qwen3_5_text", "separate", 2),
        ("llama", "separate", 1),
    ],
)
def test_fused_and_gated_projections_are_recognised(family, layout, q_width):
    a = next(b.attention for b in describe(tiny_model(family)) if b.attention)
    assert (a.layout, a.q_width) == (layout, q_width)


def _falcon_grouped():
    config = tiny_config("falcon")
    config.new_decoder_architecture, config.num_kv_heads = True, 2
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("column", ["wanda-sp", "flap uniform", "flap adaptive"])
def test_grouped_fused_qkv_width_cut_equals_the_zeroed_dense_model(column, tmp_path):
    dense = _falcon_grouped()
    assert describe(dense)[0].attention.layout == "grouped"
    CELLS[column](dense, tmp_path)  # raises on a mismatch with the zeroed reference


def test_each_block_gets_its_own_inputs_on_sliding_window_and_hybrid_models():
    """Running the blocks in order on the captured inputs reproduces the model's own hidden states:
    sliding and full layers get their own masks (a sliding window shorter than the sequence makes
    them differ), linear-attention layers theirs."""
    for family, extra in (("gemma3_text", {"sliding_window": 4}), ("qwen3_5_text", {}), ("lfm2", {})):
        config = tiny_config(family)
        for k, v in extra.items():
            setattr(config, k, v)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        anatomy = describe(model)
        ids = calib_ids(2, 16)
        # one sequence per chunk: block 0 computes on the first chunk only, a stand-in records the rest
        chunks = capture_block_inputs(model, anatomy.blocks, ids, 1, torch.device("cpu"))
        assert len(chunks) == 2
        with torch.no_grad():
            want = model(ids, output_hidden_states=True, use_cache=False).hidden_states
            for c, chunk in enumerate(chunks):
                hidden = chunk.hidden
                torch.testing.assert_close(hidden, want[0][c : c + 1])
                for i, block in enumerate(anatomy.blocks[:-1]):
                    hidden = chunk.run(block, i, hidden)
                    torch.testing.assert_close(hidden, want[i + 1][c : c + 1], rtol=1e-5, atol=1e-5)


def test_a_model_without_a_decoder_stack_names_what_it_saw():
    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.LayerNorm(4)]))  # blocks without linears
    with pytest.raises(UnsupportedArchitecture, match=r"module lists: 0 \(1\)"):
        describe(model)


def test_anatomy_is_computed_once_and_renewed_after_blocks_are_removed():
    model = tiny_model("llama")
    first = describe(model)
    assert describe(model) is first
    sparsekit.prune(model, method="shortgpt", remove_layers=1, calib=calib_ids(), show_progress=False)
    again = describe(model)
    assert again is not first and len(again) == 3


def test_depth_removal_slices_per_layer_config_lists_and_keeps_the_cache_working():
    model = tiny_model("gemma3_text")
    types = list(model.config.layer_types)
    report = sparsekit.prune(
        model, method="shortgpt", remove_layers=2, calib=calib_ids(), show_progress=False
    )
    kept = [t for i, t in enumerate(types) if i not in report.removed_blocks]
    assert model.config.layer_types == kept and model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in describe(model).blocks] == [0, 1]
    CELLS["shortgpt"](copy.deepcopy(tiny_model("gemma3_text")), None)
