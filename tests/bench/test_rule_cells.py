"""bench/rule_cells.py: the rule's misses, control range and held copies, read from a report."""

import json

import pytest

from tests.bench.conftest import bench_script


def _row(backend, m, speedup, impl="", dtype="float32"):
    return {"backend": backend, "m": m, "speedup": speedup, "impl": impl, "dtype": dtype, "n": 8, "k": 16}


REPORT = {
    "command": "python bench/cpu_isa_layers.py ...",
    "rule_margin": 0.0,
    "rows": [
        _row("dense", 1, 1.0),
        _row("dense-control", 1, 0.98),
        _row("dense-control", 64, 1.03),
        _row("2:4-fastest@avx2", 1, 2.0, "rule: fastest -> sparse kernel"),
        _row("bitmap-fastest=0.7@avx2", 1, 3.0, "rule: fastest -> sparse kernel"),
        _row("2:4-fastest@avx2", 64, 0.93,
             "rule: fastest -> sparse kernel (rule measured sparse 1.0 ms, dense 1.1 ms)"),
        _row("int8-fastest", 64, 0.80,
             "rule: fastest -> dense copy (+0.44 MB held) (rule measured sparse 2 ms, dense 1 ms)"),
        _row("int4-fastest", 16, 1.10, "rule: fastest -> dense copy (+1.50 MB held)"),
        _row("int4-fastest", 4, 1.00, "rule: fastest -> dense copy (+1.50 MB held)"),
    ],
}  # fmt: skip


def test_counts_misses_copies_and_what_the_rule_saw():
    bench = bench_script("rule_cells")
    s = bench.summarise(REPORT)
    assert (s["rule_cells"], s["below_floor"], s["below_0.90"]) == (6, 2, 1)
    assert s["control"] == (0.98, 1.03)
    assert (s["cells_from_16"], s["dense_held"], s["dense_held_mb"]) == (3, 2, pytest.approx(1.94))
    assert (s["cells_small_m"], s["dense_held_small_m"]) == (1, 1)
    assert [m["cell"] for m in s["misses"]] == [
        "int8-fastest float32 8x16 M=64",
        "2:4-fastest@avx2 float32 8x16 M=64",
    ]
    assert [m["path"] for m in s["misses"]] == ["dense copy", "sparse kernel"]
    assert [m["rule_dense_over_sparse"] for m in s["misses"]] == [0.5, pytest.approx(1.1)]
    assert s["decode_min"] == 2.0 and set(s["decode_geo"]) == {
        "2:4-fastest avx2 float32", "bitmap-fastest=0.7 avx2 float32"}  # fmt: skip
    assert bench.summarise(REPORT, floor=0.9)["below_floor"] == 1


def test_cli_writes_the_summary_and_refuses_a_report_without_rule_rows(tmp_path, capsys):
    bench = bench_script("rule_cells")
    good, bad = tmp_path / "r.json", tmp_path / "plain.json"
    good.write_text(json.dumps(REPORT))
    bad.write_text(json.dumps({"rows": [_row("dense", 1, 1.0)]}))
    bench.main([str(good), "--out", str(tmp_path / "s.md")])
    text = (tmp_path / "s.md").read_text()
    assert "**2 of 6**" in text and "| int8-fastest float32 8x16 M=64 | 0.800 | dense copy | 0.500 |" in text
    with pytest.raises(SystemExit):
        bench.main([str(bad)])
    assert "no -fastest rows" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "none.json")])
