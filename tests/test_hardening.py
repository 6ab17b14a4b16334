"""Careless or unlucky use: bad arguments fail before the model loads, damaged weights and data
get errors naming the problem, failed prunes say what they changed, killed saves leave no debris."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import pytest
import torch

import sparsekit
from sparsekit import cli
from sparsekit._io import OWNER_FILE, atomic_dir, check_can_create
from sparsekit.pruning import PruneConfig, PruningMethod, prune_model, sparsegpt_prune
from sparsekit.pruning.engine import PartialPruneError
from sparsekit.pruning.method import LayerResult
from tests.conftest import tiny_model


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the argument check")

    monkeypatch.setattr(cli, "load_any", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nsamples", "0"], "--nsamples must be >= 1"),
        (["--seqlen", "1"], "--seqlen must be >= 2"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--blocksize", "0"], "--blocksize must be >= 1"),
        (["--percdamp", "-0.1"], "--percdamp must be >= 0"),
        (["--calib", "no/such/corpus.txt"], "unknown corpus"),
        (["--eval", "--eval-dataset", "nope"], "unknown corpus"),
        (["--sparsity", "3:2"], "0 < N < M"),
        (["--method", "flap", "--sparsity", "2:4"], "not a fraction"),
    ],
)
def test_prune_arguments_are_checked_before_the_model_loads(no_model_load, capsys, argv, message):
    assert cli.main(["prune", "smollm2", *argv]) == 2
    assert message in capsys.readouterr().err


def test_existing_or_uncreatable_out_is_refused_before_loading(no_model_load, tmp_path, capsys):
    assert cli.main(["prune", "smollm2", "--out", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert cli.main(["prune", "smollm2", "--out", str(tmp_path / "file" / "out")]) == 2
    assert "not a writable folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--seqlen", "0"], "--seqlen must be >= 2"), (["--dataset", "nope"], "unknown corpus")],
)
def test_eval_arguments_are_checked_before_the_model_loads(no_model_load, capsys, argv, message):
    assert cli.main(["eval", "smollm2", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_mistyped_relative_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    from sparsekit.hf.models import resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="no model folder out/typo"):
        resolve_model("out/typo")
    assert time.perf_counter() - started < 1


def test_a_folder_with_config_and_no_weights_is_a_one_line_error(tmp_path, capsys):
    tiny_model("llama").config.save_pretrained(tmp_path / "m")
    assert cli.main(["eval", str(tmp_path / "m"), "--max-tokens", "64", "--seqlen", "32"]) == 2
    assert "error" in capsys.readouterr().err


def test_calibration_longer_than_the_position_table_is_refused():
    model = tiny_model("llama")  # max_position_embeddings 64
    ids = torch.randint(0, 128, (2, 100))
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 64"):
        sparsekit.prune(model, method="wanda", sparsity=0.5, calib=ids, show_progress=False)
    with pytest.raises(ValueError, match="exceeds"):
        sparsekit.perplexity(model, torch.randint(0, 128, (1, 400)), seqlen=100)


def test_malformed_jsonl_names_the_file_and_line(tmp_path):
    from sparsekit.hf.data import corpus_texts

    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"c.jsonl, line 2: not a JSON record"):
        list(corpus_texts(str(path), "calib")) + list(corpus_texts(str(path), "eval"))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "flap", "shortgpt"])
def test_non_finite_weights_are_refused_up_front_naming_the_layer(method):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[3, 5] = float("inf")
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 128, (4, 16))
    kw = {"remove_layers": 1} if method == "shortgpt" else {}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj has 1 NaN/Inf weights"):
        sparsekit.prune(model, method=method, sparsity=0.5, calib=ids, show_progress=False, **kw)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was touched


class _FailsOnBlock1(PruningMethod):
    name = "fails-on-block-1"

    def __init__(self):
        self.calls = 0

    def prune(self, weight, stat, config):
        self.calls += 1
        if self.calls > 7:  # the 7 linears of block 0 succeed
            raise RuntimeError("boom")
        return LayerResult(weight * 0, torch.zeros_like(weight, dtype=torch.bool))


def test_a_prune_that_fails_midway_says_which_blocks_changed():
    model = tiny_model("llama")
    with pytest.raises(PartialPruneError, match="blocks 0-0 are already pruned in place.*reload the model"):
        prune_model(model, None, PruneConfig(method=_FailsOnBlock1(), sparsity=0.5, show_progress=False))


def test_prune_config_rejects_bad_numbers():
    for bad in ({"blocksize": 0}, {"percdamp": -1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            PruneConfig(**bad)


def test_sparsegpt_refuses_a_hessian_that_is_not_x_t_x():
    weight = torch.randn(8, 16)
    x = torch.randn(64, 16)
    good = 2 / 64 * x.T @ x
    sparsegpt_prune(weight, good, 0.5)
    skew = good.clone()
    skew[0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        sparsegpt_prune(weight, skew, 0.5)
    neg = good.clone()
    neg[2, 2] = -1.0
    with pytest.raises(ValueError, match="negative diagonal"):
        sparsegpt_prune(weight, neg, 0.5)
    with pytest.raises(ValueError, match="blocksize must be >= 1"):
        sparsegpt_prune(weight, good, 0.5, blocksize=0)
    with pytest.raises(ValueError, match="percdamp must be >= 0"):
        sparsegpt_prune(weight, good, 0.5, percdamp=-0.01)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_save_leaves_debris_that_the_next_save_removes(tmp_path):
    stale = tmp_path / ".ck.tmp-killed"
    stale.mkdir()
    (stale / OWNER_FILE).write_text(str(_dead_pid()))
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    busy = tmp_path / ".ck.tmp-busy"  # another save still writing: left alone
    busy.mkdir()
    (busy / OWNER_FILE).write_text(str(os.getpid()))
    with atomic_dir(tmp_path / "ck") as tmp:
        (tmp / "f").write_text("ok")
    assert not stale.exists() and busy.exists()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["f"]  # no owner file in the output


def test_check_can_create(tmp_path):
    check_can_create(tmp_path / "new" / "deeper")
    with pytest.raises(FileExistsError):
        check_can_create(tmp_path)


def test_sparse_linear_refuses_inputs_of_the_wrong_width():
    from sparsekit.nn import SparseLinear

    layer = SparseLinear.from_linear(torch.nn.Linear(10, 4), format="bitmap")
    with pytest.raises(ValueError, match=r"expects inputs \[..., 10\]"):
        layer(torch.randn(2, 12))


def test_sparsify_warns_when_a_format_makes_the_model_larger(caplog):
    from sparsekit.nn import sparsify

    with caplog.at_level("WARNING"):
        report = sparsify(tiny_model("llama"), format="bitmap")  # dense weights: bitmap is larger
    assert report.layer_bytes_after > report.layer_bytes_before
    assert "makes these layers larger" in caplog.text
