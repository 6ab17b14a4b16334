"""Structured pruning on the real default model: ppl, parameters, prune time and end-to-end
TTFT / TPOT of every variant, with all generations interleaved in rounds (one run, one machine).

    python bench/structured_table.py --out reports/structured          # about 35 min on 2 cores
    python bench/structured_table.py --variants dense,flap-20,angular-6 --out /tmp/s   # a subset
    # issue 25's table (every method at 20% and 35%, zero-shot accuracy, the best three of each size
    # distilled 200 steps): many hours on 2 cores
    python bench/structured_table.py --preset round2 --items 200 --distill-steps 200 --distill-best 3 \
        --out reports/structured_round2
    # the same, resumable across sessions: every pruned model is saved to --models, and a rerun of the
    # same command after a stop keeps the finished rows (and timing / distillation once done)
    python bench/structured_table.py --preset round2 --items 200 --distill-steps 200 --distill-best 3 \
        --models reports/round2-models --resume --out docs/data/structured_round2

Variants: dense; shortgpt-N / angular-N / shortened-ppl-N / shortened-taylor-N (N of 30 blocks;
-r: with the linear repair; -rw: the repair re-solves down_proj's weights);
wanda-sp-P / flap-P (P% of block parameters, same widths in every block; flap-P-adaptive: per-block
widths; -refit: the least-squares refit of the cut projections); blockpruner-P (attention and MLP
sub-blocks removed greedily by calibration ppl, P% of block parameters; -lazy: the lazy search);
2ssp-P (MLP channels by activation norm, then attention sub-blocks by ppl); llm-pruner-P (Taylor
importance of coupled groups in blocks 4 .. L-3; -element2, -vector: the other criteria; -refit);
minitron-P (hidden size and MLP channels by activation; -all: heads too; -width: MLP and heads only);
sparsegpt-2:4; stacked steps joined by "+", each pruning what the one before left
(flap-20+2:4; angular-3-rw+flap-28-adaptive-refit: 28% of the block parameters depth left).
``--rounds 0`` skips the generation timing (ppl, parameters and prune time only).
Writes structured.json and structured.md to --out. With ``--models`` every model (dense too) is
saved there as a sparsekit checkpoint and the timing and distillation load them from there, so
every timed model took the same path from disk; each row records the commit and CPU it was pruned
on (the process's start: edits made while it runs are not in it).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch

import sparsekit
from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.bench.e2e import prompt_ids, time_generation_interleaved
from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.models import load_model
from sparsekit.models import model_bytes
from sparsekit.pruning.structured import block_param_count, param_count

DEFAULT_VARIANTS = (
    "dense,shortgpt-3,shortgpt-3-r,shortgpt-6,shortgpt-6-r,shortgpt-9,shortgpt-9-r,"
    "angular-3,angular-3-r,angular-6,angular-6-r,angular-9,angular-9-r,"
    "wanda-sp-20,wanda-sp-50,flap-20,flap-50,flap-20-adaptive,flap-50-adaptive,sparsegpt-2:4,flap-20+2:4"
)

# issue 25's table: every method at 20% and 35% of block parameters (depth: 6 and 10 of 30 blocks)
ROUND2 = ",".join(
    ["dense"]
    + [
        v
        for blocks, p, hybrids in (
            (6, 20, ("angular-3-rw+flap-11-adaptive-refit",)),
            # 3 or 5 blocks first (10%, 17%), then width: p% in all (the recipes table's best at 35%)
            (10, 35, ("angular-3-rw+flap-28-adaptive-refit", "shortgpt-5-rw+flap-22-adaptive-refit")),
        )
        for v in (
            f"shortgpt-{blocks}",
            f"shortgpt-{blocks}-r",
            f"shortgpt-{blocks}-rw",
            f"angular-{blocks}-r",
            f"angular-{blocks}-rw",
            *hybrids,
            f"shortened-ppl-{blocks}-r",
            f"shortened-taylor-{blocks}-r",
            f"wanda-sp-{p}",
            f"wanda-sp-{p}-refit",
            f"flap-{p}",
            f"flap-{p}-adaptive",
            f"flap-{p}-adaptive-refit",
            f"llm-pruner-{p}",
            f"llm-pruner-{p}-refit",
            f"minitron-{p}",
            f"minitron-{p}-all",
            f"blockpruner-{p}-lazy",
            f"2ssp-{p}",
        )  # fmt: skip
    ]
)
PRESETS = {"round1": DEFAULT_VARIANTS, "round2": ROUND2}
# the width methods' and the cosine depth criteria's calibration forwards stay fp32 in these
# tables, as they ran before those methods took forward_dtype (whose default, "auto", is bf16 where
# the CPU has bf16 matmuls)
FP32_FORWARDS = {"forward_dtype": "model"}


def steps_of(variant: str) -> list[tuple[str, str, dict]]:
    """'angular-6-r' -> [("angular", "0", {"remove_layers": 6, "repair": True})], etc."""
    if variant == "dense":
        return []
    if variant in ("sparsegpt-2:4", "2:4"):
        return [("sparsegpt", "2:4", {})]
    if "+" in variant:  # stacked: each part prunes what the one before left
        return [step for part in variant.split("+") for step in steps_of(part)]
    for method in ("shortgpt", "angular", "shortened-ppl", "shortened-taylor"):
        if variant.startswith(method + "-"):
            blocks, *flags = variant[len(method) + 1 :].split("-")
            if flags not in ([], ["r"], ["rw"]):
                raise ValueError(f"unknown variant {variant!r}: the {method} suffixes are -r and -rw")
            kw = {"remove_layers": int(blocks), "repair": bool(flags)}
            if flags == ["rw"]:
                kw["repair_fit"] = "weights"
            elif not flags and method in ("shortgpt", "angular"):  # they cast their forwards without repair
                kw |= FP32_FORWARDS
            return [(method, "0", kw)]
    for method in ("blockpruner", "2ssp"):
        if variant.startswith(method + "-"):
            percent, *flags = variant[len(method) + 1 :].split("-")
            if set(flags) - {"lazy"}:
                raise ValueError(f"unknown variant {variant!r}: the {method} suffix is -lazy")
            search = {"subblock_search": "lazy"} if flags else {}
            return [(method, str(int(percent) / 100), search)]
    if variant.startswith("llm-pruner-"):
        percent, *flags = variant[len("llm-pruner-") :].split("-")
        if set(flags) - {"element2", "vector", "refit"}:
            raise ValueError(
                f"unknown variant {variant!r}: llm-pruner suffixes are -element2, -vector, -refit"
            )
        kw: dict = {"refit": "refit" in flags} | FP32_FORWARDS
        kw.update(("importance", f) for f in flags if f in ("element2", "vector"))
        return [("llm-pruner", str(int(percent) / 100), kw)]
    if variant.startswith("minitron-"):
        percent, *flags = variant[len("minitron-") :].split("-")
        axes = {(): "hidden,mlp", ("all",): "hidden,mlp,heads", ("width",): "mlp,heads"}.get(tuple(flags))
        if axes is None:
            raise ValueError(f"unknown variant {variant!r}: minitron suffixes are -all and -width")
        return [("minitron", str(int(percent) / 100), {"axes": axes})]
    for method in ("wanda-sp", "flap"):
        if variant.startswith(method + "-"):
            percent, *flags = variant[len(method) + 1 :].split("-")
            if set(flags) - {"adaptive", "refit", "bias", "nobias"} or {"bias", "nobias"} <= set(flags):
                raise ValueError(
                    f"unknown variant {variant!r}: width suffixes are -adaptive, -refit and one of -bias / "
                    "-nobias (bias compensation on / off; default: the method's)"
                )
            kw = {"widths": "adaptive" if "adaptive" in flags else "uniform", "refit": "refit" in flags}
            if {"bias", "nobias"} & set(flags):
                kw["bias_compensation"] = "bias" in flags
            return [(method, str(int(percent) / 100), kw | FP32_FORWARDS)]
    raise ValueError(f"unknown variant {variant!r}")


# what a kept row depends on (--resume)
PROTOCOL = ("model", "nsamples", "calib_seed", "seqlen", "eval_tokens", "eval_seqlen", "items")
TIMING = ("rounds", "prompt_len", "new_tokens")  # what kept timings depend on
DISTILL = ("distill_steps", "distill_lr", "distill_batch", "distill_seqlen", "items")


def settings(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    return {k: getattr(args, k) for k in names}


def check_resume(args: argparse.Namespace) -> None:
    """Before any work: timing and distillation of rows pruned in an earlier session read the saved
    models, so --resume with either needs --models."""
    if (args.rounds > 0 or args.distill_steps) and not args.models:
        raise SystemExit(
            "--resume keeps rows of a stopped run, but timing (--rounds) and distillation need every "
            "pruned model: add --models DIR (each model is saved there and loaded back), or --rounds 0 "
            "without --distill-steps"
        )


def resumed_state(args: argparse.Namespace) -> dict:
    """What a stopped run with the same protocol left in --out/structured.partial.json ({} if none):
    {"rows": {variant: row}, "timing": {...}}; a clear error for another protocol."""
    path = Path(args.out) / "structured.partial.json"
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    protocol = settings(args, PROTOCOL)
    if saved.get("protocol") != protocol:
        raise SystemExit(
            f"--resume: {path} was written with {saved.get('protocol')}, this run asks for {protocol}: "
            "give the same settings, or another --out"
        )
    return {"rows": {r["variant"]: r for r in saved["rows"]}, "timing": saved.get("timing")}


def claim_models_dir(args: argparse.Namespace) -> None:
    """--models holds the models of one protocol: refuse a folder written for another (before any
    work), mark a new one."""
    if not args.models:
        return
    mark, protocol = Path(args.models) / "protocol.json", settings(args, PROTOCOL)
    if mark.exists() and json.loads(mark.read_text()) != protocol:
        raise SystemExit(
            f"--models {args.models} holds models of {json.loads(mark.read_text())}, this run asks for "
            f"{protocol}: give another --models folder"
        )
    write_json_atomic(mark, protocol)


def model_dir(models: str, variant: str) -> Path:
    """Where ``variant``'s model is saved ('sparsegpt-2:4' -> 'sparsegpt-2_4')."""
    return Path(models) / variant.replace(":", "_")


def distil_choice(rows: list[dict], best: int, named: str) -> list[dict]:
    """The rows to distil: those named, and the ``best`` lowest-ppl variants of each size (the share
    of block parameters removed, to the nearest 5%)."""
    chosen = [r for r in rows if r["variant"] in named.split(",") and r["variant"] != "dense"]
    sizes: dict[int, list[dict]] = {}
    for r in rows:
        if r["variant"] != "dense" and r["removed"] > 0:
            sizes.setdefault(round(r["removed"] * 20), []).append(r)
    for group in sizes.values():
        chosen += sorted(group, key=lambda r: r["ppl"])[:best]
    return list({id(r): r for r in chosen}.values())


def distil(model, p: Protocol, args: argparse.Namespace) -> dict:
    """Distil a copy of ``model`` from the dense model (KL at T = 1, every block linear trained); its
    ppl, accuracies and training time. The pruned model itself stays as it was (it is timed)."""
    from sparsekit.hf.finetune import finetune

    student = copy.deepcopy(model)
    fr = finetune(
        student,
        input_ids=p.train_ids,
        steps=args.distill_steps,
        lr=args.distill_lr,
        batch_size=args.distill_batch,
        teacher=p.dense,
    )
    out = {
        "steps": args.distill_steps,
        "ppl": perplexity_of_ids(student, p.eval_ids, seqlen=args.eval_seqlen).ppl,
        "seconds": fr.seconds,
        "first_loss": fr.losses[0],
        "last_loss": fr.losses[-1],
        "accuracy": p.accuracy(student, args.items),
    }
    logging.info("distilled %d steps: ppl %.2f (%.0f s)", args.distill_steps, out["ppl"], fr.seconds)
    return out


def add_timing(rows: list[dict], timing: dict[str, dict]) -> None:
    """Each row gets its TTFT / TPOT figures and its speedups against dense (or the first variant)."""
    base = timing.get("dense", next(iter(timing.values())))
    for row in rows:
        t = timing[row["variant"]]
        row |= t | {
            "decode_speedup": base["tpot_ms"] / t["tpot_ms"],
            "prefill_speedup": base["ttft_ms"] / t["ttft_ms"],
        }


def timing_cells(r: dict) -> str:
    """The four timing cells of a row ('-' where the run was not timed: --rounds 0)."""
    if "tpot_ms" not in r:
        return "- | - | - | -"
    return (
        f"{r['ttft_ms']:.0f} ({r['ttft_p20_ms']:.0f}-{r['ttft_p80_ms']:.0f}) | "
        f"{r['tpot_ms']:.1f} ({r['tpot_p20_ms']:.1f}-{r['tpot_p80_ms']:.1f}) | "
        f"{r['decode_speedup']:.2f} | {r['prefill_speedup']:.2f}"
    )


def distil_cells(r: dict, steps: int) -> str:
    if not steps:
        return ""
    d = r.get("distilled") or {}
    if not d:
        return " - | - |"
    acc = "".join(f", {t} {a:.3f}" for t, a in d.get("accuracy", {}).items())
    return f" {d['ppl']:.2f}{acc} | {d['seconds']:.0f} |"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--variants", default=None, help="comma-separated (default: the round1 preset)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None, help="a named list of variants")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--calib-seed", type=int, default=0, help="which calibration windows (another draw)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--items",
        type=int,
        default=0,
        help="items per zero-shot task (wiki_lambada, wiki_continuation; 0: skip)",
    )
    parser.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="then distil --distill-variants and the --distill-best of each size from the dense model "
        "for this many steps (0: skip)",
    )
    parser.add_argument("--distill-variants", default="", help="comma-separated variants to distil")
    parser.add_argument(
        "--distill-best",
        type=int,
        default=0,
        help="distil the N lowest-ppl variants of each size (nearest 5%%)",
    )
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--distill-batch", type=int, default=2)
    parser.add_argument("--distill-seqlen", type=int, default=256)
    parser.add_argument("--out", default="reports/structured")
    parser.add_argument(
        "--models",
        default=None,
        help="save every model (dense too) to DIR/<variant> as a sparsekit checkpoint; the timing and "
        "distillation then load them from there (needed by --resume with timing or distillation)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep what a stopped run left in --out/structured.partial.json (same protocol): its rows, "
        "and its timing and distillation where their settings and rows are the same",
    )
    args = parser.parse_args()
    if args.variants and args.preset:
        parser.error("give --variants or --preset, not both")
    args.variants = args.variants or PRESETS[args.preset or "round1"]
    for variant in args.variants.split(","):  # a typo fails here, not after an hour of pruning
        steps_of(variant)
    if args.resume:
        check_resume(args)
    claim_models_dir(args)
    return args


class Protocol:
    """The model, tokens and tasks every row is measured with, loaded once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dense, self.tokenizer = load_model(args.model)
        tok = self.tokenizer
        self.calib = calibration_ids(tok, "wiki-offline", args.nsamples, args.seqlen, seed=args.calib_seed)
        self.eval_ids = evaluation_ids(tok, "wiki-offline", max_tokens=args.eval_tokens)
        self.prompts, self.prompt_source = prompt_ids(tok, 1, args.prompt_len)
        self.tasks = ("wiki_lambada", "wiki_continuation") if args.items else ()
        self.manager = None
        if self.tasks:
            from sparsekit.eval.zero_shot import task_manager

            self.manager = task_manager(list(self.tasks), None)
        self.train_ids = calibration_ids(tok, "wiki-offline", 256, args.distill_seqlen, seed=1)
        self.dense_block_params = block_param_count(self.dense)

    def accuracy(self, model, items: int) -> dict[str, float]:
        from sparsekit.eval.zero_shot import zero_shot

        return {
            t: zero_shot(model, [t], self.tokenizer, limit=items, manager=self.manager).scores[t].main[1]
            for t in self.tasks
        }


def prune_row(variant: str, p: Protocol, args: argparse.Namespace, stamp: dict):
    """Prune a copy of the dense model as ``variant`` says; (its row, the model)."""
    model = copy.deepcopy(p.dense)
    started = time.perf_counter()
    reports = [
        sparsekit.prune(model, method=method, sparsity=sparsity, calib=p.calib, show_progress=False, **kw)
        for method, sparsity, kw in steps_of(variant)
    ]
    prune_s = time.perf_counter() - started
    ppl = perplexity_of_ids(model, p.eval_ids, seqlen=args.eval_seqlen).ppl
    row = {
        "variant": variant,
        "removed": 1.0 - block_param_count(model) / p.dense_block_params,
        "ppl": ppl,
        "params": param_count(model),
        "bytes": model_bytes(model),
        "layers": model.config.num_hidden_layers,
        "prune_s": prune_s if variant != "dense" else 0.0,
        "accuracy": p.accuracy(model, args.items),
        # each step's choice and scores (depth: per block), so a ranking can be examined later
        "steps": [
            {
                k: getattr(r, k)
                for k in ("method", "removed_blocks", "removed_subblocks", "block_scores")
                if hasattr(r, k)
            }
            for r in reports
        ],
        "run": stamp | {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    logging.info(
        "%s: ppl %.2f, accuracy %s, %d params, pruned in %.1f s",
        variant, ppl, row["accuracy"], row["params"], prune_s,
    )  # fmt: skip
    return row, model


def save_checked(model, folder: Path, ids: torch.Tensor) -> None:
    """Save ``model`` and load it back at once: a checkpoint that does not reproduce the model's
    logits fails here, not hours later in the timing."""
    sparsekit.save(model, folder)
    with torch.no_grad():
        want, got = model(ids).logits, sparsekit.load(folder)(ids).logits
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError(
            f"{folder} loads back with logits {float((got - want).abs().max()):.3g} away from the "
            "pruned model's: the checkpoint does not hold this model"
        )


def saved_model(args: argparse.Namespace, variant: str):
    """The model --models holds for ``variant`` (fp32, eval mode), or None."""
    folder = model_dir(args.models, variant) if args.models else None
    if folder is None or not folder.is_dir():
        return None
    return sparsekit.load(folder)


def distil_rows(
    rows: list[dict], p: Protocol, args: argparse.Namespace, models: dict, save_partial, stamp: dict
) -> None:
    """Distil the chosen rows (those already distilled with the same settings are kept); each
    distillation records the commit and CPU it ran on (``stamp``) and when it finished."""
    wanted = settings(args, DISTILL)
    for row in distil_choice(rows, args.distill_best, args.distill_variants):
        if (row.get("distilled") or {}).get("settings") == wanted:
            logging.info("%s: distillation kept from the stopped run", row["variant"])
            continue
        model = models.get(row["variant"]) or saved_model(args, row["variant"])
        done = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        row["distilled"] = distil(model, p, args) | {"settings": wanted, "run": stamp | done}
        save_partial()


def main() -> None:
    args = parse_args()
    kept = resumed_state(args) if args.resume else {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(torch.get_num_threads())
    env = environment()  # at the start: the code this process runs
    stamp = {"commit": env["commit"], "cpu": env["cpu"], "cpu_threads": env["cpu_threads"]}
    p = Protocol(args)
    out = Path(args.out)
    partial = {"protocol": settings(args, PROTOCOL), "rows": [], "timing": None}

    variants = args.variants.split(",")

    def save_partial() -> None:  # a stopped run keeps these (--resume reads them)
        others = [r for v, r in kept.get("rows", {}).items() if v not in variants]
        write_json_atomic(out / "structured.partial.json", partial | {"rows": partial["rows"] + others})

    rows, models, pruned_now = partial["rows"], {}, False
    uses_models = args.rounds > 0 or args.distill_steps  # timing and distillation need every model
    for variant in variants:
        row = kept.get("rows", {}).get(variant)
        saved = not (args.models and uses_models) or model_dir(args.models, variant).is_dir()
        if row is not None and saved:  # (a kept row whose model timing needs is gone: pruned again)
            rows.append(row)
            logging.info("%s: kept from the stopped run (--resume)", variant)
            continue
        row, model = prune_row(variant, p, args, stamp)
        pruned_now = True
        if args.models:
            save_checked(model, model_dir(args.models, variant), p.prompts)
        elif uses_models:  # kept resident for the interleaved timing / distillation
            models[variant] = model
        rows.append(row)
        save_partial()
    if args.rounds > 0:
        timing = kept.get("timing")
        same = timing and timing["settings"] == settings(args, TIMING)
        if pruned_now or not (same and timing["variants"] == [r["variant"] for r in rows]):
            resident = models or {r["variant"]: saved_model(args, r["variant"]) for r in rows}
            results = time_generation_interleaved(resident, p.prompts, args.new_tokens, rounds=args.rounds)
            timing = {
                "settings": settings(args, TIMING),
                "variants": [r["variant"] for r in rows],
                "results": results,
                "run": stamp | {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            }
            del resident
        partial["timing"] = timing
        save_partial()
        add_timing(rows, timing["results"])
    if args.distill_steps:
        distil_rows(rows, p, args, models, save_partial, stamp)
    write_report(rows, partial["timing"], p, args)


def setup_line(p: Protocol, args: argparse.Namespace) -> str:
    loaded = "; every model timed as loaded from its checkpoint" if args.models and args.rounds > 0 else ""
    return (
        f"model {args.model}; calibration wiki-offline {args.nsamples} x {args.seqlen} tokens "
        f"(seed {args.calib_seed}); "
        f"ppl on {p.eval_ids.shape[1]} held-out tokens in windows of {args.eval_seqlen}; generation: "
        f"batch 1, {args.prompt_len}-token prompt ({p.prompt_source}), {args.new_tokens} new tokens, "
        f"greedy, static KV cache, fp32 eager, {args.rounds} rounds with every variant interleaved in "
        f"each round (0: not timed){loaded}"
        f"; zero-shot: "
        f"{args.items} items per task of {', '.join(p.tasks) or 'none'}"
        + (
            f"; distillation: {args.distill_steps} AdamW steps, lr {args.distill_lr}, batch "
            f"{args.distill_batch} x {args.distill_seqlen} tokens of wiki-offline (seed 1), KL to the dense "
            "model's logits at T = 1, every block linear trained"
            if args.distill_steps
            else ""
        )
    )


def runs_line(rows: list[dict], timing: dict | None) -> str:
    """Which commit and CPU each group of rows was pruned on (and the timing run)."""
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        run = r.get("run", {})
        key = (run.get("commit", "?"), run.get("cpu", "?"), run.get("cpu_threads", "?"))
        groups.setdefault(key, []).append(r["variant"])
    parts = [
        f"{', '.join(names) if len(groups) > 1 else 'every row'}: pruned at commit {c} on {cpu} "
        f"({threads} threads)"
        for (c, cpu, threads), names in groups.items()
    ]
    if timing:
        run = timing["run"]
        parts.append(
            f"timing: commit {run['commit']} on {run['cpu']} ({run['cpu_threads']} threads), one process"
        )
    distilled: dict[tuple, list[str]] = {}
    for r in rows:
        run = (r.get("distilled") or {}).get("run")
        if run:  # distillations before the stamp was kept say nothing here
            distilled.setdefault((run["commit"], run["cpu"], run["cpu_threads"]), []).append(r["variant"])
    parts += [
        f"distillation of {', '.join(names)}: commit {c} on {cpu} ({threads} threads)"
        for (c, cpu, threads), names in distilled.items()
    ]
    return "; ".join(parts)


def write_report(rows: list[dict], timing: dict | None, p: Protocol, args: argparse.Namespace) -> None:
    """structured.json and structured.md in --out."""
    env = environment()
    setup = setup_line(p, args)
    out = Path(args.out)
    write_json_atomic(out / "structured.json", {"env": env, "setup": setup, "rows": rows, "timing": timing})
    tasks = p.tasks
    lines = [
        "| variant | blocks | params (M) | ppl | "
        + "".join(f"{t} acc | " for t in tasks)
        + "prune s | TTFT ms (p20-p80) | TPOT ms (p20-p80) | decode x | prefill x |"
        + (" distilled ppl | distil s |" if args.distill_steps else ""),
        "|---|---:|---:|---:|"
        + "---:|" * len(tasks)
        + "---:|---:|---:|---:|---:|"
        + ("---:|---:|" if args.distill_steps else ""),
    ]
    for r in rows:
        acc = "".join(f"{r['accuracy'][t]:.3f} | " for t in tasks)
        lines.append(
            f"| {r['variant']} | {r['layers']} | {r['params'] / 1e6:.1f} | {r['ppl']:.2f} | {acc}"
            f"{r['prune_s']:.0f} | {timing_cells(r)} |" + distil_cells(r, args.distill_steps)
        )
    markdown = "\n".join(lines) + (
        f"\n\n{setup}.\nRuns: {runs_line(rows, timing)}.\nReport written: torch {env['torch']}, "
        f"commit {env['commit']}, {env['time_utc']}.\n"
    )
    write_text_atomic(out / "structured.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
