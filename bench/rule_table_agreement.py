"""Do two CPU rule tables (``sparsekit bench rule-table``) of one model decide alike?

    python bench/rule_table_agreement.py RUN1.json RUN2.json [--out agreement.md]

Per M class: how many keys both tables hold, how many they decide alike, and every key they
decide apart with the sparse kernel's speedup over the dense copy each run measured (dense ms /
sparse ms). Two runs of one command on one machine show how stable the table's decisions are;
a key decided apart costs at most the gap the run that chose wrong measured. Reads the JSON only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsekit._io import print_and_write
from sparsekit.nn.cpu_rule_table import entry_key, read_table


def agreement(first: dict, second: dict) -> list[dict]:
    """One dict per M class: keys both hold, how many decided alike, and the keys decided apart."""
    a = {entry_key(e): e for e in first["entries"]}
    b = {entry_key(e): e for e in second["entries"]}
    shared = sorted(a.keys() & b.keys(), key=lambda k: (k[-1], k))
    if not shared:
        raise ValueError("the two tables share no decision key: are they of one model, dtype and ISA?")
    rows = []
    for m in sorted({k[-1] for k in shared}):
        keys = [k for k in shared if k[-1] == m]
        apart = [k for k in keys if a[k]["dense_won"] != b[k]["dense_won"]]
        rows.append(
            {
                "m": m,
                "keys": len(keys),
                "alike": len(keys) - len(apart),
                "apart": [
                    (
                        f"{k[3]}x{k[4]}",
                        a[k]["dense_ms"] / a[k]["sparse_ms"],
                        b[k]["dense_ms"] / b[k]["sparse_ms"],
                    )
                    for k in apart
                ],
            }
        )
    return rows


def markdown(rows: list[dict], first: str, second: str) -> str:
    alike, keys = sum(r["alike"] for r in rows), sum(r["keys"] for r in rows)
    lines = [
        f"{first} against {second}: {alike} of {keys} decisions alike.",
        "",
        "| M | keys | alike | decided apart (sparse speedup run 1 / run 2) |",
        "|---:|---:|---:|---|",
    ]
    for r in rows:
        apart = ", ".join(f"{shape} {x:.2f}x / {y:.2f}x" for shape, x, y in r["apart"]) or "-"
        lines.append(f"| {r['m']} | {r['keys']} | {r['alike']} | {apart} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--out", help="write the markdown here too")
    args = parser.parse_args(argv)
    text = markdown(
        agreement(read_table(args.first), read_table(args.second)),
        Path(args.first).stem,
        Path(args.second).stem,
    )
    print_and_write(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
