import pytest
import torch

from sparsekit import magnitude_prune, sparsegpt_prune, wanda_prune
from sparsekit.pruning import HessianNotPositiveDefinite


def _hessian(cols: int, tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(tokens, cols) * (torch.rand(cols) * 3 + 0.1)
    return x, 2.0 / tokens * x.T @ x


def _output_error(weight, pruned, hessian):
    delta = weight - pruned
    return (delta @ hessian @ delta.T).trace() / (weight @ hessian @ weight.T).trace()


def test_magnitude_is_per_layer_for_unstructured():
    # row 0 holds all the large weights: a per-layer comparison prunes row 1 entirely
    weight = torch.tensor([[4.0, 3.0, 2.0, 5.0], [0.1, 0.2, 0.3, 0.4]])
    pruned, mask = magnitude_prune(weight, 0.5)
    assert mask.tolist() == [[True] * 4, [False] * 4]
    assert torch.equal(pruned, weight * mask)


def test_wanda_ranks_per_row_with_the_l2_norm():
    # |W| * ||X||: col0 = 1 * 2 = 2 < col1 = 3 * 1 = 3 -> keep col1.
    # With the squared norm (a known porting bug) col0 would win: 1 * 4 = 4 > 3.
    weight = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    act_norm = torch.tensor([2.0, 1.0])
    _, mask = wanda_prune(weight, act_norm, 0.5)
    assert mask.tolist() == [[False, True], [True, False]]


def test_wanda_compares_within_each_row():
    weight = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.1, 0.2, 0.3, 0.4]])
    _, mask = wanda_prune(weight, torch.ones(4), 0.5)
    assert mask.sum(1).tolist() == [2, 2]  # a per-matrix comparison would prune row 1 entirely


@pytest.mark.parametrize("sparsity", [0.5, "2:4", "4:8", 0.7])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_methods_hit_the_pattern_exactly(method, sparsity):
    weight = torch.randn(24, 64)
    x, hessian = _hessian(64)
    if method == "magnitude":
        pruned, mask = magnitude_prune(weight, sparsity)
    elif method == "wanda":
        pruned, mask = wanda_prune(weight, x.norm(dim=0), sparsity)
    else:
        pruned, mask = sparsegpt_prune(weight, hessian, sparsity, blocksize=32)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert (pruned[~mask] == 0).all()
    if isinstance(sparsity, str):
        n, m = map(int, sparsity.split(":"))
        assert (mask.view(24, -1, m).sum(-1) == n).all()
    elif method == "wanda":  # exact per output row
        assert (mask.sum(1) == 64 - int(64 * sparsity)).all()
    else:  # exact per layer (magnitude) or per column block (sparsegpt): floor() per group
        assert mask.sum().item() == pytest.approx(weight.numel() * (1 - sparsity), abs=2)


@pytest.mark.parametrize("sparsity", [0.5, "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(sparsity):
    weight = torch.randn(48, 96)
    x, hessian = _hessian(96, tokens=1024)
    errors = {
        "magnitude": _output_error(weight, magnitude_prune(weight, sparsity)[0], hessian),
        "wanda": _output_error(weight, wanda_prune(weight, x.norm(dim=0), sparsity)[0], hessian),
        "sparsegpt": _output_error(
            weight, sparsegpt_prune(weight, hessian, sparsity, blocksize=32)[0], hessian
        ),
    }
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_keeps_dtype_and_handles_dead_inputs():
    weight = torch.randn(8, 16, dtype=torch.bfloat16)
    x, hessian = _hessian(16)
    hessian[3, :] = hessian[:, 3] = 0  # an input channel that never fires
    pruned, mask = sparsegpt_prune(weight, hessian, 0.5, blocksize=8)
    assert pruned.dtype == torch.bfloat16
    assert (pruned[:, 3] == 0).all()


def test_sparsegpt_rejects_a_hessian_that_is_not_positive_definite():
    with pytest.raises(HessianNotPositiveDefinite, match="more calibration samples or a larger percdamp"):
        # symmetric, positive diagonal (1), eigenvalues down to -1000: no dampening rescues it
        sparsegpt_prune(torch.randn(4, 8), 1001 * torch.ones(8, 8) - 1000 * torch.eye(8), 0.5, blocksize=8)


def test_sparsegpt_rejects_nan_hessian():
    hessian = torch.eye(8)
    hessian[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt_prune(torch.randn(4, 8), hessian, 0.5, blocksize=8)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"hessian must be \[8, 8\]"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(4), 0.5)
    with pytest.raises(ValueError, match=r"act_norm must be \[in_features\]"):
        wanda_prune(torch.randn(4, 8), torch.ones(5), 0.5)
    with pytest.raises(ValueError, match="in_features % 4 == 0"):
        magnitude_prune(torch.randn(4, 10), "2:4")
    with pytest.raises(ValueError, match="NaN/inf"):
        wanda_prune(torch.randn(4, 8), torch.full((8,), float("nan")), 0.5)
