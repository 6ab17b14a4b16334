"""bench/rule_table_agreement.py: how many decisions two rule tables of one model share."""

import pytest

from sparsekit.nn import cpu_rule_table
from tests.bench.conftest import bench_script


def _entry(n, m, dense_ms, sparse_ms=1.0):
    return {
        "format": "2:4", "isa": "avx2", "dtype": "torch.float32", "n": n, "k": 64, "m_class": m, "layers": 2,
        "sparse_ms": sparse_ms, "dense_ms": dense_ms, "dense_won": dense_ms < sparse_ms,
    }  # fmt: skip


def test_keys_decided_apart_are_listed_with_both_speedups(tmp_path):
    mod = bench_script("rule_table_agreement")
    one = [_entry(32, 16, 2.0), _entry(64, 16, 1.05), _entry(32, 64, 0.9)]
    two = [_entry(32, 16, 1.8), _entry(64, 16, 0.95), _entry(32, 64, 0.8), _entry(128, 64, 0.5)]
    paths = []
    for name, entries in (("a", one), ("b", two)):
        paths.append(cpu_rule_table.write_table(tmp_path / f"{name}.json", entries, 0.0, 3, "m"))
    rows = mod.agreement(cpu_rule_table.read_table(paths[0]), cpu_rule_table.read_table(paths[1]))
    assert [(r["m"], r["keys"], r["alike"]) for r in rows] == [(16, 2, 1), (64, 1, 1)]
    assert rows[0]["apart"] == [("64x64", pytest.approx(1.05), pytest.approx(0.95))]
    assert mod.main([str(paths[0]), str(paths[1]), "--out", str(tmp_path / "g.md")]) == 0
    text = (tmp_path / "g.md").read_text()
    assert "2 of 3 decisions alike" in text and "64x64 1.05x / 0.95x" in text
    other = cpu_rule_table.write_table(tmp_path / "c.json", [_entry(8, 2, 1.0)], 0.0, 3, "m")
    with pytest.raises(ValueError, match="share no decision key"):
        mod.agreement(cpu_rule_table.read_table(paths[0]), cpu_rule_table.read_table(other))
