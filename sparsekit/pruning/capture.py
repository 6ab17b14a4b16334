"""Capture the inputs of the first decoder block and run blocks on captured inputs.

The inputs of block 0 (hidden states plus every keyword argument the model passes: attention
mask, position ids, rotary ``position_embeddings``, cache flags) are recorded with a forward
pre-hook for the whole calibration batch in chunks; the model stops there. The calibration
forwards may run in another dtype than the model (``resolve_forward_dtype``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsekit.arch import model_device

from .offload import materialized, offloaded_modules


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


class _Captured(Exception):
    """Raised by the pre-hook on block 0 once its inputs are recorded: nothing later needs to run."""


@dataclass
class Chunk:
    hidden: torch.Tensor  # [b, L, H] input of the current block
    args: tuple
    kwargs: dict[str, Any]


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def floats_to(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors inside ``value`` (nested tuples / lists / dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(floats_to(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: floats_to(v, dtype) for k, v in value.items()}
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
) -> list[Chunk]:
    """Run the model on ``input_ids`` [n, L] up to block 0 and record its inputs per chunk."""
    chunks: list[Chunk] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        chunks.append(Chunk(hidden.detach(), tuple(a for a in args[1:]), kwargs))
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


def run_block(block: nn.Module, chunks: list[Chunk], on_chunk: Callable[[], None] | None = None):
    outputs = []
    with torch.no_grad():
        for chunk in chunks:
            outputs.append(_block_output(block(chunk.hidden, *chunk.args, **chunk.kwargs)))
            if on_chunk is not None:
                on_chunk()
    return outputs
