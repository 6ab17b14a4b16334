"""The block-by-block gradient pass (``passes.block_gradients``) against plain autograd through the
whole model: every decoder-block parameter's gradient of the mean next-token loss, on families
with different tails and block inputs (sliding windows, logit soft-capping, position embeddings,
Conv1D, hybrid linear-attention blocks), batch sizes that split the data unevenly."""

from __future__ import annotations

import pytest
import torch

from sparsekit.bench.coverage import calib_ids, tiny_model
from sparsekit.models import describe
from sparsekit.pruning.structured.passes import block_gradients


def _autograd(model, ids):
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    blocks = describe(model).blocks
    names = [n for n, _ in blocks.named_parameters()]
    grads = torch.autograd.grad(loss, list(blocks.parameters()), allow_unused=True)
    return {n: g for n, g in zip(names, grads, strict=True) if g is not None}


@pytest.mark.parametrize(
    "family", ["llama", "gemma2", "gemma3_text", "gpt2", "phi3", "falcon", "opt", "qwen3_5_text"]
)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_block_by_block_gradients_equal_whole_model_autograd(family, batch_size):
    model = tiny_model(family).double()
    ids = calib_ids(4, 12)
    want = _autograd(model, ids)
    # float64 weights throughout; Gemma's norms and Qwen3.5's linear attention compute in float32 inside
    tol = 1e-5 if family in ("gemma2", "gemma3_text", "qwen3_5_text") else 1e-10
    got: dict[str, torch.Tensor] = {}

    def consume(index, block):
        for name, p in block.named_parameters():
            if p.grad is not None:
                key = f"{index}.{name}"
                got[key] = got.get(key, 0) + p.grad.clone()

    block_gradients(model, ids, batch_size, torch.device("cpu"), consume)
    assert set(got) == set(want)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=tol, atol=tol * 1e-2)
    assert all(p.grad is None for p in model.parameters())


def test_gradient_scores_of_a_disk_offloaded_model_equal_the_in_memory_ones(saved_llama):
    """Blocks whose weights accelerate keeps on disk (meta tensors in the model): LLM-Pruner's
    saliences and Shortened-LLaMA's Taylor+ block scores come out as for the model in memory, and
    the weights stay offloaded."""
    from sparsekit.pruning.structured.depth import block_taylor_scores
    from sparsekit.pruning.structured.llm_pruner import taylor_saliences
    from tests.pruning.test_offload import _offloaded

    reference, tmp_path = saved_llama
    offloaded = _offloaded(tmp_path)
    assert offloaded.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    ids = calib_ids(4, 12)
    cpu = torch.device("cpu")
    want = block_taylor_scores(reference, reference.model.layers, ids, 2, cpu)
    got = block_taylor_scores(offloaded, offloaded.model.layers, ids, 2, cpu)
    assert got == pytest.approx(want, rel=1e-5)
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    for importance in ("element1", "element2"):
        sal = {}
        for model in (reference, offloaded):
            linears = [model.get_submodule(n) for n in names]
            out = taylor_saliences(model, linears, ids, 2, importance, cpu)
            sal[model] = [out[m] for m in linears]
        for a, b in zip(sal[reference], sal[offloaded], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-9)
    assert offloaded.model.layers[1].mlp.down_proj.weight.device.type == "meta"
