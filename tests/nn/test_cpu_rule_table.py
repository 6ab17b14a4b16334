"""The CPU rule's decision table on disk: written, validated, checked against the machine, pinned."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import sparsekit.nn.sparse_linear as sl_mod
from sparsekit.kernels.cpu_ext import resolve_isa
from sparsekit.kernels.topk_select import nm_keep_mask
from sparsekit.nn import SparseLinear, cpu_rule, cpu_rule_table
from tests.conftest import require_cpu_extension


@pytest.fixture(autouse=True)
def _fresh_decisions():
    cpu_rule.forget()
    yield
    cpu_rule.forget()


def _entry(m=16, dense_won=True, n=48, k=64, **over):
    entry = {
        "format": "2:4", "isa": resolve_isa().value, "dtype": "torch.float32", "n": n, "k": k,
        "m_class": m, "layers": 2, "sparse_ms": 0.5, "dense_ms": 0.25 if dense_won else 1.0,
        "dense_won": dense_won,
    }  # fmt: skip
    entry.update(over)
    return entry


def _write(tmp_path, table_entries, **over):
    path = cpu_rule_table.write_table(
        tmp_path / "table.json", table_entries, margin=-0.1, rounds=3, model="tiny"
    )
    if over:
        table = json.loads(path.read_text())
        for name, value in over.items():
            table[name] = value(table[name]) if callable(value) else value
        path.write_text(json.dumps(table))
    return path


def test_round_trip_pins_decisions_and_their_medians(tmp_path):
    path = _write(tmp_path, [_entry(16, True), _entry(64, False)])
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temp file, renamed
    assert cpu_rule_table.load_table(path) == 2
    key16 = cpu_rule_table.entry_key(_entry(16))
    key64 = cpu_rule_table.entry_key(_entry(64))
    assert cpu_rule.decided(key16) is True and cpu_rule.decided(key64) is False
    assert cpu_rule.measured(key16) == (0.5, 0.25) and cpu_rule.measured(key64) == (0.5, 1.0)
    table = cpu_rule_table.read_table(path)
    assert table["machine"] == cpu_rule_table.machine() and table["margin"] == -0.1


def test_a_layer_runs_the_tables_choice_without_measuring(tmp_path, monkeypatch):
    """Under 'fastest', a key the table holds is not measured: dense where it says dense (the layer
    holds its copy), sparse where it says sparse; a key it lacks is measured on the first call."""
    require_cpu_extension()
    calls = []
    monkeypatch.setattr(sl_mod, "dense_wins", lambda key, *a, **kw: calls.append(key) or False)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.mul_(nm_keep_mask(lin.weight.abs(), 2, 4))
    layer = SparseLinear.from_linear(lin, format="2:4")
    layer.cpu_rule = "fastest"
    cpu_rule_table.load_table(_write(tmp_path, [_entry(16, True), _entry(64, False)]))
    with torch.no_grad():
        for rows, copy_bytes in ((16, 48 * 64 * 4), (64, 48 * 64 * 4)):
            x = torch.randn(1, rows, 64)
            torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
            assert layer.dense_copy_bytes() == copy_bytes
        assert calls == []
        layer(torch.randn(1, 4, 64))  # class 4: not in the table
    assert [key[-1] for key in calls] == [4]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"m_class": 3}, "m_class 3 is not an M class"),
        ({"m_class": 1}, "m_class 1 is not an M class"),
        ({"isa": "avx9"}, "isa 'avx9' is not one of"),
        ({"dtype": "torch.int8"}, "dtype 'torch.int8' is not one of"),
        ({"n": 0}, "must be positive"),
        ({"n": True}, "n = True is not a int"),
        ({"k": 64.0}, "k = 64.0 is not a int"),
        ({"sparse_ms": math.nan}, "sparse_ms = nan is not a positive float"),
        ({"dense_ms": -1.0}, "dense_ms = -1.0 is not a positive float"),
        ({"dense_won": 1}, "dense_won = 1 is not a bool"),
    ],
)
def test_bad_entries_are_refused_before_anything_is_pinned(tmp_path, change, message):
    good = _entry(16)
    path = _write(tmp_path, [good])
    table = json.loads(path.read_text())
    table["entries"].append(_entry(64) | change)
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=message):
        cpu_rule_table.load_table(path)
    assert cpu_rule.decided(cpu_rule_table.entry_key(good)) is None
    with pytest.raises(ValueError, match=message):  # the writer checks too
        cpu_rule_table.write_table(tmp_path / "w.json", [_entry(64) | change], -0.1, 1, "m")


def test_bad_files_are_refused_naming_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="sparsekit bench rule-table MODEL --out"):
        cpu_rule_table.load_table(tmp_path / "none.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        cpu_rule_table.load_table(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something"}))
    with pytest.raises(ValueError, match="is not a CPU rule table"):
        cpu_rule_table.load_table(tmp_path / "other.json")
    with pytest.raises(ValueError, match="version 9 table"):
        cpu_rule_table.load_table(_write(tmp_path, [_entry()], version=9))
    lacking = {k: v for k, v in _entry().items() if k != "dense_ms"}
    with pytest.raises(ValueError, match="lacks dense_ms"):
        cpu_rule_table.load_table(_write(tmp_path, [_entry()], entries=[lacking]))
    with pytest.raises(ValueError, match="repeats the key"):
        cpu_rule_table.load_table(_write(tmp_path, [_entry(), _entry()]))


@pytest.mark.parametrize("field", ["cpu", "threads"])
def test_a_table_from_another_machine_is_refused(tmp_path, field):
    other = {"cpu": "Some Other CPU", "threads": torch.get_num_threads() + 1}[field]
    path = _write(tmp_path, [_entry()], machine=lambda m: m | {field: other})
    with pytest.raises(
        ValueError, match=f"measured with {field} .*Measure this machine: `sparsekit bench rule-table"
    ):
        cpu_rule_table.load_table(path)
    assert cpu_rule.decisions() == {}
    assert cpu_rule_table.load_table(path, check_machine=False) == 1


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def test_the_env_table_is_read_once_and_makes_fastest_the_default(tmp_path):
    path = _write(tmp_path, [_entry(16, True)])
    code = (
        "from sparsekit.nn import cpu_rule; from sparsekit.nn.cpu_rule_table import read_table, entry_key; "
        f"e = read_table({str(path)!r})['entries'][0]; "
        "print(cpu_rule.default_rule(), cpu_rule.decided(entry_key(e)), cpu_rule.measured(entry_key(e)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "SPARSEKIT_CPU_RULE"}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env | {"SPARSEKIT_CPU_RULE_TABLE": str(path)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["fastest", "True", "(0.5,", "0.25)"]
    run = _python(code, SPARSEKIT_CPU_RULE_TABLE=str(path), SPARSEKIT_CPU_RULE="sparse")
    assert run.returncode != 0 and "SPARSEKIT_CPU_RULE=sparse never reads one" in run.stderr
    run = _python(code, SPARSEKIT_CPU_RULE_TABLE=str(tmp_path / "missing.json"), SPARSEKIT_CPU_RULE="fastest")
    assert run.returncode != 0 and "SPARSEKIT_CPU_RULE_TABLE: no CPU rule table at" in run.stderr
    again = (  # a table that failed to load fails again: never silently skipped
        "from sparsekit.nn import cpu_rule\nfor _ in range(2):\n    try:\n"
        "        cpu_rule.decided(('2:4',))\n    except FileNotFoundError:\n        print('raised')"
    )
    run = _python(again, SPARSEKIT_CPU_RULE_TABLE=str(tmp_path / "missing.json"))
    assert run.stdout.split() == ["raised", "raised"], run.stderr
