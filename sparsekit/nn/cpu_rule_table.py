"""The CPU rule's decision table on disk: what a benchmark measured in a model's own forward, read at
load instead of one short first-call measurement per layer shape.

``sparsekit bench rule-table MODEL --out TABLE.json`` (``sparsekit.bench.rule_table``) times every
SparseLinear of a compressed model inside the model's forward, its sparse kernel against its
dense copy, per M class, and writes a table. ``load_table(path)`` (or ``SPARSEKIT_CPU_RULE_TABLE=
path[:path...]``, read once, which also makes 'fastest' the process default rule) pins those
decisions, so a layer under ``cpu_rule='fastest'`` whose key the table holds runs the table's
choice and measures nothing; a key the table lacks is measured on its first call as before.

A table is valid only on the machine it was measured on: its CPU model and torch thread count are
checked at load (a mismatch is an error naming the fix). Every entry is validated before a
decision is pinned. File format (JSON)::

    {"kind": "sparsekit-cpu-rule-table", "version": 1,
     "machine": {"cpu": str, "threads": int, "isa": str, "llc_bytes": int, "torch": str},
     "margin": float, "rounds": int, "model": str,
     "entries": [{"format": "2:4", "isa": "avx512", "dtype": "torch.float32", "n": int, "k": int,
                  "m_class": int, "layers": int, "sparse_ms": float, "dense_ms": float,
                  "dense_won": bool}, ...]}
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from sparsekit._io import write_json_atomic
from sparsekit.kernels._backend import CpuIsa
from sparsekit.kernels.cpu_ext import cpu_model, llc_bytes, supported_isa

from . import cpu_rule

log = logging.getLogger(__name__)

TABLE_KIND = "sparsekit-cpu-rule-table"
TABLE_VERSION = 1
TABLE_ENV = "SPARSEKIT_CPU_RULE_TABLE"
DTYPES = ("torch.float32", "torch.bfloat16", "torch.float16")
_ENTRY_FIELDS = {
    "format": str, "isa": str, "dtype": str, "n": int, "k": int, "m_class": int, "layers": int,
    "sparse_ms": float, "dense_ms": float, "dense_won": bool,
}  # fmt: skip


def machine() -> dict:
    """What a table's decisions depend on: CPU model, torch threads, best ISA, LLC, torch version."""
    return {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "isa": supported_isa().value,
        "llc_bytes": llc_bytes(),
        "torch": torch.__version__,
    }


def entry_key(entry: dict) -> tuple:
    """(format, isa, dtype, N, K, M class): the rule's decision key of a table entry."""
    return (entry["format"], entry["isa"], entry["dtype"], entry["n"], entry["k"], entry["m_class"])


def write_table(path: str | Path, entries: list[dict], margin: float, rounds: int, model: str) -> Path:
    """Write a decision table (atomically: a temp file renamed); each entry is checked first."""
    for i, entry in enumerate(entries):
        _check_entry(entry, f"{path}: entry {i}")
    table = {
        "kind": TABLE_KIND,
        "version": TABLE_VERSION,
        "machine": machine(),
        "margin": margin,
        "rounds": rounds,
        "model": model,
        "entries": entries,
    }
    return write_json_atomic(path, table)


def _check_entry(entry: object, where: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is {type(entry).__name__}, not an object")
    missing = sorted(set(_ENTRY_FIELDS) - set(entry))
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    for name, kind in _ENTRY_FIELDS.items():
        value = entry[name]
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and value > 0
        if not ok:
            raise ValueError(
                f"{where}: {name} = {value!r} is not a{' positive' if kind is float else ''} {kind.__name__}"
            )
    isas = [i.value for i in CpuIsa if i is not CpuIsa.AUTO]
    if entry["isa"] not in isas:
        raise ValueError(f"{where}: isa {entry['isa']!r} is not one of {', '.join(isas)}")
    if entry["dtype"] not in DTYPES:
        raise ValueError(f"{where}: dtype {entry['dtype']!r} is not one of {', '.join(DTYPES)}")
    if entry["n"] < 1 or entry["k"] < 1 or entry["layers"] < 1:
        raise ValueError(
            f"{where}: n, k and layers must be positive, got {entry['n']}, {entry['k']}, {entry['layers']}"
        )
    m = entry["m_class"]
    if not cpu_rule.is_decided_class(m):
        raise ValueError(
            f"{where}: m_class {m} is not an M class the rule decides "
            f"(a power of 2 from {cpu_rule.MIN_M} to 1024)"
        )


def read_table(path: str | Path) -> dict:
    """A decision table read and validated (kind, version, every entry; no duplicate keys)."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no CPU rule table at {path}; write one with `sparsekit bench rule-table MODEL --out {path}`"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not JSON ({exc}); rewrite it with `sparsekit bench rule-table`"
        ) from None
    if not isinstance(table, dict) or table.get("kind") != TABLE_KIND:
        raise ValueError(
            f"{path} is not a CPU rule table (kind {TABLE_KIND!r}); "
            "write one with `sparsekit bench rule-table`"
        )
    if table.get("version") != TABLE_VERSION:
        raise ValueError(
            f"{path} is a version {table.get('version')!r} table; "
            f"this sparsekit reads version {TABLE_VERSION}"
        )
    entries = table.get("entries")
    if not isinstance(entries, list) or not isinstance(table.get("machine"), dict):
        raise ValueError(f"{path} has no entries list or machine record")
    seen: set[tuple] = set()
    for i, entry in enumerate(entries):
        _check_entry(entry, f"{path}: entry {i}")
        key = entry_key(entry)
        if key in seen:
            raise ValueError(f"{path}: entry {i} repeats the key {key}")
        seen.add(key)
    return table


def _check_machine(path: Path, recorded: dict) -> None:
    here = machine()
    for name in ("cpu", "threads"):
        if recorded.get(name) != here[name]:
            raise ValueError(
                f"{path} was measured with {name} {recorded.get(name)!r}, this process runs {here[name]!r}: "
                f"its decisions do not hold here. Measure this machine: `sparsekit bench rule-table MODEL "
                f"--threads {here['threads']} --out {path}` "
                "(or load_table(..., check_machine=False) to use it anyway)"
            )
    if recorded.get("torch") != here["torch"]:
        log.warning("%s was measured under torch %s, this is %s", path, recorded.get("torch"), here["torch"])


def check_table(path: str | Path, check_machine: bool = True) -> dict:
    """The table at ``path``, read and validated, pinning nothing: raises when the file is not a
    valid table, or (``check_machine``) was measured on another CPU model or thread count than this
    process runs now."""
    table = read_table(path)
    if check_machine:
        _check_machine(Path(path), table["machine"])
    return table


def load_table(path: str | Path, check_machine: bool = True) -> int:
    """Pin every decision of the table at ``path`` (``cpu_rule.pin``); returns how many. Raises before
    pinning anything as ``check_table`` does."""
    table = check_table(path, check_machine)
    for entry in table["entries"]:
        cpu_rule.pin(entry_key(entry), entry["dense_won"], (entry["sparse_ms"], entry["dense_ms"]))
    dense = sum(e["dense_won"] for e in table["entries"])
    log.info("cpu rule table %s: %d decisions pinned (%d dense)", path, len(table["entries"]), dense)
    return len(table["entries"])


def load_env_tables() -> int:
    """Load the tables ``SPARSEKIT_CPU_RULE_TABLE`` names (``os.pathsep``-separated); 0 when unset."""
    paths = [p for p in os.environ.get(TABLE_ENV, "").split(os.pathsep) if p]
    try:
        return sum(load_table(p) for p in paths)
    except (OSError, ValueError) as exc:
        raise type(exc)(f"{TABLE_ENV}: {exc}") from None


__all__ = [
    "TABLE_ENV", "TABLE_KIND", "TABLE_VERSION", "check_table", "entry_key", "load_env_tables", "load_table",
    "machine", "read_table", "write_table",
]  # fmt: skip
