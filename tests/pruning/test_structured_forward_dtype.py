"""The width methods' and the cosine depth criteria's calibration forwards in another dtype
(``StructuredConfig.forward_dtype``): the statistics hooks fire on the cast copy that runs, the
model's own weights keep their dtype, the bf16 statistics and depth scores match the fp32 ones
within bf16's rounding, the refit runs on bf16 inputs, and the option is refused by the structured
methods that do not honour it."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsekit._checks import check_prune_request
from sparsekit.models import describe
from sparsekit.pruning.capture import cast_chunks
from sparsekit.pruning.structured import StructuredConfig, structured_method
from sparsekit.pruning.structured.passes import capture
from sparsekit.pruning.structured.width import collect_stats
from tests.pruning.test_structured import calib, make


def _stats(model, dtype: torch.dtype):
    anatomy = describe(model)
    chunks = capture(model, calib(8, 16), 4, torch.device("cpu"))
    cast_chunks(chunks, dtype)
    return collect_stats(anatomy, chunks, torch.device("cpu"), show_progress=False)


def test_bf16_statistics_match_fp32_within_bf16_rounding():
    model = make("llama", layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp32, bf16 = _stats(model, torch.float32), _stats(model, torch.bfloat16)
    for a, b in zip(fp32, bf16, strict=True):
        for x, y in ((a.attn, b.attn), (a.mlp, b.mlp)):
            assert x.count == y.count > 0
            # sums of squares: every token's value rounded to bf16 (8 bits) through 3 blocks
            torch.testing.assert_close(y.sq_sum, x.sq_sum, rtol=0.05, atol=1e-3)
            assert not torch.equal(x.sq_sum, y.sq_sum)  # the bf16 pass really ran in bf16
    after = model.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("refit", [False, True], ids=["cut", "refit"])
@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_width_methods_prune_with_bf16_forwards(method, refit):
    dense = make("llama", layers=3)
    reports, models = {}, {}
    for dtype in ("model", "bfloat16"):
        models[dtype] = copy.deepcopy(dense)
        config = StructuredConfig(sparsity=0.4, refit=refit, forward_dtype=dtype, show_progress=False)
        reports[dtype] = structured_method(method).prune(models[dtype], calib(16, 16), config)
    assert reports["model"].forward_dtype == "float32"
    assert reports["bfloat16"].forward_dtype == "bfloat16"
    assert all(p.dtype == torch.float32 for p in models["bfloat16"].parameters())
    assert reports["bfloat16"].removed_fraction == pytest.approx(reports["model"].removed_fraction, abs=0.02)
    ids = calib(2, 16)
    with torch.no_grad():
        a = models["model"](ids).logits
        b = models["bfloat16"](ids).logits
    assert torch.isfinite(b).all()
    # the same method on slightly different statistics: close outputs, not identical ones
    assert (a - b).norm() / a.norm() < 0.5


def test_forward_dtype_is_refused_where_no_forward_runs_in_it():
    for method, options in (
        ("shortened-ppl", {"remove_layers": 1}),
        ("minitron", {}),
        ("blockpruner", {}),
    ):
        with pytest.raises(ValueError, match=r"forward_dtype \(--forward-dtype\) does nothing with"):
            check_prune_request(method, 0.2 if not options else None, {**options, "forward_dtype": "bf16"})
    for method, options in (
        ("flap", {}),
        ("wanda-sp", {}),
        ("llm-pruner", {"refit": True}),
        ("shortgpt", {}),
        ("angular", {}),
    ):
        config = check_prune_request(method, 0.2, {**options, "forward_dtype": "bf16"}).config
        assert config.forward_dtype == torch.bfloat16
    # llm-pruner's scores come from gradients: without a refit or compensation nothing runs in it
    with pytest.raises(ValueError, match="add one, or drop it"):
        check_prune_request("llm-pruner", 0.2, {"forward_dtype": "bf16"})
    # the depth repair fits on the model dtype's states, so its scoring pass runs in that dtype too
    with pytest.raises(ValueError, match="the repair fits its maps"):
        check_prune_request("shortgpt", 0.2, {"repair": True, "forward_dtype": "bf16"})
    with pytest.raises(ValueError, match="forward_dtype"):
        StructuredConfig(forward_dtype="half-ish")
    with pytest.raises(ValueError, match="the repair fits its maps"):  # the config alone refuses it too
        StructuredConfig(remove_layers=1, repair=True, forward_dtype="bf16")


@pytest.mark.parametrize("method", ["shortgpt", "angular"])
def test_cosine_depth_criteria_score_in_the_forward_dtype(method):
    """bf16 forwards: scores within bf16's rounding of the fp32 ones (a cosine of 8-bit-mantissa
    states), the report says bf16, the kept blocks keep fp32 weights; with the repair the scoring
    stays in the model's dtype."""
    dense = make("llama", layers=6)
    ids = calib(16, 32)
    reports = {}
    for dtype in ("model", "bfloat16"):
        model = copy.deepcopy(dense)
        config = StructuredConfig(remove_layers=2, forward_dtype=dtype, show_progress=False)
        reports[dtype] = structured_method(method).prune(model, ids, config)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    fp32, bf16 = reports["model"], reports["bfloat16"]
    assert (fp32.forward_dtype, bf16.forward_dtype) == ("float32", "bfloat16")
    a, b = torch.tensor(fp32.block_scores), torch.tensor(bf16.block_scores)
    assert not torch.equal(a, b)  # the bf16 pass really ran in bf16
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.01)
    repaired = StructuredConfig(remove_layers=2, repair=True, show_progress=False)
    report = structured_method(method).prune(copy.deepcopy(dense), ids, repaired)
    assert report.forward_dtype == "float32"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--method", "flap", "--sparsity", "0.2", "--then-method", "sparsegpt", "--then-sparsity", "2:4"],
         {"flap": torch.float32, "sparsegpt": torch.float32}),
        (["--method", "angular", "--remove-layers", "2", "--then-method", "flap", "--then-sparsity", "0.2"],
         {"angular": torch.float32, "flap": torch.float32}),
        (["--method", "angular", "--remove-layers", "2", "--repair", "--then-method", "flap",
          "--then-sparsity", "0.2"],
         {"angular": "auto", "flap": torch.float32}),  # with the repair the depth step runs none in it
        (["--method", "shortgpt", "--remove-layers", "2", "--then-method", "wanda"],
         {"shortgpt": torch.float32, "wanda": torch.float32}),
        (["--method", "shortened-ppl", "--remove-layers", "2", "--then-method", "wanda"],
         {"shortened-ppl": "auto", "wanda": torch.float32}),
    ],
    ids=["width-then-per-layer", "depth-then-width", "repaired-depth-then-width", "depth-then-per-layer",
         "ppl-depth-then-per-layer"],
)  # fmt: skip
def test_the_cli_gives_forward_dtype_to_every_stacked_step_that_runs_forwards(argv, expected, tmp_path):
    from sparsekit.cli import _check_prune_args, build_parser

    args = build_parser().parse_args(
        ["prune", "smollm2", *argv, "--forward-dtype", "fp32", "--out", str(tmp_path / "o")]
    )
    steps = _check_prune_args(args)
    assert {method: request.config.forward_dtype for method, request in steps} == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_channel_stats_of_half_precision_inputs_match_float64(dtype):
    from sparsekit.pruning.structured.width import ChannelStats

    g = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(4, 64, 48, generator=g) * 3 + 1).to(dtype) for _ in range(3)]
    stats = ChannelStats()
    for x in chunks:
        stats(None, (x,))
    ref = torch.cat([x.reshape(-1, 48).double() for x in chunks])  # the same rounded values, in float64
    assert stats.count == ref.shape[0] and stats.sum.dtype == torch.float64
    torch.testing.assert_close(stats.sum, ref.sum(0), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(stats.sq_sum, (ref * ref).sum(0), rtol=1e-6, atol=1e-4)


def test_a_cast_copy_of_a_blocks_anatomy_names_the_copys_linears():
    from sparsekit.pruning.capture import cast_runner
    from sparsekit.pruning.structured.passes import running_copy

    block = describe(make("llama", layers=1))[0]
    run = cast_runner(block.module, torch.bfloat16)
    view = running_copy(block, run)
    assert run is not block.module and view.module is run
    assert view.linears.keys() == block.linears.keys()
    assert all(view.linears[n] is run.get_submodule(n) for n in block.linears)
    assert all(p.dtype == torch.bfloat16 for p in run.parameters())
    assert all(p.dtype == torch.float32 for p in block.module.parameters())
    assert cast_runner(block.module, torch.float32) is block.module
