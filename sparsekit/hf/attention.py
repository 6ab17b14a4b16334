"""transformers' 'sdpa' attention on sparsekit's causal CPU kernels, for calibration forwards.

``calibration_attention()`` is a context manager: inside it, a Hugging Face model whose
attention implementation is 'sdpa' runs ``sparsekit.kernels.attention_cpu.causal_attention_cpu``
wherever that computes exactly what SDPA would (and SDPA itself everywhere else):

- no attention mask and no position bias (so SDPA would run ``is_causal``), the module causal,
  more than one query, no dropout, no softcap, no attention sinks, no attention weights asked for;
- bf16 inputs, or fp32 / bf16 inputs under CPU autocast to bf16 (where SDPA casts them to bf16),
  on the bf16 kernel; fp32 inputs outside autocast on the fp32 one;
- no gradient needed, not inside ``torch.compile``;
- what ``unsupported_reason`` checks: CPU, head dim 64 / 96 / 128 / 256, AVX512_BF16 for bf16,
  AVX2 + FMA for fp32.

``sparsekit.prune`` enters it for its calibration forwards, whose attention is a third of a
bf16 block forward with SDPA on CPUs (docs/results.md, "Causal attention on its own CPU kernel")
and a sixth of an fp32 one ("fp32 calibration attention on its own AVX2 kernel").
``SPARSEKIT_CPU_ATTENTION=sdpa`` (read once) keeps SDPA everywhere; the default is ``auto``.
``attention_mode(mode)`` overrides it inside a ``with`` block (for A/B runs in one process).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import torch
from transformers.modeling_utils import AttentionInterface

from sparsekit.kernels.attention_cpu import causal_attention_cpu, unsupported_reason

log = logging.getLogger(__name__)

ATTENTION_MODES = ("auto", "sdpa")
_lock = threading.Lock()
_state: dict[str, object] = {"depth": 0, "original": None, "logged": False, "override": None}


@cache
def cpu_attention_mode() -> str:
    """``SPARSEKIT_CPU_ATTENTION``: 'auto' (default: the kernel where it applies) or 'sdpa'."""
    value = os.environ.get("SPARSEKIT_CPU_ATTENTION", "auto").strip().lower()
    if value not in ATTENTION_MODES:
        raise ValueError(
            f"SPARSEKIT_CPU_ATTENTION is {value!r}; set it to one of {', '.join(ATTENTION_MODES)} or unset it"
        )
    return value


def active_attention_mode() -> str:
    """The mode ``calibration_attention`` obeys: ``attention_mode``'s override, else the env's."""
    override = _state["override"]
    return str(override) if override is not None else cpu_attention_mode()


@contextmanager
def attention_mode(mode: str) -> Iterator[None]:
    """Within: calibration forwards use ``mode`` ('auto' or 'sdpa') whatever
    ``SPARSEKIT_CPU_ATTENTION`` says; the previous mode is back on exit. Nested blocks stack."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention mode {mode!r}: choose one of {', '.join(ATTENTION_MODES)}")
    before = _state["override"]
    _state["override"] = mode
    try:
        yield
    finally:
        _state["override"] = before


def _kernel_inputs(
    module, query, key, value, attention_mask, dropout, is_causal, position_bias, kwargs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q, k, v) in the kernel's dtype when it computes what SDPA would on these arguments, else
    None (bf16 under CPU autocast to bf16, else the inputs' own dtype)."""
    if attention_mask is not None or position_bias is not None or dropout:
        return None
    if any(kwargs.get(name) is not None for name in ("softcap", "s_aux")) or kwargs.get("output_attentions"):
        return None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len = query.shape[2]
    if not causal or q_len < 2 or key.shape[2] < q_len or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return None
    key, value = key[:, :, :q_len], value[:, :, :q_len]  # SDPA crops keys past the queries alike
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        if any(t.dtype not in (torch.float32, torch.bfloat16) for t in (query, key, value)):
            return None
        query, key, value = (t.to(torch.bfloat16) for t in (query, key, value))
    elif torch.is_autocast_enabled("cpu"):  # autocast to another dtype: SDPA would compute in that
        return None
    if unsupported_reason(query, key, value) is not None:
        return None
    return query, key, value


def _with_kernel(original: Callable) -> Callable:
    """``original`` (the 'sdpa' attention function) taking the kernel where it applies."""

    def attention(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
        position_bias=None, **kwargs,
    ):  # fmt: skip
        inputs = _kernel_inputs(
            module, query, key, value, attention_mask, dropout, is_causal, position_bias, kwargs
        )
        if inputs is None:
            return original(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                is_causal=is_causal, position_bias=position_bias, **kwargs,
            )  # fmt: skip
        if not _state["logged"]:
            _state["logged"] = True
            log.info(
                "calibration attention runs on sparsekit's causal %s CPU kernel "
                "(SPARSEKIT_CPU_ATTENTION=sdpa keeps torch's SDPA)",
                "bf16" if inputs[0].dtype == torch.bfloat16 else "fp32",
            )
        return causal_attention_cpu(*inputs, scale=scaling), None

    attention.sparsekit_original = original
    return attention


@contextmanager
def calibration_attention() -> Iterator[None]:
    """Within: 'sdpa' attention takes the causal CPU kernels where they apply (module doc).
    Re-entrant; restores transformers' own function on exit."""
    if active_attention_mode() == "sdpa":
        yield
        return
    with _lock:
        if _state["depth"] == 0:
            _state["original"] = AttentionInterface._global_mapping["sdpa"]
            AttentionInterface.register("sdpa", _with_kernel(_state["original"]))
        _state["depth"] = int(_state["depth"]) + 1
    try:
        yield
    finally:
        with _lock:
            _state["depth"] = int(_state["depth"]) - 1
            if _state["depth"] == 0:
                AttentionInterface.register("sdpa", _state["original"])
                _state["original"] = None


__all__ = [
    "ATTENTION_MODES",
    "active_attention_mode",
    "attention_mode",
    "calibration_attention",
    "cpu_attention_mode",
]
