"""Structured pruning of the real default model (SmolLM2-135M: 30 LLaMA blocks, 9 query / 3 KV
heads): the CLI writes a smaller checkpoint that plain transformers loads in a fresh process."""

import copy
import json
import subprocess
import sys

import pytest

import sparsekit
from sparsekit.cli import main
from sparsekit.hf.checkpoint import is_checkpoint
from tests.real.conftest import SEQLEN

pytestmark = pytest.mark.real


def _ppl(model, ids):
    return sparsekit.perplexity(model, ids, seqlen=SEQLEN).ppl


def test_depth_repair_recovers_part_of_the_loss(smollm2, calib, eval_ids, dense_ppl):
    ppl = {}
    for repair in (False, True):
        model = copy.deepcopy(smollm2[0])
        report = sparsekit.prune(
            model, method="angular", remove_layers=4, repair=repair, calib=calib, show_progress=False
        )
        assert model.config.num_hidden_layers == 26 and len(report.removed_blocks) == 4
        assert report.removed_blocks == list(range(report.removed_blocks[0], report.removed_blocks[0] + 4))
        assert report.removed_fraction == pytest.approx(4 / 30)
        ppl[repair] = _ppl(model, eval_ids)
    assert dense_ppl < ppl[True] < ppl[False], (dense_ppl, ppl)


def test_width_methods_keep_a_working_model(smollm2, calib, eval_ids, dense_ppl):
    for method, kw in (("wanda-sp", {}), ("flap", {}), ("flap", {"widths": "adaptive", "heads": "query"})):
        model = copy.deepcopy(smollm2[0])
        report = sparsekit.prune(model, method=method, sparsity=0.2, calib=calib, show_progress=False, **kw)
        assert report.removed_fraction == pytest.approx(0.2, abs=0.01)
        assert report.params_after < report.params_before
        ppl = _ppl(model, eval_ids)
        assert dense_ppl < ppl < 4 * dense_ppl, (method, kw, ppl)


_PLAIN = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
assert "sparsekit" not in sys.modules
assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "tied embeddings lost"
ids = tok("The capital of France is", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=4, do_sample=False)
print(model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads,
      model.config.intermediate_size, sum(p.numel() for p in model.parameters()))
"""


def test_cli_flap_checkpoint_loads_in_plain_transformers(tmp_path, capsys):
    out = tmp_path / "flap"
    code = main(
        [
            "prune",
            "smollm2",
            "--method",
            "flap",
            "--sparsity",
            "0.2",
            "--nsamples",
            "4",
            "--seqlen",
            "128",
            "--heads",
            "query",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "removed 20" in printed or "removed 19" in printed, printed
    assert not is_checkpoint(out), "uniform widths save as an ordinary HF checkpoint"
    report = json.loads((out / "prune_report.json").read_text())
    assert report["kind"] == "structured" and report["uniform_widths"]
    result = subprocess.run(
        [sys.executable, "-c", _PLAIN, str(out)], capture_output=True, text=True, check=True
    )
    layers, heads, kv, inter, params = map(int, result.stdout.split())
    assert layers == 30 and kv == 3 and heads in (3, 6, 9) and inter % 8 == 0
    assert params == report["params_after"] < report["params_before"]
    healed = tmp_path / "healed"
    code = main(
        [
            "finetune",
            str(out),
            "--distill",
            "smollm2",
            "--steps",
            "2",
            "--nsamples",
            "4",
            "--seqlen",
            "64",
            "--batch-size",
            "2",
            "--eval-tokens",
            "512",
            "--eval-seqlen",
            "256",
            "--out",
            str(healed),
        ]
    )
    assert code == 0
    assert "fine-tuned (distill)" in capsys.readouterr().out
    ft = json.loads((healed / "finetune_report.json").read_text())
    assert ft["loss"] == "distill" and len(ft["losses"]) == 2 and ft["ppl_after"] > 0
    assert not is_checkpoint(healed)  # still a plain HF checkpoint


def test_cli_angular_then_2_4_stacks_and_saves_compressed(tmp_path, capsys):
    out = tmp_path / "stacked"
    code = main(
        [
            "prune",
            "smollm2",
            "--method",
            "angular",
            "--remove-layers",
            "3",
            "--then-method",
            "wanda",
            "--then-sparsity",
            "2:4",
            "--nsamples",
            "4",
            "--seqlen",
            "128",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert is_checkpoint(out)
    model = sparsekit.load(out)
    assert model.config.num_hidden_layers == 27
    report = json.loads((out / "prune_report.json").read_text())
    assert report["then"]["overall_sparsity"] == pytest.approx(0.5)


def test_cli_depth_then_width_saves_a_plain_checkpoint(tmp_path, capsys):
    """angular + the weights repair, then FLAP with the refit on what is left: one command, an
    ordinary smaller HF checkpoint whose logits are the pruned model's."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "depth-width"
    argv = [
        "prune", "smollm2", "--method", "angular", "--remove-layers", "3", "--repair", "--repair-fit",
        "weights", "--then-method", "flap", "--then-sparsity", "0.1", "--refit", "--nsamples", "4",
        "--seqlen", "128", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "angular: removed 10.0%" in printed and "flap: removed" in printed, printed
    assert not is_checkpoint(out)  # plain transformers
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 27
    assert model.config.intermediate_size < 1536
    report = json.loads((out / "prune_report.json").read_text())
    assert report["repaired_blocks"] and report["then"]["method"] == "flap"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_cli_refuses_removing_every_block(capsys):
    assert main(["prune", "smollm2", "--method", "shortgpt", "--remove-layers", "30"]) == 2
    assert "would leave none" in capsys.readouterr().err


def test_cli_blockpruner_checkpoint_loads_and_exports_to_decilm(tmp_path, capsys):
    """A sub-block removed from the real model: the sparsekit checkpoint loads with the logits the
    pruned model had, and the DeciLM export computes them from its own files (format reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.hf.test_decilm import decilm_reference_logits, expected_names

    out, exported = tmp_path / "bp", tmp_path / "decilm"
    args = ["--method", "blockpruner", "--sparsity", "0.01", "--nsamples", "2", "--seqlen", "64"]
    assert main(["prune", "smollm2", *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "removed sub-blocks (block kind, in order): " in printed and "attention" in printed, printed
    report = json.loads((out / "prune_report.json").read_text())
    assert [s["kind"] for s in report["removed_subblocks"]] == ["attention"]
    assert is_checkpoint(out)
    assert main(["export", str(out), "--decilm", "--out", str(exported)]) == 0
    config = json.loads((exported / "config.json").read_text())
    no_ops = [i for i, b in enumerate(config["block_configs"]) if b["attention"]["no_op"]]
    assert no_ops == [report["removed_subblocks"][0]["block"]]
    assert not any(b["ffn"]["no_op"] for b in config["block_configs"])
    from safetensors import safe_open

    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected_names(config)
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = loaded(ids, use_cache=False).logits
    torch.testing.assert_close(decilm_reference_logits(exported, ids), want, rtol=1e-3, atol=1e-3)


def test_cli_minitron_cuts_the_hidden_size_and_loads_in_plain_transformers(tmp_path, capsys):
    """Hidden size and MLP cut on the real model: a plain checkpoint (head_dim written, tied
    embeddings kept) that transformers loads without sparsekit, with the in-process logits."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "minitron"
    args = ["--method", "minitron", "--sparsity", "0.2", "--nsamples", "4", "--seqlen", "128"]
    assert main(["prune", "smollm2", *args, "--out", str(out)]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["removed_fraction"] == pytest.approx(0.2, abs=0.02)
    before, after = report["hidden_size"]
    assert before == 576 and after < 576 and after % 8 == 0
    assert not is_checkpoint(out)
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == after and config["head_dim"] == 64
    result = subprocess.run(
        [sys.executable, "-c", _PLAIN, str(out)], capture_output=True, text=True, check=True
    )
    assert int(result.stdout.split()[-1]) == report["params_after"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids, use_cache=False).logits).all()
