"""Command line: ``sparsekit prune | eval | ...``. argparse lives here only."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from sparsekit._checks import (
    CALIBRATION_INPUTS,
    DEPTH_OPTIONS,
    EXPERT_REMOVAL_OPTIONS,
    MINITRON_OPTIONS,
    PER_LAYER_OPTIONS,
    SUBBLOCK_OPTIONS,
    TAYLOR_OPTIONS,
    WIDTH_FORWARD_OPTIONS,
    WIDTH_OPTIONS,
    PruneRequest,
    check_prune_request,
)
from sparsekit._io import (
    atomic_dir,
    check_can_create,
    check_can_write_file,
    write_json_atomic,
    write_text_atomic,
)
from sparsekit.hf.resources import check_device
from sparsekit.kernels.dtypes import parse_dtype
from sparsekit.pruning import PASSES, method_names
from sparsekit.pruning.engine import PartialPruneError
from sparsekit.pruning.structured import is_structured, structured_method_names

log = logging.getLogger("sparsekit")


def _dtype(name: str) -> torch.dtype:
    try:
        return parse_dtype(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", type=_dtype, default=torch.float32, help="compute dtype (default float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model")


def check_at_least(minimum: float, **values: float | None) -> None:
    """Raise naming the flag when a numeric argument is below ``minimum`` (None: not given)."""
    for name, value in values.items():
        if value is not None and not value >= minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum:g}, got {value}")


def load_any(
    spec: str,
    dtype: torch.dtype,
    device: str,
    trust_remote_code: bool = False,
    offload_folder: str | None = None,
    max_cpu_memory: str = "4GiB",
):
    """A model spec (hub id, folder, GGUF, 'smollm2') or a sparsekit checkpoint -> (model, tokenizer)."""
    from sparsekit.hf.checkpoint import is_checkpoint, load
    from sparsekit.hf.models import load_model, load_tokenizer, resolve_model

    if is_checkpoint(spec):
        model = load(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        return model, load_tokenizer(resolve_model(spec))
    return load_model(
        spec,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        offload_folder=offload_folder,
        max_cpu_memory=max_cpu_memory,
    )


_PRUNE_OPTIONS = (  # CLI flags that are keyword options of sparsekit.prune, checked by sparsekit._checks
    "calib",
    "nsamples",
    "seqlen",
    "seed",
    "batch_size",
    "device",
    *PER_LAYER_OPTIONS,
    *DEPTH_OPTIONS,
    *WIDTH_OPTIONS,
    *SUBBLOCK_OPTIONS,
    *TAYLOR_OPTIONS,
    *MINITRON_OPTIONS,
    *EXPERT_REMOVAL_OPTIONS,
)
_NOT_ON_THE_CLI = ("share_statistics", "measure_error", "channel_multiple")


def _passes(value: str) -> bool | None:
    """--passes: auto -> None, one -> True, two -> False (``PruneConfig.sequential``)."""
    if value not in PASSES:
        raise argparse.ArgumentTypeError(f"invalid choice {value!r}: choose {', '.join(PASSES)}")
    return PASSES[value]


@functools.cache
def _defaults(*argv: str) -> dict:
    """The parsed defaults of a subcommand (argv: the subcommand and its positionals)."""
    return vars(build_parser().parse_args(list(argv)))


def _given(args: argparse.Namespace, *argv: str) -> set[str]:
    """Flags (as dests) whose value differs from the subcommand's default."""
    defaults = _defaults(*argv)
    return {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}


def _step_options(args: argparse.Namespace, method: str, stacked: bool, step: int = 0) -> dict:
    """The options one step of ``sparsekit prune`` is checked with: all of them, or, when a per-layer
    method is stacked on a structured one, each family's own (the calibration settings go with the
    structured step, which always calibrates); a width method stacked on a depth one takes the width
    options, the depth method the depth options (both calibrate)."""
    keys = [k for k in _PRUNE_OPTIONS if k not in _NOT_ON_THE_CLI]
    if stacked and is_structured(method):
        forwards = WIDTH_FORWARD_OPTIONS if _casts_forwards(args, method) else ()
        keys = [k for k in keys if k not in PER_LAYER_OPTIONS or k in forwards]
        if is_structured(args.then_method):  # depth, then width (checked in _check_prune_args)
            other = DEPTH_OPTIONS if step else (*WIDTH_OPTIONS, *TAYLOR_OPTIONS, *MINITRON_OPTIONS)
            keys = [k for k in keys if k not in other]
    elif stacked:
        skip = (
            *DEPTH_OPTIONS, *WIDTH_OPTIONS, *SUBBLOCK_OPTIONS, *TAYLOR_OPTIONS, *MINITRON_OPTIONS,
            *EXPERT_REMOVAL_OPTIONS, *CALIBRATION_INPUTS, "batch_size",
        )  # fmt: skip
        keys = [k for k in keys if k not in skip]
    return {k: getattr(args, k) for k in keys}


def _casts_forwards(args: argparse.Namespace, method: str) -> bool:
    """Whether structured ``method`` runs calibration forwards in ``forward_dtype`` (the width
    methods, and shortgpt / angular without --repair; a per-layer method stacked after it takes the
    same --forward-dtype)."""
    from sparsekit.pruning.structured import structured_method
    from sparsekit.pruning.structured.depth import DepthMethod

    obj = structured_method(method)
    return obj.casts_forwards and not (isinstance(obj, DepthMethod) and args.repair)


def _depth_then_width(method: str, then: str) -> bool:
    """A depth method followed by a width one (``--method angular --then-method flap``)."""
    from sparsekit.pruning.structured import structured_method
    from sparsekit.pruning.structured.depth import DepthMethod
    from sparsekit.pruning.structured.minitron import Minitron
    from sparsekit.pruning.structured.width import WidthMethod

    first, second = structured_method(method), structured_method(then)
    return isinstance(first, DepthMethod) and isinstance(second, WidthMethod | Minitron)


def _prune_options(
    args: argparse.Namespace, step: int, method: str, request: PruneRequest, stacked: bool
) -> dict:
    """Keyword arguments for ``sparsekit.prune`` for one checked step."""
    options = _step_options(args, method, stacked, step)
    if request.needs_calibration:
        options |= {k: getattr(args, k) for k in (*CALIBRATION_INPUTS, "batch_size")}
    sparsity = args.then_sparsity if step else args.sparsity
    return {"method": method, "sparsity": sparsity, **options}


def _refuse_without(given: set[str], keys: tuple[str, ...], needed: str, why: str) -> None:
    unused = [k for k in keys if k in given]
    if unused:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in unused)
        raise ValueError(f"{flags} {'does' if len(unused) == 1 else 'do'} nothing without {needed}: {why}")


def _then_per_layer(args: argparse.Namespace) -> bool:
    return bool(args.then_method) and not is_structured(args.then_method)


def _check_cli_only_prune_flags(args: argparse.Namespace, given: set[str]) -> None:
    """The flags of ``sparsekit prune`` that sparsekit.prune does not take: used, or refused
    (--dist-timeout is kept outside torchrun: ``torchrun --nproc-per-node 1`` runs one plain process)."""
    if not args.then_method:
        _refuse_without(given, ("then_sparsity",), "--then-method", "add --then-method wanda|sparsegpt|ria")
    if args.method != "maskllm":
        _refuse_without(given, _MASKLLM_ONLY, "--method maskllm", "they set MaskLLM's training")
    if not args.eval:
        _refuse_without(
            given,
            ("eval_dataset", "eval_seqlen", "eval_tokens"),
            "--eval",
            "add --eval to measure perplexity",
        )
    if not args.out:
        _refuse_without(given, ("save_format",), "--out", "add --out FOLDER to save the pruned model")
    if not args.offload_folder:
        _refuse_without(
            given,
            ("max_cpu_memory",),
            "--offload-folder",
            "add --offload-folder DIR to keep the rest on disk",
        )
    if "save_format" in given and is_structured(args.method) and not _then_per_layer(args):
        raise ValueError(
            f"--save-format does nothing when every step is structured ({args.method}): it saves an "
            "ordinary, smaller HF checkpoint (uniform widths) or a per-block-widths checkpoint (adaptive); "
            "drop it, or stack a per-layer --then-method to save that step's sparsity compressed or dense"
        )


def _check_prune_args(args: argparse.Namespace) -> list[tuple[str, PruneRequest]]:
    """Everything checkable before the model loads; returns the (method, checked request) steps."""
    from sparsekit.hf.data import check_corpus

    check_at_least(1, nsamples=args.nsamples, batch_size=args.batch_size, blocksize=args.blocksize)
    check_at_least(2, seqlen=args.seqlen, eval_seqlen=args.eval_seqlen)
    check_at_least(0, percdamp=args.percdamp)
    if args.eval_tokens is not None:
        check_at_least(args.eval_seqlen, eval_tokens=args.eval_tokens)
    check_device(args.device)
    given = _given(args, "prune", args.model)
    _check_cli_only_prune_flags(args, given)
    methods = [args.method]
    if args.then_method:
        both = is_structured(args.method) and is_structured(args.then_method)
        if not is_structured(args.method) or (both and not _depth_then_width(args.method, args.then_method)):
            raise ValueError(
                "--then-method stacks an unstructured/N:M method on a structured one (--method "
                "shortgpt|shortened-ppl|wanda-sp|flap|... --then-method wanda|sparsegpt|magnitude), or a "
                "width method on a depth one (--method angular|shortgpt --remove-layers N --then-method "
                "flap|wanda-sp|llm-pruner|minitron --then-sparsity P)"
            )
        methods.append(args.then_method)
    stacked = len(methods) > 1
    steps, routed = [], set()
    for step, method in enumerate(methods):
        sparsity = args.then_sparsity if step else args.sparsity
        options = _step_options(args, method, stacked, step)
        routed |= options.keys()
        steps.append((method, check_prune_request(method, sparsity, options)))
    lost = sorted(k for k in given if k in _PRUNE_OPTIONS and k not in routed)
    if lost:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in lost)
        raise ValueError(
            f"{flags} {'does' if len(lost) == 1 else 'do'} nothing with --method {args.method} --then-method "
            f"{args.then_method}: neither step takes it"
        )
    if any(request.needs_calibration for _, request in steps):
        check_corpus(args.calib)
    if args.eval:
        check_corpus(args.eval_dataset)
    if args.out:
        check_can_create(args.out)
    if args.offload_folder and args.out and args.save_format == "compressed":
        raise ValueError(
            "--offload-folder keeps the weights on disk, and compressing them would bring every layer "
            "into memory: add --save-format dense (then compress on a machine that holds the model)"
        )
    return steps


def _print_report(report, method: str) -> None:
    if getattr(report, "removed_fraction", None) is not None and hasattr(report, "removed_blocks"):
        print(
            f"{method}: removed {100 * report.removed_fraction:.1f}% of decoder-block parameters; "
            f"parameters {report.params_before:,} -> {report.params_after:,}"
        )
        if report.removed_blocks:
            print(f"removed blocks {report.removed_blocks}; repaired {report.repaired_blocks or 'none'}")
        if report.removed_subblocks:
            parts = ", ".join(f"{s['block']} {s['kind']}" for s in report.removed_subblocks)
            print(f"removed sub-blocks (block kind, in order): {parts}")
        if report.widths and not report.removed_subblocks:
            shown = report.widths if not report.uniform_widths else report.widths[:1]
            where = "every block" if report.uniform_widths else "per block"
            print(f"widths before {report.widths_before}, after ({where}): {shown}")
    else:
        print(
            f"pruned {len(report.layers)} linear layers with {getattr(report, 'recipe', '') or method} "
            f"to {report.overall_sparsity:.3f} "
            f"sparsity ({report.sparsity}); calib {report.calib}, {report.nsamples} x {report.seqlen} tokens"
        )
    print("time per phase: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings_s.items()))
    for rank, timings in enumerate(getattr(report, "rank_timings_s", None) or []):
        print(
            f"  rank {rank} of {report.world_size}: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        )
    for note in report.notes:
        print("note:", note)


_MASKLLM_ONLY = ("steps", "lr", "prior", "start", "prior_update", "update_weights")
_MASKLLM_FLAGS = {
    *_MASKLLM_ONLY, "sparsity", "calib", "nsamples", "seqlen", "seed", "batch_size", "eval",
    "eval_dataset", "eval_seqlen", "eval_tokens", "out", "dist_timeout", "verbose",
    "trust_remote_code",
}  # fmt: skip


def _check_maskllm_args(args: argparse.Namespace) -> None:
    from sparsekit.hf.data import check_corpus

    given = _given(args, "prune", args.model) - {"method"}
    unused = sorted(given - _MASKLLM_FLAGS)
    if unused:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in unused)
        raise ValueError(
            f"{flags} {'does' if len(unused) == 1 else 'do'} nothing with --method maskllm (it learns the "
            "2:4 masks by training on this rank's GPU when there is one, else the CPU; its flags: --steps "
            "--lr --prior --start --prior-update --update-weights --batch-size --calib --nsamples --seqlen)"
        )
    if args.sparsity != "2:4":
        raise ValueError(f"--method maskllm learns 2:4 masks: give --sparsity 2:4 (got {args.sparsity})")
    if args.prior == "none" and (args.start == "prior" or args.prior_update not in (None, "none")):
        raise ValueError(
            "--prior none has no one-shot weights: --start prior and --prior-update need a prior"
        )
    if args.prior_update not in (None, "none") and args.start != "prior":
        raise ValueError(
            f"--prior-update {args.prior_update} changes only the kept weights, which the default dense "
            "start puts back: add --start prior"
        )
    check_at_least(1, nsamples=args.nsamples, batch_size=args.batch_size, steps=args.steps)
    check_at_least(2, seqlen=args.seqlen, eval_seqlen=args.eval_seqlen)
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    check_corpus(args.calib)
    if args.eval:
        check_corpus(args.eval_dataset)
    if args.out:
        check_can_create(args.out)


def _maskllm(args: argparse.Namespace, main_rank: bool) -> int:
    """``sparsekit prune --method maskllm``: prior, learned masks (every rank), eval and save (rank 0)."""
    from sparsekit.api import perplexity, prune

    model, tokenizer = load_any(args.model, torch.float32, "cpu", args.trust_remote_code)
    options = {k: getattr(args, k) for k in _MASKLLM_ONLY if getattr(args, k) is not None}
    report = prune(
        model,
        method="maskllm",
        sparsity="2:4",
        calib=args.calib,
        tokenizer=tokenizer,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        batch_size=args.batch_size,
        **options,
    )
    if not main_rank:
        return 0
    train = report.train
    print(
        f"maskllm: learned the 2:4 masks of {report.layers} layers in {train['steps']} steps "
        f"({train['seconds']:.0f} s, {train['world_size']} process(es)) from the {report.prior} prior; "
        f"{100 * report.changed_from_prior:.1f}% of the groups of four changed pattern; loss "
        f"{train['losses'][0]:.3f} -> {train['losses'][-1]:.3f}"
    )
    summary = report.to_dict()
    if args.eval:
        result = perplexity(
            model,
            args.eval_dataset,
            seqlen=args.eval_seqlen,
            tokenizer=tokenizer,
            max_tokens=args.eval_tokens,
        )
        summary["perplexity"] = result.to_dict()
        print(f"perplexity {result.ppl:.3f} on {result.dataset} ({result.windows} x {result.seqlen} tokens)")
    if args.out:
        save_pruned(model, tokenizer, args.out, summary, "compressed")
        print(f"saved (compressed) to {args.out}")
    return 0


@contextlib.contextmanager
def _torchrun_world(timeout_s: float, barrier_at_exit: bool) -> Iterator:
    """Under torchrun: join the process group, quiet every rank but 0, and leave it on exit (after a
    barrier when ``barrier_at_exit``); yields the ``World``, or None for one plain process."""
    from sparsekit.pruning import distributed

    if not distributed.launched_by_torchrun():
        yield None
        return
    world = distributed.init(timeout_s=timeout_s)
    if not world.main:  # progress and logs from rank 0 only
        logging.getLogger().setLevel(logging.WARNING)
    try:
        yield world
    finally:
        if barrier_at_exit:
            distributed.barrier()
        distributed.shutdown()


def cmd_prune(args: argparse.Namespace) -> int:
    if args.method == "maskllm":
        _check_maskllm_args(args)
        with _torchrun_world(args.dist_timeout, barrier_at_exit=True) as world:
            return _maskllm(args, main_rank=world is None or world.main)
    steps = _check_prune_args(args)
    check_at_least(1, dist_timeout=args.dist_timeout)
    with _torchrun_world(args.dist_timeout, barrier_at_exit=False) as world:
        if world is not None and args.offload_folder:  # each rank offloads into a folder of its own
            args.offload_folder = str(Path(args.offload_folder) / f"rank{world.rank}")
        return _prune_and_save(args, steps, world)


def _prune_and_save(args: argparse.Namespace, steps, world=None) -> int:
    """Load, prune every step, evaluate and save; under torchrun every rank prunes, rank 0 alone
    evaluates, prints and writes (atomically) while the others wait at a barrier."""
    from sparsekit.api import perplexity, prune
    from sparsekit.pruning import distributed

    main_rank = world is None or world.main
    # the model stays on the CPU (or on disk); blocks visit --device one at a time, so it may exceed
    # device memory
    model, tokenizer = load_any(
        args.model, args.dtype, "cpu", args.trust_remote_code, args.offload_folder, args.max_cpu_memory
    )
    summary: dict = {}
    kinds = []  # per step: the report's kind and whether its widths are uniform
    for index, (method, request) in enumerate(steps):
        options = _prune_options(args, index, method, request, stacked=len(steps) > 1)
        report = prune(model, tokenizer=tokenizer, **options)
        if main_rank:
            _print_report(report, method)
        step = report.to_dict()
        kinds.append((step.get("kind"), step.get("uniform_widths", True)))
        summary = step if index == 0 else summary | {"then": step}
    if not main_rank:
        distributed.barrier()  # rank 0 evaluates and writes
        return 0
    if args.eval:
        if not args.offload_folder:
            model.to(args.device)
        result = perplexity(
            model,
            args.eval_dataset,
            seqlen=args.eval_seqlen,
            tokenizer=tokenizer,
            max_tokens=args.eval_tokens,
        )
        summary["perplexity"] = result.to_dict()
        print(f"perplexity {result.ppl:.3f} on {result.dataset} ({result.windows} x {result.seqlen} tokens)")
    if args.out:
        save_format = args.save_format
        if all(kind == "structured" for kind, _ in kinds):  # an ordinary smaller model, or per-block widths
            save_format = "dense" if all(uniform for _, uniform in kinds) else "widths"
        save_pruned(model if args.offload_folder else model.cpu(), tokenizer, args.out, summary, save_format)
        print(f"saved ({save_format}) to {args.out}")
    if world is not None:
        distributed.barrier()
    return 0


def save_pruned(model, tokenizer, out: str, summary: dict, save_format: str = "compressed") -> None:
    """Save the pruned model and its prune report (prune_report.json) into ``out``, atomically.

    compressed: SparseLinear layers (2:4 or bitmap, whichever fits) in a sparsekit checkpoint that
    ``sparsekit eval`` / ``sparsekit.load`` / ``from_pretrained`` after ``import sparsekit`` read;
    dense: an ordinary HF checkpoint with the zeros kept (a structurally pruned model with the same
    widths in every block: an ordinary, smaller HF checkpoint); widths: a structurally pruned model
    with per-block widths, as a sparsekit checkpoint (``from_pretrained`` after ``import sparsekit``).
    """
    if save_format == "widths":
        from sparsekit.hf.checkpoint import save

        save(model, out, tokenizer=tokenizer, extra_json={"prune_report.json": summary})
        return
    if save_format == "compressed":
        from sparsekit.hf.checkpoint import save
        from sparsekit.nn import sparsify

        swap = sparsify(model, format="auto")
        summary["sparsify"] = swap.to_dict()
        print(
            f"compressed {len(swap.layers)} layers: weights {swap.layer_bytes_before / 2**20:.1f} MiB -> "
            f"{swap.layer_bytes_after / 2**20:.1f} MiB"
        )
        save(model, out, tokenizer=tokenizer, extra_json={"prune_report.json": summary})
        return
    with atomic_dir(out, overwrite=False) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "prune_report.json", summary)


def _limit(text: str) -> int | float:
    """--limit: an item count (10) or a fraction of each task (0.1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--limit takes a number of items or a fraction, got {text!r}"
        ) from None
    return int(value) if value >= 1 and value.is_integer() else value


def _check_eval_args(args: argparse.Namespace):
    """Everything checkable before the model loads; returns the TaskManager (or None without --tasks)."""
    from sparsekit.hf.data import check_corpus

    check_at_least(2, seqlen=args.seqlen)
    check_at_least(1, batch_size=args.batch_size)
    check_at_least(0, num_fewshot=args.num_fewshot)
    if args.max_tokens is not None:
        check_at_least(args.seqlen, max_tokens=args.max_tokens)
    if args.limit is not None and not args.limit > 0:
        raise ValueError(f"--limit must be > 0, got {args.limit}")
    check_device(args.device)
    given = _given(args, "eval", args.model)
    if not args.offload_folder:
        _refuse_without(
            given,
            ("max_cpu_memory",),
            "--offload-folder",
            "add --offload-folder DIR to keep the rest on disk",
        )
    if args.tasks and not args.ppl:
        _refuse_without(
            given, ("dataset", "seqlen", "max_tokens"), "--ppl", "with --tasks, add --ppl for perplexity too"
        )
    if not args.tasks:
        _refuse_without(given, ("ppl",), "--tasks", "perplexity is what eval measures without --tasks")
        _refuse_without(
            given,
            ("limit", "num_fewshot", "include_path", "batch_size"),
            "--tasks",
            "these set up lm-evaluation-harness tasks: add --tasks wiki_lambada,...",
        )
    if args.ppl or not args.tasks:
        check_corpus(args.dataset)
    if args.json:
        check_can_write_file(args.json)
    if not args.tasks:
        return None
    from sparsekit.eval.zero_shot import check_tasks_available, parse_tasks, task_manager

    names = parse_tasks(args.tasks)
    manager = task_manager(names, args.include_path)
    check_tasks_available(manager, names)
    return manager


def cmd_eval(args: argparse.Namespace) -> int:
    from sparsekit.api import perplexity

    manager = _check_eval_args(args)
    model, tokenizer = load_any(
        args.model,
        args.dtype,
        args.device,
        args.trust_remote_code,
        args.offload_folder,
        args.max_cpu_memory,
    )
    record: dict = {"model": args.model}
    ppl = None
    if args.ppl or not args.tasks:
        ppl = perplexity(
            model,
            args.dataset,
            seqlen=args.seqlen,
            tokenizer=tokenizer,
            max_tokens=args.max_tokens,
            show_progress=True,
        )
        record["perplexity"] = ppl.to_dict()
        if not args.tasks:
            print(f"perplexity {ppl.ppl:.3f} on {ppl.dataset}: {ppl.windows} windows x {ppl.seqlen} tokens")
            if args.json:
                write_json_atomic(args.json, ppl.to_dict())
            return 0
    from sparsekit.eval.zero_shot import eval_markdown, parse_tasks, zero_shot

    result = zero_shot(
        model,
        parse_tasks(args.tasks),
        tokenizer,
        limit=args.limit,
        batch_size=args.batch_size,
        num_fewshot=args.num_fewshot,
        include_path=args.include_path,
        manager=manager,
    )
    record["zero_shot"] = result.to_dict()
    print(eval_markdown(args.model, result, ppl))
    if args.json:
        write_json_atomic(args.json, record)
    return 0


def cmd_bench_layers(args: argparse.Namespace) -> int:
    from sparsekit.bench import layers
    from sparsekit.bench.timing import choose_threads

    cuda = check_device(args.device).type == "cuda"
    _, threads_note = choose_threads(args.threads)
    names = [args.model] if args.model else (args.shapes.split(",") if args.shapes else None)
    names = names or list(layers.GPU_SHAPES if cuda else layers.CPU_SHAPES)
    shapes = [s for name in names for s in layers.linear_shapes(name)]
    ms = tuple(int(m) for m in args.m.split(",")) if args.m else (layers.GPU_MS if cuda else layers.CPU_MS)
    backends = tuple(args.backends.split(",")) if args.backends else None
    isas = tuple(args.isa.split(",")) if args.isa else None
    result = layers.run_layers(
        shapes, ms, args.pattern, backends, args.dtype, args.device, args.cuda_graphs, isas=isas
    )
    result.config["threads_note"] = threads_note
    paths = layers.write_layers_report(result, args.out)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_bench_rule_table(args: argparse.Namespace) -> int:
    from sparsekit.bench.rule_table import check_m_classes, measure_rule_table, table_markdown
    from sparsekit.bench.timing import choose_threads
    from sparsekit.nn.cpu_rule_table import write_table

    if check_device(args.device).type != "cpu":
        raise ValueError(f"the CPU rule table is measured on the CPU, not {args.device}: drop --device")
    m_classes = check_m_classes(tuple(int(m) for m in args.m.split(",")))
    check_at_least(1, rounds=args.rounds)
    if not args.out.endswith(".json"):
        raise ValueError(f"--out is the table's JSON file (its .md summary goes beside it), got {args.out}")
    check_can_write_file(args.out)
    _, threads_note = choose_threads(args.threads)
    if threads_note:
        print(f"note: {threads_note}; the table holds for that thread count")
    from sparsekit.hf.checkpoint import is_checkpoint, load

    if not is_checkpoint(args.model):
        raise ValueError(
            f"{args.model} is not a sparsekit checkpoint, so it has no compressed layers for the rule to "
            f"decide: prune and save it first (`sparsekit prune {args.model} --sparsity 2:4 --out DIR`), "
            "then measure DIR"
        )
    model = load(args.model, device="cpu", dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    table = measure_rule_table(model, m_classes, args.rounds, args.margin)
    path = write_table(args.out, table.entries, table.margin, table.rounds, args.model)
    md = write_text_atomic(Path(args.out).with_suffix(".md"), table_markdown(table, args.model))
    print(md.read_text())
    print(f"wrote {path}, {md}; load it with SPARSEKIT_CPU_RULE_TABLE={path}")
    return 0


def _parse_dtypes(text: str | None) -> tuple[torch.dtype, ...] | None:
    """'fp32,bf16' -> (torch.float32, torch.bfloat16); None stays None."""
    return tuple(parse_dtype(d) for d in text.split(",")) if text else None


def cmd_bench_e2e(args: argparse.Namespace) -> int:
    from sparsekit.bench.e2e import check_cpu_rule_twins, check_quantize, run_e2e, write_e2e_report
    from sparsekit.bench.timing import choose_threads

    _, threads_note = choose_threads(args.threads)  # first: a rule table is checked against them
    check_cpu_rule_twins(
        args.cpu_rule_twins, check_device(args.device), args.cpu_rule_table
    )  # before loading
    quantize = check_quantize(tuple(q for q in (args.quantize or "").split(",") if q))
    if args.quantize_head and not quantize:
        raise ValueError(
            "--quantize-head adds head-quantized twins of the quantized variants: give --quantize too"
        )
    model, tokenizer = load_any(args.model, args.dtype, args.device, args.trust_remote_code)
    pruned = Path(args.model, "prune_report.json").is_file()  # a `sparsekit prune --out` folder
    result = run_e2e(
        model,
        tokenizer,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        batch=args.batch,
        pattern=args.pattern,
        pruned=pruned,
        compile=args.compile,
        eval_tokens=args.eval_tokens,
        repeats=args.repeats,
        cache=args.cache,
        model_label=args.model,
        method=args.method,
        dtypes=_parse_dtypes(args.dtypes),
        quantize=quantize,
        quantize_head=args.quantize_head,
        cpu_rule_twins=args.cpu_rule_twins,
        cpu_rule_table=args.cpu_rule_table,
    )
    result.config["threads_note"] = threads_note
    paths = write_e2e_report(result, args.out)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from sparsekit.bench.demo import FULL, QUICK, DemoConfig, run_demo

    if args.quick and args.full:
        raise ValueError("--quick and --full exclude each other")
    base = QUICK if args.quick else FULL if args.full else DemoConfig()
    config = replace(base, model=args.model, threads=args.threads)
    report = run_demo(args.out, quick=args.quick, config=config)
    print(f"report: {report}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sparsekit.hf.checkpoint import export_dense

    if args.dense == args.decilm:
        raise ValueError(
            "sparsekit export needs one of --dense (an ordinary HF checkpoint, zeros kept) or --decilm "
            "(DeciLM / Nemotron-NAS block_configs, for removed sub-blocks and per-block widths)"
        )
    if args.dense:
        out = export_dense(args.checkpoint, args.out)
        print(f"wrote a dense HF checkpoint (zeros kept, no quantization_config) to {out}")
        return 0
    from sparsekit.hf.checkpoint import load
    from sparsekit.hf.decilm import export_decilm
    from sparsekit.nn import densify

    if Path(args.out).exists():
        raise ValueError(f"--out {args.out} exists; choose a new folder")
    model = load(args.checkpoint)
    densify(model)
    out = export_decilm(model, args.out, source_dir=args.checkpoint)
    print(f"wrote a DeciLM / Nemotron-NAS checkpoint (block_configs; vLLM runs it) to {out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from sparsekit.hf.checkpoint import save
    from sparsekit.nn import quantize
    from sparsekit.nn.sparsify import check_quant_format

    check_quant_format(args.format)
    if Path(args.out).exists():
        raise ValueError(f"--out {args.out} exists; choose a new folder")
    model, tokenizer = load_any(args.model, args.dtype, "cpu", args.trust_remote_code)
    report = quantize(model, args.format, head=args.head)
    for fmt in ("2:4-int8", args.format):
        part = report.get(fmt)
        if part and part["layers_swapped"]:
            mib = (part["layer_bytes_before"] / 2**20, part["layer_bytes_after"] / 2**20)
            print(f"{fmt}: {part['layers_swapped']} layers, weights {mib[0]:.1f} MiB -> {mib[1]:.1f} MiB")
    head = report.get("head")
    if head and "format" in head:
        mib = (head["bytes_before"] / 2**20, head["bytes_after"] / 2**20)
        untied = " (untied: the input embedding stays float)" if head["untied"] else ""
        print(f"{head['layer']}: {head['format']}, {mib[0]:.1f} MiB -> {mib[1]:.1f} MiB{untied}")
    save(model, args.out, tokenizer=tokenizer, extra_json={"quantize_report.json": report})
    print(
        f"saved a sparsekit checkpoint to {args.out} (load it with sparsekit.load or, after "
        "`import sparsekit`, AutoModelForCausalLM.from_pretrained)"
    )
    return 0


def _check_finetune_args(args: argparse.Namespace) -> Path | None:
    """Every finetune flag checked before a model loads; returns the folder the run's checkpoints
    and log go to (None when the checkpoint is overwritten in place)."""
    from sparsekit.hf.checkpoint import is_checkpoint

    check_at_least(1, steps=args.steps, nsamples=args.nsamples, batch_size=args.batch_size)
    check_at_least(1, grad_accum=args.grad_accum, dist_timeout=args.dist_timeout)
    check_at_least(0, warmup=args.warmup, eval_every=args.eval_every, save_every=args.save_every)
    check_at_least(2, seqlen=args.seqlen, eval_seqlen=args.eval_seqlen)
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    given = _given(args, "finetune", args.checkpoint)
    if not args.distill:
        _refuse_without(
            given,
            ("temperature", "lm_weight", "teacher_topk"),
            "--distill",
            "these weigh the teacher's logits: add --distill",
        )
    if not args.lora_rank:
        _refuse_without(given, ("lora_alpha", "lora_targets"), "--lora-rank", "add --lora-rank R")
    if args.schedule == "constant":
        _refuse_without(given, ("min_lr_ratio",), "--schedule cosine", "add --schedule cosine")
    out = Path(args.out or args.checkpoint)
    in_place = out.resolve() == Path(args.checkpoint).resolve()
    if in_place and not is_checkpoint(args.checkpoint):
        raise ValueError(
            f"{args.checkpoint} is not a sparsekit checkpoint: give --out for the fine-tuned model"
        )
    if in_place and (args.save_every or args.resume):
        raise ValueError("--save-every / --resume keep the run's state in --out: give --out a new folder")
    if args.resume and not (out / "train_state").is_dir():
        raise FileNotFoundError(f"--resume: {out}/train_state does not exist (no run saved there)")
    if args.resume and (out / "finetune_report.json").is_file():
        raise ValueError(f"--resume: the run in {out} finished already (finetune_report.json is there)")
    if not in_place and out.exists() and not args.resume:
        raise FileExistsError(
            f"{out} exists; remove it, pick another --out, or add --resume to continue the run saved there"
        )
    return None if in_place else out / "train_state"


def _train_config(args: argparse.Namespace):
    from sparsekit.hf.trainer import TrainConfig

    return TrainConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        schedule=args.schedule,
        warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        precision=args.precision,
        activation_checkpointing=args.activation_checkpointing,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        temperature=args.temperature,
        lm_weight=args.lm_weight,
        teacher_topk=args.teacher_topk,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=tuple(t for t in (args.lora_targets or "").split(",") if t),
    )


def cmd_finetune(args: argparse.Namespace) -> int:
    state_dir = _check_finetune_args(args)
    config = _train_config(args)
    with _torchrun_world(args.dist_timeout, barrier_at_exit=True) as world:
        if world is not None:
            config.check(world.size)
        return _finetune_and_save(args, config, state_dir, main_rank=world is None or world.main)


def _finetune_and_save(args: argparse.Namespace, config, state_dir: Path | None, main_rank: bool) -> int:
    """Load, train (one process or every torchrun rank), and on rank 0 save the model in the form
    it came in (compressed / widths checkpoint, or plain HF), the LoRA adapter and the run's state."""
    from sparsekit.api import perplexity
    from sparsekit.hf.data import calibration_ids, evaluation_ids
    from sparsekit.hf.trainer import train

    config.check(1)
    model, tokenizer = load_any(args.checkpoint, torch.float32, "cpu")
    from sparsekit.hf.trainer import compute_dtype, train_device

    # the frozen teacher is stored in the compute dtype (bf16 halves its shards); the student in fp32
    teacher_dtype = compute_dtype(config.precision, train_device()) or torch.float32
    teacher = load_any(args.distill, teacher_dtype, "cpu")[0] if args.distill else None
    ids = calibration_ids(tokenizer, args.calib, args.nsamples, args.seqlen, args.seed)
    eval_ids = evaluation_ids(tokenizer, args.eval_dataset, max_tokens=args.eval_tokens)
    adapter_tmp = Path(tempfile.mkdtemp(prefix="sparsekit-adapter-")) if args.lora_rank else None
    try:
        report = train(
            model,
            ids,
            config,
            teacher=teacher,
            evaluate=lambda m: perplexity(m, eval_ids, seqlen=args.eval_seqlen).ppl,
            state_dir=state_dir,
            resume=args.resume,
            adapter_dir=adapter_tmp,
        )
        if main_rank:
            _print_finetune(report)
            _save_finetuned(model.cpu(), tokenizer, args, report, state_dir, adapter_tmp)
    finally:
        if adapter_tmp is not None:
            shutil.rmtree(adapter_tmp, ignore_errors=True)
    return 0


def _print_finetune(report) -> None:
    evals = ", ".join(f"step {s}: {p:.3f}" for s, p in report.evals)
    print(
        f"fine-tuned ({report.loss}{', LoRA r=' + str(report.lora_rank) if report.lora_rank else ''}) "
        f"{report.trained_layers} layers for {report.steps} steps on {report.world_size} process(es) "
        f"({report.precision}) in {report.seconds:.0f} s, {report.tokens_per_s:.0f} tokens/s: loss "
        f"{report.losses[0]:.3f} -> {report.losses[-1]:.3f}, perplexity {report.ppl_before:.3f} -> "
        f"{report.ppl_after:.3f}, masks exact: {report.masks_exact}"
        + (f"; resumed at step {report.resumed_from}" if report.resumed_from else "")
        + (f"; eval {evals}" if evals else "")
    )


def _save_finetuned(model, tokenizer, args, report, state_dir: Path | None, adapter: Path | None) -> None:
    from sparsekit.hf.checkpoint import save
    from sparsekit.nn import SparseLinear

    out = Path(args.out or args.checkpoint)
    extra = {"finetune_report.json": report.to_dict()}
    with atomic_dir(out, overwrite=True) as tmp:
        sparse = any(isinstance(m, SparseLinear) for m in model.modules())
        if sparse or getattr(model.config, "block_widths", None):
            save(model, tmp, tokenizer=tokenizer, extra_json=extra)
        else:  # a plain (e.g. structurally pruned) model stays a plain HF checkpoint
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / "finetune_report.json", report.to_dict())
        if adapter is not None:
            shutil.copytree(adapter, tmp / "adapter")
        if state_dir is not None and state_dir.is_dir():  # the run's checkpoints and log stay
            shutil.move(str(state_dir), tmp / "train_state")
    print(f"saved to {out}" + (f" (unmerged LoRA adapter in {out}/adapter)" if adapter else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsekit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a causal LM one-shot")
    p.add_argument(
        "model", help="hub id, local folder, folder/file.gguf, or 'smollm2' (the embedded default)"
    )
    p.add_argument(
        "--method", choices=[*method_names(), *structured_method_names(), "maskllm"], default="wanda"
    )
    p.add_argument("--steps", type=int, default=None, help="maskllm: training steps (default 100)")
    p.add_argument("--lr", type=float, default=None, help="maskllm: lr of the mask logits (default 5e-4)")
    p.add_argument(
        "--prior",
        choices=("sparsegpt", "wanda", "magnitude", "none"),
        default=None,
        help="maskllm: the one-shot 2:4 mask the logits start from (default sparsegpt)",
    )
    p.add_argument(
        "--start",
        choices=("dense", "prior"),
        default=None,
        help="maskllm: the weights training starts from: dense (the paper; default), or the one-shot "
        "prior's updated weights where its mask keeps them",
    )
    p.add_argument(
        "--prior-update",
        choices=("none", "admm"),
        default=None,
        help="maskllm: the one-shot prior's extra weight update (e.g. admm; default none)",
    )
    p.add_argument(
        "--update-weights",
        action="store_true",
        default=None,
        help="maskllm: train the weights with the masks (default: weights frozen)",
    )
    p.add_argument(
        "--sparsity",
        default=None,
        help="0.5 (the default for the per-layer methods), 50%%, 2:4, 4:8 ...; structured methods need it "
        "(or --remove-layers): the fraction of decoder-block parameters removed",
    )
    p.add_argument(
        "--remove-layers", type=int, default=None, help="depth methods: number of blocks to remove"
    )
    p.add_argument(
        "--num-experts",
        type=int,
        default=None,
        help="expert methods (reap, ean, frequency): experts every MoE block keeps (instead of --sparsity)",
    )
    p.add_argument(
        "--repair", action="store_true", help="depth methods: fold a least-squares map into each cut"
    )
    p.add_argument(
        "--repair-fit",
        choices=("map", "weights"),
        default="map",
        help="with --repair: fit one [hidden, hidden] map of the MLP output (ReplaceMe; map), or re-solve "
        "the down projection's weights on its inputs (weights)",
    )
    p.add_argument(
        "--heads",
        choices=("group", "query"),
        default="group",
        help="width methods: remove whole KV groups, or the same number of query heads per group",
    )
    p.add_argument(
        "--widths",
        choices=("uniform", "adaptive"),
        default="uniform",
        help="flap: same widths in every block (plain HF checkpoint) or per-block (adaptive); expert "
        "methods: the same expert count in every MoE block or per-block counts ranked globally (adaptive)",
    )
    p.add_argument(
        "--bias-compensation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="width methods: add removed channels' mean output back as a bias (flap default on)",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="width methods: re-solve the kept columns of o_proj / down_proj by least squares on the "
        "calibration inputs (with the compensation bias where it is on)",
    )
    p.add_argument(
        "--importance",
        choices=("element1", "element2", "vector"),
        default="element1",
        help="llm-pruner: |w g| per weight (element1), with the Fisher term (element2), or |sum w g| per "
        "row / column (vector), summed over each coupled group",
    )
    p.add_argument(
        "--axes",
        default="hidden,mlp",
        help="minitron: what to cut, a comma-separated subset of hidden (the embedding / residual width), "
        "mlp (intermediate channels) and heads (default hidden,mlp: the paper's recipe)",
    )
    p.add_argument(
        "--subblock-search",
        choices=("exhaustive", "lazy"),
        default="exhaustive",
        help="blockpruner: re-score every sub-block at every step (the paper), or lazily in the order "
        "of their last scores (faster; an approximation)",
    )
    p.add_argument(
        "--tokens",
        choices=("all", "last"),
        default="all",
        help="depth methods: similarity over all tokens or the last token of each sequence",
    )
    p.add_argument(
        "--then-method",
        choices=(*method_names(), *structured_method_names()),
        default=None,
        help="after a structured method, prune what remains with this method (stacking): a per-layer "
        "method, or a width method after a depth one",
    )
    p.add_argument("--then-sparsity", default="2:4", help="sparsity of --then-method")
    p.add_argument(
        "--allocation",
        choices=("uniform", "owl"),
        default="uniform",
        help="per-block sparsity: the same everywhere, or OWL (blocks with more activation outliers "
        "keep more; unstructured sparsity only; the overall sparsity stays the target)",
    )
    p.add_argument(
        "--owl-lambda", type=float, default=0.08, help="OWL: block sparsities span target +- lambda"
    )
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL: outliers are scores above M x their mean")
    p.add_argument(
        "--refine",
        choices=("none", "dsnot"),
        default="none",
        help="after the method's mask: DSnoT prune-and-grow swaps lowering each row's expected output error",
    )
    p.add_argument(
        "--update",
        choices=("none", "sparsegpt", "admm"),
        default="none",
        help="set the kept weights: SparseGPT's OBS solve on the fixed mask, or ADMM least squares "
        "(20 iterations, warm-started from the method's weights, never worse on the calibration data)",
    )
    p.add_argument(
        "--permute",
        action="store_true",
        help="N:M: permute down_proj / o_proj input channels before masking (RIA), folded into "
        "gate/up and v_proj so the saved model needs no permutation",
    )
    p.add_argument(
        "--passes",
        dest="sequential",
        type=_passes,
        default=None,
        metavar="{auto,one,two}",
        help="calibration forwards per block: one (each group of layers solved on inputs already through "
        "the pruned layers before it), two (a dense forward for the statistics, then a pruned one: the "
        "original code's and llm-compressor's order), or auto (the default: one where the method sets "
        "the kept weights, as SparseGPT and --update do, two where it only scores, as Wanda)",
    )
    p.add_argument(
        "--expert-tokens",
        choices=("routed", "all"),
        default="routed",
        help="MoE: each expert's statistics from the tokens routed to it, or from every token",
    )
    p.add_argument(
        "--expert-min-tokens",
        type=int,
        default=64,
        help="MoE: experts with fewer routed calibration tokens get the block's pooled statistics added",
    )
    p.add_argument(
        "--prune-routers", action="store_true", help="MoE: prune the routers too (kept dense by default)"
    )
    p.add_argument("--calib", default="wiki-offline", help="wiki-offline | wikitext2 | c4 | dolly | PATH")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block")
    p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening (fraction of mean diag)")
    p.add_argument(
        "--wbits",
        type=int,
        default=None,
        help="SparseGPT: quantize the kept weights to a symmetric N-bit grid (2..8) inside the same sweep "
        "(the paper's joint mode); the saved weights hold the grid values",
    )
    p.add_argument(
        "--wgroup", type=int, default=None, help="with --wbits: one grid step per group of this many inputs"
    )
    p.add_argument(
        "--forward-dtype",
        default="auto",
        help="dtype of the calibration forwards (the per-layer methods, wanda-sp / flap / llm-pruner, and "
        "shortgpt / angular without --repair): "
        "auto (bf16-mixed for an fp32 model where bf16 matmuls are fast), model, bf16, fp16, fp32 (the "
        "block and its inputs cast), or bf16-mixed / fp16-mixed (the model's own weights and fp32 hidden "
        "states, matmuls and attention in bf16 / fp16 under torch.autocast); statistics are fp32 or wider "
        "and weights keep their dtype",
    )
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per block forward")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        help="under torchrun: seconds a rank waits for the others (a failed or killed rank) before it "
        "stops with an error; must cover rank 0's --eval and save",
    )
    p.add_argument("--eval", action="store_true", help="print perplexity after pruning")
    p.add_argument("--eval-dataset", default="wiki-offline")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=None, help="cap on evaluation tokens")
    p.add_argument("--out", help="directory to save the pruned model to")
    p.add_argument(
        "--save-format",
        choices=("compressed", "dense"),
        default="compressed",
        help="compressed: SparseLinear layers (2:4 / bitmap) in a sparsekit checkpoint (default); "
        "dense: plain HF checkpoint, zeros kept",
    )
    p.add_argument(
        "--offload-folder",
        help="keep at most --max-cpu-memory of weights in RAM, the rest on disk here (accelerate offload)",
    )
    p.add_argument("--max-cpu-memory", default="4GiB", help="RAM budget for weights with --offload-folder")
    _add_model_args(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "eval",
        help="perplexity, or zero-shot accuracy through lm-evaluation-harness, of a model or checkpoint",
        description="Without --tasks: perplexity on --dataset. With --tasks: lm-evaluation-harness tasks "
        "(offline: wiki_lambada, wiki_continuation; standard: boolq, rte, hellaswag, winogrande, arc_easy, "
        "arc_challenge, openbookqa, piqa, ... where their datasets are reachable); add --ppl for both in "
        "one table. Needs pip install 'sparsekit[eval]' for --tasks.",
    )
    p.add_argument("model", help="hub id, folder, GGUF, 'smollm2', a `prune --out` folder or a checkpoint")
    p.add_argument("--tasks", help="comma-separated harness tasks, e.g. wiki_lambada,wiki_continuation")
    p.add_argument("--ppl", action="store_true", help="with --tasks: also perplexity on --dataset")
    p.add_argument("--limit", type=_limit, default=None, help="items per task (or a fraction, 0.1)")
    p.add_argument("--batch-size", type=int, default=8, help="harness batch size")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: task's, 0)")
    p.add_argument(
        "--include-path", action="append", default=None, help="folder of extra task YAMLs (repeatable)"
    )
    p.add_argument("--dataset", default="wiki-offline", help="perplexity corpus")
    p.add_argument("--seqlen", type=int, default=512, help="perplexity window")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on perplexity tokens")
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--offload-folder", help="keep at most --max-cpu-memory of weights in RAM, the rest here")
    p.add_argument("--max-cpu-memory", default="4GiB", help="RAM budget for weights with --offload-folder")
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("bench", help="per-layer and end-to-end speed benchmarks")
    bench = p.add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser(
        "layers",
        help="dense F.linear vs every sparse backend on real-model linear shapes (no weights needed)",
        description="Defaults: on CUDA llama-2-7b,llama-3-8b,llama-2-13b,llama-2-70b at M 1..4096 in fp16; "
        "on the CPU smollm2-135m,llama-2-7b at M 1,16,128 in fp32 (about a minute or two on 2 cores: "
        "big shapes at large M take seconds per call there).",
    )
    p.add_argument("--model", help="one shipped shape config (llama-2-7b, smollm2, ...) or a model folder")
    p.add_argument("--shapes", help="comma-separated shipped configs, e.g. llama-2-7b,llama-3-8b")
    p.add_argument("--m", help="comma-separated token counts M (default: 1,16,128 on CPU; 1..4096 on GPU)")
    p.add_argument("--pattern", default="2:4", help="2:4 or an unstructured ratio like 0.5")
    p.add_argument(
        "--backends",
        help="dense,dense-compiled,2:4,bitmap,2:4-fastest,bitmap-fastest,masked,int8,int4,2:4-int8,"
        "cusparselt,csr; "
        "NAME=SPARSITY re-prunes for that backend (bitmap=0.7), NAME@ISA sets its CPU ISA (2:4@avx2)",
    )
    p.add_argument(
        "--isa",
        help="CPU: run every SparseLinear backend once per ISA level, interleaved, e.g. avx512,avx2,scalar "
        "(default: the best this CPU runs, or SPARSEKIT_CPU_ISA)",
    )
    p.add_argument("--dtype", type=_dtype, default=None, help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cuda-graphs", action="store_true", help="time M <= 64 inside CUDA graphs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="reports/layers", help="directory for layers.json/.md/.png")
    p.set_defaults(func=cmd_bench_layers)
    p = bench.add_parser(
        "rule-table",
        help="time a compressed model's SparseLinear layers in its own forward, sparse vs dense per M "
        "class; write the CPU rule's decision table",
        description="Load the table with SPARSEKIT_CPU_RULE_TABLE=TABLE.json (which makes cpu_rule 'fastest' "
        "the default) or sparsekit.nn.cpu_rule_table.load_table. It holds on the CPU model and thread "
        "count it was measured with. Cost: 2 x (rounds + 1) forwards of M tokens per M class.",
    )
    p.add_argument(
        "model", help="a compressed model: a `sparsekit prune --out` folder or sparsekit checkpoint"
    )
    p.add_argument(
        "--m",
        default=",".join(str(m) for m in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)),
        help="M classes to decide (powers of 2 from 2 to 1024; 1 always runs sparse)",
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per side after one untimed")
    p.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="dense wins when dense ms < (1 - margin) x sparse ms (0: the faster; the first-call rule: -0.1)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (the table holds for these)")
    p.add_argument("--out", required=True, help="the table's JSON file (a .md summary goes beside it)")
    _add_model_args(p)
    p.set_defaults(func=cmd_bench_rule_table)
    p = bench.add_parser("e2e", help="TTFT / TPOT / memory / perplexity, dense vs sparsified")
    p.add_argument("model", help="hub id, folder, 'smollm2', a `prune --out` folder, a sparsekit checkpoint")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pattern", default="2:4", help="pattern the sparse variant of an unpruned model gets")
    p.add_argument(
        "--method",
        choices=("wanda", "sparsegpt", "magnitude"),
        default="wanda",
        help="how an unpruned model is pruned (calibrated on 8 x 256 offline tokens)",
    )
    p.add_argument("--dtypes", default=None, help="e.g. fp32,bf16: dense and sparse rows in each")
    p.add_argument(
        "--quantize",
        default=None,
        help="e.g. int8,int4: add the dense and the sparse model weight-only quantized (torch's CPU "
        "int8 / int4 ops; int8 on 2:4 layers is sparsekit's 2:4-int8 kernel)",
    )
    p.add_argument(
        "--quantize-head",
        action="store_true",
        help="add a twin of each quantized variant with its lm_head quantized too (as torchao's quantize_ "
        "and llama.cpp do; a tied head is untied, the input embedding stays float)",
    )
    p.add_argument(
        "--compile", action="store_true", help="add torch.compile'd twins (CUDA graphs on GPU for decode)"
    )
    p.add_argument(
        "--cpu-rule-twins",
        action="store_true",
        help="add a twin of every sparse / quantized variant under cpu_rule='fastest' (CPU: dense on a "
        "kept copy where it measured faster, from 2 rows up; its MiB include the copies)",
    )
    p.add_argument(
        "--cpu-rule-table",
        help="decide the rule twins before timing: 'measure' (each twin timed in its own forward at this "
        "run's prefill and decode M) or a table file from `sparsekit bench rule-table`",
    )
    p.add_argument("--cache", choices=("static", "dynamic"), default="static", help="KV cache kind")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds after one untimed")
    p.add_argument("--eval-tokens", type=int, default=2048, help="perplexity tokens (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="reports/e2e", help="directory for e2e.json/.md/.png")
    _add_model_args(p)
    p.set_defaults(func=cmd_bench_e2e)

    p = sub.add_parser("demo", help="prune, evaluate and benchmark the embedded model; write a report")
    p.add_argument("--out", help="report directory (default reports/<timestamp>)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run, about a minute)")
    p.add_argument(
        "--full",
        action="store_true",
        help="the docs/results.md run: 15 variants, 32 x 512 calibration, 150 + 100 task items "
        "(32 minutes with its first 10 variants on 2 cores)",
    )
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="write a sparsekit checkpoint in a form other engines load")
    p.add_argument("checkpoint", help="folder written by sparsekit.save")
    p.add_argument("--dense", action="store_true", help="zeros kept, loadable by any engine (vLLM, ...)")
    p.add_argument(
        "--decilm", action="store_true", help="DeciLM / Nemotron-NAS block_configs (vLLM): no-op sub-blocks"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "quantize",
        help="weight-only int8 / int4 of a dense, pruned or sparsekit model (2:4 layers: 2:4-int8)",
    )
    p.add_argument("model", help="hub id, folder, 'smollm2', a `prune --out` folder, a sparsekit checkpoint")
    p.add_argument(
        "--format",
        default="int8",
        help="int8 (per row; 2:4 layers become 2:4-int8), int4 (groups of 64), int4-g32, int4-g128, "
        "int4-g256",
    )
    p.add_argument(
        "--head",
        action="store_true",
        help="quantize the output head (lm_head) too, as torchao and llama.cpp do; a tied head is untied "
        "and the input embedding stays float",
    )
    p.add_argument("--out", required=True, help="new folder for the sparsekit checkpoint")
    p.add_argument("--dtype", type=_dtype, default=torch.bfloat16, help="float dtype (default bfloat16)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "finetune",
        help="heal a pruned model (masks kept exact): fine-tune, distil or masked LoRA; FSDP2, torchrun",
    )
    p.add_argument("checkpoint", help="a sparsekit checkpoint or a pruned HF folder (`prune --out`)")
    p.add_argument(
        "--distill", metavar="TEACHER", help="train against this dense model's logits (KL), e.g. smollm2"
    )
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--lm-weight", type=float, default=0.0, help="with --distill: add this times the LM loss")
    p.add_argument(
        "--teacher-topk",
        type=int,
        default=0,
        help="with --distill: precompute the teacher's top-k logits to disk first (the teacher is not "
        "held during training)",
    )
    p.add_argument("--lora-rank", type=int, default=0, help="mask-preserving LoRA of this rank (peft)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument(
        "--lora-targets",
        default=None,
        help="comma-separated module names / suffixes (default: every pruned linear)",
    )
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine: final lr / lr")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=None, help="clip the global gradient norm")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step, over all processes")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per process per step")
    p.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="compute dtype (fp32 master weights either way); auto: bf16 where the device runs it natively",
    )
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="training text and data order")
    p.add_argument("--calib", default="wiki-offline", help="training text (a corpus name or a text file)")
    p.add_argument("--eval-dataset", default="wiki-offline")
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-every", type=int, default=0, help="held-out perplexity every N steps")
    p.add_argument(
        "--save-every", type=int, default=0, help="sharded checkpoint every N steps (and at the end)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--dist-timeout", type=float, default=1800.0, help="torchrun: collective timeout (s)")
    p.add_argument("--out", help="save here (default: overwrite the checkpoint, atomically)")
    p.set_defaults(func=cmd_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (
        ValueError,
        OSError,
        ConnectionError,
        ImportError,
        PartialPruneError,
        torch.cuda.OutOfMemoryError,
    ) as exc:
        print(f"sparsekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except torch.distributed.DistError as exc:  # under torchrun: another rank failed, died or timed out
        print(
            f"sparsekit {args.command}: error: the process group failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); another rank failed, was killed or did not "
            "answer within --dist-timeout; nothing was written",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
