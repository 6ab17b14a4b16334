"""bench/attention_cpu.py: options checked first, a wrong kernel stops it, the report is whole."""

import json

import pytest
import torch

from tests.bench.conftest import bench_script
from tests.conftest import require_avx2, require_avx512_bf16


@pytest.fixture(params=["bf16", "fp32"])
def dtype(request) -> str:
    """Each kernel's name, where this CPU runs it."""
    (require_avx512_bf16 if request.param == "bf16" else require_avx2)(
        f"the {request.param} attention benchmark"
    )
    return request.param


def test_unknown_shapes_are_refused_before_anything_runs(capsys, tmp_path):
    bench = bench_script("attention_cpu")
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), "--shapes", "smollm2-calib,gpt-5"])
    assert "unknown ['gpt-5']" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_wrong_kernel_stops_the_benchmark(monkeypatch, dtype):
    bench = bench_script("attention_cpu")
    wrong = lambda q, k, v: bench.causal_attention_reference(q, k, v) * 1.01  # noqa: E731
    monkeypatch.setattr(bench, "causal_attention_cpu", wrong)
    with pytest.raises(SystemExit, match="kernel error"):
        bench.check((1, 2, 1, 40, 64), bench.DTYPES[dtype])


def test_every_shape_and_variant_is_reported(monkeypatch, tmp_path, dtype):
    bench = bench_script("attention_cpu")
    monkeypatch.setattr(bench, "SHAPES", {"tiny": (1, 4, 2, 70, 64), "tiny-128": (1, 2, 1, 33, 128)})
    argv = ["--out", str(tmp_path), "--rounds", "2", "--min-time", "0.01", "--threads", "1", "--dtype", dtype]
    bench.main(argv)
    report = json.loads((tmp_path / "attention-cpu.json").read_text())
    rows = report["rows"]
    assert [(r["shape"], r["variant"]) for r in rows] == [
        ("tiny", "sdpa"), ("tiny", "kernel"), ("tiny-128", "sdpa"), ("tiny-128", "kernel"),
    ]  # fmt: skip
    for r in rows:
        assert r["p20"] <= r["ms"] <= r["p80"] and r["gflops"] > 0
        assert r["max_abs_error"] < 0.05
    assert all(r["speedup"] == 1.0 for r in rows if r["variant"] == "sdpa")
    names = set(bench.SDPBackend.__members__)
    assert all(r["backend"] in names for r in rows if r["variant"] == "sdpa")
    assert "| tiny (1, 4, 2, 70, 64) | kernel |" in (tmp_path / "attention-cpu.md").read_text()


def test_real_inputs_are_checked_per_block(monkeypatch, tmp_path, dtype):
    """--real-model: one row per decoder block with both errors, and the summary line."""
    bench = bench_script("attention_cpu")
    g = torch.Generator().manual_seed(0)
    fake = [
        tuple(torch.randn(1, n, 40, 64, generator=g).to(bench.DTYPES[dtype]) for n in (4, 2, 2)) + (None,)
        for _ in range(3)
    ]
    monkeypatch.setattr(bench, "real_inputs", lambda name, dt: fake)
    monkeypatch.setattr(bench, "SHAPES", {"tiny": (1, 2, 1, 40, 64)})
    argv = ["--out", str(tmp_path), "--rounds", "1", "--min-time", "0.01", "--real-model", "smollm2"]
    bench.main(argv + ["--dtype", dtype])
    rows = [
        r
        for r in json.loads((tmp_path / "attention-cpu.json").read_text())["rows"]
        if r["variant"] == "real-inputs"
    ]
    assert [r["block"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0 < r["kernel_rel"] < 0.01 and 0 < r["sdpa_rel"] < 0.01
        if dtype == "bf16":
            assert 0 < r["fp32_rel"] < min(r["kernel_rel"], r["sdpa_rel"])  # one rounding: the floor
        else:
            assert "fp32_rel" not in r and r["kernel_rel"] < 1e-5
    text = (tmp_path / "attention-cpu.md").read_text()
    assert "Real inputs: smollm2" in text and "| 2 |" in text
