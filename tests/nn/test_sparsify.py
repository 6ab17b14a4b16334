"""sparsify on tiny random configs of every supported architecture: same logits, fewer bytes."""

import copy

import pytest
import torch
from torch import nn

from sparsekit.models import block_linears, find_decoder_blocks, linear_weight, model_bytes
from sparsekit.nn import SparseLinear, densify, set_format, sparsify
from sparsekit.pruning import PruneConfig, prune_model
from tests.conftest import TINY_ARCHS, TOL, tiny_model


def pruned_tiny(arch: str, sparsity: str = "2:4"):
    model = tiny_model(arch)
    prune_model(model, None, PruneConfig(method="magnitude", sparsity=sparsity, show_progress=False))
    return model


def random_masked_tiny(arch: str, keep: float = 0.4):
    model = tiny_model(arch)
    _, blocks = find_decoder_blocks(model)
    with torch.no_grad():
        for block in blocks:
            for module in block_linears(block).values():
                module.weight.mul_(torch.rand_like(module.weight) < keep)
    return model


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_sparsify_2_4_matches_the_dense_masked_model(arch):
    model = pruned_tiny(arch)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    sparse = copy.deepcopy(model)
    report = sparsify(sparse)
    n_linears = sum(len(block_linears(b)) for b in find_decoder_blocks(model)[1])
    assert len(report.layers) == n_linears and set(report.layers.values()) == {"2:4"}
    assert not any(isinstance(m, nn.Linear) for b in find_decoder_blocks(sparse)[1] for m in b.modules())
    out_emb = sparse.get_output_embeddings()
    assert isinstance(out_emb, nn.Linear) and not isinstance(out_emb, SparseLinear)
    # fp32 at 2:4: 0.5 * 4 + 1/8 bytes per weight
    assert report.layer_bytes_after == pytest.approx(report.layer_bytes_before * 2.125 / 4, rel=0.02)
    assert report.model_bytes_after < report.model_bytes_before == model_bytes(model)
    with torch.no_grad():
        out = sparse(ids).logits
    torch.testing.assert_close(out, ref, rtol=TOL[torch.float32][0], atol=TOL[torch.float32][1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unstructured_layers_go_bitmap_and_filter_fn_skips(arch):
    model = random_masked_tiny(arch)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        ref = model(ids).logits
    report = sparsify(model, filter_fn=lambda module, name: not name.endswith(("q_proj", "c_attn")))
    assert set(report.layers.values()) == {"bitmap"}
    assert report.skipped and set(report.skipped.values()) == {"filter_fn"}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-4)


def test_dense_layers_are_left_alone_and_2_4_refuses_unstructured():
    model = tiny_model("llama")  # not pruned: bitmap would be bigger than dense
    report = sparsify(model)
    assert not report.layers and "not sparse enough" in next(iter(report.skipped.values()))
    with pytest.raises(ValueError, match="is not 2:4"):
        sparsify(random_masked_tiny("llama"), format="2:4")


def test_set_format_and_densify_round_trip():
    model = pruned_tiny("qwen2")
    ids = torch.randint(0, 128, (1, 8))
    sparsify(model)
    with torch.no_grad():
        ref = model(ids).logits
    assert set_format(model, "masked") == 14
    assert set_format(model, "2:4") == 14
    assert densify(model) == 14
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-4)
    for block in find_decoder_blocks(model)[1]:
        for module in block_linears(block).values():
            assert (linear_weight(module) != 0).float().mean() == 0.5


def test_compile_fullgraph_has_no_graph_break():
    torch._dynamo.reset()
    model = pruned_tiny("llama")
    sparsify(model)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
        # eager backend: dynamo traces the whole model (fullgraph raises on any break) without codegen
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(ids).logits, ref, rtol=1e-5, atol=1e-4)


def test_compile_inductor_on_one_layer():
    torch._dynamo.reset()
    layer = SparseLinear.from_linear(pruned_tiny("llama").model.layers[0].mlp.up_proj)
    x = torch.randn(3, 64)
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
