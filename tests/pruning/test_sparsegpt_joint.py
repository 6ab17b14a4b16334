"""SparseGPT's joint sparsification and quantization (``wbits``): the fast solve against the plain
per-column loop, the grid itself, and what the joint sweep buys over rounding afterwards."""

import pytest
import torch
from torch import nn

from sparsekit.kernels.quant import quantize_int8, round_to_grid, symmetric_steps
from sparsekit.nn import SparseLinear
from sparsekit.pruning import PLAIN_SOLVER, PruneConfig, QuantGrid, sparsegpt_solve
from tests.pruning.test_sparsegpt_solver import _hessian

CASES = [  # rows, cols, sparsity, blocksize, bits, group
    (33, 96, 0.5, 32, 4, None),
    (17, 128, "2:4", 64, 4, 32),
    (8, 200, 0.6, 64, 8, None),
    (5, 64, "4:8", 16, 3, 16),
]


def _on_grid(weight: torch.Tensor, grid: QuantGrid, dense: torch.Tensor) -> bool:
    step = grid.steps(dense)
    codes = weight / step
    qmax = 2 ** (grid.bits - 1) - 1
    return bool((codes - codes.round()).abs().max() < 1e-3) and bool(codes.abs().max() <= qmax + 1e-3)


@pytest.mark.parametrize("rows,cols,sparsity,blocksize,bits,group", CASES, ids=lambda v: str(v))
def test_joint_fast_solve_matches_plain_loop(rows, cols, sparsity, blocksize, bits, group):
    torch.manual_seed(0)
    weight, hessian = torch.randn(rows, cols), _hessian(cols)
    grid = QuantGrid(bits, group)
    fast = sparsegpt_solve(weight, hessian, sparsity, blocksize=blocksize, grid=grid)
    ref = sparsegpt_solve(weight, hessian, sparsity, blocksize=blocksize, grid=grid, solver=PLAIN_SOLVER)
    assert torch.equal(fast.mask, ref.mask)
    step = grid.steps(weight)
    # both land on the grid; a weight may sit on the other side of a rounding boundary after fp32
    # differences between the two solves, which moves it by exactly one step
    off = ((fast.weight - ref.weight).abs() / step).round()
    assert off.max() <= 1 and (off > 0).float().mean() < 0.02, (off.max(), (off > 0).float().mean())
    for result in (fast, ref):
        assert _on_grid(result.weight, grid, weight)
        assert (result.weight[~result.mask] == 0).all()


def _output_error(weight, pruned, x):
    return ((x @ (weight - pruned).T).square().sum() / (x @ weight.T).square().sum()).item()


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_joint_beats_prune_then_round(sparsity):
    """The point of the joint mode: later columns compensate the rounding too, so the layer's output
    error on its calibration inputs is lower than SparseGPT followed by rounding on the same grid."""
    torch.manual_seed(1)
    cols, tokens = 128, 512
    z = torch.randn(tokens, cols)
    x = z + (z @ (torch.randn(cols, 8) / cols**0.5)) @ torch.randn(8, cols)
    weight, hessian = torch.randn(64, cols), 2 * x.T @ x / tokens
    grid = QuantGrid(4, 32)
    joint = sparsegpt_solve(weight, hessian, sparsity, blocksize=64, grid=grid).weight
    pruned = sparsegpt_solve(weight, hessian, sparsity, blocksize=64).weight
    rounded = round_to_grid(pruned, grid.steps(weight), grid.bits)
    err_joint, err_after = _output_error(weight, joint, x), _output_error(weight, rounded, x)
    assert err_joint < 0.9 * err_after, (err_joint, err_after)


def test_steps_match_int8_scale_and_keep_zero():
    weight = torch.randn(12, 64)
    weight[3] = 0
    _, scale = quantize_int8(weight)
    assert torch.equal(symmetric_steps(weight, 8)[:, 0], scale)
    assert torch.equal(symmetric_steps(weight, 8)[3], torch.ones(64))
    grouped = symmetric_steps(weight, 4, 16)
    assert torch.allclose(grouped[0, :16], weight[0, :16].abs().max().expand(16) / 7)
    assert round_to_grid(torch.zeros(4), torch.full((4,), 0.3), 4).eq(0).all()


@pytest.mark.parametrize(
    "options,match",
    [
        ({"method": "wanda", "wbits": 4}, "method 'wanda' has none"),
        ({"method": "sparsegpt", "wgroup": 64}, "add wbits"),
        ({"method": "sparsegpt", "wbits": 9}, "2..8"),
        ({"method": "sparsegpt", "wbits": 4, "wgroup": 0}, ">= 1"),
        ({"method": "sparsegpt", "wbits": 4, "update": "admm"}, "move them off it"),
    ],
)
def test_config_refuses_what_the_grid_cannot_do(options, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**options)


def test_group_must_divide_in_features():
    with pytest.raises(ValueError, match="must divide in_features=96"):
        symmetric_steps(torch.randn(4, 96), 4, 64)


def test_engine_puts_every_pruned_layer_on_its_grid():
    from sparsekit.models import block_linears, linear_weight
    from sparsekit.pruning import find_decoder_blocks, prune_model
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    dense = {id(m): linear_weight(m).detach().clone() for b in blocks for m in block_linears(b).values()}
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    config = PruneConfig(
        method="sparsegpt", sparsity="2:4", wbits=4, wgroup=16, blocksize=16, show_progress=False
    )
    report = prune_model(model, ids, config)
    assert config.label == "sparsegpt+w4g16" and any("4-bit grid" in n for n in report.notes)
    for block in blocks:
        for module in block_linears(block).values():
            w = linear_weight(module).detach()
            assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all()
            assert _on_grid(w, QuantGrid(4, 16), dense[id(module)])
    with pytest.raises(ValueError, match="does not divide in_features"):
        prune_model(
            tiny_model("llama"), ids, PruneConfig(method="sparsegpt", wbits=4, wgroup=48, show_progress=False)
        )


STORED = [  # sparsity, bits, group, format (2:4-int8 holds 2:4 weights only)
    *((s, 8, None, "int8") for s in ("0.5", "2:4")),
    ("2:4", 8, None, "2:4-int8"),
    *((s, 4, 64, "int4") for s in ("0.5", "2:4")),
    *((s, 4, None, "int4-g32") for s in ("0.5", "2:4")),
]


@pytest.mark.parametrize("sparsity,bits,group,fmt", STORED, ids=lambda v: str(v))
def test_joint_weights_are_stored_exactly_by_the_quantized_formats(sparsity, bits, group, fmt):
    """The joint sweep leaves every kept weight on its grid; the int8 / int4 formats find that
    grid (a row whose largest code moved below 127 included) instead of rounding a second time."""
    torch.manual_seed(0)
    cols, tokens = 256, 1024
    x = torch.randn(tokens, cols)
    weight, hessian = torch.randn(96, cols), 2 * x.T @ x / tokens
    joint = sparsegpt_solve(weight, hessian, sparsity, blocksize=64, grid=QuantGrid(bits, group)).weight
    if bits == 8:  # what makes the case: rows whose largest code is below 127
        codes = joint / symmetric_steps(weight, 8)
        assert int((codes.abs().amax(1).round() < 127).sum()) > 0
    lin = nn.Linear(cols, 96, bias=False).requires_grad_(False)
    lin.weight.copy_(joint)
    stored = SparseLinear.from_linear(lin, format=fmt).dense_weight()
    torch.testing.assert_close(stored, joint, rtol=0, atol=1e-6 * float(joint.abs().max()))
