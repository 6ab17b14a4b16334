"""OWL pinned to its paper's definition (Yin et al., 2024, eq. 1 and section 3.2) by hand.

Per decoder block l: A_ij = ||X_j||_2 * |W_ij| over every linear layer of the block, one pool;
D_l = the share of A_ij above M times the pool's mean. Keep ratios: D scaled min-max to
[0, 2 lambda], shifted to mean 1 - target; block sparsity S_l = 1 - keep_l. The statistics come
from the dense model, each block on the previous dense block's outputs.
"""

import copy

import pytest
import torch
import transformers

from sparsekit.pruning import OWL, PruneConfig, outlier_ratio, prune_model
from tests.conftest import tiny_config

# Two linears of one block: A = |W| * ||X|| per input column (hand-written).
# a: |W| [[1, 1, 1, 1], [1, 1, 1, 3]] x ||X|| [1, 1, 1, 10] -> [[1, 1, 1, 10], [1, 1, 1, 30]]  (sum 46)
# b: |W| [1 x 9, 10] x ||X|| ones                            -> [1 x 9, 10]                    (sum 19)
# one pool of 18: mean 65 / 18 = 3.611, 5 x mean = 18.06: only the 30 is an outlier -> D = 1 / 18
# (a mean per linear would count b's 10 as well, 10 > 5 x 1.9: 2 / 18 -- not the paper's D)
W_A = torch.tensor([[1.0, -1.0, 1.0, 1.0], [1.0, 1.0, -1.0, 3.0]])
NORM_A = torch.tensor([1.0, 1.0, 1.0, 10.0])
W_B = torch.tensor([[1.0] * 9 + [-10.0]])
NORM_B = torch.ones(10)


def test_outlier_ratio_pools_every_linear_of_the_block_under_one_mean():
    scores = [W_A.abs() * NORM_A, W_B.abs() * NORM_B]
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 18)
    assert outlier_ratio([W_B.abs() * NORM_B], 5.0) == pytest.approx(1 / 10)  # b alone: its own mean
    assert outlier_ratio(scores, 10.0) == 0.0  # 30 is not above 10 x 3.611


def test_owl_block_sparsities_by_hand():
    # D = [10%, 0%, 5%], lambda 0.08, target 0.7: scaled [0.16, 0, 0.08], mean 0.08,
    # keep = scaled - 0.08 + 0.3 = [0.38, 0.22, 0.30] -> S = [0.62, 0.78, 0.70]
    expected = [0.62, 0.78, 0.70]
    assert OWL(lam=0.08, m=5).block_sparsities(0.7, [0.10, 0.0, 0.05]) == pytest.approx(expected, abs=1e-12)
    # the reference code keeps D in percent: the min-max scaling makes the unit irrelevant
    assert OWL(lam=0.08, m=5).block_sparsities(0.7, [10.0, 0.0, 5.0]) == pytest.approx(expected, abs=1e-12)


def _five_block_llama():
    """A tiny Llama with five blocks whose q_proj / down_proj get 0..4 strong input columns, so the
    blocks' outlier ratios differ."""
    config = tiny_config("llama")
    config.num_hidden_layers = 5
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for index, block in enumerate(model.model.layers):
            block.self_attn.q_proj.weight[:, :index] *= 8.0
            block.mlp.down_proj.weight[:, : 2 * index] *= 6.0
    return model


def _reference_ratios(model, ids: torch.Tensor, m: float) -> list[float]:
    """The definition, independently: hooks on every linear of the dense fp32 model, one forward
    (each block sees the previous dense block's outputs), D_l over the pooled scores."""
    sq_sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sq_sums[name] = sq_sums.get(name, 0) + x.square().sum(0)

        return record

    linears = {
        (index, name): module
        for index, block in enumerate(model.model.layers)
        for name, module in block.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    handles = [module.register_forward_hook(hook(key)) for key, module in linears.items()]
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    ratios = []
    for index in range(len(model.model.layers)):
        scores = [
            (module.weight.detach().double().abs() * sq_sums[key].sqrt()).reshape(-1)
            for key, module in linears.items()
            if key[0] == index
        ]
        pool = torch.cat(scores)
        ratios.append(float((pool > m * pool.mean()).double().mean()))
    return ratios


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_engine_prunes_each_block_at_the_definitions_sparsity(method):
    model = _five_block_llama()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    owl = OWL(lam=0.1, m=3.0)
    ratios = _reference_ratios(model, ids, owl.m)
    assert len(set(ratios)) == 5 and min(ratios) > 0  # the example is not degenerate
    expected = owl.block_sparsities(0.6, ratios)
    pruned = copy.deepcopy(model)
    report = prune_model(
        pruned,
        ids,
        PruneConfig(
            method=method,
            sparsity=0.6,
            allocation=owl,
            forward_dtype="float32",
            blocksize=16,
            show_progress=False,
        ),
    )
    # one entry more or less above M x mean moves a block by > 1e-5; fp32 counting by ~1e-8
    assert report.block_sparsities == pytest.approx(expected, abs=1e-6)
    # each linear reaches its block's ratio per output row: floor(K * S_l) zeros in every row
    for index, block in enumerate(pruned.model.layers):
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                zeros = (module.weight == 0).sum(1)
                k = module.weight.shape[1]
                want = int(k * expected[index])
                if method == "wanda":
                    assert (zeros == want).all(), (index, name, zeros.tolist(), want)
                else:  # SparseGPT's mask is chosen over column blocks: the layer, not each row
                    assert abs(int(zeros.sum()) - want * module.weight.shape[0]) <= module.weight.shape[0]
