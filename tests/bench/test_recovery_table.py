"""The recovery table script's row choice: comma-separated substrings, or one part of a row's
name whole (row names hold commas)."""

from __future__ import annotations

import argparse

import pytest

from tests.bench.conftest import bench_script


@pytest.fixture(scope="module")
def table():
    return bench_script("recovery_table")


def _names(table, rows: str) -> list[str]:
    return [r[0] for r in table.rows_to_run(argparse.Namespace(rows=rows, lora_rank=16))]


def test_rows_by_comma_separated_substrings(table):
    names = _names(table, "FLAP,permute")
    assert names[0] == "dense" and "SparseGPT+permute+ADMM 2:4" in names
    assert [n for n in names if n.startswith("FLAP")] == [
        "FLAP 20%", "FLAP 20% + fine-tune", "FLAP 20% + distill", "FLAP 20% + LoRA r16",
    ]  # fmt: skip
    assert not any("MaskLLM" in n for n in names)


def test_a_part_of_a_name_with_a_comma_picks_that_row_only(table):
    assert _names(table, "ADMM start, weights frozen") == [
        "dense",
        "MaskLLM 2:4 (SparseGPT+ADMM start, weights frozen)",
    ]
    every = _names(table, "")  # no filter: every row, each once
    assert len(every) == len(set(every)) and set(_names(table, "FLAP,permute")) < set(every)
    assert "MaskLLM 2:4 (SparseGPT+ADMM start, weights trained)" in every
