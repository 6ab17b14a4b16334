"""bench/joint_quant.py's rounding and bench/vs_llmcompressor.py's summary over seeds."""

import math

import pytest
import torch

from sparsekit.models import block_linears, find_decoder_blocks, linear_weight
from sparsekit.pruning import QuantGrid
from tests.bench.conftest import bench_script, original_driver_command
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


def test_seed_summary_keeps_one_and_two_passes_apart():
    vs = bench_script("vs_llmcompressor")
    rows = []
    for seed in (1, 2):
        rows.append(
            {"config": "wanda/2:4", "seed": seed, "tool": "llm-compressor 0.14", "ppl": 100.0, "prune_s": 2.0}
        )
        for passes, ppl in (("one", 90.0 + seed), ("two", 110.0)):
            rows.append(
                {"config": "wanda/2:4", "seed": seed, "tool": "sparsekit", "forward_dtype": "float32",
                 "passes": passes, "ppl": ppl, "prune_s": 1.0}
            )  # fmt: skip
    lines = vs._seed_summary(rows)
    one = next(line for line in lines if "sparsekit (float32, one pass)" in line)
    two = next(line for line in lines if "sparsekit (float32, two passes)" in line)
    assert "91.50 [91.00-92.00]" in one and "110.00 [110.00-110.00]" in two
    table = vs._reference_summary(rows)
    assert sum("| float32, one pass |" in line for line in table) == 2


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


def test_mask_difference_counts_flips_and_names_the_first_block():
    vs = bench_script("vs_llmcompressor")
    ref = {f"model.layers.{i}.mlp.up_proj": torch.zeros(4, 4, dtype=torch.bool) for i in range(3)}
    ours = {k: v.clone() for k, v in ref.items()}
    assert vs.mask_difference(ours, ref) == {"share": 0.0, "first_block": None}
    ours["model.layers.2.mlp.up_proj"][0, :2] = True
    ours["model.layers.1.mlp.up_proj"][3, 3] = True
    assert vs.mask_difference(ours, ref) == {"share": 3 / 48, "first_block": 1}


def test_original_driver_rope_hook_reproduces_the_models_own_layer_call():
    """The original code calls a decoder layer with position_ids only; the hook supplies the
    position_embeddings transformers 5 computes once per model, so the outputs match."""
    driver = bench_script("original_driver")
    model = tiny_model("llama")
    layer, rotary = model.model.layers[0], model.model.rotary_emb
    hidden = torch.randn(1, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(6).unsqueeze(0)
    with torch.no_grad():
        want = layer(hidden, position_ids=positions, position_embeddings=rotary(hidden, positions))
        layer.register_forward_pre_hook(driver._rope_hook(rotary), with_kwargs=True)
        got = layer(hidden, attention_mask=None, position_ids=positions)
    got, want = (t[0] if isinstance(t, tuple) else t for t in (got, want))
    torch.testing.assert_close(got, want)


def test_original_driver_feeds_the_callers_windows_and_the_code_pattern():
    driver = bench_script("original_driver")
    ids = torch.arange(12).reshape(3, 4)
    windows, _ = driver._calibration_loader(ids)("c4", nsamples=2, seed=0, seqlen=2048)
    assert len(windows) == 2 and torch.equal(windows[1][0], ids[1:2])
    assert (windows[0][1][0, :-1] == -100).all() and windows[0][1][0, -1] == 3
    with pytest.raises(SystemExit, match="asked for 4 windows"):
        driver._calibration_loader(ids)("c4", nsamples=4)
    assert driver._pattern("2:4") == (0.5, 2, 4) and driver._pattern("0.7") == (0.7, 0, 0)


def test_original_driver_runs_a_checkout_as_the_original_calls_it(tmp_path):
    """The driver's plumbing on a stand-in checkout written here: its prune function fetches the
    calibration windows through get_loaders, runs every decoder layer the 2023 way and prunes."""
    import json
    import subprocess

    from safetensors.torch import load_file

    code = tmp_path / "code"
    (code / "lib").mkdir(parents=True)
    (code / "lib" / "__init__.py").write_text("")
    (code / "lib" / "prune.py").write_text(
        "import torch\n"
        "def get_loaders(*a, **k):\n    raise RuntimeError('the C4 loader must be replaced')\n"
        "def prune_wanda(args, model, tokenizer, device, prune_n=0, prune_m=0):\n"
        "    windows, _ = get_loaders('c4', nsamples=args.nsamples, seed=args.seed, seqlen=model.seqlen)\n"
        "    assert model.hf_device_map == {} and (prune_n, prune_m) == (2, 4)\n"
        "    h = model.model.embed_tokens(windows[0][0])\n"
        "    pos = torch.arange(h.shape[1]).unsqueeze(0)\n"
        "    for layer in model.model.layers:\n"
        "        h = layer(h, attention_mask=None, position_ids=pos)\n"
        "        h = h[0] if isinstance(h, tuple) else h\n"
        "        layer.mlp.up_proj.weight.data[:, ::2] = 0\n"
        "    assert torch.isfinite(h).all()\n"
    )
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "dense")
    torch.save(torch.randint(0, 100, (2, 8)), tmp_path / "calib.pt")
    out, report = tmp_path / "pruned.safetensors", tmp_path / "report.json"
    command = original_driver_command(
        code, "wanda", tmp_path / "dense", tmp_path / "calib.pt", "wanda", "2:4", out, report
    )
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    state = load_file(str(out))
    assert all(k.startswith("model.layers.") for k in state)
    assert (state["model.layers.0.mlp.up_proj.weight"][:, ::2] == 0).all()
    assert json.loads(report.read_text())["entry"] == "lib.prune.prune_wanda"
    bad = subprocess.run(
        [*command[:10], "--method", "sparsegpt+owl", *command[12:]], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "has no method 'sparsegpt+owl'" in bad.stderr


def test_fetch_original_clones_each_checkout_at_its_pinned_commit(tmp_path, monkeypatch):
    import subprocess

    vs = bench_script("vs_llmcompressor")
    source = tmp_path / "source"
    pins = {}
    for name in ("wanda", "owl"):
        repo = source / name
        (repo / "lib").mkdir(parents=True)
        git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        for text in ("pinned", "later"):
            (repo / "lib" / "prune.py").write_text(text)
            subprocess.run([*git, "add", "-A"], check=True)
            subprocess.run([*git, "commit", "-q", "-m", text], check=True)
            if text == "pinned":
                pins[name] = (
                    "unused-url",
                    subprocess.check_output([*git, "rev-parse", "HEAD"], text=True).strip(),
                )
    monkeypatch.setattr(vs, "ORIGINAL", pins)
    got = vs.fetch_original(tmp_path / "checkouts", str(source))
    assert sorted(got) == ["owl", "wanda"]
    assert all((path / "lib" / "prune.py").read_text() == "pinned" for path in got.values())
    (got["owl"] / "lib" / "prune.py").write_text("kept")  # an existing checkout is used as it is
    assert (
        vs.fetch_original(tmp_path / "checkouts", str(source))["owl"] / "lib" / "prune.py"
    ).read_text() == "kept"


@pytest.mark.parametrize(
    "argv,match",
    [(["--seeds", "1", "1"], "repeats a seed"), (["--original-from", "/nowhere"], "needs --original DIR")],
)
def test_vs_llmcompressor_refuses_bad_options_before_any_work(argv, match, capsys):
    with pytest.raises(SystemExit):
        bench_script("vs_llmcompressor").main(["--venv", "/nonexistent-venv", *argv])
    assert match in capsys.readouterr().err


def test_composed_recipes_map_to_prune_options_and_are_timed_against_the_original_sparsegpt():
    vs = bench_script("vs_llmcompressor")
    assert vs.recipe_options("sparsegpt+owl+admm+dsnot") == (
        "sparsegpt",
        {"allocation": "owl", "update": "admm", "refine": "dsnot"},
    )
    assert vs.recipe_options("ria+permute+admm") == ("ria", {"permute": True, "update": "admm"})
    assert vs.recipe_options("wanda+owl") == ("wanda", {"allocation": "owl"})
    with pytest.raises(ValueError, match="unknown recipe piece 'sgd'"):
        vs.recipe_options("wanda+sgd")
    rows = [
        {"config": "sparsegpt/2:4", "seed": 0, "tool": "original wanda@8e8fc87", "ppl": 58.0,
         "prune_s": 200.0},
        {"config": "sparsegpt/2:4", "seed": 0, "tool": "llm-compressor 0.14", "ppl": 59.0, "prune_s": 210.0},
        {"config": "ria+permute+admm/2:4", "seed": 0, "tool": "sparsekit", "forward_dtype": "bfloat16",
         "ppl": 48.0, "prune_s": 150.0},
    ]  # fmt: skip
    (line,) = [x for x in vs._composed_summary(rows) if x.startswith("- ")]
    assert "150.0 s against the original SparseGPT's 200.0 s (0.75x); ppl 48.00 against its 58.00" in line
    assert vs._composed_summary(rows[1:]) == []  # no original row: nothing to compare with


def test_vs_llmcompressor_knows_the_composed_rows(capsys):
    with pytest.raises(SystemExit):
        bench_script("vs_llmcompressor").main(["--venv", "/nonexistent-venv", "--rows", "ria+admm/2:4"])
    err = capsys.readouterr().err
    assert "unknown rows ['ria+admm/2:4']" in err and "ria+permute+admm/2:4" in err
