"""sparsekit against llm-compressor (the maintained peer) on the same model, tokens and machine, in one run.

    python bench/vs_llmcompressor.py --setup --out docs/data/vs_llmcompressor

``--setup`` creates llm-compressor's own virtual environment (``--venv``, default ``.venv-llmc``:
torch 2.13.0 and llmcompressor 0.14.0.1 from PyPI; it pins transformers <= 5.17, so it never
shares sparsekit's) when it is missing. Protocol (issue 28): SmolLM2-135M in fp32, 64 x 512
calibration tokens of the offline corpus (seed 0), perplexity on 32,768 held-out tokens in
windows of 512, 2 threads. Per config (method x sparsity), in turn: llm-compressor's one-shot
modifier run by ``bench/llmcompressor_driver.py`` in its venv on the dense model saved as
safetensors and the same calibration ids (attention mask all ones), its pruned decoder weights
loaded back here; then sparsekit with its default calibration forwards (bf16 where the CPU has
fast bf16 matmuls) and with fp32 forwards (``forward_dtype="float32"``). Every row is evaluated by
the same perplexity code on the same tokens; prune time is each tool's own one-shot call (model
load excluded). ``--rows`` picks configs (e.g. ``sparsegpt/2:4 wanda/0.5``; ``wanda+owl/0.7``: OWL's
allocation, M 5 and lambda 0.08, in both tools). ``--seeds 0 1 2 3`` repeats every config on that
many calibration draws (both tools get the same ids per seed) and adds a summary: per tool the
median ppl over seeds with its range, and the median of the per-seed ratio to llm-compressor (a
2:4 choice flips on rounding-level differences, so one seed cannot rank tools by a few percent).
``--original DIR`` adds the papers' own code as a third tool (issue 28): ``DIR/wanda`` and
``DIR/owl`` are git checkouts of locuslab/wanda and luuyin/OWL (Wanda and SparseGPT rows from the
first, ``+owl`` rows from the second), cloned there from GitHub at ``ORIGINAL`` 's pinned commits
when missing (``--original-from`` points the clones elsewhere, e.g. local mirrors); each prune
runs in ``bench/original_driver.py`` (a subprocess of this venv, with the shims it lists). A
reference table then gives, per config and seed, sparsekit's default ppl and prune time as ratios
to each reference. ``--forward-dtypes auto`` skips sparsekit's fp32-forward variant; ``--passes one
two`` runs sparsekit with one calibration forward per block and with two (``sequential=False``: a
dense forward for the statistics, then a pruned one, the references' order); the default, ``auto``,
runs what ``sparsekit.prune`` does by default (one for SparseGPT and weight updates, two for Wanda).
Writes <out>.json and <out>.md after every row.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import sparsekit
from sparsekit._env import environment, run_line
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model
from sparsekit.pruning import PASSES, PruneConfig

CONFIGS = [
    "sparsegpt/0.5", "sparsegpt/2:4", "wanda/0.5", "wanda/2:4",
    "wanda/0.7", "wanda+owl/0.7", "sparsegpt+owl/0.7",
]  # fmt: skip
# sparsekit's composed recipes (issue 28: at most the original SparseGPT's time at the same sparsity);
# no reference runs them, so they are timed against the session's own original SparseGPT row
COMPOSED = ["ria+permute+admm/2:4", "sparsegpt+owl+admm+dsnot/0.5"]
PIECES = {"owl": {"allocation": "owl"}, "permute": {"permute": True}, "admm": {"update": "admm"}}
PIECES |= {"dsnot": {"refine": "dsnot"}}
PINS = ("torch==2.13.0", "llmcompressor==0.14.0.1")
DRIVER = Path(__file__).with_name("llmcompressor_driver.py")
ORIGINAL_DRIVER = Path(__file__).with_name("original_driver.py")
ORIGINAL = {  # checkout name -> (GitHub repository, the commit every table row ran)
    "wanda": ("https://github.com/locuslab/wanda", "8e8fc87b4a2f9955baa7e76e64d5fce7fa8724a6"),
    "owl": ("https://github.com/luuyin/OWL", "dddb7a4bffe27c73e4c8cf692b3a5e36401532c8"),
}
log = logging.getLogger("vs_llmcompressor")


def setup_venv(venv: Path) -> Path:
    """llm-compressor's own environment (created with ``PINS`` when missing) -> its python."""
    python = venv / "bin" / "python"
    if python.is_file():
        return python
    log.info("creating %s with %s (a few minutes, network needed)", venv, " ".join(PINS))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for pin in PINS:
        subprocess.run([str(python), "-m", "pip", "install", "-q", pin], check=True)
    return python


def decoder_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Share of zeros over the decoder-block linears, from their ``decoder_masks``."""
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def decoder_masks(model) -> dict[str, torch.Tensor]:
    """{name: weight == 0} (bool, the weight's shape) of every linear inside the decoder blocks."""
    return {
        name: module.weight.detach() == 0
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }


def mask_difference(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    """Share of decoder weights whose kept/pruned state differs, and the first block that differs
    (None: identical masks). Names ``...layers.<i>...``."""
    differ = total = 0
    first = None
    for name, mask in ours.items():
        count = int((mask != ref[name]).sum())
        differ, total = differ + count, total + mask.numel()
        if count:
            block = int(name.split(".layers.")[1].split(".")[0])
            first = block if first is None else min(first, block)
    return {"share": differ / total, "first_block": first}


def run_llmcompressor(python: Path, dense, folder: Path, calib_file: Path, method: str, sparsity: str):
    """(pruned copy of ``dense``, the driver's report)."""
    out, report = folder / "llmc.safetensors", folder / "llmc.json"
    command = [
        str(python), str(DRIVER), "--model", str(folder / "dense"), "--calib", str(calib_file),
        "--method", method, "--sparsity", sparsity, "--out", str(out), "--report", str(report),
    ]  # fmt: skip
    return _load_pruned(command, dense, out, report, "llm-compressor")


def run_driver(command: list[str], tool: str) -> None:
    """Run a prune driver ``command``, its stderr passed on; a RuntimeError naming ``tool`` and the
    driver's last line when it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    sys.stderr.write(done.stderr[-20000:])
    if done.returncode:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        raise RuntimeError(f"{tool} failed (exit {done.returncode}): {last[0]}")


def _load_pruned(command: list[str], dense, out: Path, report: Path, tool: str):
    """Run a driver ``command``; load the decoder weights it wrote into a copy of ``dense``."""
    run_driver(command, tool)
    state = load_file(str(out))
    model = copy.deepcopy(dense)
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown or not state:
        raise RuntimeError(f"{tool}'s weights do not match the model: {unknown[:3]}")
    model.load_state_dict(state, strict=False)
    return model, json.loads(report.read_text())


def fetch_original(folder: Path, source: str | None, pins: dict | None = None) -> dict[str, Path]:
    """The checkouts of ``pins`` ({name: (repository, commit)}; default ``ORIGINAL``) under ``folder``
    (cloned from GitHub, or ``source``/<name> when given, at the pinned commit when missing) ->
    {name: path}. An existing checkout is used as it is."""
    out = {}
    for name, (url, commit) in (ORIGINAL if pins is None else pins).items():
        path = folder / name
        if not path.is_dir():
            origin = f"{source}/{name}" if source else url
            log.info("cloning %s into %s at %s", origin, path, commit[:12])
            subprocess.run(["git", "clone", "-q", origin, str(path)], check=True)
            subprocess.run(["git", "-C", str(path), "checkout", "-q", commit], check=True)
        out[name] = path
    return out


def run_original(code: dict[str, Path], dense, folder: Path, calib_file: Path, method: str, sparsity: str):
    """(copy of ``dense`` pruned by the original code, the driver's report)."""
    impl = "owl" if method.endswith("+owl") else "wanda"
    out, report = folder / "original.safetensors", folder / "original.json"
    command = [
        sys.executable, str(ORIGINAL_DRIVER), "--code", str(code[impl]), "--impl", impl,
        "--model", str(folder / "dense"), "--calib", str(calib_file), "--method", method,
        "--sparsity", sparsity, "--out", str(out), "--report", str(report),
    ]  # fmt: skip
    return _load_pruned(command, dense, out, report, "the original code")


def recipe_options(method: str) -> tuple[str, dict]:
    """'sparsegpt+owl+admm' -> ('sparsegpt', {allocation: owl, update: admm}) (``PIECES``)."""
    score, *pieces = method.split("+")
    options: dict = {}
    for piece in pieces:
        if piece not in PIECES:
            raise ValueError(f"unknown recipe piece {piece!r} in {method!r}; choose from {' '.join(PIECES)}")
        options |= PIECES[piece]
    return score, options


def run_sparsekit(
    dense, calib: torch.Tensor, method: str, sparsity: str, forward_dtype: str, passes: str = "auto"
):
    """sparsekit's one-shot prune of a copy of ``dense``; ``passes``: "auto" (the default), "one"
    (one calibration forward per block) or "two" (``sequential=False``, the references' order)."""
    model = copy.deepcopy(dense)
    method, options = recipe_options(method)
    sequential = PASSES[passes]
    if sequential is None:  # the row names what auto chose
        passes = "one" if PruneConfig(method=method, **options).one_forward else "two"
    start = time.perf_counter()
    report = sparsekit.prune(
        model, method=method, sparsity=sparsity, calib=calib, forward_dtype=forward_dtype,
        show_progress=False, sequential=sequential, **options,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    info = {"prune_s": seconds, "timings_s": report.timings_s, "forward_dtype": report.forward_dtype}
    return model, info | {"passes": passes, "notes": report.notes}


def _forwards(row: dict) -> str:
    """'float32, one pass': a sparsekit row's calibration forwards (rows before the option: dtype only)."""
    if "passes" not in row:
        return row["forward_dtype"]
    return f"{row['forward_dtype']}, {'one pass' if row['passes'] == 'one' else 'two passes'}"


def _markdown(head: str, rows: list[dict]) -> str:
    lines = [
        head,
        "",
        "| config | seed | tool | calibration forwards | ppl | prune s | decoder sparsity |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ppl = "failed" if r.get("error") else f"{r['ppl']:.3f}"
        forwards = _forwards(r) if "forward_dtype" in r else "-"
        lines.append(
            f"| {r['config']} | {r.get('seed', '-')} | {r['tool']} | {forwards} | {ppl} | "
            f"{r.get('prune_s', 0):.1f} | {r.get('sparsity', 0):.4f} |"
        )
    lines += _reference_summary(rows)
    lines += _composed_summary(rows)
    lines += _seed_summary(rows)
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["", *(f"- {r['config']}, {r['tool']}: {r['error']}" for r in failed)]
    timed = [r for r in rows if r.get("timings_s")]
    if timed:
        lines += ["", "sparsekit's phases (s):", ""]
        seed = lambda r: f", seed {r['seed']}" if "seed" in r else ""  # noqa: E731
        lines += [
            f"- {r['config']}{seed(r)} ({_forwards(r)}): "
            + ", ".join(f"{k} {v:.1f}" for k, v in r["timings_s"].items())
            for r in timed
        ]
    return "\n".join(lines) + "\n"


def _variant(row: dict) -> str:
    return f"{row['tool']} ({_forwards(row)})" if row.get("forward_dtype") else row["tool"]


def _seed_summary(rows: list[dict]) -> list[str]:
    """Per config and tool over the seeds: median ppl (min-max), median prune s, and the median of
    the per-seed ppl ratio to llm-compressor on the same calibration ids. Empty for one seed."""
    scored = [r for r in rows if "seed" in r and not r.get("error")]
    if len({r["seed"] for r in scored}) < 2:
        return []
    lines = [
        "",
        "Over the seeds (median, range in brackets; ratio: per seed, ppl / llm-compressor's ppl on the "
        "same ids):",
        "",
        "| config | tool | seeds | ppl median [min-max] | ratio to llm-compressor median [min-max] "
        "| prune s median |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for config in dict.fromkeys(r["config"] for r in scored):
        mine = [r for r in scored if r["config"] == config]
        peer = {r["seed"]: r["ppl"] for r in mine if r["tool"].startswith("llm-compressor")}
        for variant in dict.fromkeys(_variant(r) for r in mine):
            got = [r for r in mine if _variant(r) == variant]
            ppl = [r["ppl"] for r in got]
            ratios = [r["ppl"] / peer[r["seed"]] for r in got if r["seed"] in peer]
            ratio = (
                f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]" if ratios else "-"
            )
            lines.append(
                f"| {config} | {variant} | {len(got)} | {statistics.median(ppl):.2f} [{min(ppl):.2f}-"
                f"{max(ppl):.2f}] | {ratio} | {statistics.median(r.get('prune_s', 0) for r in got):.1f} |"
            )
    return lines


def composed_reference(rows: list[dict], recipe: dict) -> dict | None:
    """The row of ``rows`` a composed ``recipe`` row is timed against: the original code's SparseGPT
    at the recipe's sparsity on the same seed (None where that did not run or failed)."""
    target = f"sparsegpt/{recipe['config'].split('/')[1]}"
    return next(
        (
            r for r in rows
            if r.get("config") == target and r.get("seed") == recipe["seed"]
            and r.get("tool", "").startswith("original") and not r.get("error")
        ),
        None,
    )  # fmt: skip


def _composed_summary(rows: list[dict]) -> list[str]:
    """Each composed recipe's prune time against the original SparseGPT at its sparsity and seed
    (the issue's target: ratio <= 1)."""
    scored = [r for r in rows if "seed" in r and not r.get("error")]
    lines = []
    for r in (r for r in scored if r["config"] in COMPOSED):
        ref = composed_reference(scored, r)
        if ref is not None:
            lines.append(
                f"- {r['config']}, seed {r['seed']} ({_forwards(r)}): {r['prune_s']:.1f} s "
                f"against the original SparseGPT's {ref['prune_s']:.1f} s "
                f"({r['prune_s'] / ref['prune_s']:.2f}x); ppl {r['ppl']:.2f} against its {ref['ppl']:.2f}"
            )
    return (
        ["", "Composed recipes against the original SparseGPT (same sparsity and ids):", "", *lines]
        if lines
        else []
    )


def _reference_summary(rows: list[dict]) -> list[str]:
    """Per config and seed: each sparsekit variant against each reference on the same ids: ppl and
    prune time as ratios (below 1: sparsekit lower / faster) and how far the masks differ."""
    scored = [r for r in rows if "seed" in r and not r.get("error")]
    refs = lambda r: r["tool"].startswith(("llm-compressor", "original"))  # noqa: E731
    if not any(refs(r) for r in scored):
        return []
    lines = [
        "",
        "sparsekit against each reference on the same ids (ratios: sparsekit / reference; the issue's "
        "targets: ppl <= 1, time <= 0.5):",
        "",
        "| config | seed | reference | sparsekit forwards | reference ppl | sparsekit ppl | ppl ratio "
        "| time ratio | masks differ (share) | first block that differs |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for config, seed in dict.fromkeys((r["config"], r["seed"]) for r in scored):
        mine = [r for r in scored if r["config"] == config and r["seed"] == seed]
        for ref in (r for r in mine if refs(r)):
            for ours in (r for r in mine if r["tool"].startswith("sparsekit")):
                diff = ours.get("mask_vs", {}).get(ref["tool"], {})
                first = diff.get("first_block", "-")
                lines.append(
                    f"| {config} | {seed} | {ref['tool']} | {_forwards(ours)} | {ref['ppl']:.2f} | "
                    f"{ours['ppl']:.2f} | {ours['ppl'] / ref['ppl']:.3f} | "
                    f"{ours['prune_s'] / ref['prune_s']:.2f} | {diff.get('share', float('nan')):.4f} | "
                    f"{'none' if first is None else first} |"
                )
    pairs = [(r, t, d) for r in scored if refs(r) for t, d in r.get("mask_vs", {}).items()]
    if pairs:
        lines += ["", "The references against each other:", ""]
        lines += [
            f"- {r['config']}, seed {r['seed']}: {r['tool']} vs {t}: masks differ on {d['share']:.4f} of "
            f"the weights (first block {'none' if d['first_block'] is None else d['first_block']})"
            for r, t, d in pairs
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="reports/vs_llmcompressor")
    p.add_argument("--venv", default=".venv-llmc", help="llm-compressor's virtual environment")
    p.add_argument("--setup", action="store_true", help="create --venv when it is missing")
    p.add_argument("--rows", nargs="+", default=CONFIGS, metavar="METHOD/SPARSITY")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="calibration draws, each run by every tool"
    )
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument(
        "--original", metavar="DIR", help="also run the original code: checkouts DIR/wanda and DIR/owl"
    )
    p.add_argument("--original-from", metavar="URL", help="clone the checkouts from URL/wanda, URL/owl")
    p.add_argument(
        "--forward-dtypes", nargs="+", default=["auto", "float32"], choices=("auto", "float32"),
        help="sparsekit's calibration-forward variants, a row each",
    )  # fmt: skip
    p.add_argument(
        "--passes", nargs="+", default=["auto"], choices=tuple(PASSES),
        help="sparsekit's calibration forwards per block (auto: the default's choice), a row each",
    )  # fmt: skip
    args = p.parse_args(argv)
    unknown = [r for r in args.rows if r not in CONFIGS + COMPOSED]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {' '.join(CONFIGS + COMPOSED)}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    if args.original_from and not args.original:
        p.error("--original-from needs --original DIR (where the checkouts go)")
    venv = Path(args.venv)
    if not (venv / "bin" / "python").is_file() and not args.setup:
        p.error(f"{venv} has no python: pass --setup to create llm-compressor's environment there")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    python = setup_venv(venv)
    original = fetch_original(Path(args.original), args.original_from) if args.original else None
    dense, tok = load_model("smollm2", dtype=torch.float32)
    eval_ids = evaluation_ids(tok, "wiki-offline", max_tokens=args.eval_tokens)
    env = environment()
    head = (
        f"{run_line('bench/vs_llmcompressor.py', argv, env)} (llm-compressor in its own venv"
        f"{'; the original code via bench/original_driver.py' if original else ''}); "
        f"SmolLM2-135M fp32, calibration {args.nsamples} x {args.seqlen} (seeds "
        f"{' '.join(map(str, args.seeds))}), ppl on {eval_ids.shape[1]} "
        "held-out tokens in windows of 512."
    )
    out = Path(args.out)
    rows = [{"config": "dense", "tool": "-", "ppl": perplexity_of_ids(dense, eval_ids, 512).ppl}]

    ref_masks: dict[str, dict[str, torch.Tensor]] = {}  # this config and seed's references

    def add(row: dict, model) -> None:
        row["ppl"] = perplexity_of_ids(model, eval_ids, 512).ppl
        masks = decoder_masks(model)
        row["sparsity"] = decoder_sparsity(masks)
        row["mask_vs"] = {tool: mask_difference(masks, ref) for tool, ref in ref_masks.items()}
        if not row["tool"].startswith("sparsekit"):
            ref_masks[row["tool"]] = masks
        rows.append(row)
        log.info("%s", {k: v for k, v in row.items() if k != "timings_s"})
        write_json_atomic(out.with_suffix(".json"), {"environment": env, "args": vars(args), "rows": rows})
        write_text_atomic(out.with_suffix(".md"), _markdown(head, rows))

    def references(folder: Path, calib_file: Path, config: str, seed: int) -> None:
        """The original code (with --original) and llm-compressor on one config; a failure is a
        result too: recorded, the run goes on."""
        method, sparsity = config.split("/")
        runs = [
            ("llm-compressor", lambda: run_llmcompressor(python, dense, folder, calib_file, method, sparsity))
        ]
        if original:
            runs.insert(
                0, ("original", lambda: run_original(original, dense, folder, calib_file, method, sparsity))
            )
        for name, run in runs:
            try:
                model, info = run()
            except RuntimeError as exc:
                log.error("%s", exc)
                rows.append(
                    {"config": config, "seed": seed, "tool": name, "ppl": float("nan"), "error": str(exc)}
                )
                continue
            version = info["code"] if name == "original" else info["llmcompressor"]
            add({"config": config, "seed": seed, "tool": f"{name} {version}", **info}, model)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dense.save_pretrained(folder / "dense")
        tok.save_pretrained(folder / "dense")
        for seed in args.seeds:
            calib = calibration_ids(tok, "wiki-offline", args.nsamples, args.seqlen, seed=seed)
            calib_file = folder / "calib.pt"
            torch.save(calib.clone(), calib_file)
            for config in args.rows:
                method, sparsity = config.split("/")
                ref_masks.clear()
                if config not in COMPOSED:  # neither reference runs sparsekit's composed recipes
                    references(folder, calib_file, config, seed)
                for forward_dtype, passes in itertools.product(args.forward_dtypes, args.passes):
                    model, info = run_sparsekit(dense, calib, method, sparsity, forward_dtype, passes)
                    add(
                        {
                            "config": config,
                            "seed": seed,
                            "tool": f"sparsekit {sparsekit.__version__}",
                            **info,
                        },
                        model,
                    )
                del model
    print(_markdown(head, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
