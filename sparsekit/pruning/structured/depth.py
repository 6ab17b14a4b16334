"""Depth pruning: remove whole decoder blocks (ShortGPT, angular distance), with an optional
training-free linear repair of each cut (ReplaceMe's least-squares map, folded into weights).

- ``shortgpt`` (Men et al., 2024): Block Influence BI_i = 1 - mean over tokens of
  cos(x_in, x_out); the blocks with the lowest BI go.
- ``angular`` (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"): the
  contiguous run of n blocks whose input and output are closest in angular distance
  arccos(cos) / pi, averaged over tokens (``tokens="all"``, default) or the last token of each
  sequence (``tokens="last"``, the paper's choice).
- ``shortened-ppl`` (Kim et al., 2024, "Shortened LLaMA"): the calibration perplexity of the
  model with each block skipped alone (from the stored input of the skipped block: blocks after
  it and the model's tail only); the n blocks whose removal raises it least go, in one shot.
- ``shortened-taylor`` (the same paper's Taylor+): a block's score is sum |W * dL/dW| over its
  weights, the gradient of the mean calibration loss (one backward per batch, a block at a time on
  the compute device); the first four and
  last two blocks are kept, as the paper does, and the n lowest-scoring of the rest go.
- repair: for each removed run, the block before it gets its MLP output M mapped by T, where T
  minimises ||Y + M T - X_target||^2 over calibration tokens (Y: that block's output without its
  MLP term, X_target: the dense model's hidden state after the run). T is folded into down_proj
  (W <- T^T W, b <- T^T b), so the saved model is still a plain architecture.
  ``repair_fit="weights"`` re-solves down_proj's weights W' [H, I] instead, on its inputs a [I]:
  min ||Y + W' a + T^T b - X_target||^2 with the same token weights, plus a ridge pulling W'
  towards the map's T^T W (a larger family of fits than T^T W: the map's is one of them).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsekit.kernels import accumulate_gram
from sparsekit.models import (
    BlockAnatomy,
    describe,
    linear_weight,
    model_dtype,
    set_linear_weight,
    set_submodule,
)
from sparsekit.models.families import family

from ..capture import Chunk, ForwardPrecision, block_output_structure, resolve_forward_precision, tail_loss
from ..distributed import World, calibration_share, current_world, sum_over_ranks_
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
from .passes import BlockStates, block_gradients, capture, compute_device, forward, on_device

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


def _mean_over_ranks(values: torch.Tensor, world: World | None) -> float:
    """The mean of ``values`` [n] over every rank's tokens (this rank's alone outside a group)."""
    if world is None or not world.active:
        return values.mean().item()
    total, count = sum_over_ranks_([], [values.double().sum().item(), values.numel()], values.device)
    return total / count


def block_influence(
    blocks: nn.ModuleList,
    chunks: list[Chunk],
    device,
    tokens: str = "all",
    show_progress: bool = True,
    record=None,
    world: World | None = None,
) -> list[float]:
    """ShortGPT's BI per block (1 - mean cos(in, out)); runs the dense stack once (chunks advance).
    With an active ``world`` each rank holds its share of the chunks and the mean is over all."""
    scores = []
    for index, block in enumerate(tqdm(blocks, desc="block influence", disable=not show_progress)):
        with on_device(block, device):
            outs = forward(block, chunks, index)
        cos = torch.cat([_token_cos(c.hidden, o, tokens) for c, o in zip(chunks, outs, strict=True)])
        scores.append(1.0 - _mean_over_ranks(cos, world))
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
    world: World | None = None,
) -> list[float]:
    """d(l) = mean arccos(cos(x_l, x_{l+n})) / pi for every start l in [0, blocks - n] (the mean over
    every rank's tokens with an active ``world``)."""
    window: deque[list[torch.Tensor]] = deque([[c.hidden for c in chunks]], maxlen=n + 1)
    distances = []

    def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        cos = torch.cat([_token_cos(x, y, tokens) for x, y in zip(a, b, strict=True)])
        return _mean_over_ranks(torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi, world)

    if n == 0:
        return [0.0] * (len(blocks) + 1)
    for index, block in enumerate(tqdm(blocks, desc="angular distance", disable=not show_progress)):
        with on_device(block, device):
            outs = forward(block, chunks, index)
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


# config lists that hold layer indices (not one entry per layer): renumbered after a removal
INDEX_LIST_KEYS = ("mlp_only_layers", "full_attn_idxs")


def _slice_per_layer_weights(model: nn.Module, model_type: str, total: int, keep: list[int]) -> None:
    """Keep the kept blocks' slices of model-level per-layer weights (``Family.per_layer_weights``)."""
    for suffix, dim in family(model_type).per_layer_weights.items():
        for name, module in model.named_modules():
            if name != suffix and not name.endswith("." + suffix):
                continue
            weight = module.weight
            shape = list(weight.shape)
            per = shape[dim] // total
            parts = weight.data.unflatten(dim, (total, per)).index_select(
                dim, torch.tensor(keep, device=weight.device)
            )
            module.weight = nn.Parameter(
                parts.flatten(dim, dim + 1).contiguous(), requires_grad=weight.requires_grad
            )
            for attr, value in (("embedding_dim", len(keep) * per), ("out_features", len(keep) * per)):
                if isinstance(getattr(module, attr, None), int) and getattr(module, attr) == shape[dim]:
                    setattr(module, attr, value)


def remove_blocks(model: nn.Module, indices: list[int]) -> None:
    """Delete decoder blocks in place: the ModuleList, every ``layer_idx`` (KV-cache slots) and the
    config (``num_hidden_layers``, per-layer lists such as ``layer_types``, and lists of layer
    indices such as ``mlp_only_layers``) follow."""
    anatomy = describe(model)
    name, blocks = anatomy.blocks_path, anatomy.blocks
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
    for key in anatomy.layer_config_keys:
        setattr(config, key, [getattr(config, key)[i] for i in keep])
    renumber = {old: new for new, old in enumerate(keep)}
    for key in INDEX_LIST_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, list) and all(isinstance(i, int) for i in value):
            setattr(config, key, [renumber[i] for i in value if i in renumber])
    _slice_per_layer_weights(model, anatomy.model_type, total, keep)
    config.num_hidden_layers = len(keep)


def _repair_target(block: BlockAnatomy) -> nn.Module:
    """The MLP output projection a repair folds into, or ValueError saying why there is none."""
    if block.mlp is None:
        raise ValueError(
            f"block {block.index}: linear repair folds into the MLP's output projection, and the anatomy "
            f"found no MLP ({'; '.join(block.problems) or 'none'}): prune without repair"
        )
    return block.linear(block.mlp.down)


def check_mlp_reaches_residual(block: BlockAnatomy, chunk: Chunk, device) -> None:
    """Refuse a repair where the MLP output is not added straight to the residual stream (a norm
    after the MLP, as in Gemma-2 or OLMo-2): doubling the MLP output must move the block output
    by exactly that output. Runs the block twice on the chunk's first sequence."""
    down = _repair_target(block)
    seen: list[torch.Tensor] = []

    def double(_m, _i, out):
        seen.append(out.detach().clone())  # a block may add to it in place (Falcon)
        return out * 2 if len(seen) == 2 else out

    handle = down.register_forward_hook(double)
    try:
        with on_device(block.module, device):
            one = Chunk(chunk.hidden[:1], _first_sequence(chunk.inputs), chunk.autocast)
            base = one.run(block.module, block.index)
            moved = one.run(block.module, block.index)
    finally:
        handle.remove()
    delta, mlp = (moved - base).double(), seen[0].double().reshape(base.shape)
    err = (delta - mlp).norm() / mlp.norm().clamp_min(1e-12)
    if err > 1e-3:
        raise ValueError(
            f"block {block.index}: the MLP output ({block.mlp.down}) is not added straight to the residual "
            f"stream (a norm or gate sits after it; relative mismatch {err:.2g}), so a linear repair cannot "
            "be folded into it: prune without repair"
        )


def _first_sequence(inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Per-block inputs cut to the first sequence of the batch (tensors with a batch dimension > 1)."""

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] > 1:
            return v[:1]
        if isinstance(v, tuple | list):
            return type(v)(cut(x) for x in v)
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        return v

    return [cut(x) for x in inputs]


def fold_map(down: nn.Module, transform: torch.Tensor) -> None:
    """The output y of ``down`` (a linear or Conv1D) becomes y @ T: W <- T^T W, b <- T^T b (T [H, H])."""
    weight = linear_weight(down)
    t = transform.to(device=weight.device, dtype=torch.float64)
    set_linear_weight(down, (t.T @ weight.data.double()).to(weight.dtype))
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


REPAIR_WEIGHTS_DAMP = 0.01  # the weights fit's ridge, a fraction of the mean diagonal of its Gram


class WeightsFit:
    """The repair's least-squares fit of down_proj's weights, its normal equations summed chunk by
    chunk (so no [tokens, I] activations are kept): min over W' [H, I] of
    sum_t w_t^2 ||rest_t + W' a_t + b' - target_t||^2 + lambda ||W' - anchor||^2, w_t = 1 / ||target_t||
    (the map's token weights), b' the folded bias (fixed), lambda = ``damp`` x mean diag."""

    def __init__(self, in_features: int, hidden: int, device) -> None:
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.cross = torch.zeros(in_features, hidden, dtype=torch.float64, device=device)
        self.total = torch.zeros(in_features, dtype=torch.float64, device=device)  # sum_t w_t^2 a_t

    def add(self, a: torch.Tensor, rest: torch.Tensor, target: torch.Tensor) -> None:
        """One chunk: a [..., I] down_proj's inputs, rest / target [..., H] (any float dtype)."""
        hidden = target.shape[-1]
        t = target.reshape(-1, hidden).float()
        w = 1.0 / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = self.gram.shape[0]
        aw = a.reshape(-1, k).float() * w
        self.gram += accumulate_gram(aw, torch.zeros(k, k, dtype=torch.float32, device=aw.device)).double()
        self.cross += (aw.T @ ((t - rest.reshape(-1, hidden).float()) * w)).double()
        self.total += (aw * w).sum(0).double()

    def solve(
        self, anchor: torch.Tensor, bias: torch.Tensor | None, damp: float = REPAIR_WEIGHTS_DAMP
    ) -> torch.Tensor:
        """W' [H, I] float64; ``anchor`` [H, I] the ridge's centre, ``bias`` [H] b' or None."""
        cross = self.cross
        if bias is not None:
            cross = cross - torch.outer(self.total, bias.to(cross))
        system = self.gram.clone()
        ridge = damp * system.diagonal().mean().clamp_min(1e-12)
        system.diagonal().add_(ridge)
        return torch.linalg.solve(system, cross + ridge * anchor.to(cross).T).T


def fold_weights(down: nn.Module, transform: torch.Tensor, fit: WeightsFit) -> None:
    """The weights repair: down_proj's bias becomes T^T b (as the map folds it) and its weight the
    fit's W', with the ridge centred on the map's T^T W."""
    weight = linear_weight(down)
    t = transform.to(device=weight.device, dtype=torch.float64)
    bias = None
    if down.bias is not None:
        bias = t.T @ down.bias.data.double()
        down.bias.data = bias.to(down.bias.dtype)
    solved = fit.solve((t.T @ weight.data.double()).to(fit.gram.device), bias)
    set_linear_weight(down, solved.to(device=weight.device, dtype=weight.dtype))


def _run_capturing(
    block: nn.Module, down: nn.Module, chunk: Chunk, index: int, hidden: torch.Tensor, inputs: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(block output, down_proj's output, its input where ``inputs``) on one chunk."""
    got: dict[str, torch.Tensor] = {}

    def hook(_m, args, out):  # copies: a block may add to the output in place (Falcon)
        got["out"] = out.detach().clone()
        if inputs:
            got["in"] = args[0].detach().clone()

    handle = down.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = chunk.run(block, index, hidden)
    finally:
        handle.remove()
    return out, got["out"].reshape(out.shape), got.get("in")  # OPT's down output is [b * L, H]


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

    def complete_or_recompute(self) -> None:
        """After scoring: a criterion that did not pass over every block leaves the states to be
        recomputed on demand."""
        if self.store and len(self.stored) != len(self.blocks) + 1:
            self.store, self.stored = False, self.stored[:1]
            self._at, self._index = self.stored[0], 0

    def input_of(self, index: int) -> list[torch.Tensor]:
        """Dense input of block ``index`` (``len(blocks)``: the output of the last block)."""
        if self.store:
            return self.stored[index]
        if index < self._index:
            self._at, self._index = self.stored[0], 0
        while self._index < index:
            with on_device(self.blocks[self._index], self.device):
                self._at = forward(self.blocks[self._index], self.chunks, self._index, self._at)
            self._index += 1
        return self._at


def repair_pass(
    anatomy, chunks: list[Chunk], removed: list[int], dense: DenseStates, device, fit: str = "map"
) -> tuple[list[int], list[str]]:
    """Fit and fold one repair per removed run (see module docstring; ``fit``: "map" or "weights").
    Runs only what it must: the block before each cut, and the kept blocks between cuts (before
    the first cut the pruned model equals the dense one). Returns (blocks that absorbed a repair,
    notes)."""
    blocks = anatomy.blocks
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
                    pruned = forward(blocks[index], chunks, index, pruned)
        block = blocks[before]
        down = _repair_target(anatomy[before])
        target = dense.input_of(end)
        weights = None
        if fit == "weights":
            weights = WeightsFit(linear_weight(down).shape[1], target[0].shape[-1], device)
        captured, rest = [], []
        with on_device(block, device):
            for chunk, x, t in zip(chunks, pruned, target, strict=True):
                out, m, a = _run_capturing(block, down, chunk, before, x, weights is not None)
                captured.append(m)
                rest.append(out - m)
                if weights is not None:
                    weights.add(a, rest[-1], t)
        transform = least_squares_map(captured, rest, target)
        if weights is None:
            fold_map(down, transform)
            pruned = [r + m @ transform.to(m.dtype) for m, r in zip(captured, rest, strict=True)]
        else:
            del captured, rest
            with on_device(block, device):
                fold_weights(down, transform, weights)
                pruned = forward(block, chunks, before, pruned)
        position = end
        repaired.append(before)
    return repaired, notes


@dataclass
class DepthContext:
    """What a depth criterion may read: the model and its calibration ids (this rank's share under
    torchrun when the method ``shards``), the decoder blocks, the
    block-0 inputs (``chunks``, advanced in place by a pass over the blocks), the compute device and
    ``record`` (called with each block's dense outputs, in order, by a pass that computes them)."""

    model: nn.Module
    input_ids: torch.Tensor
    blocks: nn.ModuleList
    chunks: list[Chunk]
    device: torch.device
    record: Callable[[list[torch.Tensor]], None]
    world: World = field(default_factory=World)  # active: ``chunks`` are this rank's share


class DepthMethod(StructuredMethod):
    """Removes whole decoder blocks; subclasses choose which (``choose``)."""

    state_budget_bytes: int = 4 << 30  # dense boundary states kept for the repair up to this size
    uses_tokens: bool = False  # reads StructuredConfig.tokens (cosine-based criteria)
    whole_model: str = ""  # "forward" / "backward": runs the whole model to its loss (memory checks)
    shards: bool = False  # ``choose`` reduces its token means over ranks (ctx.world), so chunks are split

    def choose(self, ctx: DepthContext, n: int, config: StructuredConfig) -> tuple[list[int], list[float]]:
        """(indices of the n blocks to remove, the per-block scores shown in the report)."""
        raise NotImplementedError

    def prune(
        self, model: nn.Module, input_ids: torch.Tensor | None, config: StructuredConfig
    ) -> StructuredReport:
        check_calibration(input_ids, self.name)
        anatomy = describe(model)
        blocks = anatomy.blocks
        anatomy.require_dense(self.name)
        n = layers_to_remove(len(blocks), config)
        check_finite_weights(blocks, anatomy.blocks_path)
        if config.repair:
            for block in anatomy:  # refuse before any work
                _repair_target(block)
        report = StructuredReport(self.name, config.sparsity, *input_ids.shape)
        report.params_before, report.block_params_before = param_count(model), block_param_count(model)
        device = compute_device(model, config.device)
        # under torchrun a criterion that is a token mean splits the tokens over the ranks; the repair
        # (a least-squares fit on every token) and the other criteria run on all of them on every rank
        world = current_world() if self.shards and not config.repair else World()
        started = time.perf_counter()
        with torch.no_grad():
            mine = calibration_share(input_ids, config.batch_size, world)
            chunks = capture(model, mine, config.batch_size, device)
            if config.repair:
                for block in anatomy:
                    check_mlp_reaches_residual(block, chunks[0], device)
            inputs = [c.hidden for c in chunks]
            if self.casts_forwards:  # the repair fits on the model dtype's states: no cast with it
                precision = ForwardPrecision(model_dtype(model))
                if not config.repair:
                    precision = resolve_forward_precision(config.forward_dtype, precision.dtype, device)
                    precision.apply(chunks)
                report.forward_dtype = precision.name
            dense = DenseStates(blocks, chunks, device, self.state_budget_bytes if config.repair else 0)
            ctx = DepthContext(model, mine, blocks, chunks, device, dense.record, world)
            removed, scores = self.choose(ctx, n, config)
            dense.complete_or_recompute()
            report.timings_s["score"] = time.perf_counter() - started
            report.removed_blocks, report.block_scores = sorted(removed), scores
            if config.repair and removed:
                for chunk, x in zip(chunks, inputs, strict=True):
                    chunk.hidden = x
                started = time.perf_counter()
                report.repaired_blocks, notes = repair_pass(
                    anatomy, chunks, removed, dense, device, config.repair_fit
                )
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
class ShortGPT(DepthMethod):
    """Remove the n blocks with the lowest Block Influence."""

    name = "shortgpt"
    uses_tokens = True
    shards = True
    casts_forwards = True

    def choose(self, ctx, n, config):
        show = config.show_progress and ctx.world.main
        scores = block_influence(
            ctx.blocks, ctx.chunks, ctx.device, config.tokens, show, ctx.record, ctx.world
        )
        order = sorted(range(len(scores)), key=lambda i: scores[i])
        return sorted(order[:n]), scores


@register_structured
class Angular(DepthMethod):
    """Remove the contiguous run of n blocks with the smallest angular distance across it."""

    name = "angular"
    uses_tokens = True
    shards = True
    casts_forwards = True

    def choose(self, ctx, n, config):
        if n == 0:
            return [], []
        distances = angular_distances(
            ctx.blocks, ctx.chunks, n, ctx.device, config.tokens, config.show_progress and ctx.world.main,
            ctx.record, ctx.world,
        )  # fmt: skip
        start = min(range(len(distances)), key=lambda i: distances[i])
        return list(range(start, start + n)), distances


def _lowest(scores: list[float], n: int, candidates: list[int]) -> list[int]:
    return sorted(sorted(candidates, key=lambda i: scores[i])[:n])


@register_structured
class ShortenedPPL(DepthMethod):
    """Remove the n blocks whose removal alone raises the calibration perplexity least."""

    name = "shortened-ppl"
    whole_model = "forward"
    shards = True

    def choose(self, ctx, n, config):
        """One dense pass stores every block's input; skipping block i then reruns blocks i+1.. from
        block i's stored input and the model's own tail (``capture.tail_loss``), half the block work
        of a full forward per block on average."""
        states = BlockStates(ctx.blocks, ctx.chunks, ctx.device)
        for outputs in states.inputs[1:]:
            ctx.record(outputs)
        template = block_output_structure(ctx.blocks[0], ctx.chunks[0], 0)
        scores = []
        for index in tqdm(
            range(len(ctx.blocks)),
            desc="ppl with a block skipped",
            disable=not config.show_progress or not ctx.world.main,
        ):
            final = states.run_from(index + 1, states.inputs[index])
            loss = tail_loss(
                ctx.model,
                ctx.blocks,
                final,
                ctx.input_ids,
                config.batch_size,
                ctx.device,
                template,
                ctx.world,
            )
            scores.append(math.exp(loss))
        return _lowest(scores, n, list(range(len(scores)))), scores


TAYLOR_KEEP_FIRST, TAYLOR_KEEP_LAST = 4, 2  # Shortened LLaMA's Taylor+: these blocks are never removed


@register_structured
class ShortenedTaylor(DepthMethod):
    """Remove the n blocks (of all but the first four and last two) with the lowest
    sum |W * dL/dW| over their weights."""

    name = "shortened-taylor"
    whole_model = "backward"

    def choose(self, ctx, n, config):
        total = len(ctx.blocks)
        candidates = list(range(TAYLOR_KEEP_FIRST, total - TAYLOR_KEEP_LAST))
        if n > len(candidates):
            raise ValueError(
                f"shortened-taylor keeps the first {TAYLOR_KEEP_FIRST} and last {TAYLOR_KEEP_LAST} of "
                f"{total} blocks, leaving {len(candidates)} to remove, fewer than the {n} asked: ask "
                "for fewer, or use shortened-ppl, which may remove any block"
            )
        scores = block_taylor_scores(ctx.model, ctx.blocks, ctx.input_ids, config.batch_size, ctx.device)
        return _lowest(scores, n, candidates), scores


@contextmanager
def skipping(block: nn.Module) -> Iterator[None]:
    """The block passes its input hidden states through unchanged (its output replaced by them)."""

    def hook(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def block_taylor_scores(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int, device: torch.device
) -> list[float]:
    """sum over each block's parameters of |W * G|, G the gradient of the mean loss over every
    predicted calibration token (``block_gradients``: one backward per batch, one block on
    ``device`` at a time; G summed over batches in float32 on the host); float64 sums."""
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    owned = [list(block.parameters()) for block in blocks]
    watched = {id(p) for ps in owned for p in ps}
    sums: list[list[torch.Tensor | None]] = [[None] * len(ps) for ps in owned]

    def consume(index: int, block: nn.Module) -> None:
        for k, p in enumerate(block.parameters()):
            if p.grad is None:
                continue
            if sums[index][k] is None:
                sums[index][k] = torch.zeros(p.shape, dtype=torch.float32)
            sums[index][k].add_(p.grad.detach().to("cpu", torch.float32))  # in place: no copy per batch

    try:
        for p in params:
            p.requires_grad_(id(p) in watched)
            p.grad = None
        block_gradients(model, input_ids, batch_size, device, consume)
    finally:
        for p, flag in zip(params, was, strict=True):
            p.grad = None
            p.requires_grad_(flag)
    scores = []
    for block, grads in zip(blocks, sums, strict=True):
        with on_device(block, device):
            scores.append(
                sum(
                    float((p.detach().double().cpu() * g.double()).abs().sum())
                    for p, g in zip(block.parameters(), grads, strict=True)
                    if g is not None
                )
            )
    return scores
