"""Minitron width pruning against independent references: the hidden cut of channels that carry
nothing leaves the model's function unchanged (norm gains and Gemma's embedding scale folded in),
importances match the paper's aggregation computed by hand, the budget lands on the requested
share, and the result saves and reloads as a plain checkpoint on one family per layout it cuts;
what it cannot cut is refused before any weight changes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsekit
from sparsekit.bench.coverage import calib_ids, tiny_config, tiny_model
from sparsekit.models import UnsupportedArchitecture, describe, hidden_map
from sparsekit.pruning.structured import StructuredConfig, structured_method
from sparsekit.pruning.structured.minitron import Importance, Moments, norm_gain


def _prune(model, ids=None, **kw):
    kw.setdefault("show_progress", False)
    return structured_method("minitron").prune(
        model, calib_ids() if ids is None else ids, StructuredConfig(**kw)
    )


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _kill_channels(model, dead: torch.Tensor) -> None:
    """Make hidden channels ``dead`` zero everywhere in the residual stream: the embedding's and
    position embeddings' columns and every row the blocks write into it."""
    hmap = hidden_map(model)
    with torch.no_grad():
        for name in hmap.writes:
            linear = model.get_submodule(name)
            conv = type(linear).__name__ == "Conv1D"
            linear.weight.index_fill_(1 if conv else 0, dead, 0.0)
            if linear.bias is not None:
                linear.bias[dead] = 0
        for name, _, _ in hmap.vectors:
            module = model.get_submodule(name)
            if isinstance(module, torch.nn.Embedding):
                module.weight[:, dead] = 0


@pytest.mark.parametrize(
    "family", ["llama", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "phi3", "qwen3_5_text"]
)
def test_cutting_dead_hidden_channels_keeps_the_function(family):
    """8 of 64 channels carry nothing; a hidden-only cut of 12.5% must remove exactly them, and
    with the norm gains (and Gemma's sqrt(hidden) embedding scale) folded in the logits stay."""
    model = tiny_model(family)
    for m in model.modules():  # eps would make the RMS of the kept channels differ by its share
        for attr in ("eps", "variance_epsilon"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 1e-30)
    dead = torch.tensor([3, 9, 17, 22, 40, 41, 50, 63])
    _kill_channels(model, dead)
    ids = calib_ids()
    before = _logits(model, ids)
    report = _prune(model, ids, sparsity=0.125, axes="hidden")
    assert model.config.hidden_size == 56
    assert describe(model).hidden_size == 56
    assert report.removed_fraction == pytest.approx(0.125, abs=0.01)
    torch.testing.assert_close(_logits(model, ids), before, atol=2e-4, rtol=2e-4)


def test_without_the_norm_gain_the_cut_would_change_the_output():
    """The check above can fail: the same cut with the norm gains left out changes the logits."""
    from sparsekit.pruning.structured import Minitron

    model = tiny_model("llama")
    dead = torch.arange(8)
    _kill_channels(model, dead)
    ids = calib_ids()
    before = _logits(model, ids)
    plain = Minitron()
    plain.norm_gains = False
    plain.prune(model, ids, StructuredConfig(sparsity=0.125, axes="hidden", show_progress=False))
    assert (_logits(model, ids) - before).abs().max() > 1e-2


def test_importance_is_the_papers_aggregation():
    """Mean of |x| over a sequence's tokens, squared, summed over sequences; heads by the L2 norm
    of their channels; the hidden score sums every block norm's output."""
    x = torch.randn(3, 5, 8)
    imp = Importance()
    imp.add(x[:2])
    imp.add(x[2:])
    ref = sum(x[b].abs().mean(0).double() ** 2 for b in range(3))
    torch.testing.assert_close(imp.value, ref)
    m = Moments()
    m.add(x)
    kept = torch.tensor([0, 2, 5])
    flat = x.reshape(-1, 8).double()
    expect = ((flat[:, kept] ** 2).mean(1).mean() / (flat**2).mean(1).mean()).sqrt()
    assert norm_gain(m, kept, 8, centered=False) == pytest.approx(float(expect), rel=1e-9)


def test_hidden_ranking_follows_the_norm_outputs():
    """The kept hidden channels are the top ones by the summed norm-output importance, recomputed
    here with plain hooks."""
    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    ids = calib_ids()
    hmap = hidden_map(ref)
    total = torch.zeros(64, dtype=torch.float64)

    def hook(m, a, out):
        nonlocal total
        total += sum(out[b].abs().double().mean(0) ** 2 for b in range(out.shape[0]))

    handles = [ref.get_submodule(n).register_forward_hook(hook) for n in hmap.norms]
    _logits(ref, ids)
    for h in handles:
        h.remove()
    emb_before = model.get_input_embeddings().weight.detach().clone()
    _prune(model, ids, sparsity=0.25, axes="hidden")
    kept = total.topk(model.config.hidden_size).indices.sort().values
    torch.testing.assert_close(model.get_input_embeddings().weight, emb_before[:, kept])


@pytest.mark.parametrize("axes", ["hidden,mlp", "hidden,mlp,heads", "mlp,heads", "hidden"])
def test_budget_lands_on_the_requested_share(axes):
    model = tiny_model("llama", layers=4)
    report = _prune(model, sparsity=0.3, axes=axes)
    assert report.removed_fraction == pytest.approx(0.3, abs=0.05)
    widths = describe(model)
    if "hidden" not in axes:
        assert model.config.hidden_size == 64
    if "mlp" not in axes:
        assert all(b.mlp.intermediate == 128 for b in widths)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3", "cohere", "olmo2"])
def test_saves_as_a_plain_checkpoint_and_reloads(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    ids = calib_ids()
    _prune(model, ids, sparsity=0.3, axes="hidden,mlp,heads")
    out = _logits(model, ids)
    assert torch.isfinite(out).all()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(again, ids), out)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "falcon", "opt", "stablelm", "helium", "lfm2"])
def test_families_that_tie_widths_to_the_hidden_size_cut_it(family):
    """Their code sizes the heads (head_dim = hidden / heads; Helium's o_proj input) or LFM2's
    convolutions by hidden_size: the cut takes whole heads or the convolution's channels with it,
    decodes with the cache as without and reloads as a plain checkpoint (the coverage cell)."""
    from sparsekit.bench.coverage import run_cell

    cell = run_cell(family, "minitron")
    assert cell.status == "OK", cell.detail


def _silence(model, eps_attrs=("eps", "variance_epsilon")) -> None:
    for m in model.modules():  # eps would make the RMS of the kept channels differ by its share
        for attr in eps_attrs:
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 1e-30)


@pytest.mark.parametrize("heads", ["group", "query"])
def test_a_tied_cut_removes_the_dead_head_with_the_dead_channels(heads):
    """Helium sizes o_proj's input by hidden_size, so 8 of 64 hidden channels go with one of its 8
    heads (head_dim 8). With 8 channels that carry nothing and head 5 silenced (its v rows zeroed),
    a hidden-only cut must remove exactly them: the logits stay."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("helium", num_attention_heads=8, num_key_value_heads=8, head_dim=8)
    ).eval()
    _silence(model)
    _kill_channels(model, torch.tensor([2, 9, 17, 30, 33, 41, 50, 60]))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[40:48] = 0
    ids = calib_ids()
    before = _logits(model, ids)
    _prune(model, ids, sparsity=0.15, axes="hidden", heads=heads)
    assert (model.config.hidden_size, model.config.num_attention_heads) == (56, 7)
    torch.testing.assert_close(_logits(model, ids), before, atol=2e-4, rtol=2e-4)


def test_lfm2_convolution_channels_follow_the_hidden_cut():
    """LFM2's convolution blocks are sized by hidden_size: with 8 stream channels and 8 channels of
    every convolution that carry nothing (their x rows of in_proj zeroed), a hidden-only cut of
    8 removes exactly those and keeps the logits."""
    model = tiny_model("lfm2")
    _silence(model)
    _kill_channels(model, torch.tensor([1, 8, 15, 22, 35, 44, 51, 62]))
    dead_inner = torch.tensor([0, 7, 19, 23, 31, 40, 48, 57])
    with torch.no_grad():
        for i in (0, 2):
            model.model.layers[i].conv.in_proj.weight[128 + dead_inner] = 0  # the x run of B, C, x
    ids = calib_ids()
    before = _logits(model, ids)
    _prune(model, ids, sparsity=0.1, axes="hidden")
    assert model.config.hidden_size == 56
    assert model.model.layers[0].conv.conv.weight.shape[0] == 56
    torch.testing.assert_close(_logits(model, ids), before, atol=2e-4, rtol=2e-4)


def test_a_convolution_that_mixes_channels_is_refused_before_any_weight_changes():
    """The check can fail: where the channels meet (here a roll of out_proj's input), cutting some
    is not zeroing them, and the hidden cut is refused with the reason."""
    model = tiny_model("lfm2")
    model.model.layers[0].conv.out_proj.register_forward_pre_hook(lambda m, a: (a[0].roll(1, -1),))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitecture, match="not independent"):
        _prune(model, sparsity=0.3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_multi_query_model_asks_for_query_heads_before_any_work():
    """Falcon (one KV head) ties head_dim to hidden_size: whole KV groups cannot go, so the default
    heads='group' is refused, naming heads='query'; with it the cut removes query heads."""
    model = tiny_model("falcon")
    with pytest.raises(UnsupportedArchitecture, match="pass heads='query'"):
        _prune(model, sparsity=0.3)
    report = _prune(model, sparsity=0.3, heads="query")
    assert model.config.hidden_size == 48 and model.config.num_attention_heads == 3
    assert report.removed_fraction == pytest.approx(0.3, abs=0.05)


def test_a_mixture_of_experts_width_cut_is_refused():
    model = tiny_model("mixtral")
    with pytest.raises(UnsupportedArchitecture, match="minitron cannot cut mixtral: .*Mixture-of-Experts"):
        _prune(model, sparsity=0.2)


def test_a_square_linear_outside_the_blocks_is_refused():
    """Gemma-4's model-level per-layer projection reads the stream; where its output happens to be
    hidden-sized too, nothing tells its sides apart, so the cut is refused."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("gemma4_text", hidden_size_per_layer_input=16)
    ).eval()
    with pytest.raises(
        UnsupportedArchitecture, match="per_layer_model_projection.weight .64, 64.: a hidden-size"
    ):
        _prune(model, sparsity=0.2)


def test_gemma4_model_level_projection_is_cut_and_its_derived_scale_follows(tmp_path):
    """The projection of the embedding into per-layer inputs loses the cut input columns, and the
    scale Gemma-4's code derives from hidden_size (hidden_size**-0.5) is reset with the old / new
    ratio folded into the projection: the reloaded checkpoint gives the in-memory logits."""
    model = tiny_model("gemma4_text")
    ids = calib_ids()
    report = _prune(model, ids, sparsity=0.3, axes="hidden,mlp,heads")
    new = model.config.hidden_size
    assert new < 64 and model.model.per_layer_model_projection.weight.shape[1] == new
    assert model.model.per_layer_model_projection_scale == pytest.approx(new**-0.5)
    assert any("per_layer_model_projection_scale follows the config" in n for n in report.notes)
    out = _logits(model, ids)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(again, ids), out)


def test_options_are_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="axes="):
        StructuredConfig(axes="hidden,depth")
    with pytest.raises(ValueError, match="refit"):
        _prune(model, sparsity=0.2, refit=True)
    with pytest.raises(ValueError, match="axes"):
        sparsekit.prune(
            model, method="flap", sparsity=0.2, axes="mlp", calib=calib_ids(), show_progress=False
        )


def test_prune_api_surface():
    model = tiny_model("llama")
    report = sparsekit.prune(
        model, method="minitron", sparsity=0.2, axes="hidden,mlp", calib=calib_ids(), show_progress=False
    )
    assert report.method == "minitron" and report.hidden_size == (64, model.config.hidden_size)
    assert model.config.hidden_size < 64 and model.config.head_dim == 16


@pytest.mark.parametrize("family", ["phi", "starcoder2", "glm4", "gemma2", "qwen3"])
def test_coverage_cell_on_more_layouts(family):
    """Parallel blocks (phi), LayerNorm with bias and a plain MLP (starcoder2), a fused gate_up with
    extra norms (glm4), post-norms and logit soft-capping (gemma2): cut, cached decoding and a plain
    reload (bench/coverage.py's "minitron" column runs all 30 families)."""
    from sparsekit.bench.coverage import run_cell

    cell = run_cell(family, "minitron")
    assert cell.status == "OK", cell.detail


def test_the_hidden_size_is_one_the_config_accepts(tmp_path):
    """A Llama config refuses a hidden size that is no multiple of its head count even with head_dim
    stated, so save_pretrained would fail after the cut: the plan takes the nearest multiple of
    channel_multiple that the config accepts (3 heads, multiple 4: 40 is refused, 36 is not)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(
        tiny_config("llama", hidden_size=48, num_attention_heads=3, num_key_value_heads=3)
    ).eval()
    ids = calib_ids()
    _prune(model, ids, sparsity=0.2, axes="hidden,mlp,heads", channel_multiple=4)
    assert model.config.hidden_size == 36 and model.config.num_attention_heads == 3
    out = _logits(model, ids)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(again, ids), out)


def test_accepted_hidden_takes_the_nearest_accepted_multiple():
    from sparsekit.pruning.structured.minitron import _accepted_hidden

    def by_nine(hidden, heads):
        return hidden % 9 == 0

    assert _accepted_hidden(512.4, 8, 576, 9, by_nine) == 504  # 512 refused; 504 is 8.4 away, 576 the total
    assert _accepted_hidden(512.4, 8, 576, 9, None) == 512
    with pytest.raises(ValueError, match="accepts no hidden size below 48"):
        _accepted_hidden(40.0, 8, 48, 3, lambda h, n: False)
