"""Calibration passes shared by the structured methods: capture block-0 inputs, run blocks in order."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sparsekit.models import describe, model_device

from ..capture import Chunk, capture_block_inputs
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


def forward(
    block: nn.Module, chunks: list[Chunk], index: int, hidden: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Outputs of decoder block ``index`` on each chunk (the chunk's hidden states, or ``hidden``)."""
    with torch.no_grad():
        return [c.run(block, index, None if hidden is None else hidden[i]) for i, c in enumerate(chunks)]


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
