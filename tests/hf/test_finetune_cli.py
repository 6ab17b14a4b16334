"""``sparsekit finetune`` end to end on a tiny checkpoint: compressed in, compressed out with the
same zeros; an interrupted run resumed from its folder equals an uninterrupted one; masked LoRA
under torchrun (2 processes, Gloo) writes the merged model and a peft adapter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsekit.cli import main
from sparsekit.hf.checkpoint import is_checkpoint, load

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["--steps", "4", "--nsamples", "8", "--seqlen", "32", "--batch-size", "2", "--lr", "1e-3",
         "--eval-tokens", "256", "--eval-seqlen", "64", "--precision", "fp32"]  # fmt: skip


@pytest.fixture(scope="module")
def sparse_checkpoint(tmp_path_factory):
    from tests.tiny_folder import save_tiny_model

    root = tmp_path_factory.mktemp("ft")
    dense = save_tiny_model(root / "dense")
    out = root / "ck"
    argv = ["prune", str(dense), "--method", "magnitude", "--sparsity", "2:4", "--out", str(out)]
    assert main(argv + ["--device", "cpu"]) == 0
    return out


def _zeros(folder):
    model = load(folder)
    return {n: (m.dense_weight() == 0) for n, m in model.named_modules() if hasattr(m, "dense_weight")}


def _weights(folder):
    from sparsekit.nn import densify

    model = load(folder)
    densify(model)
    return model.state_dict()


def test_finetune_keeps_the_format_and_every_zero(sparse_checkpoint, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", str(sparse_checkpoint), *SHORT, "--save-every", "2", "--out", str(out)]) == 0
    assert "masks exact: True" in capsys.readouterr().out
    assert is_checkpoint(out) and (out / "train_state/checkpoints/latest").is_file()
    before, after = _zeros(sparse_checkpoint), _zeros(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    report = json.loads((out / "finetune_report.json").read_text())
    assert len(report["losses"]) == 4 and report["world_size"] == 1
    log = [json.loads(line) for line in (out / "train_state/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert main(["finetune", str(sparse_checkpoint), *SHORT, "--out", str(out)]) != 0
    assert "or add --resume to continue" in capsys.readouterr().err


def test_interrupted_run_resumes_to_the_same_weights(sparse_checkpoint, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert main(["finetune", str(sparse_checkpoint), *SHORT, "--save-every", "2", "--out", str(whole)]) == 0
    import sparsekit.hf.trainer as trainer

    real_step = trainer.Trainer._step

    def crash_at_step_3(self, net, params, optimizer, step):
        if step == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third step
        return real_step(self, net, params, optimizer, step)

    part = tmp_path / "part"
    monkeypatch.setattr(trainer.Trainer, "_step", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(["finetune", str(sparse_checkpoint), *SHORT, "--save-every", "2", "--out", str(part)])
    monkeypatch.setattr(trainer.Trainer, "_step", real_step)
    assert not is_checkpoint(part) and (part / "train_state/checkpoints/step-00000002").is_dir()
    argv = ["finetune", str(sparse_checkpoint), *SHORT, "--save-every", "2", "--out", str(part), "--resume"]
    assert main(argv) == 0
    assert json.loads((part / "finetune_report.json").read_text())["resumed_from"] == 2
    a, b = _weights(whole), _weights(part)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lora-alpha", "8"], "--lora-alpha does nothing without --lora-rank"),
        (["--teacher-topk", "8"], "--teacher-topk does nothing without --distill"),
        (["--min-lr-ratio", "0.1"], "--min-lr-ratio does nothing without --schedule cosine"),
        (["--resume"], "no run saved there"),
        (["--batch-size", "4", "--grad-accum", "3"], "not divisible"),
        (["--warmup", "100", "--steps", "10"], "warmup must be in"),
    ],
)
def test_finetune_flags_are_checked_before_loading(
    sparse_checkpoint, tmp_path, capsys, monkeypatch, flags, message
):
    import sparsekit.cli as cli

    monkeypatch.setattr(cli, "load_any", lambda *a, **k: pytest.fail("loaded a model before checking"))
    assert main(["finetune", str(sparse_checkpoint), *flags, "--out", str(tmp_path / "x")]) != 0
    assert message in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_lora_writes_the_merged_model_and_a_peft_adapter(sparse_checkpoint, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    port = str(_free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port,
           "-m", "sparsekit", "finetune", str(sparse_checkpoint), *SHORT, "--lora-rank", "4",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout and "masks exact: True" in result.stdout
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["world_size"] == 2 and report["lora_rank"] == 4
    before, after = _zeros(sparse_checkpoint), _zeros(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (out / "adapter/adapter_config.json").is_file() and (out / "adapter/sparsekit_lora.json").is_file()
