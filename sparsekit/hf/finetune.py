"""Recovery fine-tuning, the short form: ``finetune(model, tokenizer, steps=...)`` runs the trainer
(``sparsekit.hf.trainer``: FSDP2, one process or torchrun) on calibration text with every mask held
exactly, on the plain LM loss or distilled from a teacher's logits (KL on the vocabulary
distribution, as Minitron heals its pruned models), or as mask-preserving LoRA. A structurally
pruned model has no zeros: all its block linears train.

Pure training: perplexity comes from an ``evaluate(model) -> float`` callable the caller passes
(the eval layer sits above this one), e.g. ``lambda m: sparsekit.perplexity(m, ids, seqlen=256).ppl``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .data import DEFAULT_CORPUS, calibration_ids
from .trainer import TrainConfig, TrainReport, distill_loss, train

FinetuneReport = TrainReport

__all__ = ["FinetuneReport", "distill_loss", "finetune"]


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
    **options,
) -> TrainReport:
    """Fine-tune the pruned linears of ``model`` in place with their masks fixed; return the report.

    input_ids: LongTensor [n, L] of training tokens; default: ``nsamples`` x ``seqlen`` tokens of
    ``calib`` through ``tokenizer``. evaluate(model) -> perplexity, run before and after.
    teacher: the dense model; the loss becomes temperature^2 * KL(teacher || student) per token
    (plus ``lm_weight`` times the LM loss). Other keywords are ``TrainConfig`` fields (grad_accum,
    schedule, warmup, lora_rank, precision, ...) or ``train`` options (state_dir, resume,
    adapter_dir). The default precision here is fp32 (``precision="auto"`` picks bf16 where native).
    """
    run_keys = {"state_dir", "resume", "adapter_dir"}
    run = {k: options.pop(k) for k in list(options) if k in run_keys}
    unknown = set(options) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"finetune got unknown options {sorted(unknown)}")
    options.setdefault("precision", "fp32")
    config = TrainConfig(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        weight_decay=weight_decay,
        temperature=temperature,
        lm_weight=lm_weight,
        **options,
    )
    if input_ids is None:
        if tokenizer is None:
            raise ValueError("finetune needs a tokenizer or input_ids [nsamples, seqlen]")
        input_ids = calibration_ids(tokenizer, calib, nsamples, seqlen, seed)
    return train(model, input_ids, config, teacher=teacher, evaluate=evaluate, **run)
