"""Recovery fine-tuning: a short AdamW run on calibration text with every mask held fixed, on the
plain LM loss or distilled from the dense teacher's logits (KL on the vocabulary distribution, as
Minitron heals its pruned models). A structurally pruned model has no zeros: all its block
linears train (their all-True masks change nothing).

The pruned layers train as ``masked`` SparseLinear (``masked_mm``: the gradient of a pruned
entry is exactly zero, so it stays zero), then go back to their original format. Pure training:
perplexity comes from an ``evaluate(model) -> float`` callable the caller passes (the eval layer
sits above this one), e.g. ``lambda m: sparsekit.perplexity(m, ids, seqlen=256).ppl``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsekit.models import linear_weight, set_submodule
from sparsekit.nn import SparseLinear, densify, sparsify
from sparsekit.nn.sparsify import release_memory, sparse_candidates

from .data import DEFAULT_CORPUS, calibration_ids

log = logging.getLogger(__name__)


@dataclass
class FinetuneReport:
    steps: int
    lr: float
    seqlen: int
    nsamples: int
    batch_size: int
    losses: list[float] = field(default_factory=list)
    ppl_before: float | None = None
    ppl_after: float | None = None
    masks_exact: bool = True
    trained_layers: int = 0
    seconds: float = 0.0
    loss: str = "lm"  # "lm" | "distill" | "distill+lm"
    temperature: float = 1.0
    lm_weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """temperature^2 * mean over tokens of KL(softmax(t / T) || softmax(s / T)); logits [B, L, V]."""
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _loss(model, teacher, batch, temperature: float, lm_weight: float) -> torch.Tensor:
    if teacher is None:
        return model(input_ids=batch, labels=batch, use_cache=False).loss
    with torch.no_grad():
        target = teacher(input_ids=batch, use_cache=False).logits
    out = model(input_ids=batch, labels=batch if lm_weight else None, use_cache=False)
    loss = distill_loss(out.logits, target, temperature)
    return loss + lm_weight * out.loss if lm_weight else loss


def _has_zeros(model: nn.Module) -> bool:
    """Whether any decoder linear holds exact zeros (a pruned, unsparsified model)."""
    return any(bool((linear_weight(m) == 0).any()) for m in sparse_candidates(model).values())


def _sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def finetune(
    model: nn.Module,
    tokenizer=None,
    steps: int = 100,
    lr: float = 2e-5,
    seqlen: int = 256,
    nsamples: int = 64,
    batch_size: int = 4,
    calib: str | list[str] = DEFAULT_CORPUS,
    input_ids: torch.Tensor | None = None,
    seed: int = 0,
    weight_decay: float = 0.0,
    evaluate: Callable[[nn.Module], float] | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 1.0,
    lm_weight: float = 0.0,
) -> FinetuneReport:
    """Fine-tune the pruned linears of ``model`` in place with their masks fixed; return the report.

    The model is either sparsified already (SparseLinear layers keep their formats) or pruned in
    place with zeros (its pruned linears train as masked SparseLinear and come back as nn.Linear
    with zeros kept). Only those layers' weights and biases train; embeddings and norms are frozen.
    input_ids: LongTensor [n, L] of training tokens; default: ``nsamples`` x ``seqlen`` tokens of
    ``calib`` through ``tokenizer``. evaluate(model) -> perplexity, run before and after.
    teacher: the dense model; the loss becomes temperature^2 * KL(teacher || student) per token
    (plus ``lm_weight`` times the LM loss). It must share the student's vocabulary.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher is not None:
        t_vocab, s_vocab = teacher.config.vocab_size, model.config.vocab_size
        if t_vocab != s_vocab:
            raise ValueError(f"teacher vocabulary ({t_vocab}) differs from the student's ({s_vocab})")
        teacher.eval()
    started = time.perf_counter()
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("finetune needs a tokenizer or input_ids [nsamples, seqlen]")
        input_ids = calibration_ids(tokenizer, calib, nsamples, seqlen, seed)
    report = FinetuneReport(steps, lr, input_ids.shape[1], input_ids.shape[0], batch_size)
    if teacher is not None:
        report.loss = "distill+lm" if lm_weight else "distill"
        report.temperature, report.lm_weight = temperature, lm_weight
    if evaluate is not None:
        report.ppl_before = float(evaluate(model))

    originals = {name: m.format for name, m in _sparse_layers(model).items()}
    was_dense = not originals
    plain = was_dense and not _has_zeros(model)  # structurally pruned: nothing to mask
    if plain:
        layers = dict(sparse_candidates(model))
        masks = None
    else:
        if was_dense:
            sparsify(model, format="masked")
        else:
            for name, module in _sparse_layers(model).items():
                set_submodule(model, name, module.to_format("masked"))
        layers = _sparse_layers(model)
        if not layers:
            raise ValueError("no pruned linear layers to fine-tune: prune the model first")
        masks = {name: m.mask().clone() for name, m in layers.items()}
    report.trained_layers = len(layers)

    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for m in layers.values():
        m.weight.requires_grad_(True)
        params.append(m.weight)
        if m.bias is not None:
            m.bias.requires_grad_(True)
            params.append(m.bias)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device = next(iter(layers.values())).weight.device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    try:
        for step in range(steps):
            rows = torch.randint(0, input_ids.shape[0], (batch_size,), generator=generator)
            batch = input_ids[rows].to(device)
            loss = _loss(model, teacher, batch, temperature, lm_weight)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"fine-tune loss is {loss.item()} at step {step}; lower lr (now {lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            report.losses.append(loss.item())
            if step % 10 == 0 or step == steps - 1:
                log.info("finetune step %d/%d loss %.4f", step + 1, steps, loss.item())
    finally:
        model.train(was_training)
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        del optimizer
    with torch.no_grad():
        report.masks_exact = masks is None or all(
            not bool(((m.weight != 0) & ~masks[n]).any()) and torch.equal(m.mask(), masks[n])
            for n, m in layers.items()
        )
        if plain:
            pass
        elif was_dense:
            densify(model)
        else:
            for name, module in _sparse_layers(model).items():
                set_submodule(model, name, module.to_format(originals[name]))
    release_memory()
    if evaluate is not None:
        report.ppl_after = float(evaluate(model))
    report.seconds = time.perf_counter() - started
    return report
