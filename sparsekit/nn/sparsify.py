"""Swap the pruned linear layers of a model's decoder blocks for SparseLinear, and back.

Only the linears (nn.Linear, GPT-2 Conv1D) inside the decoder blocks are candidates: embeddings,
lm_head and norms stay as they are (``quantize(head=True)`` / ``quantize_head`` also swap the
lm_head). After ``sparsify`` the dense weights are no longer referenced
by the model, so they are freed (the caller must not hold them elsewhere).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsekit.formats.weight import WeightFormat, choose_format, weight_format
from sparsekit.models import (
    describe,
    find_decoder_blocks,
    is_conv1d,
    linear_like,
    linear_weight,
    model_bytes,
    set_submodule,
)

from .sparse_linear import SparseLinear

log = logging.getLogger(__name__)


@dataclass
class SparsifyReport:
    """What ``sparsify`` did. Bytes count parameters and buffers (shared tensors once)."""

    layers: dict[str, str] = field(default_factory=dict)  # name -> format
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason
    layer_bytes_before: int = 0
    layer_bytes_after: int = 0
    model_bytes_before: int = 0
    model_bytes_after: int = 0

    @property
    def ratio(self) -> float:
        """Bytes of the swapped layers after / before."""
        return self.layer_bytes_after / max(self.layer_bytes_before, 1)

    def to_dict(self) -> dict[str, Any]:
        formats: dict[str, int] = {}
        for fmt in self.layers.values():
            formats[fmt] = formats.get(fmt, 0) + 1
        return {
            "layers_swapped": len(self.layers),
            "formats": formats,
            "skipped": self.skipped,
            "layer_bytes_before": self.layer_bytes_before,
            "layer_bytes_after": self.layer_bytes_after,
            "layer_ratio": self.ratio,
            "model_bytes_before": self.model_bytes_before,
            "model_bytes_after": self.model_bytes_after,
        }


def release_memory() -> None:
    """Ask glibc to hand freed heap pages back to the OS, so resident memory drops after a swap."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    try:
        ctypes.CDLL(libc_name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def sparse_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Fully qualified name -> linear (or SparseLinear) of every decoder block."""
    prefix, blocks = find_decoder_blocks(model)  # found also when the linears are SparseLinear already
    return {f"{prefix}.{i}.{n}": m for i, block in enumerate(blocks) for n, m in linear_like(block).items()}


def sparsify(
    model: nn.Module,
    format: str | WeightFormat = "auto",
    backend: str = "auto",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> SparsifyReport:
    """Replace the pruned linears of ``model``'s decoder blocks by SparseLinear, in place.

    format: 'auto' (``choose_format``: 2:4 where every group of the layer is 2:4, else bitmap where
    that is smaller than dense, else the layer stays dense), or a format name / ``WeightFormat``
    for every layer (raises on a layer whose zeros do not fit it, e.g. 2:4 on a non-2:4 layer).
    filter_fn(module, name) -> False skips a layer. The model must already be pruned (zeros are
    the mask).
    """
    fixed = None if format == "auto" else weight_format(format)
    report = SparsifyReport(model_bytes_before=model_bytes(model))
    for name, module in sparse_candidates(model).items():
        if isinstance(module, SparseLinear):
            report.skipped[name] = f"already SparseLinear ({module.format})"
            continue
        if filter_fn is not None and not filter_fn(module, name):
            report.skipped[name] = "filter_fn"
            continue
        with torch.no_grad():
            weight = linear_weight(module)
            fmt = choose_format(weight) if fixed is None else fixed
            if fixed is None and fmt.name == "dense":
                report.skipped[name] = "not sparse enough: every sparse format would be larger than dense"
                continue
            if not fmt.fits(weight):
                raise ValueError(
                    f"{name} is not {fmt.name}: its zeros do not fit that format (for 2:4, a group of 4 "
                    "inputs has more than 2 nonzeros); prune it with that pattern first or use "
                    "format='auto' / 'bitmap'"
                )
            new = SparseLinear.from_linear(module, format=fmt, backend=backend)
        new.train(module.training)
        report.layer_bytes_before += sum(t.numel() * t.element_size() for t in module.parameters())
        report.layer_bytes_after += sum(t.numel() * t.element_size() for t in new.parameters())
        report.layer_bytes_after += sum(t.numel() * t.element_size() for t in new.buffers())
        set_submodule(model, name, new)
        report.layers[name] = fmt.name
        del module, weight
    release_memory()
    report.model_bytes_after = model_bytes(model)
    if report.layer_bytes_after > report.layer_bytes_before and not (fixed is not None and fixed.trainable):
        log.warning(
            "format %s makes these layers larger (%.1f MB -> %.1f MB): they are not sparse enough for it; "
            "use format='auto' (keeps such layers dense) or prune more",
            format,
            report.layer_bytes_before / 1e6,
            report.layer_bytes_after / 1e6,
        )
    log.info(
        "sparsified %d layers (%s): %.1f MB -> %.1f MB of layer weights",
        len(report.layers),
        ", ".join(sorted(set(report.layers.values()))) or "none",
        report.layer_bytes_before / 1e6,
        report.layer_bytes_after / 1e6,
    )
    return report


QUANT_FORMATS = ("int8", "int4", "int4-g32", "int4-g128", "int4-g256")


def check_quant_format(format: str) -> str:
    """``format`` if it is one of QUANT_FORMATS, else a ValueError naming the choices."""
    if format not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization {format}; choose one of {', '.join(QUANT_FORMATS)}")
    return format


def quantize(model: nn.Module, format: str = "int8", head: bool = False) -> dict[str, Any]:
    """Weight-only quantize every linear of ``model``'s decoder blocks to ``format``, in place.

    Dense linears and structurally pruned ones become ``format`` (int4: a layer whose inputs the
    group does not divide takes the largest smaller group that does); with int8, layers whose zeros are
    2:4 (plain linears or 2:4 SparseLinear) become 2:4-int8 (int8 values + 2:4 metadata: 0.625
    bytes per weight); other SparseLinear layers are quantized from their weight with zeros (int8
    keeps the zeros exactly, int4's zero points do not). ``head``: the output head (lm_head) too,
    as torchao's ``quantize_`` and llama.cpp's Q8_0 do (``quantize_head``). Returns what was done
    per format.
    """
    check_quant_format(format)
    if head:
        _output_head(model)  # a model without one is refused before any layer changes
    if format.startswith("int4"):
        _refuse_pruned_zeros(model, format)
    for name, module in sparse_candidates(model).items():
        if isinstance(module, SparseLinear):
            set_submodule(model, name, module.to_dense())  # zeros kept; stored again below
    out: dict[str, Any] = {"quantize": format}
    if format == "int8":
        as_24 = {n for n, m in sparse_candidates(model).items() if _has_24_zeros(linear_weight(m))}
        if as_24:
            out["2:4-int8"] = sparsify(model, format="2:4-int8", filter_fn=lambda _, n: n in as_24).to_dict()
    # layers already 2:4-int8 are skipped; an int4 layer whose inputs its group does not divide
    # (a width-pruned layer) takes the largest smaller group that does, else stays in float
    for name in (format, *_INT4_FALLBACK.get(format, ())):
        fmt = weight_format(name)
        swap = sparsify(model, format=fmt, filter_fn=lambda m, _, f=fmt: f.fits(linear_weight(m)))
        if swap.layers or name == format:
            out[name] = swap.to_dict()
    left = [n for n, m in sparse_candidates(model).items() if not isinstance(m, SparseLinear)]
    if left:
        out["kept_float"] = left
        log.warning("%d layers stay in float: no %s group divides their inputs", len(left), format)
    if head:
        out["head"] = quantize_head(model, format)
    return out


def _output_head(model: nn.Module) -> tuple[str, nn.Module, bool]:
    """(name, module, tied to the input embedding) of the model's output head, described afresh (a
    cached description may predate a tie or an untie), or a ValueError saying why there is none."""
    anatomy = describe(model, refresh=True)
    name = anatomy.lm_head
    module = None if name is None else model.get_submodule(name)
    if module is None or not (isinstance(module, (nn.Linear, SparseLinear)) or is_conv1d(module)):
        raise ValueError(
            f"{type(model).__name__} has no linear output head (get_output_embeddings() gives "
            f"{type(module).__name__ if module is not None else None}): quantize it without head=True"
        )
    return name, module, anatomy.tied


def _untie_output_head(model: nn.Module) -> None:
    """Stop transformers from tying lm_head to the input embedding again (on save, load, resize)."""
    configs = [getattr(m, "config", None) for m in model.modules()]
    text = getattr(getattr(model, "config", None), "get_text_config", None)
    configs.append(text() if callable(text) else None)
    for config in configs:
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def quantize_head(model: nn.Module, format: str = "int8") -> dict[str, Any]:
    """Weight-only quantize the output head (lm_head, [vocab, hidden]) to ``format``, in place.

    A head tied to the input embedding is untied first: the embedding table keeps its float
    weights (a decode step reads one of its rows per token) and the head holds its own quantized
    copy, so the model's bytes grow by the head's quantized size while a decode step streams
    ``format``'s bytes for the head instead of the float table. int4 takes the largest group that
    divides the hidden size (int4-g32 last). Returns what was done.
    """
    check_quant_format(format)
    name, module, tied = _output_head(model)
    if isinstance(module, SparseLinear):
        return {"layer": name, "skipped": f"already SparseLinear ({module.format})"}
    with torch.no_grad():
        weight = linear_weight(module)
        chain = (weight_format(n) for n in (format, *_INT4_FALLBACK.get(format, ())))
        fmt = next((f for f in chain if f.fits(weight)), None)
        if fmt is None:
            raise ValueError(
                f"{name} ({tuple(weight.shape)}): no {format} group divides its {weight.shape[1]} inputs; "
                "use int8 for the head"
            )
        new = SparseLinear.from_linear(module, format=fmt)
    before = sum(t.numel() * t.element_size() for t in module.parameters())
    after = sum(t.numel() * t.element_size() for t in (*new.parameters(), *new.buffers()))
    new.train(module.training)
    if tied:
        _untie_output_head(model)
    set_submodule(model, name, new)
    describe(model, refresh=True)  # the cached anatomy still says tied
    log.info(
        "quantized %s to %s (%.1f MB -> %.1f MB%s)",
        name,
        fmt.name,
        before / 1e6,
        after / 1e6,
        "; untied from the input embedding, which stays float" if tied else "",
    )
    return {"layer": name, "format": fmt.name, "untied": tied, "bytes_before": before, "bytes_after": after}


_INT4_FALLBACK = {
    "int4-g256": ("int4-g128", "int4", "int4-g32"),
    "int4-g128": ("int4", "int4-g32"),
    "int4": ("int4-g32",),
}


INT4_MAX_ZEROS = 0.1  # a layer with more zeros than this is pruned: int4 would fill them in


def _refuse_pruned_zeros(model: nn.Module, format: str) -> None:
    """int4's zero points move every zero off zero: refuse a model whose layers are pruned."""
    for name, module in sparse_candidates(model).items():
        weight = module.dense_weight() if isinstance(module, SparseLinear) else linear_weight(module)
        zeros = float((weight == 0).float().mean())
        if zeros > INT4_MAX_ZEROS:
            raise ValueError(
                f"{name} is {zeros:.0%} zeros (pruned): {format} stores asymmetric groups whose zero "
                "points turn every pruned weight back into a non-zero, undoing the pruning. Use int8 "
                "(zeros stay zeros; 2:4 layers become 2:4-int8), or int4 on a dense or structurally "
                "pruned model"
            )


def _has_24_zeros(weight: torch.Tensor) -> bool:
    """2:4 with at least one zero (a dense weight is 'at most 2 of 4' only when half zeros)."""
    from sparsekit.formats.weight import is_24

    return is_24(weight) and bool((weight == 0).any())


def set_format(model: nn.Module, format: str | WeightFormat) -> int:
    """Convert every SparseLinear of ``model`` to ``format`` in place; returns how many changed.

    Converting to 'masked' keeps each layer's mask exactly (fine-tune it, then convert back).
    """
    fmt = weight_format(format)
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear) and module.weight_format is not fmt:
            with torch.no_grad():
                new = module.to_format(fmt)
            new.train(module.training)
            set_submodule(model, name, new)
            count += 1
    release_memory()
    return count


def densify(model: nn.Module) -> int:
    """Replace every SparseLinear by an nn.Linear with zeros kept; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            dense = module.to_dense()
            dense.train(module.training)
            set_submodule(model, name, dense)
            count += 1
    return count
