"""Mixed-precision calibration forwards (``forward_dtype="bf16-mixed"``): the block's own fp32
weights and fp32 hidden states, matmuls and attention in bf16 under ``torch.autocast``. Checked
against fp32 forwards and the full bf16 cast: hidden states stay fp32 between blocks and land
nearer fp32's than the cast's, the statistics hooks see the inputs as they come and sum them in
fp32 (outside autocast), and both engines prune with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsekit._checks import calibration_plan, check_prune_request
from sparsekit.hf.resources import ModelShape
from sparsekit.models import describe, model_dtype
from sparsekit.pruning.capture import (
    ForwardPrecision,
    cast_runner,
    check_forward_dtype,
    fast_bf16_matmuls,
    outside_autocast,
    resolve_forward_precision,
    run_block,
)
from sparsekit.pruning.engine import PruneConfig, prune_model
from sparsekit.pruning.hooks import StatsCollector, Timer
from sparsekit.pruning.method import Gram
from sparsekit.pruning.structured import StructuredConfig, structured_method
from sparsekit.pruning.structured.passes import capture
from tests.pruning.test_structured import calib, make

CPU = torch.device("cpu")
MIXED = ForwardPrecision(torch.bfloat16, mixed=True)


def _final_hidden(model, precision: ForwardPrecision) -> torch.Tensor:
    """Hidden states after every block, the blocks run at ``precision``."""
    blocks = describe(model).blocks
    chunks = capture(model, calib(4, 32), 2, CPU)
    precision.apply(chunks)
    for index, block in enumerate(blocks):
        runner = cast_runner(block, chunks[0].hidden.dtype)
        for chunk, out in zip(chunks, run_block(runner, chunks, index), strict=True):
            chunk.hidden = out
    return torch.cat([c.hidden for c in chunks])


def test_mixed_keeps_fp32_states_and_lands_nearer_fp32_than_the_cast():
    model = make("llama", layers=4)
    fp32 = _final_hidden(model, ForwardPrecision(torch.float32))
    cast = _final_hidden(model, ForwardPrecision(torch.bfloat16))
    mixed = _final_hidden(model, MIXED)
    assert mixed.dtype == torch.float32 and cast.dtype == torch.bfloat16

    def err(x):
        return ((x.float() - fp32).norm() / fp32.norm()).item()

    assert 0 < err(mixed) < err(cast), (err(mixed), err(cast))  # > 0: the matmuls did run in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_hooks_outside_autocast_sum_in_fp32():
    """A hook's own matmul on a mixed forward stays fp32 only when it runs outside autocast."""
    layer = nn.Linear(16, 8)
    seen = {}

    def hook(name):
        def record(_m, args):
            seen[name] = (args[0].T @ args[0]).dtype

        return record

    layer.register_forward_pre_hook(hook("inside"))
    layer.register_forward_pre_hook(outside_autocast(hook("outside")))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(4, 16)).dtype == torch.bfloat16
    assert seen == {"inside": torch.bfloat16, "outside": torch.float32}


def test_the_gram_of_a_mixed_forward_is_the_fp32_gram_of_the_inputs_it_saw():
    """down_proj (K = 640: the tiled Gram, GEMMs autocast would turn bf16) fed by bf16 matmuls, and
    q_proj fed by the fp32 norm: each Gram equals the float64 product of the inputs the layer saw."""
    model = make("llama", layers=1, intermediate_size=640)
    anatomy = describe(model)
    chunks = capture(model, calib(4, 32), 4, CPU)
    MIXED.apply(chunks)
    block = anatomy[0].module
    linears = {"q": block.self_attn.q_proj, "down": block.mlp.down_proj}
    inputs = {}
    for name, module in linears.items():
        module.register_forward_pre_hook(lambda _m, a, n=name: inputs.setdefault(n, a[0].detach().clone()))
    collector = StatsCollector(linears, Gram(), Timer(CPU))
    run_block(block, chunks, 0, collector.next_chunk)
    stats = collector.finish()
    assert inputs["q"].dtype == torch.float32 and inputs["down"].dtype == torch.bfloat16
    for name, x in inputs.items():
        x = x.reshape(-1, x.shape[-1]).double()
        torch.testing.assert_close(stats[name].value.double(), x.T @ x, rtol=1e-5, atol=1e-4)


def test_forward_dtype_values():
    assert check_forward_dtype("bf16-mixed") == "bf16-mixed"
    assert check_forward_dtype("fp16-mixed") == "fp16-mixed"
    assert check_forward_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="bf16-mixed"):
        check_forward_dtype("bf16-half")
    assert resolve_forward_precision("bf16-mixed", torch.float32, CPU) == MIXED
    auto = MIXED if fast_bf16_matmuls(CPU) else ForwardPrecision(torch.float32)
    assert resolve_forward_precision("auto", torch.float32, CPU) == auto  # the default
    assert resolve_forward_precision("auto", torch.bfloat16, CPU) == ForwardPrecision(torch.bfloat16)
    assert resolve_forward_precision("model", torch.float32, CPU) == ForwardPrecision(torch.float32)
    assert MIXED.name == "bf16-mixed" and ForwardPrecision(torch.bfloat16).name == "bfloat16"


def test_the_memory_plan_counts_fp32_states_and_no_block_copy_for_mixed():
    model = make("llama", layers=2)
    shape = ModelShape.from_model(model)
    plans = {
        dtype: calibration_plan(
            check_prune_request("sparsegpt", 0.5, {"forward_dtype": dtype}), shape, model, 8, 32, False, CPU
        )
        for dtype in ("bf16", "bf16-mixed", "model")
    }
    assert plans["bf16-mixed"].forward_bytes == plans["model"].forward_bytes == 4
    assert plans["bf16"].forward_bytes == 2
    assert plans["bf16-mixed"].block_weight_copies == plans["model"].block_weight_copies
    assert plans["bf16"].block_weight_copies == plans["model"].block_weight_copies + 1


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_the_per_layer_engine_prunes_with_mixed_forwards(method):
    model = make("llama", layers=2)
    config = PruneConfig(method=method, sparsity="2:4", show_progress=False, forward_dtype="bf16-mixed")
    report = prune_model(model, calib(8, 32), config)
    assert report.forward_dtype == "bf16-mixed"
    assert model_dtype(model) == torch.float32
    assert report.overall_sparsity == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_width_methods_prune_with_mixed_forwards(method):
    model = make("llama", layers=2)
    config = StructuredConfig(sparsity=0.3, refit=True, forward_dtype="bf16-mixed", show_progress=False)
    report = structured_method(method).prune(model, calib(8, 32), config)
    assert report.forward_dtype == "bf16-mixed"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert report.removed_fraction > 0.2
