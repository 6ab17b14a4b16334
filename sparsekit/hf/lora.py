"""Mask-preserving LoRA through ``peft``: the update of a pruned linear is (B @ A) * scaling * M,
M = (W != 0), so merging it keeps every pruned weight exactly zero (a plain LoRA merge densifies:
wanda #83, 50% -> 32.7% sparse).

``MaskedLoraLinear`` is a peft LoRA layer (``peft.tuners.lora.Linear``) with two methods changed:
``forward`` adds x @ (masked delta)^T instead of B(A(x)), and ``get_delta_weight`` (what
``merge_and_unload`` adds) is masked. The mask is read from the frozen base weight on every call,
so nothing extra is stored and it holds under FSDP (the block's weights are gathered then).

The adapter folder ``save_adapter`` writes is a standard peft adapter (``adapter_config.json`` +
``adapter_model.safetensors``) plus ``sparsekit_lora.json``. ``peft.PeftModel.from_pretrained``
loads it as an ordinary LoRA, whose update is B @ A unmasked (not what was trained);
``load_adapter`` here loads it with the masked layer, which reproduces the trained model exactly.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MARKER = "sparsekit_lora.json"


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is in the train extra
        raise ImportError("LoRA needs peft: pip install 'sparsekit[train]' (or pip install peft)") from e
    return peft


@functools.cache
def _masked_layer_class():
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.utils.other import transpose

    class MaskedLoraLinear(LoraLinear):
        """peft LoRA on a pruned linear whose update is masked by the base weight's nonzeros."""

        def _masked_delta(self, adapter: str, dtype: torch.dtype) -> torch.Tensor:
            """(B @ A) * scaling * (W != 0) as [out, in] in ``dtype``."""
            a = self.lora_A[adapter].weight.to(dtype)
            b = self.lora_B[adapter].weight.to(dtype)
            weight = transpose(self.get_base_layer().weight, self.fan_in_fan_out)
            return (b @ a) * self.scaling[adapter] * (weight != 0)

        def get_delta_weight(self, adapter) -> torch.Tensor:
            dtype = self.lora_B[adapter].weight.dtype
            work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            return transpose(self._masked_delta(adapter, work).to(dtype), self.fan_in_fan_out)

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
                return super().forward(x, *args, **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            for adapter in self.active_adapters:
                if adapter in self.lora_A:
                    x_in = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)
                    delta = self._masked_delta(adapter, x_in.dtype)
                    result = result + F.linear(self.lora_dropout[adapter](x_in), delta).to(result.dtype)
            return result

    return MaskedLoraLinear


def lora_config(rank: int, targets: Sequence[str], alpha: float | None = None, dropout: float = 0.0):
    """A peft ``LoraConfig`` on ``targets`` (module names or name suffixes) whose layers are masked."""
    peft = _peft()
    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {rank}")
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=list(targets),
        bias="none",
    )
    config._register_custom_module({nn.Linear: _masked_layer_class()})
    return config


def add_lora(model: nn.Module, config) -> nn.Module:
    """``model`` wrapped by peft with masked LoRA layers; only the LoRA weights train."""
    peft = _peft()
    wrapped = peft.get_peft_model(model, config)
    masked = _masked_layer_class()
    layers = [m for m in wrapped.modules() if isinstance(m, masked)]
    if not layers:
        raise ValueError(f"--lora-targets {config.target_modules} matched no linear layer of the model")
    return wrapped


def save_adapter(peft_model: nn.Module, folder: str | Path, sparsity_note: dict | None = None) -> Path:
    """The unmerged adapter in peft's format plus ``sparsekit_lora.json`` (the masking rule)."""
    folder = Path(folder)
    peft_model.save_pretrained(folder)
    note = {
        "masked": True,
        "rule": "delta = (lora_B @ lora_A) * scaling * (base_weight != 0)",
        "load_exactly_with": "sparsekit.hf.lora.load_adapter(base_model, folder)",
        **(sparsity_note or {}),
    }
    (folder / MARKER).write_text(json.dumps(note, indent=2) + "\n")
    return folder


def load_adapter(base_model: nn.Module, folder: str | Path) -> nn.Module:
    """``base_model`` with the masked adapter in ``folder`` (as trained); merge with
    ``.merge_and_unload()`` to get a model exactly as sparse as ``base_model``."""
    peft = _peft()
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no adapter_config.json: not a peft adapter folder")
    config = peft.LoraConfig.from_pretrained(folder)
    if (folder / MARKER).is_file():
        config._register_custom_module({nn.Linear: _masked_layer_class()})
    return peft.PeftModel.from_pretrained(base_model, folder, config=config)
