"""bench/cpu_op_throughput.py: refuses a CPU without the level before building anything, and
reports every mix with rates and columns per ns consistent with each other."""

import json

import pytest

from sparsekit.kernels import cpu_ext
from sparsekit.kernels._backend import CpuIsa
from tests.bench.conftest import bench_script, require_avx512_bf16


def test_a_cpu_without_avx512_bf16_is_told_so_before_anything_is_built(monkeypatch, tmp_path):
    bench = bench_script("cpu_op_throughput")
    monkeypatch.setattr(cpu_ext, "extension", lambda: object())
    monkeypatch.setattr(cpu_ext, "supported_isa", lambda: CpuIsa.AVX2)
    monkeypatch.setattr(bench, "build", lambda: pytest.fail("built the mixes"))
    with pytest.raises(SystemExit, match="runs at most 'avx2'; the mixes need avx512-bf16"):
        bench.main(["--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_a_failed_extension_build_is_named_not_read_as_a_scalar_cpu(monkeypatch, tmp_path):
    bench = bench_script("cpu_op_throughput")
    monkeypatch.setattr(cpu_ext, "extension", lambda: None)
    monkeypatch.setattr(cpu_ext, "build_error", lambda: "RuntimeError: no g++")
    monkeypatch.setattr(bench, "build", lambda: pytest.fail("built the mixes"))
    with pytest.raises(SystemExit, match=r"did not build here \(RuntimeError: no g\+\+\)"):
        bench.main(["--out", str(tmp_path)])


def test_zero_iterations_are_refused(capsys, tmp_path):
    bench = bench_script("cpu_op_throughput")
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), "--iters", "0"])
    assert "--iters and --rounds must be at least 1" in capsys.readouterr().err


def test_every_mix_is_reported_with_consistent_columns(tmp_path):
    require_avx512_bf16("timing the mixes")
    bench = bench_script("cpu_op_throughput")
    bench.main(["--out", str(tmp_path), "--iters", "20000", "--rounds", "2"])
    report = json.loads((tmp_path / "cpu-op-throughput.json").read_text())
    rows = {r["mix"]: r for r in report["rows"]}
    assert list(rows) == list(bench.MIXES)
    for name, (_, columns) in bench.MIXES.items():
        row = rows[name]
        assert row["columns_per_step"] == columns
        assert row["msteps_per_s"] > 0
        # two equal rounds interpolate to their value give or take a rounding of the last bit
        assert row["p20"] <= row["msteps_per_s"] * (1 + 1e-12)
        assert row["msteps_per_s"] <= row["p80"] * (1 + 1e-12)
        assert row["columns_per_ns"] == pytest.approx(row["msteps_per_s"] * columns / 1e3)
    text = (tmp_path / "cpu-op-throughput.md").read_text()
    assert all(f"| {name} |" in text for name in bench.MIXES)
