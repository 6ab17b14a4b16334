"""Model structure: decoder blocks and their linear layers, found by structure not by name.

One generic finder: the decoder stack is the ModuleList holding ``config.num_hidden_layers``
blocks that contain linear layers. torch only: GPT-2's ``Conv1D`` is recognised by its class
name and weight layout ([in, out]), so nothing here imports transformers. Also the one home of
the small model-level helpers every layer above needs: where a model lives (device, dtype), how
many bytes it holds, and swapping one submodule for another.
"""

from __future__ import annotations

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "smollm3",
    "opt",
    "gpt2",
)


class UnsupportedArchitecture(ValueError):
    """The model is not one of the decoder-only families sparsekit knows how to prune."""


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: y = x @ weight + bias with weight [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_prunable_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def check_architecture(model: nn.Module) -> str:
    """Return config.model_type, or raise naming the supported families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported; sparsekit prunes "
            f"decoder-only models of type: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, ModuleList) of the decoder blocks."""
    check_architecture(model)
    expected = _num_layers(model)
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if expected is not None and len(module) != expected:
            continue
        if all(any(is_prunable_linear(m) for m in block.modules()) for block in module):
            candidates.append((name, module))
    if not candidates:
        raise UnsupportedArchitecture(
            f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of "
            f"{expected} blocks with linear layers"
        )
    return min(candidates, key=lambda item: item[0].count("."))


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linear (and Conv1D) layers of one block, by name relative to the block."""
    return {name: m for name, m in block.named_modules() if is_prunable_linear(m)}


def linear_weight(module: nn.Module):
    """The weight as [out_features, in_features] (a transposed view for Conv1D)."""
    return module.weight.T if is_conv1d(module) else module.weight


def set_linear_weight(module: nn.Module, weight) -> None:
    """Write a [out_features, in_features] weight back in place."""
    target = module.weight
    source = weight.T if is_conv1d(module) else weight
    target.data.copy_(source.to(target.dtype))


def model_device(module: nn.Module) -> torch.device:
    """The device of the first parameter not on meta (CPU when all are offloaded or there are none)."""
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def model_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the first floating-point parameter (float32 when there is none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def model_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (tied weights)."""
    seen: dict[tuple[str, int], int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "meta":
            continue
        key = (str(t.device), t.untyped_storage().data_ptr())
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
    return sum(seen.values())


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at the dotted ``name`` (e.g. ``model.layers.3.mlp.up_proj``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
