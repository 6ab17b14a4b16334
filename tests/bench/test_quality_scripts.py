"""bench/joint_quant.py's rounding and bench/vs_llmcompressor.py's summary over seeds."""

import math

import pytest
import torch

from sparsekit.models import block_linears, find_decoder_blocks, linear_weight
from sparsekit.pruning import QuantGrid
from tests.bench.conftest import bench_script
from tests.conftest import tiny_model


def test_round_model_uses_the_dense_steps_and_keeps_zeros():
    joint = bench_script("joint_quant")
    dense = tiny_model("llama")
    model = tiny_model("llama")
    model.load_state_dict(dense.state_dict())
    _, blocks = find_decoder_blocks(model)
    target = linear_weight(block_linears(blocks[0])["mlp.up_proj"])
    with torch.no_grad():
        target[:, ::2] = 0  # pruned entries, and a row max that pruning removed
    grid = QuantGrid(4, 16)
    joint.round_model_(model, grid, steps_from=dense)
    dense_up = linear_weight(block_linears(find_decoder_blocks(dense)[1][0])["mlp.up_proj"])
    codes = target / grid.steps(dense_up)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7 + 1e-4
    assert (target[:, ::2] == 0).all()


def test_seed_summary_pairs_each_seed_with_llm_compressor():
    vs = bench_script("vs_llmcompressor")
    rows = [{"config": "dense", "tool": "-", "ppl": 15.0}]
    for seed, (peer, mine) in enumerate([(50.0, 55.0), (60.0, 54.0), (40.0, 44.0)]):
        rows.append({"config": "sparsegpt/2:4", "seed": seed, "tool": "llm-compressor 0.14", "ppl": peer})
        rows.append(
            {"config": "sparsegpt/2:4", "seed": seed, "tool": "sparsekit", "forward_dtype": "bfloat16",
             "ppl": mine, "prune_s": 10.0 + seed}
        )  # fmt: skip
    lines = vs._seed_summary(rows)
    mine = next(line for line in lines if "sparsekit (bfloat16)" in line)
    cells = [c.strip() for c in mine.split("|")]
    assert cells[3] == "3" and cells[4] == "54.00 [44.00-55.00]"
    assert cells[5] == "1.100 [0.900-1.100]"  # per-seed ratios 1.1, 0.9, 1.1: not the ratio of medians
    assert math.isclose(float(cells[6]), 11.0)
    assert vs._seed_summary(rows[:3]) == []  # one seed: no summary


@pytest.mark.parametrize("argv", [["--bits", "9"], ["--group", "-1"]])
def test_joint_quant_refuses_a_bad_grid_before_loading(argv):
    with pytest.raises(ValueError, match="wbits|wgroup"):
        bench_script("joint_quant").main(["--out", "unused", *argv])


def test_joint_quant_layers_reads_each_layers_input_and_scores_errors():
    layers = bench_script("joint_quant_layers")
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    name = "model.layers.0.mlp.down_proj"
    seen = layers.layer_inputs(model, ids, [name])
    down = model.get_submodule(name)
    assert seen[name].shape == (16, down.in_features)
    with torch.no_grad():  # the recorded input reproduces the layer's own output
        want = down(seen[name])
    torch.testing.assert_close(seen[name] @ down.weight.T, want)
    w = down.weight.detach()
    assert (
        layers.rel_error(seen[name], w, w) == 0 and layers.rel_error(seen[name], w, torch.zeros_like(w)) == 1
    )


def test_run_line_quotes_the_command_and_names_the_machine():
    from sparsekit._env import environment, run_line

    env = environment()
    line = run_line("bench/x.py", ["--rows", "a b"], env)
    assert line.startswith("`python bench/x.py --rows 'a b'` on ") and env["commit"] in line
