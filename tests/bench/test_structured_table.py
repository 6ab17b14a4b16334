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
