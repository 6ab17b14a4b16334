"""Capture the inputs of the first decoder block and run blocks on captured inputs.

The inputs of block 0 (hidden states plus every keyword argument the model passes: attention
mask, position ids, rotary ``position_embeddings``, cache flags) are recorded with a forward
pre-hook for the whole calibration batch in chunks; the model stops there. The calibration
forwards may run in another dtype than the model (``resolve_forward_precision``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsekit.kernels.dtypes import parse_dtype
from sparsekit.models import model_device, model_dtype

from .distributed import World, sum_over_ranks_
from .offload import materialized, offloaded_modules

MIXED_FORWARDS = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


@dataclass(frozen=True)
class ForwardPrecision:
    """How calibration forwards run. ``mixed=False``: a copy of each block and every floating
    input cast to ``dtype``. ``mixed=True``: the block's own weights and the hidden states stay in
    the model's dtype; matmuls and attention run in ``dtype`` under ``torch.autocast`` (norms,
    residual sums and the statistics' sums keep the wider dtype)."""

    dtype: torch.dtype
    mixed: bool = False

    @property
    def name(self) -> str:
        if self.mixed:
            return next(k for k, v in MIXED_FORWARDS.items() if v == self.dtype)
        return str(self.dtype).replace("torch.", "")

    def states_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the hidden states between blocks are held in."""
        return model_dtype if self.mixed else self.dtype

    def copies_block(self, model_dtype: torch.dtype) -> bool:
        """Whether the forwards run a cast copy of each block (mixed runs the block itself)."""
        return not self.mixed and self.dtype != model_dtype

    def apply(self, chunks: list[Chunk]) -> None:
        """Prepare captured ``chunks`` for forwards at this precision (in place)."""
        if self.mixed:
            for chunk in chunks:
                chunk.autocast = self.dtype
        else:
            cast_chunks(chunks, self.dtype)


def check_forward_dtype(value: str | torch.dtype) -> str | torch.dtype:
    """A ``forward_dtype`` option as stored: "auto", "model", a mixed mode or a torch dtype."""
    if value in ("auto", "model") or value in MIXED_FORWARDS:
        return value
    try:
        return parse_dtype(value)
    except ValueError as exc:
        raise ValueError(f"forward_dtype: {exc}, or auto / model / {' / '.join(MIXED_FORWARDS)}") from None


def resolve_forward_precision(
    requested: str | torch.dtype, model_dtype: torch.dtype, device: torch.device
) -> ForwardPrecision:
    """The precision calibration forwards run at (see ``PruneConfig.forward_dtype``). "auto" is
    bf16 mixed precision for an fp32 model on a device with fast bf16 matmuls (the matmuls in bf16,
    the hidden states fp32), else the model's dtype."""
    if requested in MIXED_FORWARDS:
        return ForwardPrecision(MIXED_FORWARDS[requested], mixed=True)
    if requested == "model":
        return ForwardPrecision(model_dtype)
    if requested != "auto":
        return ForwardPrecision(requested)
    if model_dtype == torch.float32 and fast_bf16_matmuls(device):
        return ForwardPrecision(torch.bfloat16, mixed=True)
    return ForwardPrecision(model_dtype)


def fast_bf16_matmuls(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively (a CUDA GPU with bf16, a CPU oneDNN runs bf16 on)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def outside_autocast(hook: Callable) -> Callable:
    """``hook`` (a forward or pre-forward hook) run with autocast off: a hook on a mixed-precision
    forward sees the layer's inputs as they come and keeps its own sums (Gram matrices, norms)
    in the dtype it chose."""

    @functools.wraps(hook)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return hook(*args, **kwargs)

    return wrapped


class _Captured(Exception):
    """Raised by the last block's stand-in once every block's inputs are recorded."""


@dataclass
class Chunk:
    """A slice of the calibration batch: the hidden states entering the current block, and the
    other inputs the model passes each block (per block: a hybrid or sliding-window model gives
    each layer type its own attention mask and rotary tables, Gemma-4 a per-layer input)."""

    hidden: torch.Tensor  # [b, L, H]
    inputs: list[tuple[tuple, dict[str, Any]]]  # per block: (positional args after hidden, kwargs)
    autocast: torch.dtype | None = None  # mixed precision: matmuls in this dtype, the rest as stored

    def run(self, block: nn.Module, index: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Output hidden states of ``block`` (decoder block ``index``) on this chunk."""
        args, kwargs = self.inputs[index]
        with self.precision():
            return _block_output(block(self.hidden if hidden is None else hidden, *args, **kwargs))

    def precision(self) -> AbstractContextManager:
        """The autocast context a forward on this chunk runs in (a no-op unless mixed)."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.hidden.device.type, dtype=self.autocast)

    def copy(self) -> Chunk:
        return Chunk(self.hidden, self.inputs, self.autocast)


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _like(template: Any, hidden: torch.Tensor) -> Any:
    """``hidden`` in the structure a real block returns (a tensor, or a tuple led by it)."""
    if isinstance(template, tuple | list):
        return type(template)([hidden, *template[1:]])
    return hidden


def floats_to(value: Any, dtype: torch.dtype, memo: dict[int, Any] | None = None) -> Any:
    """Floating tensors inside ``value`` (nested tuples / lists / dicts) cast to ``dtype``; a tensor
    met twice (the mask every layer of one type shares) is cast once when ``memo`` is given."""
    memo = {} if memo is None else memo
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return value
        if id(value) not in memo:
            memo[id(value)] = value.to(dtype)
        return memo[id(value)]
    if isinstance(value, tuple | list):
        return type(value)(floats_to(v, dtype, memo) for v in value)
    if isinstance(value, dict):
        return {k: floats_to(v, dtype, memo) for k, v in value.items()}
    return value


def cast_chunks(chunks: list[Chunk], dtype: torch.dtype) -> None:
    """Hidden states and every floating block input cast to ``dtype`` in place (shared tensors once)."""
    for chunk in chunks:
        memo: dict[int, Any] = {}
        chunk.hidden = chunk.hidden.to(dtype)
        chunk.inputs = [floats_to(inputs, dtype, memo) for inputs in chunk.inputs]


def cast_runner(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """What a calibration forward in ``dtype`` runs: ``block`` itself where its weights are already
    ``dtype``, else a copy cast to it (the block's own weights never pass through ``dtype``)."""
    return block if model_dtype(block) == dtype else copy.deepcopy(block).to(dtype)


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


@contextmanager
def _stand_ins(blocks: nn.ModuleList, record: Callable[[int, tuple, dict], None]) -> Iterator[Callable]:
    """Blocks 1.. replaced (their ``forward`` only) by stand-ins that record their inputs and pass the
    hidden states through; the last one stops the model. Block 0 runs for real on the first chunk,
    so its output gives the structure the stand-ins return; the context yields ``skip_first()``,
    which makes block 0 a stand-in too for the chunks after that."""
    first_out: dict[str, Any] = {}
    saved = [b.__dict__.get("forward") for b in blocks]  # accelerate's hooks wrap forward per instance

    def stand_in(index: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            record(index, (hidden, *args[1:]) if index == 0 else tuple(args[1:]), rest)
            if index == len(blocks) - 1:
                raise _Captured
            return _like(first_out.get("out"), hidden)

        return forward

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        record(0, (hidden, *args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})

    def post_hook(module, args, kwargs, out):
        first_out["out"] = out
        if len(blocks) == 1:
            raise _Captured

    handles = [
        blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True),
        blocks[0].register_forward_hook(post_hook, with_kwargs=True),
    ]

    def skip_first() -> None:
        if "out" in first_out and handles:
            for h in handles:
                h.remove()
            handles.clear()
            blocks[0].forward = stand_in(0)

    for index in range(1, len(blocks)):
        blocks[index].forward = stand_in(index)
    try:
        yield skip_first
    finally:
        for h in handles:
            h.remove()
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = forward


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int, device: torch.device
) -> list[Chunk]:
    """Run the model on ``input_ids`` [n, L] and record the inputs of every decoder block per chunk:
    block 0's hidden states, and each block's other arguments. Only block 0 computes, and only on
    the first chunk."""
    chunks: list[Chunk] = []
    pending: dict[str, Any] = {}

    def record(index: int, args: tuple, kwargs: dict) -> None:
        if index == 0:  # args[0]: the hidden states
            pending["hidden"], pending["inputs"] = args[0].detach(), []
            args = args[1:]
        pending["inputs"].append((args, kwargs))

    first = blocks[0]
    first_home = model_device(first)
    with materialized(first, device), _outside_blocks_on(model, blocks, device), torch.no_grad():
        first.to(device)
        try:
            with _stand_ins(blocks, record) as skip_first:
                for ids in input_ids.split(batch_size):
                    try:
                        model(ids.to(device), use_cache=False)
                    except _Captured:
                        pass
                    if len(pending.get("inputs", ())) != len(blocks):
                        raise RuntimeError(
                            f"{type(model).__name__} called {len(pending.get('inputs', ()))} of its "
                            f"{len(blocks)} decoder blocks: the anatomy's block list is not the model's"
                        )
                    chunks.append(Chunk(pending["hidden"], pending["inputs"]))
                    pending.clear()
                    skip_first()  # block 0's output structure is known: no more real forwards
        finally:
            first.to(first_home)
    return chunks


class ForwardDone(Exception):
    """Raised by a hook once a block's forward has computed everything its caller reads: the rest
    of that chunk's forward is skipped (``run_block`` returns None for the chunk)."""


def run_block(
    block: nn.Module, chunks: list[Chunk], index: int, on_chunk: Callable[[], None] | None = None
) -> list[torch.Tensor | None]:
    """Outputs of decoder block ``index`` (``block``: it or a copy of it) on every chunk; None for
    a chunk whose forward a hook ended with ``ForwardDone``.

    The chunks run inside one precision region, so a mixed forward casts each weight to the
    autocast dtype once per call, not once per chunk (autocast keeps its casts until the outermost
    region exits; each chunk's own region nests in it)."""
    outputs: list[torch.Tensor | None] = []
    with torch.no_grad(), chunks[0].precision() if chunks else nullcontext():
        for chunk in chunks:
            try:
                outputs.append(chunk.run(block, index))
            except ForwardDone:
                outputs.append(None)
            if on_chunk is not None:
                on_chunk()
    return outputs


def block_output_structure(block: nn.Module, chunk: Chunk, index: int) -> Any:
    """What decoder block ``index`` returns (a tensor, or a tuple led by one), from one real call."""
    args, kwargs = chunk.inputs[index]
    with torch.no_grad():
        return block(chunk.hidden, *args, **kwargs)


@contextmanager
def model_tail(
    model: nn.Module, blocks: nn.ModuleList, device: torch.device, template: Any
) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The model's own tail as a function ``(batch [b, L] ids, final [b, L, H]) -> mean next-token
    loss`` (a tensor, differentiable in ``final`` where grad is enabled): every decoder block is a
    stand-in that passes hidden states on and the last one returns ``final``, so only the embedding
    and what follows the blocks (final norm, lm_head, any logit scaling) compute, whatever they are.
    ``template``: a real block output (``block_output_structure``) giving the structure to return."""
    saved = [b.__dict__.get("forward") for b in blocks]
    current: dict[str, torch.Tensor] = {}

    def passthrough(*args, **kwargs):
        return _like(template, args[0] if args else kwargs["hidden_states"])

    def last(*args, **kwargs):
        return _like(template, current["final"])

    def run(batch: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        current["final"] = final.to(device)
        batch = batch.to(device)
        return model(input_ids=batch, labels=batch, use_cache=False).loss

    for block in blocks:
        block.forward = passthrough
    blocks[len(blocks) - 1].forward = last
    try:
        with _outside_blocks_on(model, blocks, device):
            yield run
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = forward


@torch.no_grad()
def tail_loss(
    model: nn.Module,
    blocks: nn.ModuleList,
    finals: list[torch.Tensor],
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
    template: Any,
    world: World | None = None,
) -> float:
    """Mean next-token loss (nats) over every predicted token of ``input_ids`` [n, L] when the last
    decoder block outputs ``finals[k]`` [b, L, H] on the k-th batch of ``batch_size`` sequences
    (``model_tail``); with an active ``world`` each rank passes its share and the mean is over all."""
    batches = input_ids.split(batch_size)
    if len(batches) != len(finals):
        raise ValueError(f"{len(finals)} final states for {len(batches)} batches of {batch_size} sequences")
    total, count = 0.0, 0
    with model_tail(model, blocks, device, template) as run:
        for batch, final in zip(batches, finals, strict=True):
            tokens = batch.numel() - batch.shape[0]
            total, count = total + run(batch, final).item() * tokens, count + tokens
    if world is not None and world.active:
        total, count = sum_over_ranks_([], [total, count], device)
    return total / count
