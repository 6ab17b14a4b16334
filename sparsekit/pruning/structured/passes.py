"""Calibration passes shared by the structured methods: capture block-0 inputs, run blocks in order."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsekit.models import BlockAnatomy, ModelAnatomy, describe, model_device

from ..capture import Chunk, block_output_structure, capture_block_inputs, cast_runner, model_tail
from ..offload import materialized


def compute_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else model_device(model)


def capture(model: nn.Module, input_ids: torch.Tensor, batch_size: int, device: torch.device) -> list[Chunk]:
    """Inputs of block 0 for ``input_ids`` [n, L], in chunks of ``batch_size`` sequences."""
    return capture_block_inputs(model, describe(model).blocks, input_ids, batch_size, device)


@contextmanager
def on_device(block: nn.Module, device: torch.device) -> Iterator[None]:
    """The block's weights on ``device`` for the duration (offloaded weights brought in)."""
    home = model_device(block)
    with materialized(block, device):
        block.to(device)
        try:
            yield
        finally:
            block.to(home)


def running_copy(block: BlockAnatomy, run: nn.Module) -> BlockAnatomy:
    """``block``'s anatomy over ``run``, a cast copy of its module (its linears those of the copy)."""
    return dataclasses.replace(block, module=run, linears={n: run.get_submodule(n) for n in block.linears})


def forward(
    block: nn.Module, chunks: list[Chunk], index: int, hidden: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Outputs of decoder block ``index`` on each chunk (the chunk's hidden states, or ``hidden``),
    in the chunks' dtype (a cast copy of the block runs where it differs from the weights')."""
    block = cast_runner(block, (chunks[0].hidden if hidden is None else hidden[0]).dtype)
    with torch.no_grad(), chunks[0].precision():  # one region: each weight cast once, see run_block
        return [c.run(block, index, None if hidden is None else hidden[i]) for i, c in enumerate(chunks)]


def hooked_pass(
    anatomy: ModelAnatomy,
    chunks: list[Chunk],
    device: torch.device,
    hook_block: Callable[[BlockAnatomy], list],
    desc: str,
    show_progress: bool,
) -> None:
    """One pass of the blocks in order over ``chunks`` (each chunk's hidden states advanced to the
    last block's output), with the hooks ``hook_block(block)`` registers (it returns their handles)
    in place for that block's forward only. Where the chunks' dtype differs from the weights', the
    hooks go on the cast copy that runs (``hook_block`` gets the block with that copy as module)."""
    for block in tqdm(list(anatomy), desc=desc, disable=not show_progress):
        with on_device(block.module, device):
            run = cast_runner(block.module, chunks[0].hidden.dtype)
            handles = hook_block(block if run is block.module else running_copy(block, run))
            try:
                outs = forward(run, chunks, block.index)
            finally:
                for h in handles:
                    h.remove()
        for c, o in zip(chunks, outs, strict=True):
            c.hidden = o


class BlockStates:
    """The hidden states entering every decoder block of the current model (and leaving the last),
    per calibration chunk; ``refresh_after(j)`` recomputes those after block j."""

    def __init__(self, blocks: nn.ModuleList, chunks: list[Chunk], device: torch.device) -> None:
        self.blocks, self.chunks, self.device = blocks, chunks, device
        self.inputs: list[list[torch.Tensor]] = [[c.hidden for c in chunks]]
        self.refresh_after(-1)

    def refresh_after(self, index: int) -> None:
        """Recompute what block ``index`` changed: the states after it (-1: all)."""
        start = max(index, 0)
        del self.inputs[start + 1 :]
        for i in range(start, len(self.blocks)):
            self.inputs.append(self.run_from(i, self.inputs[i], stop=i + 1))

    def run_from(self, index: int, hidden: list[torch.Tensor], stop: int | None = None) -> list[torch.Tensor]:
        """Outputs of blocks ``index`` .. ``stop`` - 1 (default: to the last) from ``hidden``."""
        for i in range(index, len(self.blocks) if stop is None else stop):
            with on_device(self.blocks[i], self.device):
                hidden = forward(self.blocks[i], self.chunks, i, hidden)
        return hidden


def block_gradients(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
    consume: Callable[[int, nn.Module], None],
) -> None:
    """Gradients of the mean next-token loss over every predicted token of ``input_ids`` [n, L]
    for the parameters of every decoder block that require grad, one block on ``device`` at a time
    (offloaded weights brought in as in the forward passes), so a model larger than the device
    still gets them.

    Block 0's inputs are captured once for every batch of ``batch_size`` sequences. Per batch: a
    forward through the blocks keeps each block's input (on the host when the device is an
    accelerator), the model's own tail gives the loss (scaled by the batch's share of the tokens)
    and its gradient at the last block's output, then each block, last to first, is recomputed
    with grad from its input and back-propagated. ``consume(index, block)`` runs while the block
    is still on the device, its parameters' ``.grad`` holding this batch's contribution, and reads
    them; they are cleared after it."""
    blocks = describe(model).blocks
    wanted = [i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())]
    if not wanted:
        return
    first = wanted[0]  # blocks before it need no backward
    total = input_ids.numel() - input_ids.shape[0]
    park = torch.device("cpu") if device.type != "cpu" else device
    chunks = capture_block_inputs(model, blocks, input_ids, batch_size, device)
    with on_device(blocks[0], device):
        template = block_output_structure(blocks[0], chunks[0], 0)
    for batch, chunk in zip(input_ids.split(batch_size), chunks, strict=True):
        inputs, hidden = [], chunk.hidden
        for i, block in enumerate(blocks):
            inputs.append(hidden.to(park))
            with on_device(block, device):
                hidden = forward(block, [chunk], i, [hidden])[0]
        final = hidden.detach().requires_grad_(True)
        with torch.enable_grad(), model_tail(model, blocks, device, template) as tail:
            loss = tail(batch, final) * ((batch.numel() - batch.shape[0]) / total)
            (grad,) = torch.autograd.grad(loss, final)  # the tail's own weights get no gradient
        del final, loss
        for i in reversed(range(first, len(blocks))):
            block = blocks[i]
            with on_device(block, device):
                x = inputs.pop().to(device).detach().requires_grad_(i > first)
                with torch.enable_grad():
                    out = chunk.run(block, i, x)
                out.backward(grad.to(out.device))
                consume(i, block)
                for p in block.parameters():
                    p.grad = None
            grad = x.grad if i > first else None
            del x, out
