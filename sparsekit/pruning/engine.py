"""Layer-sequential one-shot pruning, the way SparseGPT and Wanda do it.

1. Capture the inputs of the first decoder block (hidden states plus every keyword argument the
   model passes: attention mask, position ids, rotary ``position_embeddings``, cache flags) with a
   forward pre-hook, for the whole calibration batch in chunks.
2. For each block: move it to the compute device, run it on the captured inputs with hooks on its
   linear layers that accumulate statistics (layers reading the same input tensor share one),
   prune every linear layer, run the block again so the next block sees pruned outputs, measure
   how far the pruned outputs moved, move the block back.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsekit.arch import (
    block_linears,
    find_decoder_blocks,
    linear_weight,
    model_device,
    model_dtype,
    set_linear_weight,
)
from sparsekit.formats import Pattern, mask_sparsity, parse_sparsity
from sparsekit.kernels.dtypes import parse_dtype

from .method import InputStat, PruningMethod, Statistic, pruning_method
from .offload import materialized, offloaded_modules

log = logging.getLogger(__name__)


def _cpu_has_fast_bf16() -> bool:
    """oneDNN bf16 GEMMs on native bf16 instructions (AVX512-BF16 / AMX): several times fp32 there."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_forward_dtype(requested: str | torch.dtype, model_dtype: torch.dtype, device: torch.device):
    """The dtype calibration forwards run in (see ``PruneConfig.forward_dtype``)."""
    if requested == "model":
        return model_dtype
    if requested != "auto":
        return requested
    if model_dtype != torch.float32:
        return model_dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ):
        return torch.bfloat16
    return model_dtype


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
    # dtype of the calibration forwards: "auto" (bfloat16 for an fp32 model where the device has
    # fast bf16 matmuls, as the papers ran fp16 forwards; otherwise the model's dtype), "model",
    # or a torch dtype. Statistics accumulate in fp32 and the weights are pruned in their own dtype.
    forward_dtype: str | torch.dtype = "auto"

    def __post_init__(self) -> None:
        self.method = pruning_method(self.method)
        self.sparsity = parse_sparsity(self.sparsity)
        if self.forward_dtype not in ("auto", "model"):
            try:
                self.forward_dtype = parse_dtype(self.forward_dtype)
            except ValueError as exc:
                raise ValueError(f"forward_dtype: {exc}, or auto / model") from None


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
    block_rel_errors: list[float] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    forward_dtype: str = ""  # dtype of the calibration forwards

    @property
    def overall_sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        pruned = sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers)
        return pruned / max(total, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,  # the method's name
            "sparsity": self.sparsity,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "calib": self.calib,
            "overall_sparsity": self.overall_sparsity,
            "timings_s": self.timings_s,
            "forward_dtype": self.forward_dtype,
            "block_rel_errors": self.block_rel_errors,
            "notes": self.notes,
            "layers": [vars(r) | {"shape": list(r.shape)} for r in self.layers],
        }


class _Captured(Exception):
    """Raised by the pre-hook on block 0 once its inputs are recorded: nothing later needs to run."""


@dataclass
class _Chunk:
    hidden: torch.Tensor  # [b, L, H] input of the current block
    args: tuple
    kwargs: dict[str, Any]


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


class _StatsCollector:
    """Forward hooks accumulating a method's ``Statistic`` per distinct input tensor.

    Layers fed the same tensor object in a forward (q/k/v; gate/up) share one statistic; the
    tensors seen in the current chunk are held so identity checks stay valid.
    """

    def __init__(
        self, linears: dict[str, nn.Module], statistic: Statistic, timer: _Timer, share: bool = True
    ) -> None:
        self.statistic = statistic
        self.share = share
        self.timer = timer
        self.owner: dict[str, InputStat] = {}
        self._seen: list[tuple[torch.Tensor, InputStat]] = []
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            for seen, stat in self._seen if self.share else ():
                if seen is x:
                    self.owner.setdefault(name, stat)
                    return
            with self.timer.phase("statistics"):
                stat = self.owner.get(name)
                if stat is None:
                    stat = self.owner[name] = self._new_stat(x)
                x = x.detach()
                if not torch.isfinite(x).all():
                    raise ValueError(
                        f"NaN/inf activations entering {name}: the model overflows on the calibration "
                        "data; load it in float32 or check the input ids"
                    )
                self.statistic.accumulate(x, stat.value)
                stat.tokens += x.numel() // x.shape[-1]
            self._seen.append((x, stat))

        return hook

    def _new_stat(self, x: torch.Tensor) -> InputStat:
        return InputStat(self.statistic.new(x.shape[-1], x.device))

    def next_chunk(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _floats_to(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors inside ``value`` (nested tuples / lists / dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_floats_to(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _floats_to(v, dtype) for k, v in value.items()}
    return value


def _move_own_tensors(module: nn.Module, device: torch.device) -> None:
    """Move a module's own parameters and buffers (not its children's)."""
    for param in module.parameters(recurse=False):
        param.data = param.data.to(device)
    for key, buf in module.named_buffers(recurse=False):
        module._buffers[key] = buf.to(device)


@contextmanager
def _outside_blocks_on(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """Move everything but the decoder blocks (embeddings, rotary, norms) to ``device`` for capture."""
    block_ids = {id(b) for b in blocks}
    homes: dict[nn.Module, torch.device] = {}
    for module in _non_block_leaves(model, block_ids):
        if offloaded_modules(module):
            continue  # accelerate's hook brings its weights in for each forward
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if own and own[0].device != device:
            homes[module] = own[0].device
            _move_own_tensors(module, device)
    try:
        yield
    finally:
        for module, home in homes.items():
            _move_own_tensors(module, home)


def _non_block_leaves(module: nn.Module, block_ids: set[int]) -> Iterator[nn.Module]:
    if id(module) in block_ids:
        return
    yield module
    for child in module.children():
        yield from _non_block_leaves(child, block_ids)


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int, device: torch.device
) -> list[_Chunk]:
    """Run the model on ``input_ids`` [n, L] up to block 0 and record its inputs per chunk."""
    chunks: list[_Chunk] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        chunks.append(_Chunk(hidden.detach(), tuple(a for a in args[1:]), kwargs))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    first = blocks[0]
    first_home = model_device(first)
    try:
        with materialized(first, device), _outside_blocks_on(model, blocks, device), torch.no_grad():
            first.to(device)
            try:
                for ids in input_ids.split(batch_size):
                    try:
                        model(ids.to(device), use_cache=False)
                    except _Captured:
                        pass
            finally:
                first.to(first_home)
    finally:
        handle.remove()
    return chunks


def _run_block(block: nn.Module, chunks: list[_Chunk], on_chunk: Callable[[], None] | None = None):
    outputs = []
    with torch.no_grad():
        for chunk in chunks:
            outputs.append(_block_output(block(chunk.hidden, *chunk.args, **chunk.kwargs)))
            if on_chunk is not None:
                on_chunk()
    return outputs


def _rel_error(dense: list[torch.Tensor], pruned: list[torch.Tensor]) -> float:
    num = sum((d.float() - p.float()).square().sum().item() for d, p in zip(dense, pruned, strict=True))
    den = sum(d.float().square().sum().item() for d in dense)
    return num / max(den, 1e-30)


class _OutputErrorProbe:
    """Hooks comparing each pruned linear's output with the dense weight's on the same input.

    One extra GEMM per layer: diff = x (W - W')^T, and the dense output is output + diff. Only the
    first ``max_rows`` tokens of the first forward per layer are measured (an estimate: the
    probe must not cost a noticeable part of the block's own forward).
    """

    def __init__(
        self, linears: dict[str, nn.Module], dense: dict[str, torch.Tensor], max_rows: int = 1024
    ) -> None:
        self.num = dict.fromkeys(linears, 0.0)
        self.den = dict.fromkeys(linears, 0.0)
        self.calls = dict.fromkeys(linears, 0)
        self.max_calls = 1
        self.max_rows = max_rows
        self._handles = [m.register_forward_hook(self._hook(n, m, dense[n])) for n, m in linears.items()]

    def _hook(self, name: str, module: nn.Module, dense_weight: torch.Tensor) -> Callable:
        delta = (dense_weight.float() - linear_weight(module).detach().float()).T.contiguous()

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self.calls[name] >= self.max_calls:
                return
            self.calls[name] += 1
            x, out = inputs[0].detach(), output.detach()
            if out.shape[:-1] != x.shape[:-1] or out.shape[-1] != delta.shape[1]:
                return  # not a plain [..., out_features] output: nothing to compare
            diff = x.reshape(-1, x.shape[-1])[: self.max_rows].float() @ delta
            out = out.reshape(-1, out.shape[-1])[: self.max_rows].float()
            self.num[name] += diff.square().sum().item()
            self.den[name] += (out + diff).square().sum().item()

        return hook

    def errors(self) -> dict[str, float | None]:
        return {n: (self.num[n] / self.den[n] if self.den[n] > 0 else None) for n in self.num}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _prune_linear(
    module: nn.Module, stat: InputStat | None, config: PruneConfig, timer: _Timer
) -> tuple[torch.Tensor, float | None]:
    weight = linear_weight(module).detach()
    with timer.phase("solve"):
        result = config.method.prune(weight, stat, config)
        set_linear_weight(module, result.weight)
    return result.mask, result.percdamp


def prune_model(
    model: nn.Module, input_ids: torch.Tensor | None, config: PruneConfig, block_prefix: str | None = None
) -> PruneReport:
    """Prune every linear layer of every decoder block in place; embeddings and lm_head stay dense.

    input_ids: LongTensor [nsamples, seqlen] of calibration tokens (unused by magnitude).
    """
    name, blocks = find_decoder_blocks(model)
    prefix = block_prefix or name
    device = torch.device(config.device) if config.device is not None else model_device(model)
    timer = _Timer(device)
    nsamples, seqlen = tuple(input_ids.shape) if input_ids is not None else (0, 0)
    method = config.method
    report = PruneReport(method.name, str(config.sparsity), nsamples, seqlen)
    needs_data = method.needs_calibration
    chunks: list[_Chunk] = []
    if needs_data:
        _check_calibration(input_ids, method.name)
        log.info("capturing inputs of %s.0 for %d x %d calibration tokens", prefix, nsamples, seqlen)
        with timer.phase("forward"):
            chunks = capture_block_inputs(model, blocks, input_ids, config.batch_size, device)
        forward_dtype = resolve_forward_dtype(config.forward_dtype, model_dtype(model), device)
        report.forward_dtype = str(forward_dtype).replace("torch.", "")
        for chunk in chunks:
            chunk.hidden = chunk.hidden.to(forward_dtype)
            chunk.args = _floats_to(chunk.args, forward_dtype)
            chunk.kwargs = _floats_to(chunk.kwargs, forward_dtype)
    progress = tqdm(
        range(len(blocks)), desc=f"{method.name} {config.sparsity}", disable=not config.show_progress
    )
    with torch.no_grad():
        for index in progress:
            block = blocks[index]
            home = model_device(block)
            with materialized(block, device) as changed:
                block.to(device)
                linears = _prune_block(block, f"{prefix}.{index}", chunks, config, timer, report)
                changed.update(linears.values())  # written back where accelerate offloaded them
                block.to(home)
    report.timings_s = dict(timer.totals)
    log.info(
        "pruned %d layers to %.3f sparsity (%s)",
        len(report.layers),
        report.overall_sparsity,
        ", ".join(f"{k} {v:.1f}s" for k, v in report.timings_s.items()),
    )
    return report


def _prune_block(
    block: nn.Module,
    block_name: str,
    chunks: list[_Chunk],
    config: PruneConfig,
    timer: _Timer,
    report: PruneReport,
) -> dict[str, nn.Module]:
    """Statistics, pruning and the pruned re-run of one block (on the device); returns its linears.

    ``chunks`` (empty for magnitude) hold the block's inputs and receive its pruned outputs.
    """
    linears = block_linears(block)
    stats: dict[str, InputStat] = {}
    dense_outputs = None
    runner, run_linears = block, linears  # what the calibration forwards run: the block or a cast copy
    if chunks and chunks[0].hidden.dtype != model_dtype(block):
        runner = copy.deepcopy(block).to(chunks[0].hidden.dtype)
        run_linears = block_linears(runner)
    if chunks:
        collector = _StatsCollector(run_linears, config.method.statistic, timer, config.share_statistics)
        with timer.phase("forward"):
            dense_outputs = _run_block(runner, chunks, collector.next_chunk)
        collector.remove()
        stats = collector.owner
        dense_weights = {
            n: linear_weight(m).detach().clone() for n, m in run_linears.items() if config.measure_error
        }
    for lname, module in linears.items():
        mask, percdamp = _prune_linear(module, stats.get(lname), config, timer)
        shape = tuple(linear_weight(module).shape)
        layer = LayerReport(f"{block_name}.{lname}", shape, mask_sparsity(mask), percdamp=percdamp)
        if percdamp is not None and percdamp > config.percdamp:
            report.notes.append(f"{layer.name}: Cholesky failed, dampening raised to {percdamp:g}")
        report.layers.append(layer)
    if chunks:
        if runner is not block:
            for lname, module in run_linears.items():
                set_linear_weight(module, linear_weight(linears[lname]).detach().to(chunks[0].hidden.dtype))
        probe = _OutputErrorProbe(run_linears, dense_weights) if config.measure_error else None
        with timer.phase("forward"):
            pruned_outputs = _run_block(runner, chunks)
        if probe is not None:
            probe.remove()
            for layer, err in zip(report.layers[-len(linears) :], probe.errors().values(), strict=True):
                layer.output_rel_error = err
        report.block_rel_errors.append(_rel_error(dense_outputs, pruned_outputs))
        for chunk, out in zip(chunks, pruned_outputs, strict=True):
            chunk.hidden = out
        del dense_outputs, pruned_outputs, dense_weights
    return linears


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
