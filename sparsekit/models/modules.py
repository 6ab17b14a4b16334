"""Module-level helpers every layer above needs: what counts as a linear layer (GPT-2's ``Conv1D``
recognised by its class name and weight layout [in, out], so nothing here imports transformers),
its weight as [out, in], where a model lives (device, dtype), how many bytes it holds, and
swapping one submodule for another. The model's structure is ``sparsekit.models.anatomy``.
"""

from __future__ import annotations

import torch
from torch import nn


class UnsupportedArchitecture(ValueError):
    """The model has a structure the anatomy cannot describe; the message names the module."""


_LINEAR_LIKE: list[type[nn.Module]] = []


def register_linear_like(cls: type[nn.Module]) -> type[nn.Module]:
    """Let a higher layer's linear replacement (``SparseLinear``) count as a block linear: it must
    have ``in_features``, ``out_features`` and give its weight as ``[out, in]`` through ``linear_weight``."""
    if cls not in _LINEAR_LIKE:
        _LINEAR_LIKE.append(cls)
    return cls


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: y = x @ weight + bias with weight [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_prunable_linear(module: nn.Module) -> bool:
    """A dense linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) whose weight pruning rewrites."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_linear_like(module: nn.Module) -> bool:
    """A prunable linear or a registered replacement of one (``SparseLinear``)."""
    return is_prunable_linear(module) or isinstance(module, tuple(_LINEAR_LIKE))


def int_attr(obj: object, names: tuple[str, ...]) -> int | None:
    """The first of ``names`` that ``obj`` (a module or a config) holds as a positive int."""
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear, Conv1D or registered linear-like module."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return int(module.in_features), int(module.out_features)


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
