"""On the real default model (SmolLM2-135M, 30 LLaMA blocks) with the offline Wikipedia corpus."""

import copy
import json

import pytest

import sparsekit
from sparsekit.cli import main
from sparsekit.hf.checkpoint import is_checkpoint
from tests.real.conftest import SEQLEN

pytestmark = pytest.mark.real


def test_dense_perplexity_is_that_of_a_working_model(dense_ppl):
    assert 5 < dense_ppl < 40


@pytest.fixture(scope="module")
def pruned_ppl(smollm2, calib, eval_ids):
    results = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(smollm2[0])
        report = sparsekit.prune(model, method=method, sparsity="2:4", calib=calib, show_progress=False)
        assert len(report.layers) == 30 * 7
        assert report.overall_sparsity == pytest.approx(0.5)
        results[method] = sparsekit.perplexity(model, eval_ids, seqlen=SEQLEN).ppl
        del model
    return results


def test_calibrated_methods_beat_magnitude_at_2_4(pruned_ppl, dense_ppl):
    assert dense_ppl < pruned_ppl["sparsegpt"] < pruned_ppl["magnitude"]
    assert dense_ppl < pruned_ppl["wanda"] < pruned_ppl["magnitude"]
    # SparseGPT's weight update should not be worse than Wanda's mask-only pruning
    assert pruned_ppl["sparsegpt"] < 1.1 * pruned_ppl["wanda"], pruned_ppl


def test_cli_prunes_evaluates_and_saves(tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(
        [
            "prune",
            "smollm2",
            "--method",
            "wanda",
            "--sparsity",
            "4:8",
            "--nsamples",
            "4",
            "--seqlen",
            "64",
            "--eval",
            "--eval-tokens",
            "512",
            "--eval-seqlen",
            "256",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "4:8" in printed
    report = json.loads((out / "prune_report.json").read_text())
    assert report["seqlen"] == 64 and report["nsamples"] == 4 and report["calib"] == "wiki-offline"
    assert report["overall_sparsity"] == pytest.approx(0.5)
    assert is_checkpoint(out), "prune --out writes a compressed sparsekit checkpoint by default"
    assert report["sparsify"]["layers_swapped"] == 30 * 7  # every linear of the 30 blocks
    assert report["sparsify"]["layer_ratio"] < 0.6  # bitmap at 50%: ~0.53 of the fp32 bytes
    assert main(["eval", str(out), "--max-tokens", "512", "--seqlen", "256"]) == 0
    compressed_ppl = _printed_ppl(capsys.readouterr().out)
    dense = tmp_path / "dense"
    assert main(["export", str(out), "--dense", "--out", str(dense)]) == 0
    assert not is_checkpoint(dense)
    assert main(["eval", str(dense), "--max-tokens", "512", "--seqlen", "256"]) == 0
    assert _printed_ppl(capsys.readouterr().out) == pytest.approx(compressed_ppl, rel=1e-4)


def _printed_ppl(printed: str) -> float:
    """The number after 'perplexity' in the CLI's output."""
    return float(printed.split("perplexity", 1)[1].split()[0])


def test_cli_reports_bad_sparsity_clearly(capsys):
    assert main(["prune", "smollm2", "--sparsity", "3:2", "--method", "magnitude"]) == 2
    assert "0 < N < M" in capsys.readouterr().err
