"""Perplexity the Wanda/SparseGPT way: non-overlapping windows of ``seqlen`` tokens, mean token NLL, exp."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsekit.hf.data import DEFAULT_CORPUS, evaluation_ids
from sparsekit.models import model_device


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens (windows * (seqlen - 1))
    windows: int
    seqlen: int
    dataset: str = "input_ids"

    def to_dict(self) -> dict:
        return dict(vars(self))


@torch.no_grad()
def perplexity_of_ids(
    model: nn.Module, input_ids: torch.Tensor, seqlen: int, batch_size: int = 4, show_progress: bool = False
) -> PerplexityResult:
    """input_ids [1, T] -> ppl over floor(T / seqlen) windows; each window predicts its tokens 2..seqlen."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
    windows = input_ids.shape[1] // seqlen
    if windows == 0:
        raise ValueError(f"need at least seqlen={seqlen} tokens, got {input_ids.shape[1]}")
    batches = input_ids[0, : windows * seqlen].view(windows, seqlen).split(batch_size)
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(batches, desc="perplexity", disable=not show_progress):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        labels = batch[:, 1:]
        total_nll += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
        ).item()
        total_tokens += labels.numel()
    nll = total_nll / total_tokens
    return PerplexityResult(math.exp(nll), nll, total_tokens, windows, seqlen)


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    dataset: str | None = None,
    tokenizer=None,
    seqlen: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    show_progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``input_ids`` [1, T], or on the evaluation split of ``dataset``.

    ``dataset``: 'wiki-offline' (default), 'wikitext2', 'c4', 'dolly' or a text file; needs
    ``tokenizer``. ``max_tokens`` caps the evaluation text (windows of ``seqlen``).
    """
    name = "input_ids"
    if input_ids is None:
        if tokenizer is None:
            raise ValueError(
                "perplexity on a dataset needs the tokenizer: perplexity(model, dataset=..., tokenizer=tok)"
            )
        name = dataset or DEFAULT_CORPUS
        input_ids = evaluation_ids(tokenizer, name, max_tokens)
    elif max_tokens is not None:
        input_ids = input_ids[:, :max_tokens]
    result = perplexity_of_ids(model, input_ids, seqlen, batch_size, show_progress)
    result.dataset = name
    return result
