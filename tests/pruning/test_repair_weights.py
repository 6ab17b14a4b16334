"""The depth repair that re-solves down_proj's weights (``repair_fit="weights"``,
``sparsekit/pruning/structured/depth.py``): its normal equations against torch.linalg.lstsq, a
fit at least as good as ReplaceMe's map on the calibration tokens of three families (gated, a
Conv1D with a bias, OPT's flattened MLP), and the option's checks."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsekit._checks import check_prune_request
from sparsekit.cli import build_parser
from sparsekit.models import describe
from sparsekit.pruning.structured import StructuredConfig, structured_method
from sparsekit.pruning.structured.depth import DenseStates, WeightsFit, repair_pass
from sparsekit.pruning.structured.passes import capture, forward
from tests.pruning.test_structured import calib, make


def _weighted(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return x.double() / target.double().norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_weights_fit_is_the_weighted_least_squares_solution(with_bias):
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(2, 30, 12, generator=g), torch.randn(1, 30, 12, generator=g)]
    rest = [torch.randn(x.shape[:-1] + (5,), generator=g) for x in a]
    target = [torch.randn(x.shape[:-1] + (5,), generator=g) + 3.0 for x in a]
    bias = torch.randn(5, generator=g, dtype=torch.float64) if with_bias else None
    fit = WeightsFit(12, 5, "cpu")
    for x, r, t in zip(a, rest, target, strict=True):
        fit.add(x, r, t)
    solved = fit.solve(torch.zeros(5, 12, dtype=torch.float64), bias, damp=0.0)
    x = torch.cat([v.reshape(-1, 12) for v in a])
    t = torch.cat([x.reshape(-1, 5) for x in target])
    r = torch.cat([x.reshape(-1, 5) for x in rest])
    rhs = t.double() - r.double() - (bias if with_bias else 0.0)
    reference = torch.linalg.lstsq(_weighted(x, t), _weighted(rhs, t)).solution.T  # [5, 12]
    torch.testing.assert_close(solved, reference, rtol=1e-5, atol=1e-5)


def test_a_large_damp_gives_back_the_anchor():
    g = torch.Generator().manual_seed(1)
    fit = WeightsFit(6, 4, "cpu")
    fit.add(torch.randn(40, 6, generator=g), torch.randn(40, 4, generator=g), torch.randn(40, 4, generator=g))
    anchor = torch.randn(4, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fit.solve(anchor, None, damp=1e12), anchor, rtol=1e-6, atol=1e-6)


def _repaired_error(model, ids, removed: list[int], fit: str) -> float:
    """The token-weighted squared error of the repaired block's output against the dense model's
    hidden state after the cut (what both fits minimise), on the calibration tokens."""
    anatomy = describe(model)
    chunks = capture(model, ids, 4, torch.device("cpu"))
    dense = DenseStates(anatomy.blocks, chunks, torch.device("cpu"), budget_bytes=0)
    start, end = removed[0], removed[-1] + 1
    want = [t.clone() for t in dense.input_of(end)]
    before = dense.input_of(start - 1)
    repair_pass(anatomy, chunks, removed, dense, torch.device("cpu"), fit)
    got = forward(anatomy.blocks[start - 1], chunks, start - 1, before)
    return sum(_weighted(g - w, w).pow(2).sum().item() for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_the_weights_fit_beats_the_map_on_its_calibration_tokens(arch):
    dense = make(arch, layers=5)
    ids = calib(16, 16)  # 256 tokens: more than the MLP's inputs
    errors = {fit: _repaired_error(copy.deepcopy(dense), ids, [2, 3], fit) for fit in ("map", "weights")}
    assert errors["weights"] < 0.98 * errors["map"], errors


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_weights_repair_through_the_method(arch):
    dense = make(arch, layers=5)
    ids = calib(16, 16)
    out = {}
    for fit in ("map", "weights"):
        model = copy.deepcopy(dense)
        config = StructuredConfig(remove_layers=2, repair=True, repair_fit=fit, show_progress=False)
        report = structured_method("angular").prune(model, ids, config)
        out[fit] = (report.removed_blocks, report.repaired_blocks, model)
    assert out["map"][:2] == out["weights"][:2]  # the same cut, a different fit
    assert out["map"][1], "the cut starts at block 0: nothing was repaired, pick another model"
    a, b = (describe(out[f][2])[out["map"][1][0]] for f in ("map", "weights"))
    assert not torch.equal(a.linear(a.mlp.down).weight, b.linear(b.mlp.down).weight)


def test_repair_fit_needs_the_repair():
    with pytest.raises(ValueError, match="add repair=True"):
        StructuredConfig(remove_layers=2, repair_fit="weights")
    with pytest.raises(ValueError, match="choose one of map, weights"):
        StructuredConfig(remove_layers=2, repair=True, repair_fit="down")
    options = {"remove_layers": 2, "repair": True, "repair_fit": "weights"}
    request = check_prune_request("angular", None, options)
    assert request.config.repair_fit == "weights"
    with pytest.raises(ValueError, match="do nothing with flap"):
        check_prune_request("flap", 0.2, {"repair": True, "repair_fit": "weights"})
    args = build_parser().parse_args(
        ["prune", "smollm2", "--method", "angular", "--remove-layers", "2", "--repair"]
        + ["--repair-fit", "weights"]
    )
    assert args.repair_fit == "weights"
