"""The structured table script's variant grammar and its choice of what to distil."""

from __future__ import annotations

import pytest

from tests.bench.conftest import bench_script


@pytest.fixture(scope="module")
def table():
    return bench_script("structured_table")


def test_every_preset_variant_parses(table):
    for preset in table.PRESETS.values():
        for variant in preset.split(","):
            table.steps_of(variant)
    assert table.steps_of("minitron-35-all") == [("minitron", "0.35", {"axes": "hidden,mlp,heads"})]
    with pytest.raises(ValueError, match="minitron suffixes"):
        table.steps_of("minitron-20-depth")


def test_distil_choice_takes_the_best_of_each_size_and_the_named(table):
    rows = [
        {"variant": "dense", "removed": 0.0, "ppl": 15},
        {"variant": "a-20", "removed": 0.2, "ppl": 30},
        {"variant": "b-20", "removed": 0.2, "ppl": 25},
        {"variant": "c-20", "removed": 0.21, "ppl": 40},
        {"variant": "a-35", "removed": 0.333, "ppl": 90},
        {"variant": "b-35", "removed": 0.35, "ppl": 60},
    ]
    chosen = [r["variant"] for r in table.distil_choice(rows, 1, "c-20,dense")]
    assert chosen == ["c-20", "b-20", "b-35"]
    assert [r["variant"] for r in table.distil_choice(rows, 2, "")] == ["b-20", "a-20", "b-35", "a-35"]


def test_stacked_and_repair_variants_parse(table):
    assert table.steps_of("angular-3-rw+flap-28-adaptive-refit") == [
        ("angular", "0", {"remove_layers": 3, "repair": True, "repair_fit": "weights"}),
        ("flap", "0.28", {"widths": "adaptive", "refit": True}),
    ]
    assert table.steps_of("shortgpt-6-r") == [("shortgpt", "0", {"remove_layers": 6, "repair": True})]
    assert table.steps_of("flap-20+2:4")[-1] == ("sparsegpt", "2:4", {})
    with pytest.raises(ValueError, match="suffixes are -r and -rw"):
        table.steps_of("angular-6-x")


def _args(table, tmp_path, **over):
    base = {name: 1 for name in table.PROTOCOL} | {"rounds": 0, "distill_steps": 0, "out": str(tmp_path)}
    return type("Args", (), base | over)()


def test_resume_keeps_rows_of_the_same_protocol_only(table, tmp_path):
    import json

    args = _args(table, tmp_path)
    assert table.resumed_rows(args) == {}  # nothing written yet
    protocol = {k: getattr(args, k) for k in table.PROTOCOL}
    rows = [{"variant": "dense", "ppl": 15.0}, {"variant": "flap-20", "ppl": 31.6}]
    (tmp_path / "structured.partial.json").write_text(json.dumps({"protocol": protocol, "rows": rows}))
    assert table.resumed_rows(args) == {"dense": rows[0], "flap-20": rows[1]}
    with pytest.raises(SystemExit, match="was written with"):
        table.resumed_rows(_args(table, tmp_path, nsamples=2))
    with pytest.raises(SystemExit, match="need every pruned model resident"):
        table.resumed_rows(_args(table, tmp_path, rounds=5))
