"""Depth pruning: remove whole decoder blocks (ShortGPT, angular distance), with an optional
training-free linear repair of each cut (ReplaceMe's least-squares map, folded into weights).

- ``shortgpt`` (Men et al., 2024): Block Influence BI_i = 1 - mean over tokens of
  cos(x_in, x_out); the blocks with the lowest BI go.
- ``angular`` (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"): the
  contiguous run of n blocks whose input and output are closest in angular distance
  arccos(cos) / pi, averaged over tokens (``tokens="all"``, default) or the last token of each
  sequence (``tokens="last"``, the paper's choice).
- repair: for each removed run, the block before it gets its MLP output M mapped by T, where T
  minimises ||Y + M T - X_target||^2 over calibration tokens (Y: that block's output without its
  MLP term, X_target: the dense model's hidden state after the run). T is folded into down_proj
  (W <- T^T W, b <- T^T b), so the saved model is still a plain architecture.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsekit.arch import find_decoder_blocks, set_submodule

from ..capture import Chunk
from ..engine import check_finite_weights
from .base import (
    StructuredConfig,
    StructuredMethod,
    StructuredReport,
    block_param_count,
    check_calibration,
    param_count,
    register_structured,
)
from .passes import capture, compute_device, forward, on_device

log = logging.getLogger(__name__)


def layers_to_remove(num_blocks: int, config: StructuredConfig) -> int:
    """``remove_layers`` if given, else round(sparsity * blocks) (all blocks have equal size)."""
    n = config.remove_layers if config.remove_layers is not None else round(config.sparsity * num_blocks)
    if n >= num_blocks:
        raise ValueError(
            f"removing {n} of {num_blocks} decoder blocks would leave none: ask for fewer "
            f"(remove_layers < {num_blocks}, or a smaller sparsity)"
        )
    return n


def _token_cos(a: torch.Tensor, b: torch.Tensor, tokens: str) -> torch.Tensor:
    """Cosine similarity per token [n_tokens] of hidden states [b, L, H] (fp32)."""
    if tokens == "last":
        a, b = a[:, -1], b[:, -1]
    return F.cosine_similarity(a.float(), b.float(), dim=-1).reshape(-1)


def block_influence(
    blocks: nn.ModuleList,
    chunks: list[Chunk],
    device,
    tokens: str = "all",
    show_progress: bool = True,
    record=None,
) -> list[float]:
    """ShortGPT's BI per block (1 - mean cos(in, out)); runs the dense stack once (chunks advance)."""
    scores = []
    for block in tqdm(blocks, desc="block influence", disable=not show_progress):
        with on_device(block, device):
            outs = forward(block, chunks)
        cos = torch.cat([_token_cos(c.hidden, o, tokens) for c, o in zip(chunks, outs, strict=True)])
        scores.append(1.0 - cos.mean().item())
        if record is not None:
            record(outs)
        for c, o in zip(chunks, outs, strict=True):
            c.hidden = o
    return scores


def angular_distances(
    blocks: nn.ModuleList,
    chunks: list[Chunk],
    n: int,
    device,
    tokens: str = "all",
    show_progress: bool = True,
    record=None,
) -> list[float]:
    """d(l) = mean arccos(cos(x_l, x_{l+n})) / pi for every start l in [0, blocks - n]."""
    window: deque[list[torch.Tensor]] = deque([[c.hidden for c in chunks]], maxlen=n + 1)
    distances = []

    def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        cos = torch.cat([_token_cos(x, y, tokens) for x, y in zip(a, b, strict=True)])
        return (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).mean().item()

    if n == 0:
        return [0.0] * (len(blocks) + 1)
    for block in tqdm(blocks, desc="angular distance", disable=not show_progress):
        with on_device(block, device):
            outs = forward(block, chunks)
        if record is not None:
            record(outs)
        for c, o in zip(chunks, outs, strict=True):
            c.hidden = o
        window.append(outs)
        if len(window) == n + 1:
            distances.append(distance(window[0], window[-1]))
    return distances


def contiguous_runs(indices: list[int]) -> list[tuple[int, int]]:
    """[(start, end_exclusive)] of sorted block indices."""
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def remove_blocks(model: nn.Module, indices: list[int]) -> None:
    """Delete decoder blocks in place: the ModuleList, every ``layer_idx`` (KV-cache slots) and the
    config (``num_hidden_layers`` and per-layer lists such as ``layer_types``) follow."""
    name, blocks = find_decoder_blocks(model)
    total = len(blocks)
    drop = set(indices)
    if not drop <= set(range(total)):
        raise ValueError(f"block indices {sorted(drop)} out of range for {total} blocks")
    keep = [i for i in range(total) if i not in drop]
    set_submodule(model, name, nn.ModuleList([blocks[i] for i in keep]))
    for new_index, block in enumerate(model.get_submodule(name)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)


def _check_repairable(block: nn.Module) -> nn.Linear:
    down = getattr(getattr(block, "mlp", None), "down_proj", None)
    if not isinstance(down, nn.Linear) or any("post_feedforward" in n for n, _ in block.named_modules()):
        raise ValueError(
            f"linear repair folds into mlp.down_proj and needs the MLP output added straight to the "
            f"residual; {type(block).__name__} does not have that layout: prune without repair"
        )
    return down


def fold_map(down: nn.Linear, transform: torch.Tensor) -> None:
    """down_proj's output y becomes y @ T: W <- T^T W, b <- T^T b (T [H, H])."""
    t = transform.to(device=down.weight.device, dtype=torch.float64)
    down.weight.data = (t.T @ down.weight.data.double()).to(down.weight.dtype)
    if down.bias is not None:
        down.bias.data = (t.T @ down.bias.data.double()).to(down.bias.dtype)


def least_squares_map(
    m: list[torch.Tensor],
    y: list[torch.Tensor],
    target: list[torch.Tensor],
    damp: float = 1e-4,
    normalized: bool = True,
) -> torch.Tensor:
    """T [H, H] minimising sum_t w_t ||Y_t + M_t T - target_t||^2 over tokens t (normal equations in
    float64, ridge ``damp`` times the mean diagonal).

    normalized: w_t = 1 / ||target_t||^2, so each token counts by its relative error. The next
    block starts with an RMSNorm (scale-invariant), and a few attention-sink tokens whose hidden
    states are ~100x larger than the rest would otherwise decide the fit: on SmolLM2 with 9
    blocks cut, the unweighted fit made perplexity worse than no repair (465 vs 186), the
    weighted one better (80).
    """
    hidden = m[0].shape[-1]
    gram = torch.zeros(hidden, hidden, dtype=torch.float64, device=m[0].device)
    cross = torch.zeros_like(gram)
    for mi, yi, ti in zip(m, y, target, strict=True):
        mi, yi, ti = (v.reshape(-1, hidden).double() for v in (mi, yi, ti))
        if normalized:
            w = 1.0 / ti.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            mi, yi, ti = mi * w, yi * w, ti * w
        gram += mi.T @ mi
        cross += mi.T @ (ti - yi)
    ridge = damp * gram.diagonal().mean().clamp_min(1e-12)
    gram.diagonal().add_(ridge)
    return torch.linalg.solve(gram, cross)


class DenseStates:
    """The dense model's hidden states at block boundaries: stored from the scoring pass when they
    fit in ``budget_bytes``, otherwise recomputed by running the dense blocks again."""

    def __init__(self, blocks: nn.ModuleList, chunks: list[Chunk], device, budget_bytes: int) -> None:
        self.blocks, self.chunks, self.device = blocks, chunks, device
        per_boundary = sum(c.hidden.numel() * c.hidden.element_size() for c in chunks)
        self.store = per_boundary * (len(blocks) + 1) <= budget_bytes
        self.stored: list[list[torch.Tensor]] = [[c.hidden for c in chunks]]
        self._at, self._index = self.stored[0], 0

    def record(self, outputs: list[torch.Tensor]) -> None:
        """Called by the scoring pass with each block's outputs, in order."""
        if self.store:
            self.stored.append(outputs)

    def input_of(self, index: int) -> list[torch.Tensor]:
        """Dense input of block ``index`` (``len(blocks)``: the output of the last block)."""
        if self.store:
            return self.stored[index]
        if index < self._index:
            self._at, self._index = self.stored[0], 0
        while self._index < index:
            with on_device(self.blocks[self._index], self.device):
                self._at = forward(self.blocks[self._index], self.chunks, self._at)
            self._index += 1
        return self._at


def repair_pass(
    blocks: nn.ModuleList, chunks: list[Chunk], removed: list[int], dense: DenseStates, device
) -> tuple[list[int], list[str]]:
    """Fit and fold one linear map per removed run (see module docstring). Runs only what it must:
    the block before each cut, and the kept blocks between cuts (before the first cut the pruned
    model equals the dense one). Returns (blocks that absorbed a map, notes)."""
    notes, repaired = [], []
    pruned, position = None, 0  # pruned: input of block ``position`` in the pruned model (None: dense)
    for start, end in contiguous_runs(removed):
        before = start - 1
        if before < 0:
            notes.append(f"blocks {start}..{end - 1} start at block 0: nothing before them to repair")
            pruned, position = dense.input_of(0), end
            continue
        if pruned is None:
            pruned = dense.input_of(before)
        else:
            for index in range(position, before):
                with on_device(blocks[index], device):
                    pruned = forward(blocks[index], chunks, pruned)
        block = blocks[before]
        down = _check_repairable(block)
        captured: list[torch.Tensor] = []
        handle = down.register_forward_hook(lambda _m, _i, out, store=captured: store.append(out.detach()))
        try:
            with on_device(block, device):
                out = forward(block, chunks, pruned)
        finally:
            handle.remove()
        rest = [o - m for o, m in zip(out, captured, strict=True)]
        transform = least_squares_map(captured, rest, dense.input_of(end))
        fold_map(down, transform)
        pruned = [r + m @ transform.to(m.dtype) for m, r in zip(captured, rest, strict=True)]
        position = end
        repaired.append(before)
    return repaired, notes


class _DepthMethod(StructuredMethod):
    state_budget_bytes: int = 4 << 30  # dense boundary states kept for the repair up to this size

    def choose(
        self, blocks: nn.ModuleList, chunks: list[Chunk], n: int, config: StructuredConfig, device, record
    ) -> tuple[list[int], list[float]]:
        raise NotImplementedError

    def prune(
        self, model: nn.Module, input_ids: torch.Tensor | None, config: StructuredConfig
    ) -> StructuredReport:
        check_calibration(input_ids, self.name)
        _, blocks = find_decoder_blocks(model)
        n = layers_to_remove(len(blocks), config)
        check_finite_weights(blocks, find_decoder_blocks(model)[0])
        if config.repair:
            for index, block in enumerate(blocks):  # refuse before any work
                try:
                    _check_repairable(block)
                except ValueError as exc:
                    raise ValueError(f"block {index}: {exc}") from None
        report = StructuredReport(self.name, config.sparsity, *input_ids.shape)
        report.params_before, report.block_params_before = param_count(model), block_param_count(model)
        device = compute_device(model, config.device)
        started = time.perf_counter()
        with torch.no_grad():
            chunks = capture(model, input_ids, config.batch_size, device)
            inputs = [c.hidden for c in chunks]
            dense = DenseStates(blocks, chunks, device, self.state_budget_bytes if config.repair else 0)
            removed, scores = self.choose(blocks, chunks, n, config, device, dense.record)
            report.timings_s["score"] = time.perf_counter() - started
            report.removed_blocks, report.block_scores = sorted(removed), scores
            if config.repair and removed:
                for chunk, x in zip(chunks, inputs, strict=True):
                    chunk.hidden = x
                started = time.perf_counter()
                report.repaired_blocks, notes = repair_pass(blocks, chunks, removed, dense, device)
                report.notes += notes
                report.timings_s["repair"] = time.perf_counter() - started
            del dense
        remove_blocks(model, removed)
        report.params_after, report.block_params_after = param_count(model), block_param_count(model)
        log.info(
            "%s removed blocks %s (%.1f%% of block parameters)",
            self.name,
            report.removed_blocks,
            100 * report.removed_fraction,
        )
        return report


@register_structured
class ShortGPT(_DepthMethod):
    """Remove the n blocks with the lowest Block Influence."""

    name = "shortgpt"

    def choose(self, blocks, chunks, n, config, device, record):
        scores = block_influence(blocks, chunks, device, config.tokens, config.show_progress, record)
        order = sorted(range(len(scores)), key=lambda i: scores[i])
        return sorted(order[:n]), scores


@register_structured
class Angular(_DepthMethod):
    """Remove the contiguous run of n blocks with the smallest angular distance across it."""

    name = "angular"

    def choose(self, blocks, chunks, n, config, device, record):
        if n == 0:
            return [], []
        distances = angular_distances(blocks, chunks, n, device, config.tokens, config.show_progress, record)
        start = min(range(len(distances)), key=lambda i: distances[i])
        return list(range(start, start + n)), distances
