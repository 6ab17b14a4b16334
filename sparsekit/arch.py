"""Model structure: decoder blocks and their linear layers, found by structure not by name.

One generic finder: the decoder stack is the ModuleList holding ``config.num_hidden_layers``
blocks that contain linear layers. torch only: GPT-2's ``Conv1D`` is recognised by its class
name and weight layout ([in, out]), so nothing here imports transformers. Also the one home of
the small model-level helpers every layer above needs: where a model lives (device, dtype), how
many bytes it holds, and swapping one submodule for another.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ChannelFold:
    """Input channels of ``consumer`` that its ``producers`` make, so permuting the consumer's input
    columns is free at run time when the producers' output rows take the same permutation.

    The producers' outputs are ``segments`` runs of ``width`` channels (KV heads; one run for an
    MLP), each permuted on its own; the consumer's input is ``segments * repeats`` runs, run j made
    by producer run j // repeats (the query heads sharing a KV head)."""

    consumer: str
    producers: tuple[str, ...]
    width: int
    segments: int = 1
    repeats: int = 1


_MLP_FOLDS = (
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    (("fc1",), "fc2"),
    (("mlp.c_fc",), "mlp.c_proj"),
)
_ATTN_FOLDS = (("self_attn.v_proj", "self_attn.o_proj"), ("self_attn.v_proj", "self_attn.out_proj"))


def channel_folds(block: nn.Module) -> list[ChannelFold]:
    """The foldable (producer rows -> consumer columns) pairs of one decoder block: the MLP's hidden
    channels (elementwise between the layers) and the attention's value channels per KV head.
    Shapes are checked; a pair whose shapes do not fit, or an attention with a norm on v, is left out."""
    linears = block_linears(block)
    folds = []
    for producers, consumer in _MLP_FOLDS:
        if consumer in linears and all(p in linears for p in producers):
            width = linear_weight(linears[consumer]).shape[1]
            if all(linear_weight(linears[p]).shape[0] == width for p in producers):
                folds.append(ChannelFold(consumer, producers, width))
    for producer, consumer in _ATTN_FOLDS:
        if producer not in linears or consumer not in linears:
            continue
        attn = block.get_submodule(producer.rpartition(".")[0])
        head_dim = getattr(attn, "head_dim", None)
        repeats = getattr(attn, "num_key_value_groups", 1)
        v_out = linear_weight(linears[producer]).shape[0]
        o_in = linear_weight(linears[consumer]).shape[1]
        if not isinstance(head_dim, int) or hasattr(attn, "v_norm") or v_out % head_dim:
            continue
        if o_in == v_out * repeats:
            folds.append(ChannelFold(consumer, (producer,), head_dim, v_out // head_dim, repeats))
    return folds
