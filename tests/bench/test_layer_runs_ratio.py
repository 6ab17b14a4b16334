"""bench/layer_runs_ratio.py: before / after medians of two per-layer runs, per backend, dtype and M."""

import json
import math

import pytest

from tests.bench.conftest import bench_script


def _report(times):
    rows = [
        {"n": n, "k": 16, "m": m, "dtype": "bfloat16", "backend": b, "median_ms": ms, "model": f"M{n}",
         "speedup": 1.0 / ms}
        for (b, n, m), ms in times.items()
    ]  # fmt: skip
    return {"rows": rows}


def test_geometric_mean_of_before_over_after_per_group(tmp_path):
    mod = bench_script("layer_runs_ratio")
    before = _report(
        {("dense", 8, 1): 1.0, ("dense", 32, 1): 2.0, ("bitmap", 8, 1): 1.0, ("bitmap", 32, 1): 4.0}
    )
    after = _report(
        {("dense", 8, 1): 1.0, ("dense", 32, 1): 2.0, ("bitmap", 8, 1): 0.5, ("bitmap", 32, 1): 1.0}
    )
    got = mod.ratios(before, after)
    assert got[("dense", "bfloat16", 1)] == pytest.approx(1.0)
    assert got[("bitmap", "bfloat16", 1)] == pytest.approx(math.sqrt(2.0 * 4.0))
    for name, report in (("b.json", before), ("a.json", after)):
        (tmp_path / name).write_text(json.dumps(report))
    assert (
        mod.main([str(tmp_path / "b.json"), str(tmp_path / "a.json"), "--out", str(tmp_path / "r.md")]) == 0
    )
    assert "| bitmap | bfloat16 | 1 | 2.828 |" in (tmp_path / "r.md").read_text()
    got = mod.speedups(after)[("bitmap", "bfloat16", 1)]
    assert got == pytest.approx((math.sqrt(2.0 * 1.0), 1.0, 2.0))
    assert mod.speedups(after, "M32")[("bitmap", "bfloat16", 1)] == pytest.approx((1.0, 1.0, 1.0))
    assert "| bitmap | bfloat16 | 1 | 1.00x (1.00-1.00) | 2.00x (2.00-2.00) |" in mod.speedup_table(
        [str(tmp_path / "b.json"), str(tmp_path / "a.json")], "M8"
    )
    with pytest.raises(ValueError, match="no rows of model"):
        mod.speedups(after, "Llama")
    with pytest.raises(ValueError, match="share no"):
        mod.ratios(before, _report({("int8", 8, 4): 1.0}))
    with pytest.raises(SystemExit):
        mod.main([str(tmp_path / "b.json")])
