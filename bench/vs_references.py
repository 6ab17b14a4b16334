"""Issue 28's one table: sparsekit against the original code and llm-compressor, every row, one
session, one command.

    python bench/vs_references.py --setup --original reports/original-code --out reports/vs_references

Runs ``bench/vs_llmcompressor.py`` (Wanda and SparseGPT at 50% and 2:4, Wanda at 70%, Wanda + OWL
and SparseGPT + OWL at 70%: the original code, llm-compressor in its own venv, sparsekit) and then
``bench/vs_original_structured.py`` (FLAP, Wanda-sp and ShortGPT at 20%: the original code,
sparsekit), each writing its own report (``<out>.unstructured`` and ``<out>.structured``, .md and
.json), then one summary (``<out>.md`` / ``.json``): per row the references' ppl and prune time
against sparsekit's default (bf16 calibration forwards where the CPU has fast bf16 matmuls), the
ratios the issue sets targets on (ppl <= 1, time <= 0.5 against each reference), and sparsekit's
phases. Over several seeds a row gives medians: ppl and time per tool, and the per-seed ratios.
Same protocol in both halves: SmolLM2-135M fp32, 64 x 512 calibration tokens of the offline
corpus, ppl on 32,768 held-out tokens in windows of 512, 2 threads. The structured half needs no
llm-compressor (it has none of these methods); ``--structured-seeds`` gives it its own draws
(it is the cheaper half).

``--composed`` adds sparsekit's composed recipes (RIA + permutation + ADMM at 2:4, SparseGPT + OWL +
ADMM + DSnoT at 50%) to the unstructured half; no reference runs them, so the summary times each
against the same session's original SparseGPT at its sparsity and seed (the issue's target: at
most that time).

``--from-reports A.json B.json ...`` runs nothing: it merges halves' reports written by earlier
runs (of this script or of either half alone, e.g. ``vs_llmcompressor.py --seeds 1 2``) into the
summary, each row's medians taken over every seed the reports hold. Reports of one half must share
its protocol (calibration size, ppl tokens) and machine, and no config may repeat a seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import vs_llmcompressor
import vs_original_structured

from sparsekit._env import environment, run_line
from sparsekit._io import write_json_atomic, write_text_atomic

# sparsekit's row that each structured method is judged by (the others are context)
HEADLINE = {
    "flap": "sparsekit flap adaptive",
    "wanda-sp": "sparsekit wanda-sp, at the original's size",
    "shortgpt": "sparsekit shortgpt",
}
HEADS = ("original", "llm-compressor", "sparsekit")  # the summary's tools
VERSUS = ("vs original", "vs llm-compressor")
PROTOCOL = ("nsamples", "seqlen", "eval_tokens")  # a half's args that must agree to merge its reports
MACHINE = ("cpu", "cpu_threads", "torch")  # and the environment's
log = logging.getLogger("vs_references")


def merge_reports(reports: list[dict]) -> tuple[dict, dict]:
    """The unstructured and structured halves of ``reports`` (each ``{"environment", "args",
    "rows"}``; told apart by their rows' keys), each as one report over all their seeds. Raises
    ValueError where reports of a half differ in protocol or CPU, or repeat a config's seed."""
    halves: dict[str, list[dict]] = {"unstructured": [], "structured": []}
    for report in reports:
        seeded = [r for r in report["rows"] if "seed" in r]
        if not seeded:
            raise ValueError("a report holds no seeded rows: pass the halves' reports (their .json)")
        halves["structured" if "row" in seeded[0] else "unstructured"].append(report)
    return tuple(_merge_half(name, got) for name, got in halves.items())


def _merge_half(name: str, reports: list[dict]) -> dict:
    if not reports:
        return {"rows": [], "environments": []}
    for key in PROTOCOL:
        values = {r["args"][key] for r in reports}
        if len(values) > 1:
            raise ValueError(
                f"{name} reports differ in {key} ({sorted(values)}): they measure different protocols"
            )
    for key in MACHINE:
        values = {str(r["environment"][key]) for r in reports}
        if len(values) > 1:
            raise ValueError(
                f"{name} reports differ in {key} ({sorted(values)}): time ratios would mix machines"
            )
    rows, seen = [], set()
    for report in reports:
        for row in report["rows"]:
            if "seed" not in row:
                continue
            key = (row.get("config", row.get("row")), row["seed"], row["tool"], row.get("forward_dtype"))
            if key in seen:
                raise ValueError(f"{name} reports repeat {key[0]} seed {key[1]} ({key[2]}): drop one of them")
            seen.add(key)
            rows.append(row)
    return {"rows": rows, "environments": [r["environment"] for r in reports]}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def unstructured_rows(report: dict) -> list[dict]:
    """Summary rows of vs_llmcompressor's report: per config, each tool's median ppl and time over
    seeds, sparsekit's default (the "auto" forwards) against each reference per seed. Composed
    recipes are left to ``composed_rows``."""
    rows = [r for r in report["rows"] if "seed" in r and r["config"] not in vs_llmcompressor.COMPOSED]
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        tools = {
            "original": [r for r in mine if r["tool"].startswith("original")],
            "llm-compressor": [r for r in mine if r["tool"].startswith("llm-compressor")],
            "sparsekit": [
                r for r in mine if r["tool"].startswith("sparsekit") and r.get("forward_dtype") != "float32"
            ],
        }
        phases = tools["sparsekit"][0].get("timings_s", {}) if tools["sparsekit"] else {}
        summary = _summary(config, tools, phases)
        fp32 = [r for r in mine if r["tool"].startswith("sparsekit") and r.get("forward_dtype") == "float32"]
        if fp32:  # context: the same prune with fp32 calibration forwards, judged the same way
            other = _summary(config, {**tools, "sparsekit": fp32}, {})
            summary["sparsekit fp32"] = {**other["sparsekit"], **{k: other[k] for k in VERSUS}}
        out.append(summary)
    return out


def composed_rows(report: dict) -> list[dict]:
    """Per composed recipe in vs_llmcompressor's report: sparsekit's median ppl and prune s (default
    forwards), the original SparseGPT's at the same sparsity, and the median per-seed time ratio."""
    rows = [r for r in report["rows"] if "seed" in r and not r.get("error")]
    out = []
    for config in dict.fromkeys(r["config"] for r in rows if r["config"] in vs_llmcompressor.COMPOSED):
        ours = [r for r in rows if r["config"] == config and r.get("forward_dtype") != "float32"]
        refs = [(r, vs_llmcompressor.composed_reference(rows, r)) for r in ours]
        pairs = [(r, ref) for r, ref in refs if ref is not None]
        out.append({
            "config": config,
            "reference": f"original sparsegpt/{config.split('/')[1]}",
            "sparsekit": {"ppl": _median([r["ppl"] for r in ours]),
                          "prune_s": _median([r["prune_s"] for r in ours]),
                          "seeds": [r["seed"] for r in ours]},
            "original": {"ppl": _median([b["ppl"] for _, b in pairs]),
                         "prune_s": _median([b["prune_s"] for _, b in pairs]),
                         "seeds": [b["seed"] for _, b in pairs]},
            "time": _median([a["prune_s"] / b["prune_s"] for a, b in pairs]),
        })  # fmt: skip
    return out


def structured_rows(report: dict) -> list[dict]:
    """Summary rows of vs_original_structured's report (sparsekit: each method's ``HEADLINE`` row)."""
    rows = [r for r in report["rows"] if "seed" in r]
    out = []
    for row in dict.fromkeys(r["row"] for r in rows):
        mine = [r for r in rows if r["row"] == row]
        headline = HEADLINE[row.partition("/")[0]]
        tools = {
            "original": [r for r in mine if r["tool"].startswith("original")],
            "llm-compressor": [],
            "sparsekit": [r for r in mine if r["tool"] == headline],
        }
        phases = tools["sparsekit"][0].get("phases_s", {}) if tools["sparsekit"] else {}
        out.append(_summary(row, tools, phases))
    return out


def _summary(config: str, tools: dict[str, list[dict]], phases: dict) -> dict:
    """{config, per tool: median ppl / prune s and the seeds (failures counted), per reference: the
    median per-seed ppl and time ratios of sparsekit to it, sparsekit's phases (first seed)}."""
    good = {k: [r for r in v if not r.get("error")] for k, v in tools.items()}
    summary: dict = {"config": config, "phases_s": phases}
    for name, got in good.items():
        summary[name] = {
            "ppl": _median([r["ppl"] for r in got]),
            "prune_s": _median([r["prune_s"] for r in got]),
            "seeds": [r["seed"] for r in got],
            "failed": [r.get("error", "") for r in tools[name] if r.get("error")],
        }
    ours = {r["seed"]: r for r in good["sparsekit"]}
    for name in ("original", "llm-compressor"):
        pairs = [(ours[r["seed"]], r) for r in good[name] if r["seed"] in ours]
        summary[f"vs {name}"] = {
            "ppl": _median([a["ppl"] / b["ppl"] for a, b in pairs]),
            "time": _median([a["prune_s"] / b["prune_s"] for a, b in pairs]),
            "seeds": len(pairs),
        }
    return summary


def _cell(tool: dict) -> str:
    if tool["failed"] and not tool["seeds"]:
        return "failed"
    if not tool["seeds"]:
        return "-"
    return f"{tool['ppl']:.2f} ({tool['prune_s']:.0f})"


def _ratio(summary: dict, name: str) -> str:
    r = summary[f"vs {name}"]
    if not r["seeds"]:
        return "-"
    met = "yes" if r["ppl"] <= 1 and r["time"] <= 0.5 else "no"
    return f"{r['ppl']:.3f} / {r['time']:.2f} ({met})"


def _fp32_cell(fp32: dict | None) -> str:
    if not fp32 or not fp32["seeds"]:
        return "-"
    ratios = "; ".join(
        f"{fp32[k]['ppl']:.3f} / {fp32[k]['time']:.2f}" if fp32[k]["seeds"] else "-" for k in VERSUS
    )
    return f"{_cell(fp32)}: {ratios}"


def composed_markdown(rows: list[dict]) -> list[str]:
    """The composed recipes' lines of the summary (none where no recipe ran)."""
    if not rows:
        return []
    lines = [
        "",
        "Composed recipes against the original SparseGPT at their sparsity (same session and ids; "
        "the target: time ratio <= 1):",
        "",
        "| recipe | seeds | sparsekit | original SparseGPT | time ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = r["original"]
        cell = f"{ref['ppl']:.2f} ({ref['prune_s']:.0f})" if ref["seeds"] else "-"
        met = "-" if not ref["seeds"] else f"{r['time']:.2f} ({'yes' if r['time'] <= 1 else 'no'})"
        ours = _cell({**r["sparsekit"], "failed": []})
        lines.append(f"| {r['config']} | {len(r['sparsekit']['seeds'])} | {ours} | {cell} | {met} |")
    return lines


def markdown(head: str, rows: list[dict], composed: list[dict] | None = None) -> str:
    lines = [
        head,
        "",
        "Medians over the seeds a row ran (ppl, prune s in brackets); ratios are sparsekit's default "
        "over each reference, the median of the per-seed ratios (ppl / time; the issue's targets: "
        "ppl <= 1 and time <= 0.5, 'yes' where both hold).",
        "",
        "| config | seeds | original code | llm-compressor | sparsekit default | vs original | "
        "vs llm-compressor | sparsekit's phases (s) | "
        "sparsekit, fp32 forwards: vs original; vs llm-compressor (ppl / time) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        seeds = len(r["sparsekit"]["seeds"])
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases_s"].items()) or "-"
        lines.append(
            f"| {r['config']} | {seeds} | {_cell(r['original'])} | {_cell(r['llm-compressor'])} | "
            f"{_cell(r['sparsekit'])} | {_ratio(r, 'original')} | {_ratio(r, 'llm-compressor')} | {phases} | "
            f"{_fp32_cell(r.get('sparsekit fp32'))} |"
        )
    failed = list(dict.fromkeys((r["config"], n, e) for r in rows for n in HEADS for e in r[n]["failed"]))
    lines += ["", *(f"- {c}, {n} failed: {e}" for c, n, e in failed)] if failed else []
    lines += composed_markdown(composed or [])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/vs_references")
    p.add_argument("--original", metavar="DIR", help="where the original checkouts go (needed to run)")
    p.add_argument(
        "--from-reports", nargs="+", metavar="JSON", help="merge these halves' reports instead of running"
    )
    p.add_argument("--original-from", metavar="URL", help="clone the checkouts from URL/<name>")
    p.add_argument("--venv", default=".venv-llmc", help="llm-compressor's virtual environment")
    p.add_argument("--setup", action="store_true", help="create --venv when it is missing")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration draws (every row)")
    p.add_argument(
        "--structured-seeds", type=int, nargs="+", help="the structured half's draws (default --seeds)"
    )
    p.add_argument(
        "--forward-dtypes", nargs="+", default=["auto", "float32"], choices=("auto", "float32"),
        help="sparsekit's calibration-forward variants in the unstructured half (the summary reads auto)",
    )  # fmt: skip
    p.add_argument(
        "--composed",
        action="store_true",
        help="also sparsekit's composed recipes, timed against the original SparseGPT",
    )
    args = p.parse_args(argv)
    if args.from_reports:
        return summarize_reports(p, args, argv)
    if not args.original:
        p.error("--original DIR is needed to run the references (or --from-reports to merge reports)")
    if "auto" not in args.forward_dtypes:
        p.error("--forward-dtypes needs auto: the summary judges sparsekit's default forwards")
    for seeds in (args.seeds, args.structured_seeds or []):
        if len(set(seeds)) != len(seeds):
            p.error(f"a seed list repeats a seed: {seeds}")
    if not (Path(args.venv) / "bin" / "python").is_file() and not args.setup:
        p.error(f"{args.venv} has no python: pass --setup to create llm-compressor's environment there")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    env = environment()  # the commit and time this table starts at
    out = Path(args.out)
    source = ["--original-from", args.original_from] if args.original_from else []
    common = ["--original", args.original, *source]
    unstructured, structured = (out.parent / f"{out.name}-{half}" for half in ("unstructured", "structured"))
    log.info("unstructured half -> %s", unstructured)
    vs_llmcompressor.main(
        [*common, "--out", str(unstructured), "--venv", args.venv, *(["--setup"] if args.setup else []),
         "--seeds", *map(str, args.seeds), "--forward-dtypes", *args.forward_dtypes,
         "--rows", *vs_llmcompressor.CONFIGS, *(vs_llmcompressor.COMPOSED if args.composed else [])]
    )  # fmt: skip
    log.info("structured half -> %s", structured)
    vs_original_structured.main(
        [*common, "--out", str(structured), "--seeds", *map(str, args.structured_seeds or args.seeds)]
    )
    reports = [json.loads(path.with_suffix(".json").read_text()) for path in (unstructured, structured)]
    rows = unstructured_rows(reports[0]) + structured_rows(reports[1])
    composed = composed_rows(reports[0])
    head = (
        f"{run_line('bench/vs_references.py', argv, env)}; the halves' own reports: {unstructured}.md, "
        f"{structured}.md (their protocol and versions in their headers)."
    )
    doc = {"environment": env, "args": vars(args), "rows": rows, "composed": composed}
    write_json_atomic(out.with_suffix(".json"), doc)
    write_text_atomic(out.with_suffix(".md"), markdown(head, rows, composed))
    print(markdown(head, rows, composed))
    return 0


def summarize_reports(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int:
    """--from-reports: the summary of earlier reports, merged (nothing runs)."""
    runs = (
        "original",
        "original_from",
        "setup",
        "venv",
        "seeds",
        "structured_seeds",
        "forward_dtypes",
        "composed",
    )
    given = [f"--{a.replace('_', '-')}" for a in runs if getattr(args, a) != p.get_default(a)]
    if given:
        p.error(f"--from-reports runs nothing: drop {' '.join(given)}")
    paths = [Path(f) for f in args.from_reports]
    missing = [str(f) for f in paths if not f.is_file()]
    if missing:
        p.error(f"no such report: {' '.join(missing)}")
    try:
        unstructured, structured = merge_reports([json.loads(f.read_text()) for f in paths])
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        p.error(f"cannot merge the reports: {exc}")
    rows = unstructured_rows(unstructured) + structured_rows(structured)
    composed = composed_rows(unstructured)
    commits = sorted({e["commit"] for half in (unstructured, structured) for e in half["environments"]})
    cpus = sorted({e["cpu"] for half in (unstructured, structured) for e in half["environments"]})
    head = (
        f"{run_line('bench/vs_references.py', argv, environment())}; merged from "
        f"{', '.join(map(str, paths))} (commits {', '.join(commits)}; {'; '.join(cpus)}; their protocol "
        "and versions in their headers)."
    )
    out = Path(args.out)
    write_json_atomic(
        out.with_suffix(".json"),
        {"args": vars(args), "sources": args.from_reports, "rows": rows, "composed": composed},
    )
    write_text_atomic(out.with_suffix(".md"), markdown(head, rows, composed))
    print(markdown(head, rows, composed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
