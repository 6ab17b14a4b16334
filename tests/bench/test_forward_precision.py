"""bench/forward_precision.py: errors against fp32 per block, interleaved timing, bad options."""

import json

import pytest
import torch

from tests.bench.conftest import bench_script
from tests.conftest import tiny_model


def test_a_run_reports_errors_per_block_and_fp32_is_its_own_reference(tmp_path, monkeypatch):
    fp = bench_script("forward_precision")
    dense = tiny_model("llama")
    monkeypatch.setattr(fp, "load_model", lambda *a, **k: (dense, None))
    ids = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(fp, "calibration_ids", lambda *a, **k: ids)
    out = tmp_path / "fp"
    argv = ["--out", str(out), "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--rounds", "2"]
    assert fp.main(argv) == 0
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    layers = len(dense.model.layers)
    assert list(results) == ["float32", "bfloat16", "bf16-mixed"]
    assert results["float32"]["hidden"] == [0.0] * layers  # the reference against itself
    for name in ("bfloat16", "bf16-mixed"):
        r = results[name]
        assert len(r["hidden"]) == len(r["gram_qkv"]) == len(r["gram_down"]) == layers
        assert all(0 < e < 0.1 for e in r["hidden"] + r["gram_down"])  # bf16 rounding, not garbage
        assert len(r["seconds"]) == 2
    # block 0's q/k/v input comes from the fp32 norm in mixed precision: its Gram is fp32's exactly
    assert results["bf16-mixed"]["gram_qkv"][0] == 0.0 < results["bfloat16"]["gram_qkv"][0]
    assert "| bf16-mixed | 0 |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--precisions", "bf16-half"], "bf16-mixed"),
        (["--precisions", "float32"], "other than float32"),
        (["--precisions", "bfloat16", "bfloat16"], "distinct"),
        (["--rounds", "0"], ">= 1"),
    ],
)
def test_bad_options_are_refused_before_the_model_loads(argv, match, capsys, monkeypatch, tmp_path):
    fp = bench_script("forward_precision")
    monkeypatch.setattr(fp, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit):
        fp.main(["--out", str(tmp_path / "x"), *argv])
    assert match in capsys.readouterr().err
