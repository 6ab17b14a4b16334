"""Layer-sequential one-shot pruning, the way SparseGPT and Wanda do it: the loop.

1. Capture the inputs of the first decoder block (hidden states plus every keyword argument the
   model passes: attention mask, position ids, rotary ``position_embeddings``, cache flags) with a
   forward pre-hook, for the whole calibration batch in chunks.
2. For each block: move it to the compute device, run it on the captured inputs with hooks on its
   linear layers that accumulate statistics (layers reading the same input tensor share one),
   prune every linear layer, run the block again so the next block sees pruned outputs, measure
   how far the pruned outputs moved, move the block back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsekit._memory import free_bytes
from sparsekit.formats import NMPattern, Pattern, Unstructured, mask_sparsity, parse_sparsity
from sparsekit.kernels.mask_bits import pack_mask, unpack_mask
from sparsekit.models import (
    BlockAnatomy,
    block_linears,
    channel_folds,
    describe,
    linear_weight,
    model_device,
    model_dtype,
    set_linear_weight,
)

from .allocation import Allocation, allocation, outlier_ratio
from .capture import (
    Chunk,
    capture_block_inputs,
    cast_runner,
    check_forward_dtype,
    resolve_forward_precision,
    run_block,
)
from .compose import MaskRefine, NoRefine, NoUpdate, WeightUpdate, mask_refine, weight_update
from .distributed import (
    World,
    all_reduce_sum_,
    assign,
    broadcast_,
    calibration_share,
    current_world,
    gather_objects,
)
from .experts import pool_expert_stats, routed_experts
from .hooks import OutputErrorProbe, StatsCollector, Timer, fold_partial, rel_error_parts
from .method import (
    InputStat,
    PruningMethod,
    SquaredNorm,
    Statistic,
    pruning_method,
    split_stat,
    statistic_for,
)
from .offload import check_writable_offload, materialized
from .permute import fold_permutation, permute_columns_, permute_rows_, permute_stats
from .sequential import ChunkThreads, input_groups, paused_bytes, run_block_sequential
from .sparsegpt import QuantGrid

log = logging.getLogger(__name__)


class PartialPruneError(RuntimeError):
    """Pruning failed after some blocks were changed in place: the message says which."""


def check_finite_weights(blocks: nn.ModuleList, prefix: str) -> None:
    """Refuse NaN / Inf weights up front, naming the layer (before any block is touched)."""
    for index, block in enumerate(blocks):
        for lname, module in block_linears(block).items():
            weight = linear_weight(module)
            if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
                bad = int((~torch.isfinite(weight)).sum())
                raise ValueError(
                    f"{prefix}.{index}.{lname} has {bad} NaN/Inf weights: the model is damaged (or was "
                    "loaded in a dtype too narrow for it); fix or reload it before pruning"
                )


# how many calibration forwards a block runs, by name (the CLI's --passes) -> PruneConfig.sequential
PASSES: dict[str, bool | None] = {"auto": None, "one": True, "two": False}


@dataclass
class PruneConfig:
    """What to prune and how. ``sparsity``: 0.5, '50%', '2:4', '4:8', or a Pattern."""

    method: str | PruningMethod = "wanda"  # a registered name or a PruningMethod object
    sparsity: str | float | Pattern = 0.5
    blocksize: int = 128  # SparseGPT column block
    percdamp: float = 0.01  # SparseGPT dampening, fraction of mean(diag H)
    batch_size: int = 8  # calibration sequences per block forward
    device: str | torch.device | None = None  # compute device; default: where the model is
    share_statistics: bool = True  # one statistic per distinct input (q/k/v, gate/up share)
    measure_error: bool = True  # per-layer output error on the first calibration chunk
    show_progress: bool = True
    # precision of the calibration forwards: "auto" (for an fp32 model where the device has fast
    # bf16 matmuls "bf16-mixed", as the papers ran fp16 forwards; otherwise the model's dtype),
    # "model", a torch dtype (the block and its inputs cast to it), or "bf16-mixed" / "fp16-mixed"
    # (the model's own weights and hidden states, matmuls and attention in bf16 / fp16 under
    # torch.autocast). Statistics accumulate in fp32 and the weights are pruned in their own dtype.
    forward_dtype: str | torch.dtype = "auto"
    # how much of each block to prune: "uniform", "owl" (outlier-weighted, unstructured only) or
    # an ``Allocation`` value such as ``OWL(lam=0.1)``
    allocation: str | Allocation = "uniform"
    # after the method's mask: "none" or "dsnot" (a ``MaskRefine``), then "none", "sparsegpt" or
    # "admm" (a ``WeightUpdate``) for the kept weights
    refine: str | MaskRefine = "none"
    update: str | WeightUpdate = "none"
    # N:M only: permute each foldable layer's input channels before masking (RIA), folded into the
    # producing layers so the saved model runs without a permutation
    permute: bool = False
    # Mixture-of-Experts blocks: each expert's statistics from the tokens routed to it ("routed") or
    # from every token ("all", what a routing-blind port does); experts with fewer routed tokens
    # than expert_min_tokens are topped up with the block's pooled statistics; routers (and
    # routing-only linears such as a shared expert's gate) stay dense unless prune_routers
    expert_tokens: str = "routed"
    expert_min_tokens: int = 64
    prune_routers: bool = False
    # one calibration forward per block (True): each group of linears reading one input is solved on
    # inputs that went through the pruned layers before it, and that forward gives the next block's
    # inputs (see ``sequential``); False: a dense forward for every statistic, then a pruned one (the
    # original code's and llm-compressor's order). None: one forward where the kept weights are set
    # from the statistics (SparseGPT, update='sparsegpt' / 'admm'), two where the method only scores
    # (Wanda: docs/results.md, "One calibration forward per block"). Blocks without a fixed call order
    # (Mixture of Experts), permute=True and paused activations over half the free memory take two.
    sequential: bool | None = None
    # SparseGPT only: quantize every kept weight to a symmetric wbits-bit grid (per output row, or per
    # group of wgroup inputs) inside the same sweep (the paper's joint mode); weights stay float
    wbits: int | None = None
    wgroup: int | None = None

    def __post_init__(self) -> None:
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1, got {self.blocksize}")
        if not self.percdamp >= 0:
            raise ValueError(f"percdamp must be >= 0 (a fraction of mean(diag H)), got {self.percdamp}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.expert_tokens not in ("routed", "all"):
            raise ValueError(f"expert_tokens={self.expert_tokens!r}: choose routed or all")
        if self.expert_min_tokens < 0:
            raise ValueError(f"expert_min_tokens must be >= 0, got {self.expert_min_tokens}")
        self.method = pruning_method(self.method)
        self.sparsity = parse_sparsity(self.sparsity)
        self.allocation = allocation(self.allocation)
        if self.allocation.needs_scores and not isinstance(self.sparsity, Unstructured):
            raise ValueError(
                f"allocation {self.allocation.name!r} spreads an unstructured sparsity over blocks; "
                f"{self.sparsity} fixes every group's count: use a ratio like 0.7, or allocation='uniform'"
            )
        self.refine = mask_refine(self.refine)
        self.update = weight_update(self.update)
        self._check_combination()
        self._check_quantization()
        self.forward_dtype = check_forward_dtype(self.forward_dtype)

    @property
    def quant_grid(self) -> QuantGrid | None:
        """The joint mode's grid (``wbits``, ``wgroup``), or None."""
        return None if self.wbits is None else QuantGrid(self.wbits, self.wgroup)

    def _check_quantization(self) -> None:
        if self.wbits is None:
            if self.wgroup is not None:
                raise ValueError(
                    f"wgroup={self.wgroup} sizes the groups of wbits' grid: add wbits (e.g. 4), or drop it"
                )
            return
        QuantGrid(self.wbits, self.wgroup)  # refuses bits outside 2..8 and a group below 1
        if self.method.name != "sparsegpt":
            raise ValueError(
                f"wbits quantizes inside SparseGPT's sweep, and method {self.method.name!r} has none: use "
                "method='sparsegpt', or prune and then quantize (sparsekit quantize)"
            )
        moved = [s.name for s in (self.refine, self.update) if s.name != "none"]
        if moved:
            raise ValueError(
                f"wbits puts the weights on a grid, and {' and '.join(moved)} would move them off it "
                "after the sweep: drop refine / update, or drop wbits"
            )

    def _check_combination(self) -> None:
        if self.sequential and self.permute:
            raise ValueError(
                "sequential=True solves each group of layers as the forward reaches it, and permute=True "
                "reorders a block's channels from every layer's statistic at once: drop one (--passes two "
                "or auto with --permute)"
            )
        if self.sequential is not None and self.statistic is None:
            raise ValueError(
                f"sequential chooses how many calibration forwards each block runs, and {self.method.name} "
                "runs none per block (its mask needs no statistic): drop it (--passes)"
            )
        if self.permute and not isinstance(self.sparsity, NMPattern):
            raise ValueError(
                f"permute=True groups input channels for N:M sparsity; {self.sparsity} has no groups: "
                "use a sparsity like '2:4', or drop --permute"
            )
        if (
            self.update.name == "sparsegpt"
            and self.method.name == "sparsegpt"
            and isinstance(self.refine, NoRefine)
        ):
            raise ValueError(
                "update='sparsegpt' after method='sparsegpt' solves the same mask twice; use update='none' "
                "(SparseGPT already updates), update='admm', or add refine='dsnot' to re-solve a refined mask"
            )

    @property
    def statistic(self) -> Statistic | None:
        """What the engine collects per layer input: everything the method, refine and update read."""
        parts = [self.method.statistic] if self.method.statistic is not None else []
        return statistic_for(parts + list(self.refine.statistics) + list(self.update.statistics))

    @property
    def needs_calibration(self) -> bool:
        return self.statistic is not None or self.allocation.needs_scores

    @property
    def one_forward(self) -> bool:
        """Whether blocks prune in one calibration forward (``sequential``, resolved)."""
        if self.sequential is not None:
            return self.sequential
        return self.method.updates_weights or self.update.name != "none"

    def solve_cost(self, rows: int, cols: int) -> float | None:
        """The method's solve cost plus the update's (None when both are cheap, see PruningMethod)."""
        costs = [c for c in (self.method.solve_cost(rows, cols), self.update.solve_cost(rows, cols)) if c]
        return sum(costs) if costs else None

    @property
    def label(self) -> str:
        """The method and every non-default step, e.g. 'ria+permute+dsnot+admm'."""
        steps = [self.method.name] + (["permute"] if self.permute else [])
        steps += [s.name for s in (self.refine, self.update) if s.name != "none"]
        if self.allocation.name != "uniform":
            steps.append(self.allocation.name)
        if self.quant_grid is not None:
            steps.append(str(self.quant_grid))
        return "+".join(steps)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    output_rel_error: float | None = None  # ||(W - W') X||^2 / ||W X||^2 on the calibration inputs
    percdamp: float | None = None


@dataclass
class PruneReport:
    method: str
    sparsity: str
    nsamples: int
    seqlen: int
    calib: str = "input_ids"
    layers: list[LayerReport] = field(default_factory=list)
    # per block: ||dense - pruned outputs||^2 / ||dense outputs||^2 on the first calibration chunk
    # (two forwards per block) or the first calibration sequence (one forward per block)
    block_rel_errors: list[float] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    forward_dtype: str = ""  # dtype of the calibration forwards
    block_sparsities: list[float] = field(default_factory=list)  # per block, when not uniform
    world_size: int = 1  # processes that pruned together (torch.distributed)
    recipe: str = ""  # method and steps, e.g. 'ria+permute+dsnot+admm' (PruneConfig.label)
    permuted: list[dict[str, Any]] = field(default_factory=list)  # layer, kept score before/after
    rank_timings_s: list[dict[str, float]] = field(default_factory=list)  # each rank's phases
    experts: list[dict[str, Any]] = field(default_factory=list)  # MoE blocks: routed tokens per expert

    @property
    def overall_sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        pruned = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return pruned / max(total, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,  # the method's name
            "recipe": self.recipe,
            "permuted": self.permuted,
            "sparsity": self.sparsity,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "calib": self.calib,
            "overall_sparsity": self.overall_sparsity,
            "timings_s": self.timings_s,
            "forward_dtype": self.forward_dtype,
            "block_sparsities": self.block_sparsities,
            "world_size": self.world_size,
            "rank_timings_s": self.rank_timings_s,
            "block_rel_errors": self.block_rel_errors,
            "experts": self.experts,
            "notes": self.notes,
            "layers": [vars(r) | {"shape": list(r.shape)} for r in self.layers],
        }


def _prune_linear(
    module: nn.Module, stats: dict[str, InputStat], config: PruneConfig, timer: Timer
) -> tuple[torch.Tensor, float | None]:
    """method -> refine -> update on one layer; ``stats`` by statistic name."""
    weight = linear_weight(module).detach()
    method = config.method
    with timer.phase("solve"):
        own = stats.get(method.statistic.name) if method.statistic is not None else None
        result = method.prune(weight, own, config)
        pruned, mask = result.weight, result.mask
    if not isinstance(config.refine, NoRefine):
        with timer.phase("refine"):
            refined = config.refine.refine(weight, pruned, mask, stats, config.sparsity)
            grown = refined & ~mask
            pruned = torch.where(refined, torch.where(grown, weight, pruned), torch.zeros_like(pruned))
            mask = refined
    if not isinstance(config.update, NoUpdate):
        with timer.phase("update"):
            pruned = config.update.update(weight, pruned, mask, stats, config)
    set_linear_weight(module, pruned)
    return mask, result.percdamp


def prune_model(
    model: nn.Module, input_ids: torch.Tensor | None, config: PruneConfig, block_prefix: str | None = None
) -> PruneReport:
    """Prune every linear layer of every decoder block in place; embeddings and lm_head stay dense.

    input_ids: LongTensor [nsamples, seqlen] of calibration tokens (unused by magnitude).
    """
    anatomy = describe(model)
    anatomy.require_dense(config.label)
    _check_expert_options(anatomy, config)
    _check_grid_groups(anatomy, config)
    moe = [b.index for b in anatomy if b.experts is not None]
    blocks = anatomy.blocks
    prefix = block_prefix or anatomy.blocks_path
    device = torch.device(config.device) if config.device is not None else model_device(model)
    timer = Timer(device)
    nsamples, seqlen = tuple(input_ids.shape) if input_ids is not None else (0, 0)
    method = config.method
    check_finite_weights(blocks, prefix)
    check_writable_offload(model)
    world = current_world()
    report = PruneReport(
        method.name, str(config.sparsity), nsamples, seqlen, world_size=world.size, recipe=config.label
    )
    if config.quant_grid is not None:
        per = f"per {config.wgroup} inputs" if config.wgroup else "per output row"
        report.notes.append(
            f"wbits: kept weights rounded to a symmetric {config.wbits}-bit grid ({per}) inside SparseGPT's "
            "sweep; they are stored as floats on that grid (simulated quantization)"
        )
    if config.permute and moe:
        report.notes.append(
            f"permute: the experts of MoE blocks {moe} keep their channel order (no fold is defined inside "
            "fused experts); their attention and dense layers are permuted"
        )
    needs_data = config.needs_calibration
    chunks: list[Chunk] = []
    probe: Chunk | None = None  # the first calibration sequence alone (one forward per block)
    if needs_data:
        _check_calibration(input_ids, config.label)
        mine = calibration_share(input_ids, config.batch_size, world)
        log.info(
            "capturing inputs of %s.0 for %d x %d calibration tokens%s",
            prefix,
            mine.shape[0],
            seqlen,
            f" (rank {world.rank} of {world.size}: {nsamples} in all)" if world.active else "",
        )
        with timer.phase("forward"):
            chunks = capture_block_inputs(model, blocks, mine, config.batch_size, device)
            # one forward per block: the first sequence alone gives the groups and the block error
            if config.one_forward:
                probe = capture_block_inputs(model, blocks, mine[:1], 1, device)[0]
        log.info(
            "%s calibration forward%s per block (sequential=%s)",
            "one" if config.one_forward else "two",
            "" if config.one_forward else "s",
            config.sequential,
        )
        precision = resolve_forward_precision(config.forward_dtype, model_dtype(model), device)
        report.forward_dtype = precision.name
        precision.apply(chunks if probe is None else [*chunks, probe])
    block_configs = [config] * len(blocks)
    if config.allocation.needs_scores:
        with timer.phase("allocation"):
            ratios = _outlier_ratios(anatomy, chunks, config, timer, world, device)
        report.block_sparsities = config.allocation.block_sparsities(config.sparsity.sparsity, ratios)
        block_configs = [replace(config, sparsity=Unstructured(s)) for s in report.block_sparsities]
        if config.statistic is None:
            chunks = []  # magnitude needed the data only for the allocation
        log.info(
            "%s allocation: block sparsities %.3f..%.3f around %.3f",
            config.allocation.name,
            min(report.block_sparsities),
            max(report.block_sparsities),
            config.sparsity.sparsity,
        )
    progress = tqdm(
        range(len(blocks)),
        desc=f"{config.label} {config.sparsity}",
        disable=not config.show_progress or not world.main,
    )
    threads = ChunkThreads()  # the chunks' threads of one-forward blocks, kept across blocks
    with torch.no_grad(), threads:
        for index in progress:
            block = blocks[index]
            home = model_device(block)
            try:
                with materialized(block, device) as changed:
                    block.to(device)
                    linears = _prune_block(
                        anatomy[index],
                        f"{prefix}.{index}",
                        chunks,
                        block_configs[index],
                        timer,
                        report,
                        world,
                        threads,
                        probe,
                    )
                    changed.update(linears.values())  # written back where accelerate offloaded them
                    block.to(home)
            except Exception as exc:
                if index == 0 and not report.layers:
                    raise
                done = f"blocks 0-{index - 1} are already pruned in place and " if index else ""
                raise PartialPruneError(
                    f"pruning stopped in {prefix}.{index} ({type(exc).__name__}: {exc}); {done}block {index} "
                    "may be partly pruned: reload the model before trying again"
                ) from exc
    report.timings_s = dict(timer.totals)
    if world.active:
        report.rank_timings_s = gather_objects(report.timings_s)
    log.info(
        "pruned %d layers to %.3f sparsity (%s)",
        len(report.layers),
        report.overall_sparsity,
        ", ".join(f"{k} {v:.1f}s" for k, v in report.timings_s.items()),
    )
    return report


@dataclass
class _BlockJob:
    """One block's pruning: what each of its steps reads. ``runner`` is the block itself or the cast
    copy the calibration forwards run (``run_linears`` its linears, ``linears`` the block's own)."""

    anatomy: BlockAnatomy
    name: str
    chunks: list[Chunk]
    config: PruneConfig
    timer: Timer
    report: PruneReport
    world: World
    runner: nn.Module
    linears: dict[str, nn.Module]
    run_linears: dict[str, nn.Module]
    probe: Chunk | None = None  # the first sequence alone: the one-forward block's dense reference


def _prune_block(
    anatomy: BlockAnatomy,
    block_name: str,
    chunks: list[Chunk],
    config: PruneConfig,
    timer: Timer,
    report: PruneReport,
    world: World | None,
    threads: ChunkThreads,
    probe: Chunk | None = None,
) -> dict[str, nn.Module]:
    """Statistics, pruning and the pruned re-run of one block (on the device); returns its linears.

    ``chunks`` (empty for magnitude) hold the block's inputs and receive its pruned outputs. With
    an active ``world`` the statistics are summed over the ranks first, each layer is solved on
    one rank and its pruned weight broadcast to the others. One forward (``config.one_forward``)
    where the block allows it, else two.
    """
    block = anatomy.module
    linears = anatomy.prunable(routers=config.prune_routers)
    # what the calibration forwards run: the block or a cast copy
    runner = cast_runner(block, chunks[0].hidden.dtype) if chunks else block
    run_linears = linears if runner is block else anatomy.prunable(runner, routers=config.prune_routers)
    world = world or World()
    job = _BlockJob(
        anatomy, block_name, chunks, config, timer, report, world, runner, linears, run_linears, probe
    )
    plan = _sequential_plan(job) if chunks and config.one_forward else None
    if plan is not None:
        _prune_block_sequential(job, *plan, threads)
    else:
        _prune_block_two_passes(job)
    return linears


def _prune_block_two_passes(job: _BlockJob) -> None:
    """A dense forward collecting every statistic, every linear pruned, a pruned forward."""
    anatomy, chunks, config, timer, report = job.anatomy, job.chunks, job.config, job.timer, job.report
    block, index = anatomy.module, anatomy.index
    runner, run_linears, linears = job.runner, job.run_linears, job.linears
    stats: dict[str, dict[str, InputStat]] = {}
    dense_outputs = None
    dense_weights: dict[str, torch.Tensor] = {}
    routed = routed_experts(anatomy, runner, run_linears, config.expert_tokens == "all")
    if chunks:
        collector = StatsCollector(run_linears, config.statistic, timer, config.share_statistics)
        stop = None
        try:
            with timer.phase("forward"), routed, chunks[0].precision():  # one region: see run_block
                # the first chunk whole (its outputs are the block error's dense reference), the
                # rest only as far as the last statistic
                dense_outputs = run_block(runner, chunks[:1], index, collector.next_chunk)
                stop = collector.stop_after_last() if anatomy.experts is None else None
                run_block(runner, chunks[1:], index, collector.next_chunk)
        finally:  # a failed forward leaves no hook on the model
            if stop is not None:
                stop.remove()
            collector.remove()
        if anatomy.experts is not None:
            collector.ensure(run_linears, chunks[0].hidden.device)
        collected = collector.finish(job.world)
        if anatomy.experts is not None:
            counts = pool_expert_stats(anatomy.experts, index, collected, config.expert_min_tokens)
            report.experts.append(vars(counts))
        stats = {
            n: split_stat(config.statistic, collected.get(n), linear_weight(m).shape[1])
            for n, m in linears.items()
        }
        dense_weights = _dense_weights(run_linears, config)
    if config.permute:  # magnitude permutes without data: no chunks, no statistics
        with timer.phase("permute"):
            copies = [runner] if runner is not block else []
            _permute_block(anatomy, job.name, copies, dense_weights, stats, config, report)
    results = _prune_linears(linears, stats, config, timer, job.world)
    _report_layers(job, results)
    if not chunks:
        return
    if runner is not block:
        _copy_weights(linears, run_linears, chunks[0].hidden.dtype)
    probe = OutputErrorProbe(run_linears, dense_weights) if config.measure_error else None
    with timer.phase("forward"), routed_experts(anatomy, runner, run_linears):
        pruned_outputs = run_block(runner, chunks, index)
    errors = probe.errors() if probe is not None else {}
    if probe is not None:
        probe.remove()
    _finish_block(job, dense_outputs, pruned_outputs, errors)


def _sequential_plan(job: _BlockJob) -> tuple[list[list[str]], list[torch.Tensor]] | None:
    """(the block's input groups in call order, the dense outputs of the first sequence, or of the
    first chunk where no probe was captured) where one forward can prune it; None, with a note in the
    report, where it takes two."""
    anatomy, chunks = job.anatomy, job.chunks
    reason = None
    if anatomy.experts is not None:
        reason = "Mixture-of-Experts blocks route each chunk differently"
    elif job.config.permute:
        reason = "permute reorders a block's channels from every layer's statistics at once"
    else:
        need = paused_bytes(chunks, job.run_linears)
        free = free_bytes(chunks[0].hidden.device)
        if free is not None and need > free // 2:
            reason = (
                f"the paused chunks would hold ~{need / 2**30:.1f} GiB, over half the {free / 2**30:.1f} GiB "
                "free (fewer calibration tokens per process fit)"
            )
    if job.world.active:  # every rank must take the same path: their collectives pair up
        vetoes = torch.tensor(
            [float(reason is not None)], dtype=torch.float64, device=chunks[0].hidden.device
        )
        all_reduce_sum_([vetoes])
        if reason is None and vetoes.item() > 0:
            reason = "another process has too little free memory"
    if reason is None:
        # the first sequence dense, alone (the whole first chunk where no probe was captured): the
        # block error's reference, and the order of the groups
        reference = chunks[0]
        if job.probe is not None:
            reference = job.probe
            reference.hidden = chunks[0].hidden[:1]
        with job.timer.phase("forward"):
            groups, dense_outputs = input_groups(job.runner, reference, anatomy.index, job.run_linears)
        if groups is not None:
            return groups, [dense_outputs]
        reason = f"block {anatomy.index} does not call each linear exactly once"
    note = f"two calibration forwards per block where one does not apply: {reason}"
    if note not in job.report.notes:
        job.report.notes.append(note)
        log.info(note)
    return None


def _prune_block_sequential(
    job: _BlockJob,
    groups: list[list[str]],
    dense_outputs: list[torch.Tensor],
    threads: ChunkThreads,
) -> None:
    """One forward over every chunk; each input group solved when every chunk has reached it."""
    anatomy, chunks, config, timer, world = job.anatomy, job.chunks, job.config, job.timer, job.world
    runner, linears, run_linears = job.runner, job.linears, job.run_linears
    statistic = config.statistic
    group_stats: list[InputStat | None] = [None] * len(groups)
    dense_weights = _dense_weights(run_linears, config)
    results: dict[str, tuple[torch.Tensor, float | None]] = {}
    probes: list[OutputErrorProbe] = []

    def collect(group: int, chunk: int, x: torch.Tensor) -> None:
        with timer.phase("statistics"):
            x = x.detach()
            stat = group_stats[group]
            if stat is None:
                stat = group_stats[group] = InputStat(statistic.new(x.shape[-1], x.device))
            statistic.accumulate(x, stat.value)
            fold_partial(stat, f"{job.name}.{groups[group][0]}")
            stat.tokens += x.numel() // x.shape[-1]

    def solve(group: int) -> None:
        stat = group_stats[group]
        if world.active:
            with timer.phase("communication"):
                tokens = torch.tensor([stat.tokens], dtype=torch.float64, device=stat.total.device)
                all_reduce_sum_([stat.total, tokens])
                stat.tokens = int(tokens.item())
        stat.value, stat.total = stat.total.to(torch.float32), None
        members = {n: linears[n] for n in groups[group]}
        stats = {n: split_stat(statistic, stat, linear_weight(m).shape[1]) for n, m in members.items()}
        results.update(_prune_linears(members, stats, config, timer, world))
        runs = {n: run_linears[n] for n in members}
        if runner is not anatomy.module:
            _copy_weights(members, runs, chunks[0].hidden.dtype)
        if config.measure_error:
            probes.append(OutputErrorProbe(runs, dense_weights))

    gates = {members[0]: g for g, members in enumerate(groups)}
    before = dict(timer.totals)
    try:
        with timer.phase("forward"):
            pruned_outputs = run_block_sequential(
                runner, chunks, anatomy.index, gates, run_linears, collect, solve, threads
            )
    finally:
        for probe in probes:
            probe.remove()
    # "forward" counts the statistics (as in two passes), not the solves made inside it
    own = ("forward", "statistics")
    inside = sum(v - before.get(k, 0.0) for k, v in timer.totals.items() if k not in own)
    timer.totals["forward"] -= inside
    _report_layers(job, {n: results[n] for n in linears})
    errors = {n: e for probe in probes for n, e in probe.errors().items()}
    _finish_block(job, dense_outputs, pruned_outputs, errors)


def _dense_weights(run_linears: dict[str, nn.Module], config: PruneConfig) -> dict[str, torch.Tensor]:
    """Copies of the weights before pruning, for the per-layer output error (if measured)."""
    if not config.measure_error:
        return {}
    return {n: linear_weight(m).detach().clone() for n, m in run_linears.items()}


def _copy_weights(linears: dict[str, nn.Module], copies: dict[str, nn.Module], dtype: torch.dtype) -> None:
    """The pruned weights of ``linears`` into the cast copy's layers (``copies``, same names)."""
    for name, module in linears.items():
        set_linear_weight(copies[name], linear_weight(module).detach().to(dtype))


def _report_layers(job: _BlockJob, results: dict[str, tuple[torch.Tensor, float | None]]) -> None:
    """A ``LayerReport`` per pruned linear, in the block's order (and a note per raised dampening)."""
    for lname, module in job.linears.items():
        mask, percdamp = results[lname]
        shape = tuple(linear_weight(module).shape)
        layer = LayerReport(f"{job.name}.{lname}", shape, mask_sparsity(mask), percdamp=percdamp)
        if percdamp is not None and percdamp > job.config.percdamp:
            job.report.notes.append(f"{layer.name}: Cholesky failed, dampening raised to {percdamp:g}")
        job.report.layers.append(layer)


def _finish_block(
    job: _BlockJob,
    dense_outputs: list[torch.Tensor],
    pruned_outputs: list[torch.Tensor],
    errors: dict[str, float | None],
) -> None:
    """Record the layers' output errors and the block's (first chunk, dense against pruned), and
    hand the pruned outputs to the next block."""
    report, world, chunks = job.report, job.world, job.chunks
    for layer, name in zip(report.layers[-len(job.linears) :], job.linears, strict=True):
        if name in errors:
            layer.output_rel_error = errors[name]
    # the first calibration chunk of the whole batch (rank 0's first: calibration_share), or as
    # many of its first sequences as the dense reference holds
    rows = dense_outputs[0].shape[0]
    first = [pruned_outputs[0][:rows]]
    num, den = rel_error_parts(dense_outputs, first) if world.main else (0.0, 0.0)
    if world.active:
        parts = torch.tensor([num, den], dtype=torch.float64, device=chunks[0].hidden.device)
        all_reduce_sum_([parts])
        num, den = parts.tolist()
    report.block_rel_errors.append(num / max(den, 1e-30))
    for chunk, out in zip(chunks, pruned_outputs, strict=True):
        chunk.hidden = out


def _check_grid_groups(anatomy, config: PruneConfig) -> None:
    """wgroup must divide every pruned layer's in_features: checked before any forward runs."""
    if config.wgroup is None:
        return
    widths = sorted(
        {
            linear_weight(m).shape[1]
            for b in anatomy
            for m in b.prunable(routers=config.prune_routers).values()
        }
    )
    bad = [k for k in widths if k % config.wgroup]
    if bad:
        fits = [g for g in (32, 64, 128, 256) if all(k % g == 0 for k in widths)]
        raise ValueError(
            f"wgroup={config.wgroup} does not divide in_features {bad} of this model's layers; "
            f"choose a group that divides {widths}{f' (e.g. {fits[-1]})' if fits else ''}, or drop wgroup"
        )


def _check_expert_options(anatomy, config: PruneConfig) -> None:
    """Expert options on a model without a Mixture-of-Experts block would do nothing: refuse them."""
    if any(b.experts is not None for b in anatomy):
        return
    asked = [
        k
        for k, default in (("expert_tokens", "routed"), ("expert_min_tokens", 64), ("prune_routers", False))
        if getattr(config, k) != default
    ]
    if asked:
        raise ValueError(
            f"{', '.join(asked)} act on Mixture-of-Experts blocks, and {anatomy.model_type} has none: drop "
            f"{'it' if len(asked) == 1 else 'them'}"
        )


def _permute_block(
    anatomy: BlockAnatomy,
    block_name: str,
    copies: list[nn.Module],
    dense_weights: dict[str, torch.Tensor],
    stats: dict[str, dict[str, InputStat]],
    config: PruneConfig,
    report: PruneReport,
) -> None:
    """RIA's channel permutation on every foldable layer of ``block`` (and of its forward ``copies``,
    the dense weights kept for the error probe, the consumer's statistics), before any masking."""
    method, pattern = config.method, config.sparsity
    linears = block_linears(anatomy.module)
    for fold in channel_folds(anatomy):
        consumer = linears[fold.consumer]
        layer_stats = stats.get(fold.consumer, {})
        own = layer_stats.get(method.statistic.name) if method.statistic is not None else None
        scores = method.channel_scores(linear_weight(consumer).detach(), own)
        rows, cols, before, after = fold_permutation(fold, scores, pattern.keep, pattern.group)
        for module_set in [linears] + [block_linears(c) for c in copies]:
            permute_columns_(module_set[fold.consumer], cols)
            for name in fold.producers:
                permute_rows_(module_set[name], rows)
        if fold.consumer in dense_weights:
            dense_weights[fold.consumer] = dense_weights[fold.consumer][
                :, cols.to(dense_weights[fold.consumer].device)
            ]
        for name in fold.producers:
            if name in dense_weights:
                dense_weights[name] = dense_weights[name][rows.to(dense_weights[name].device)]
        if layer_stats:
            stats[fold.consumer] = permute_stats(layer_stats, cols)
        layer = f"{block_name}.{fold.consumer}"
        report.permuted.append({"layer": layer, "kept_score_before": before, "kept_score_after": after})
        log.debug("%s: permuted input channels, kept score %.4g -> %.4g", layer, before, after)


def _outlier_ratios(
    anatomy, chunks: list[Chunk], config: PruneConfig, timer: Timer, world: World, device
) -> list[float]:
    """OWL's pre-pass: the dense model's blocks in order, each on the previous block's dense outputs,
    with Wanda scores |W| * ||X||_2 of every layer the prune will cut (experts on their routed
    tokens) -> each block's outlier ratio. ``chunks`` are left as they are (the pruning pass starts
    from block 0's inputs again)."""
    chunks = [c.copy() for c in chunks]
    ratios = []
    for part in anatomy:
        block, index = part.module, part.index
        home = model_device(block)
        with materialized(block, device):
            block.to(device)
            runner = cast_runner(block, chunks[0].hidden.dtype)
            linears = part.prunable(runner, routers=config.prune_routers)
            collector = StatsCollector(linears, SquaredNorm(), timer, config.share_statistics)
            with timer.phase("forward"), routed_experts(part, runner, linears, config.expert_tokens == "all"):
                outputs = run_block(runner, chunks, index, collector.next_chunk)
            collector.remove()
            stats = collector.finish(world)
            if part.experts is not None:
                pool_expert_stats(part.experts, index, stats, config.expert_min_tokens)
            own = part.prunable(routers=config.prune_routers)
            scores = [
                linear_weight(own[n]).detach().abs().float() * stats[n].value.sqrt().reshape(1, -1)
                for n in linears
                if n in stats
            ]
            ratios.append(outlier_ratio(scores, config.allocation.m))
            block.to(home)
        for chunk, out in zip(chunks, outputs, strict=True):
            chunk.hidden = out
    return ratios


def _prune_linears(
    linears: dict[str, nn.Module],
    stats: dict[str, dict[str, InputStat]],
    config: PruneConfig,
    timer: Timer,
    world: World,
) -> dict[str, tuple[torch.Tensor, float | None]]:
    """Prune every linear. With an active ``world`` and a method whose solves are worth spreading
    (``solve_cost``), each layer is pruned on one rank, by cost, and broadcast from it; otherwise
    every rank prunes every layer (same statistics, same code: the same weights)."""
    costs = {n: config.solve_cost(*linear_weight(m).shape) for n, m in linears.items()}
    if not world.active or any(c is None for c in costs.values()):  # cheap solves: every rank its own
        return {n: _prune_linear(m, stats.get(n, {}), config, timer) for n, m in linears.items()}
    owner = assign(list(costs.items()), world.size)
    results = {
        n: _prune_linear(m, stats.get(n, {}), config, timer)
        for n, m in linears.items()
        if owner[n] == world.rank
    }
    with timer.phase("communication"):
        for name, module in linears.items():  # the same order on every rank
            weight = linear_weight(module).detach()
            src = owner[name]
            mask, percdamp = results.get(
                name, (torch.zeros(weight.shape, dtype=torch.bool, device=weight.device), None)
            )
            broadcast_(weight, src)
            bits = broadcast_(pack_mask(mask.to(weight.device)), src)  # 1 bit per weight on the wire
            damp = torch.tensor(
                [float("nan") if percdamp is None else percdamp], dtype=torch.float64, device=weight.device
            )
            broadcast_(damp, src)
            results[name] = (unpack_mask(bits, weight.shape), None if damp.isnan().item() else damp.item())
    return results


def _check_calibration(input_ids: torch.Tensor | None, method_name: str) -> None:
    if input_ids is None:
        raise ValueError(
            f"{method_name} and other methods with a statistic need calibration data: "
            "pass input_ids [nsamples, seqlen]"
        )
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            f"calibration input_ids must be a LongTensor [nsamples, seqlen], got {input_ids.dtype} "
            f"{tuple(input_ids.shape)}"
        )
