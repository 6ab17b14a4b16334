"""The user-facing Python API: prune a model from a calibration spec, measure its perplexity and
zero-shot accuracy."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sparsekit._checks import (
    DEFAULT_NSAMPLES,
    DEFAULT_SEQLEN,
    check_calibration_memory,
    check_prune_request,
)
from sparsekit.eval.perplexity import PerplexityResult
from sparsekit.eval.perplexity import perplexity as _perplexity
from sparsekit.hf.attention import calibration_attention
from sparsekit.hf.data import DEFAULT_CORPUS, calibration_ids
from sparsekit.models import describe
from sparsekit.nn import densify
from sparsekit.pruning import PruneReport, PruningMethod, prune_model
from sparsekit.pruning.structured import StructuredMethod, StructuredReport

log = logging.getLogger(__name__)


def _tokenizer_for(model: nn.Module, tokenizer):
    if tokenizer is not None:
        return tokenizer
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        raise ValueError("text calibration data needs a tokenizer: prune(model, ..., tokenizer=tok)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _decompress_blocks(model: nn.Module) -> None:
    """A compressed model (SparseLinear block layers, e.g. a loaded sparsekit checkpoint) goes back
    to dense linears with its zeros, so it can be pruned further or stacked with another method."""
    compressed = describe(model).compressed_layers()
    if compressed:
        log.info("decompressing %d SparseLinear block layers (zeros kept) before pruning", len(compressed))
        densify(model)
        describe(model, refresh=True)


def check_context(model: nn.Module, seqlen: int, what: str) -> None:
    """Refuse sequences longer than the model's position table (they would fail or crawl)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise ValueError(
            f"{what} {seqlen} exceeds the model's max_position_embeddings {limit}; use <= {limit}"
        )


def calibration_batch(
    model: nn.Module,
    calib: str | list[str] | torch.Tensor,
    tokenizer=None,
    nsamples: int = DEFAULT_NSAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    seed: int = 0,
) -> tuple[torch.Tensor, str]:
    """Resolve ``calib`` (corpus spec, texts, or LongTensor [n, L]) to token ids [n, L] and a label."""
    length = calib.shape[-1] if isinstance(calib, torch.Tensor) else seqlen
    check_context(model, length, "calibration seqlen")
    if isinstance(calib, torch.Tensor):
        return calib, f"tensor[{calib.shape[0]}x{calib.shape[1]}]"
    ids = calibration_ids(_tokenizer_for(model, tokenizer), calib, nsamples, seqlen, seed)
    label = calib if isinstance(calib, str) else f"{len(calib)} texts"
    return ids, label


def prune(
    model: nn.Module,
    method: str | PruningMethod | StructuredMethod = "wanda",
    sparsity: str | float | None = None,
    calib: str | list[str] | torch.Tensor = DEFAULT_CORPUS,
    tokenizer=None,
    nsamples: int = DEFAULT_NSAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    seed: int = 0,
    **config: object,
) -> PruneReport | StructuredReport:
    """Prune ``model`` in place one-shot and return the report.

    method: a registered name ('magnitude' | 'wanda' | 'ria' | 'sparsegpt', or the structured
    'shortgpt' | 'angular' | 'shortened-ppl' | 'shortened-taylor' | 'wanda-sp' | 'flap' |
    'llm-pruner' | 'minitron' | 'blockpruner' | '2ssp', the expert methods) or a method object; 'maskllm'
    learns 2:4 masks by training (keywords: ``MASKLLM_OPTIONS``; returns a ``MaskLLMReport``).
    sparsity: 0.5 (the default for the per-layer methods), '50%', '2:4', '4:8'; for structured
    methods the fraction of decoder-block parameters removed, which they need explicitly (or,
    depth methods, remove_layers) (keywords: remove_layers, repair, repair_fit, heads, widths,
    bias_compensation, refit, tokens, subblock_search, importance, axes; see ``StructuredConfig``).
    Structured methods return a ``StructuredReport`` and leave a smaller dense model; prune again
    with an unstructured method, or a width method after a depth one, to stack (the second
    sparsity counts the block parameters the first left). A sparsity of 0 is refused.
    calib: 'wiki-offline' | 'wikitext2' | 'c4' | 'dolly' | a text/JSONL path | list of texts |
    LongTensor [nsamples, seqlen]. Extra keywords go to ``PruneConfig``: the steps around the
    method's score, allocation='owl' (owl_lambda, owl_m), refine='dsnot', update='sparsegpt' |
    'admm', permute=True (N:M), and blocksize, percdamp, batch_size, device, show_progress, ...

    Before any work (``sparsekit._checks``): every keyword that differs from its default must be
    used by this method (else ValueError), ``device`` must exist here, and the calibration's
    estimated memory must fit in what is free on the device and the host.
    """
    if method == "maskllm":
        return _prune_maskllm(model, sparsity, calib, tokenizer, nsamples, seqlen, seed, config)
    tensor = isinstance(calib, torch.Tensor)
    options = {"nsamples": nsamples, "seqlen": seqlen, "seed": seed, **config}
    if isinstance(calib, str):
        options["calib"] = calib
    num_blocks = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    request = check_prune_request(method, sparsity, options, calib_is_data=tensor, num_blocks=num_blocks)
    _decompress_blocks(model)
    ids, label = None, "none"
    if request.needs_calibration:
        n, length = tuple(calib.shape) if tensor and calib.dim() == 2 else (nsamples, seqlen)
        check_context(model, length, "calibration seqlen")
        check_calibration_memory(request, model, n, length, tokenize=not tensor)
        ids, label = calibration_batch(model, calib, tokenizer, nsamples, seqlen, seed)
    elif not isinstance(calib, str):  # data passed along (a corpus name here would have been refused)
        log.info("%s reads no calibration data: calib is not used", request.method.name)
    with calibration_attention():  # causal attention on the CPU kernels where they apply
        if request.structured:
            report = request.method.prune(model, ids, request.config)
        else:
            report = prune_model(model, ids, request.config)
    report.calib = label
    return report


MASKLLM_SETTINGS = (
    "prior_strength",
    "weight_reg",
    "update_weights",
    "weight_lr_scale",
    "temperature",
    "scale",
)
MASKLLM_TRAIN = (
    "steps", "lr", "batch_size", "grad_accum", "schedule", "warmup", "min_lr_ratio",
    "precision", "activation_checkpointing", "save_every", "show_progress", "log_every",
)  # fmt: skip
MASKLLM_OPTIONS = ("prior", "start", "prior_update", "state_dir", "resume", *MASKLLM_SETTINGS, *MASKLLM_TRAIN)


def _prune_maskllm(model, sparsity, calib, tokenizer, nsamples, seqlen, seed, options: dict):
    """``prune(method="maskllm")``: a one-shot prior, then the 2:4 masks learned on ``calib``."""
    from sparsekit.hf.maskllm import MaskLLMSettings, check_prior, learn_masks
    from sparsekit.hf.trainer import TrainConfig

    if str(sparsity) != "2:4":
        raise ValueError(f"maskllm learns 2:4 masks: use sparsity='2:4' (got {sparsity!r})")
    unknown = sorted(set(options) - set(MASKLLM_OPTIONS))
    if unknown:
        raise ValueError(f"maskllm does not take {unknown}; its options are {list(MASKLLM_OPTIONS)}")
    train = {k: options[k] for k in MASKLLM_TRAIN if k in options}
    train.setdefault("lr", 5e-4)
    config = TrainConfig(seed=seed, **train)
    settings = MaskLLMSettings(seed=seed, **{k: options[k] for k in MASKLLM_SETTINGS if k in options})
    config.check(1)
    settings.check()
    if "weight_lr_scale" in options and not options.get("update_weights"):
        raise ValueError("weight_lr_scale sets the trained weights' lr: it needs update_weights=True")
    prior = options.get("prior", "sparsegpt")
    start, prior_update = options.get("start", "dense"), options.get("prior_update", "none")
    check_prior(prior, start, prior_update)
    _decompress_blocks(model)
    ids, label = calibration_batch(model, calib, tokenizer, nsamples, seqlen, seed)
    report = learn_masks(
        model,
        ids,
        config,
        prior=prior,
        settings=settings,
        state_dir=options.get("state_dir"),
        resume=bool(options.get("resume", False)),
        start=start,
        prior_update=prior_update,
    )
    report.calib = label
    return report


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor | str | None = None,
    seqlen: int = 512,
    tokenizer=None,
    max_tokens: int | None = None,
    **kwargs: object,
) -> PerplexityResult:
    """Perplexity on ``input_ids`` [1, T] or on a dataset spec's evaluation split (non-overlapping
    windows of ``seqlen`` tokens, mean token NLL, exp)."""
    check_context(model, seqlen, "evaluation seqlen")
    if isinstance(input_ids, str) or input_ids is None:
        dataset = input_ids or DEFAULT_CORPUS
        return _perplexity(
            model,
            dataset=dataset,
            tokenizer=_tokenizer_for(model, tokenizer),
            seqlen=seqlen,
            max_tokens=max_tokens,
            **kwargs,
        )
    return _perplexity(model, input_ids=input_ids, seqlen=seqlen, max_tokens=max_tokens, **kwargs)


def zero_shot(
    model: nn.Module,
    tasks: str | Sequence[str] = ("wiki_lambada", "wiki_continuation"),
    tokenizer=None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    seed: int = 0,
):
    """Accuracy of ``model`` on lm-evaluation-harness tasks (needs ``pip install 'sparsekit[eval]'``).

    tasks: names or 'a,b': the offline 'wiki_lambada', 'wiki_continuation', or any harness task
    (boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, piqa, ...) whose
    dataset is reachable; ``include_path`` adds folders of task YAMLs. limit: items per task.
    Returns a ``ZeroShotResult`` (per-task metrics with stderr, item counts, versions, environment).
    """
    from sparsekit.eval.zero_shot import zero_shot as _zero_shot

    return _zero_shot(
        model,
        tasks,
        _tokenizer_for(model, tokenizer),
        limit=limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        include_path=include_path,
        seed=seed,
    )
