"""Zero-shot (or few-shot) accuracy through lm-evaluation-harness, on a model already in memory.

The harness does the prompting and scoring (``lm_eval.simple_evaluate`` with its ``HFLM`` wrapper
around our model object: dense, with SparseLinear layers, structurally pruned, or offloaded);
sparsekit adds its offline tasks (``sparsekit/eval/tasks``), a reachability check so a missing
dataset fails in seconds with the task's name instead of retrying, and a flat result record.

Standard tasks (boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, piqa, ...)
read their datasets from the hub when it is reachable, else from the datasets cache
(``HF_DATASETS_CACHE``); ``include_path`` adds folders of task YAMLs (the harness's own way of
adding tasks), e.g. a copy of a standard task whose ``dataset_path`` points at local files.
"""

from __future__ import annotations

import difflib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from sparsekit._env import environment
from sparsekit.hf.data import offline_if_unreachable
from sparsekit.models import model_device

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
OFFLINE_TASKS = ("wiki_lambada", "wiki_continuation")
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")
_LM_EVAL_RANGE = ">=0.4.13,<0.5"


class _HideCustomDatasetHint(logging.Filter):
    """The harness logs a --metadata hint for every task with a custom_dataset (ours): noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_HideCustomDatasetHint())


class TaskUnavailableError(ValueError):
    """A task's dataset is neither reachable on the hub nor in the local cache."""


@dataclass
class TaskScore:
    """One task's metrics: ``metrics[name] = (value, stderr)``; ``items`` evaluated of ``items_total``."""

    task: str
    metrics: dict[str, tuple[float, float | None]]
    items: int
    items_total: int
    version: str | float | None = None
    num_fewshot: int = 0

    @property
    def main(self) -> tuple[str, float, float | None]:
        """The headline metric: acc_norm when there is one (HellaSwag-style), else acc, else the first."""
        for name in ("acc_norm", "acc"):
            if name in self.metrics:
                return (name, *self.metrics[name])
        name = next(iter(self.metrics))
        return (name, *self.metrics[name])


@dataclass
class ZeroShotResult:
    scores: dict[str, TaskScore]
    seconds: float
    limit: int | float | None
    env: dict = field(default_factory=dict)

    def mean_accuracy(self) -> float | None:
        """Mean of the tasks' headline accuracies (None when no task has one)."""
        values = [s.main[1] for s in self.scores.values() if s.main[0].startswith("acc")]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict:
        return {
            "scores": {
                name: {
                    "metrics": {k: {"value": v, "stderr": e} for k, (v, e) in s.metrics.items()},
                    "items": s.items,
                    "items_total": s.items_total,
                    "version": s.version,
                    "num_fewshot": s.num_fewshot,
                }
                for name, s in self.scores.items()
            },
            "mean_accuracy": self.mean_accuracy(),
            "seconds": self.seconds,
            "limit": self.limit,
            "env": self.env,
        }


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ImportError(
            "zero-shot tasks run through lm-evaluation-harness: pip install 'sparsekit[eval]' "
            f"(lm-eval{_LM_EVAL_RANGE})"
        ) from None
    return lm_eval


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b'] (stripped, no empties, no duplicates)."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if name and name not in out:
            out.append(name)
    if not out:
        raise ValueError("no task given: e.g. --tasks wiki_lambada,wiki_continuation")
    return out


def _include_paths(include_path: str | Path | Sequence[str | Path] | None) -> list[Path]:
    given = (
        []
        if include_path is None
        else [include_path]
        if isinstance(include_path, str | Path)
        else include_path
    )
    paths = [TASKS_DIR]
    for p in given:
        path = Path(os.path.expanduser(str(p)))
        if not path.is_dir():
            raise ValueError(f"--include-path {p}: not a folder of task YAMLs")
        paths.append(path)
    return paths


def task_manager(names: Sequence[str], include_path=None):
    """A TaskManager that knows ``names``: only our and the user's folders when they suffice
    (indexing the harness's ~15k built-in YAMLs takes seconds), else the built-ins as well."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in _include_paths(include_path)]
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(n in local.all_tasks for n in names):
        return local
    manager = TaskManager(include_path=paths)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        raise ValueError(
            "unknown task(s): "
            + "; ".join(
                f"{n!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for n, h in hints.items()
            )
            + ". Offline tasks: wiki_lambada, wiki_continuation; add your own with --include-path DIR"
        )
    return manager


def _load_each(manager, names: Sequence[str], online: bool) -> None:
    """Build every task once (downloads or reads its dataset) and name the one that fails."""
    for name in names:
        try:
            manager.load([name])
        except Exception as exc:  # datasets raises many types for a missing dataset
            where = "the hub" if online else "the hub (unreachable from here)"
            raise TaskUnavailableError(
                f"task {name!r}: its dataset could not be loaded from {where} or the datasets cache "
                f"({type(exc).__name__}: {str(exc)[:200]}). Make it available: run once where the hub "
                "is reachable (the datasets cache keeps it; point HF_DATASETS_CACHE there), or pass "
                "--include-path DIR with a task YAML whose dataset_path/dataset_kwargs read local files "
                "(docs/evaluation.md). Offline tasks that need nothing: wiki_lambada, wiki_continuation"
            ) from exc


def check_tasks_available(manager, names: Sequence[str]) -> None:
    """Load every task's dataset now (before a model loads) and raise ``TaskUnavailableError``
    naming the first task whose dataset is neither reachable nor cached."""
    with offline_if_unreachable() as online:
        _load_each(manager, names, online)


def _scores(raw: dict) -> dict[str, TaskScore]:
    scores = {}
    for task, values in raw["results"].items():
        metrics: dict[str, tuple[float, float | None]] = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = values.get(f"{metric}_stderr,{filt}")
            metrics[metric] = (float(value), float(stderr) if isinstance(stderr, int | float) else None)
        counts = raw.get("n-samples", {}).get(task, {})
        scores[task] = TaskScore(
            task=task,
            metrics=metrics,
            items=int(counts.get("effective", 0)),
            items_total=int(counts.get("original", 0)),
            version=raw.get("versions", {}).get(task),
            num_fewshot=int(raw.get("n-shot", {}).get(task, 0) or 0),
        )
    return scores


def zero_shot(
    model: nn.Module,
    tasks: str | Sequence[str],
    tokenizer,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    seed: int = 0,
    manager=None,
) -> ZeroShotResult:
    """Run ``tasks`` (names or 'a,b') through lm-evaluation-harness on ``model`` (a HF causal LM).

    limit: items per task (int) or fraction (float < 1); None: all. ``manager``: a TaskManager from
    ``task_manager`` (built here when None). Returns per-task metrics with stderr, item counts, task
    versions and the environment. The harness shows its own progress bars.
    """
    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if limit is not None and not limit > 0:
        raise ValueError(f"--limit must be > 0, got {limit}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    names = parse_tasks(tasks)
    manager = manager or task_manager(names, include_path)
    start = time.perf_counter()
    with offline_if_unreachable() as online:
        _load_each(manager, names, online)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        lm._device = model_device(model)  # an offloaded model reports 'meta' as its device
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            bootstrap_iters=1000,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            verbosity=None,
        )
    if raw is None:
        raise RuntimeError("lm_eval.simple_evaluate returned nothing (non-zero rank?)")
    return ZeroShotResult(
        scores=_scores(raw),
        seconds=time.perf_counter() - start,
        limit=limit,
        env=environment() | {"lm_eval": lm_eval.__version__, "hub_reachable": online},
    )


def scores_markdown(result: ZeroShotResult) -> str:
    """One row per task: headline metric ± stderr, other metrics, items."""
    lines = ["| task | metric | value | ± stderr | other | items |", "|---|---|---:|---:|---|---:|"]
    for name, score in result.scores.items():
        metric, value, stderr = score.main
        other = ", ".join(f"{k} {v:.4g}" for k, (v, _) in score.metrics.items() if k != metric)
        err = f"{stderr:.4f}" if stderr is not None else "-"
        lines.append(
            f"| {name} | {metric} | {value:.4f} | {err} | {other} | {score.items} of {score.items_total} |"
        )
    return "\n".join(lines)


def eval_markdown(model: str, result: ZeroShotResult, ppl=None) -> str:
    """The one table ``sparsekit eval`` prints: perplexity (when given) and every task, then a footer
    with the harness version, item counts and wall time."""
    lines = [f"## {model}", "", scores_markdown(result)]
    if ppl is not None:
        lines.append(
            f"| perplexity ({ppl.dataset}) | ppl | {ppl.ppl:.4f} | - "
            f"| {ppl.windows} x {ppl.seqlen} tokens | - |"
        )
    mean = result.mean_accuracy()
    lines += [
        "",
        (f"mean accuracy {mean:.4f}; " if mean is not None else "")
        + f"lm-eval {result.env.get('lm_eval')}, limit {result.limit}, {result.seconds:.0f} s",
    ]
    return "\n".join(lines)
