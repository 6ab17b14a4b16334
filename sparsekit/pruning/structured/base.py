"""What a structured method is, its configuration and its report.

A structured method removes whole structures (decoder blocks, attention heads, MLP channels)
from a model in place and returns a ``StructuredReport``; the model comes out as an ordinary,
smaller dense model. Methods register by name with ``@register_structured`` so they are chosen
by value (``sparsekit.prune(model, method="flap")``) like the per-layer methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from sparsekit.models import describe

from ..capture import check_forward_dtype

_STRUCTURED: dict[str, type[StructuredMethod]] = {}


@dataclass
class StructuredConfig:
    """How much and how to remove.

    sparsity: fraction of decoder-block parameters to remove (FLAP's counting), in [0, 1).
    remove_layers: depth methods only; the number of blocks to remove (overrides sparsity).
    repair: depth methods; fit a linear map for each removed run and fold it into the block before.
    repair_fit: what the repair fits: "map", ReplaceMe's [H, H] map of the MLP output folded into
      down_proj; "weights", down_proj's weights re-solved on its inputs (``depth.py``).
    heads: "group" removes whole KV groups with their query heads; "query" removes the same number
      of query heads from every KV group (KV heads kept). MHA models (one query head per KV head)
      are the same either way.
    widths: width methods; "uniform" keeps every block the same width (a plain HF checkpoint),
      "adaptive" ranks heads and channels globally across blocks (flap only; per-block widths).
    refit: width methods; re-solve the kept columns of the attention and MLP output projections by
      least squares on calibration inputs (``refit.py``), with a bias column where compensation is on.
    bias_compensation: add the mean output of the removed channels back as a bias of o_proj /
      down_proj (FLAP); skipped with a note where the architecture has no such bias in its config.
    tokens: depth distances over "all" tokens or the "last" token of each calibration sequence.
    subblock_search: sub-block methods; "exhaustive" re-scores every candidate at every step,
      "lazy" re-scores them in the order of their last perplexity and stops early (faster, an
      approximation: ``subblock.py``).
    importance: llm-pruner; "element1" (|w g| summed), "element2" (with the Fisher term) or
      "vector" (|sum w g| per row / column) over each coupled group (``llm_pruner.py``).
    axes: minitron; what it cuts, a comma-separated subset of "hidden", "mlp", "heads"
      (``minitron.py``; default "hidden,mlp", the paper's recipe).
    channel_multiple: kept MLP widths are rounded to a multiple of this (8: aligned GEMMs, and
      2:4 / 4:8 stacking needs a multiple of 4 or 8); 1 disables the rounding.
    forward_dtype: width methods (wanda-sp, flap, llm-pruner) and the cosine depth criteria
      (shortgpt, angular, without the repair); the dtype of their calibration forwards
      (statistics, refit, the scoring pass): "auto" ("bf16-mixed" for an fp32 model where the
      device has fast bf16 matmuls, as the unstructured engine), "model", a torch dtype, or
      "bf16-mixed" / "fp16-mixed" (``capture.ForwardPrecision``). Statistics,
      cosines and solves stay in fp32 / float64; the weights are cut and refitted in their own
      dtype. LLM-Pruner's gradient pass and the depth repair run in the model's dtype.
    """

    sparsity: float = 0.2
    remove_layers: int | None = None
    repair: bool = False
    repair_fit: str = "map"
    heads: str = "group"
    widths: str = "uniform"
    bias_compensation: bool | None = None  # None: the method's default
    refit: bool = False
    tokens: str = "all"
    subblock_search: str = "exhaustive"
    importance: str = "element1"
    axes: str = "hidden,mlp"
    channel_multiple: int = 8
    num_experts: int | None = None  # expert methods: experts every MoE block keeps (overrides sparsity)
    forward_dtype: str | torch.dtype = "auto"
    batch_size: int = 8
    device: str | torch.device | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, str):
            text = self.sparsity.strip()
            try:
                self.sparsity = float(text[:-1]) / 100 if text.endswith("%") else float(text)
            except ValueError:
                raise ValueError(
                    f"structured sparsity {text!r} is not a fraction: give e.g. 0.2 or 20% (N:M patterns "
                    "are for the unstructured methods)"
                ) from None
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"structured sparsity must be in [0, 1), got {self.sparsity}")
        if self.remove_layers is not None and self.remove_layers < 0:
            raise ValueError(f"remove_layers must be >= 0, got {self.remove_layers}")
        for key, allowed in (
            ("heads", ("group", "query")),
            ("widths", ("uniform", "adaptive")),
            ("tokens", ("all", "last")),
            ("subblock_search", ("lazy", "exhaustive")),
            ("importance", ("element1", "element2", "vector")),
            ("repair_fit", ("map", "weights")),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        if self.repair_fit != "map" and not self.repair:
            raise ValueError(f"repair_fit={self.repair_fit!r} chooses what the repair fits: add repair=True")
        bad = [a for a in self.axes_tuple if a not in ("hidden", "mlp", "heads")]
        if bad or not self.axes_tuple:
            raise ValueError(f"axes={self.axes!r}: give a comma-separated subset of hidden, mlp, heads")
        if self.num_experts is not None and self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.channel_multiple < 1:
            raise ValueError(f"channel_multiple must be >= 1, got {self.channel_multiple}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.forward_dtype = check_forward_dtype(self.forward_dtype)
        if self.forward_dtype not in ("auto", "model"):
            if self.repair:
                raise ValueError(
                    f"forward_dtype={self.forward_dtype} with repair=True: the repair fits its maps on "
                    "states in the model's dtype, so the scoring pass runs in it too; drop one of them"
                )

    @property
    def axes_tuple(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a.strip() for a in self.axes.split(",") if a.strip()))


@dataclass
class StructuredReport:
    """What was removed, the parameter counts before and after, and where the time went."""

    method: str
    sparsity: float
    nsamples: int = 0
    seqlen: int = 0
    calib: str = "input_ids"
    params_before: int = 0  # whole model
    params_after: int = 0
    block_params_before: int = 0  # decoder blocks only (what sparsity counts)
    block_params_after: int = 0
    removed_blocks: list[int] = field(default_factory=list)  # indices in the original model
    block_scores: list[float] = field(default_factory=list)  # depth: per-block (or per-start) score
    repaired_blocks: list[int] = field(default_factory=list)  # blocks whose down_proj absorbed a repair
    removed_subblocks: list[dict[str, Any]] = field(default_factory=list)  # block, kind, params, ppl
    widths: list[dict[str, int]] = field(default_factory=list)  # per kept block, after pruning
    widths_before: dict[str, int] = field(default_factory=dict)
    hidden_size: tuple[int, int] | None = None  # minitron: (before, after)
    experts: list[dict[str, Any]] = field(default_factory=list)  # expert methods: per MoE block
    uniform_widths: bool = True
    bias_compensation: bool = False
    forward_dtype: str = ""  # methods that cast their forwards: the dtype they ran in
    timings_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def removed_fraction(self) -> float:
        """Fraction of decoder-block parameters removed."""
        return 1.0 - self.block_params_after / max(self.block_params_before, 1)

    # PruneReport-compatible summary fields, so the CLI prints either report
    @property
    def overall_sparsity(self) -> float:
        return self.removed_fraction

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self)) | {"removed_fraction": self.removed_fraction, "kind": "structured"}


class StructuredMethod:
    """Base class: ``name``, ``needs_calibration`` and ``prune(model, input_ids, config)``."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = True
    structured: ClassVar[bool] = True
    casts_forwards: ClassVar[bool] = False  # runs its calibration forwards in config.forward_dtype

    def prune(
        self, model: nn.Module, input_ids: torch.Tensor | None, config: StructuredConfig
    ) -> StructuredReport:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def register_structured(cls: type[StructuredMethod]) -> type[StructuredMethod]:
    if cls.name in _STRUCTURED:
        raise ValueError(f"structured method {cls.name!r} is registered twice")
    _STRUCTURED[cls.name] = cls
    return cls


def structured_method_names() -> tuple[str, ...]:
    return tuple(_STRUCTURED)


def is_structured(method: object) -> bool:
    return isinstance(method, StructuredMethod) or (isinstance(method, str) and method in _STRUCTURED)


def structured_method(method: str | StructuredMethod) -> StructuredMethod:
    if isinstance(method, StructuredMethod):
        return method
    try:
        return _STRUCTURED[method]()
    except KeyError:
        raise ValueError(
            f"unknown structured method {method!r}; choose one of {', '.join(_STRUCTURED)}"
        ) from None


def block_param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in describe(model).blocks.parameters())


def param_count(model: nn.Module) -> int:
    """Parameters, each storage counted once (tied embeddings)."""
    seen = {}
    for p in model.parameters():
        seen[(p.device, p.data_ptr() if p.device.type != "meta" else id(p))] = p.numel()
    return sum(seen.values())


def check_calibration(input_ids: torch.Tensor | None, name: str) -> None:
    if input_ids is None:
        raise ValueError(f"{name} needs calibration data: pass input_ids [nsamples, seqlen] or calib=")
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            f"calibration input_ids must be a LongTensor [nsamples, seqlen], got {input_ids.dtype} "
            f"{tuple(input_ids.shape)}"
        )
