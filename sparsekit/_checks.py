"""The one check of a prune request, shared by ``sparsekit.prune`` and ``sparsekit prune``.

Every option is either used by the method it comes with or refused here, before the model is
touched: per-layer options (allocation, refine, update, permute, forward_dtype, ...) with a
structured method, depth options (remove_layers, repair, tokens) with anything but a depth method
(tokens: shortgpt / angular only), width options (heads, widths, bias_compensation, refit) with
anything but wanda-sp / flap / llm-pruner / minitron, subblock_search off blockpruner / 2ssp,
importance off llm-pruner, axes off minitron, SparseGPT's blocksize / percdamp without a
SparseGPT solve, OWL's lambda / M without OWL, calibration settings for a method that reads no
data. A structured method needs an explicit amount; a sparsity of 0 is refused. An option counts
as given when it differs from its default. The device is checked (``hf.resources.check_device``)
and calibration memory estimated from the model config (``check_calibration_memory``) before any
calibration work.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsekit.formats import NMPattern, parse_sparsity
from sparsekit.hf.data import DEFAULT_CORPUS
from sparsekit.hf.resources import CalibrationPlan, ModelShape, calibration_memory, check_device, check_memory
from sparsekit.pruning import OWL, PruneConfig, pruning_method
from sparsekit.pruning.structured import (
    EAN,
    FLAP,
    REAP,
    Angular,
    DepthMethod,
    Frequency,
    LLMPruner,
    Minitron,
    RandomExperts,
    StructuredConfig,
    SubblockMethod,
    WidthMethod,
    is_structured,
    structured_method,
    structured_method_names,
)

DEFAULT_SPARSITY = 0.5  # the per-layer methods' default; structured methods have none
DEFAULT_NSAMPLES = 128  # SparseGPT / Wanda defaults
DEFAULT_SEQLEN = 2048

CALIBRATION_INPUTS = ("calib", "nsamples", "seqlen", "seed")
FORWARD_OPTIONS = ("forward_dtype", "batch_size", "share_statistics", "measure_error", "sequential")
SOLVE_OPTIONS = ("blocksize", "percdamp")
OWL_OPTIONS = ("owl_lambda", "owl_m")
EXPERT_OPTIONS = ("expert_tokens", "expert_min_tokens", "prune_routers")  # MoE blocks (engine checks)
PER_LAYER_OPTIONS = (
    *SOLVE_OPTIONS,
    "forward_dtype",
    "allocation",
    *OWL_OPTIONS,
    "refine",
    "update",
    "permute",
    "sequential",
    "share_statistics",
    "measure_error",
    "wbits",
    "wgroup",
    *EXPERT_OPTIONS,
)
DEPTH_OPTIONS = ("remove_layers", "repair", "repair_fit", "tokens")
WIDTH_OPTIONS = ("heads", "widths", "bias_compensation", "refit", "channel_multiple")
WIDTH_FORWARD_OPTIONS = ("forward_dtype",)  # per-layer methods' option that the width methods also honour
SUBBLOCK_OPTIONS = ("subblock_search",)
TAYLOR_OPTIONS = ("importance",)
MINITRON_OPTIONS = ("axes",)
EXPERT_REMOVAL_OPTIONS = ("num_experts",)
COMMON_OPTIONS = ("batch_size", "device", "show_progress")
log = logging.getLogger(__name__)

_NO_SOLVE = ("magnitude", "wanda", "ria")  # registered methods that never read blocksize / percdamp


def _field_defaults(cls) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


DEFAULTS: dict[str, Any] = {
    "calib": DEFAULT_CORPUS,
    "nsamples": DEFAULT_NSAMPLES,
    "seqlen": DEFAULT_SEQLEN,
    "seed": 0,
    "owl_lambda": OWL.lam,
    "owl_m": OWL.m,
    **{k: v for k, v in _field_defaults(PruneConfig).items() if k not in ("method", "sparsity")},
    **{k: v for k, v in _field_defaults(StructuredConfig).items() if k != "sparsity"},
}


def _flags(keys) -> str:
    """'allocation (--allocation), refine (--refine)': the keyword and its CLI flag."""
    return ", ".join(f"{k} (--{k.replace('_', '-')})" for k in keys)


def _it(keys) -> str:
    return "it" if len(keys) == 1 else "them"


def _is_default(key: str, value: Any) -> bool:
    default = DEFAULTS.get(key, dataclasses.MISSING)
    return value is default or (type(value) is type(default) and value == default)


def given(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that differ from their defaults (what a user actually asked for)."""
    return {k: v for k, v in options.items() if not _is_default(k, v)}


@dataclass
class PruneRequest:
    """A checked prune: the method object, its config, and whether it reads calibration data."""

    method: Any
    structured: bool
    config: PruneConfig | StructuredConfig
    needs_calibration: bool
    device: torch.device | None = None


def check_prune_request(
    method: Any,
    sparsity: str | float | None,
    options: Mapping[str, Any],
    calib_is_data: bool = False,
    num_blocks: int | None = None,
) -> PruneRequest:
    """Check one prune step before any work; return its method and config, or raise ValueError.

    options: keyword options (the API's keywords, the CLI's flags with '-' as '_'), defaults
    included or not: only those that differ from their defaults count as given. calib_is_data:
    the calibration comes as token ids already (nsamples / seqlen / seed would do nothing).
    num_blocks: the model's decoder blocks, when known (sparsity and remove_layers may then both
    be given if they agree).
    """
    asked = given(options)
    unknown = sorted(set(asked) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; prune takes {', '.join(sorted(DEFAULTS))}")
    device = check_device(asked["device"]) if asked.get("device") is not None else None
    if is_structured(method):
        request = _structured(method, sparsity, asked, num_blocks)
    else:
        request = _per_layer(method, sparsity, asked)
    _check_calibration_inputs(request, asked, calib_is_data)
    request.device = device
    return request


def _refuse_unused(name: str, keys: list[str], why: str) -> None:
    if keys:
        raise ValueError(f"{_flags(keys)} {'does' if len(keys) == 1 else 'do'} nothing with {name}: {why}")


def _structured(method: Any, sparsity, asked: dict[str, Any], num_blocks: int | None) -> PruneRequest:
    obj = structured_method(method)
    name = obj.name
    if not obj.casts_forwards:
        _refuse_unused(
            name,
            [k for k in WIDTH_FORWARD_OPTIONS if k in asked],
            "of the structured methods only wanda-sp / flap / llm-pruner and shortgpt / angular run "
            "their calibration forwards in it; a per-layer method stacked after this one takes it "
            "(--then-method)",
        )
    elif asked.get("repair"):
        _refuse_unused(
            name,
            [k for k in WIDTH_FORWARD_OPTIONS if k in asked],
            "the repair fits its maps on states in the model's dtype, so with --repair the scoring "
            "pass runs in it too: drop one of them",
        )
    elif isinstance(obj, LLMPruner) and not (asked.get("refit") or asked.get("bias_compensation")):
        _refuse_unused(
            name,
            [k for k in WIDTH_FORWARD_OPTIONS if k in asked],
            "llm-pruner scores by gradients in the model's dtype and runs calibration forwards only for "
            "refit (--refit) or bias compensation (--bias-compensation): add one, or drop it",
        )
    per_layer = [k for k in PER_LAYER_OPTIONS if k in asked and k not in WIDTH_FORWARD_OPTIONS]
    _refuse_unused(
        name,
        per_layer,
        "the per-layer options act on an unstructured or N:M mask and its calibration forwards, and "
        f"{name} removes whole structures; stack a per-layer method after it to use them "
        "(--then-method wanda|sparsegpt|ria, or prune again)",
    )
    depth = isinstance(obj, DepthMethod)
    width = isinstance(obj, WidthMethod | Minitron)  # minitron's refusals are below
    expert = isinstance(obj, REAP | EAN | Frequency | RandomExperts)
    if not expert:
        _refuse_unused(
            name,
            [k for k in EXPERT_REMOVAL_OPTIONS if k in asked],
            "num_experts is for the expert methods (reap, ean, frequency)",
        )
    if not depth:
        _refuse_unused(
            name, [k for k in DEPTH_OPTIONS if k in asked], f"the depth options are for {_depth_names()}"
        )
    elif not obj.uses_tokens:
        _refuse_unused(
            name,
            [k for k in ("tokens",) if k in asked],
            f"{name} scores blocks by the calibration loss, not by cosines over tokens",
        )
    if not width:
        shared = ("widths",) if expert else ()  # expert methods: per-block expert counts
        _refuse_unused(
            name,
            [k for k in WIDTH_OPTIONS if k in asked and k not in shared],
            "the width options are for wanda-sp / flap / llm-pruner / minitron",
        )
    if not isinstance(obj, SubblockMethod):
        _refuse_unused(
            name,
            [k for k in SUBBLOCK_OPTIONS if k in asked],
            "subblock_search is for the sub-block methods (blockpruner)",
        )
    if not isinstance(obj, LLMPruner):
        _refuse_unused(
            name, [k for k in TAYLOR_OPTIONS if k in asked], "importance is llm-pruner's Taylor criterion"
        )
    if not isinstance(obj, Minitron):
        _refuse_unused(
            name, [k for k in MINITRON_OPTIONS if k in asked], "axes is minitron's choice of what to cut"
        )
    else:
        _refuse_unused(
            name,
            [k for k in ("refit", "bias_compensation") if k in asked],
            "minitron keeps uniform widths with no refit or bias; distil after it (finetune --distill)",
        )
        axes = str(asked.get("axes", StructuredConfig.axes))
        if "heads" in asked and "heads" not in axes.split(","):
            _refuse_unused(name, ["heads"], f"axes {axes!r} cuts no heads (add heads to --axes)")
    if asked.get("widths") == "adaptive" and not (isinstance(obj, FLAP) or expert):
        raise ValueError(
            f"widths='adaptive' (--widths adaptive) is flap's global ranking (and the expert methods' "
            f"per-block expert counts); {name} keeps every block the same width: drop it or use --method flap"
        )
    if expert and asked.get("num_experts") is not None:
        if sparsity is not None:
            raise ValueError(
                f"{name}: give sparsity (--sparsity, the fraction of experts to remove) or num_experts "
                "(--num-experts, the experts every MoE block keeps), not both"
            )
        fraction = 0.0
    else:
        fraction = _structured_amount(name, sparsity, asked.get("remove_layers"), depth, num_blocks, expert)
    keys = [
        k
        for k in (
            *DEPTH_OPTIONS,
            *WIDTH_OPTIONS,
            *SUBBLOCK_OPTIONS,
            *TAYLOR_OPTIONS,
            *MINITRON_OPTIONS,
            *EXPERT_REMOVAL_OPTIONS,
            *COMMON_OPTIONS,
            *(WIDTH_FORWARD_OPTIONS if obj.casts_forwards else ()),
        )  # fmt: skip
        if k in asked
    ]
    config = StructuredConfig(sparsity=fraction, **{k: asked[k] for k in keys})
    return PruneRequest(obj, True, config, obj.needs_calibration)


def _depth_names() -> str:
    return " / ".join(n for n in structured_method_names() if isinstance(structured_method(n), DepthMethod))


def _fraction(sparsity: str | float) -> float:
    return StructuredConfig(sparsity=sparsity).sparsity


def _structured_amount(
    name: str, sparsity, remove_layers: int | None, depth: bool, num_blocks: int | None, expert: bool = False
) -> float:
    """The fraction to pass on; refuses a missing, zero or contradicting amount."""
    fraction = None if sparsity is None else _fraction(sparsity)
    amount = "sparsity (--sparsity 0.2: the fraction of decoder-block parameters to remove)"
    if expert:
        amount = (
            "sparsity (--sparsity 0.25: the fraction of experts every MoE block loses) or num_experts "
            "(--num-experts 6: the experts every MoE block keeps)"
        )
    if depth:
        amount += " or remove_layers (--remove-layers 4: the number of blocks to remove)"
    if remove_layers is not None:
        if remove_layers == 0:
            raise ValueError(f"remove_layers 0 removes nothing: give {amount}")
        if fraction and (num_blocks is None or round(fraction * num_blocks) != remove_layers):
            blocks = ""
            if num_blocks is not None:
                blocks = f": round({fraction:g} x {num_blocks} blocks) = {round(fraction * num_blocks)}"
            raise ValueError(
                f"{name}: give sparsity {fraction:g} (--sparsity) or remove_layers {remove_layers} "
                f"(--remove-layers), not both{' (they disagree' + blocks + ')' if blocks else ''}"
            )
        return 0.0
    if fraction is None:
        raise ValueError(f"{name} needs an explicit amount: {amount}")
    if fraction == 0:
        raise ValueError(
            f"sparsity 0 makes {name} remove nothing (after calibrating for nothing): give {amount}"
        )
    return fraction


def _per_layer(method: Any, sparsity, asked: dict[str, Any]) -> PruneRequest:
    obj = pruning_method(method)
    name = obj.name
    structured_keys = [k for k in (*DEPTH_OPTIONS, *WIDTH_OPTIONS) if k in asked]
    _refuse_unused(
        name, structured_keys, "the structured options are for the depth methods, wanda-sp and flap"
    )
    pattern = parse_sparsity(DEFAULT_SPARSITY if sparsity is None else sparsity)
    if not isinstance(pattern, NMPattern) and pattern.sparsity == 0:
        raise ValueError(
            "sparsity 0 prunes nothing (and would calibrate for minutes first): give a sparsity such as "
            "0.5, 50% or 2:4"
        )
    allocation = asked.get("allocation", "uniform")
    owl = [k for k in OWL_OPTIONS if k in asked]
    if owl and allocation != "owl":
        raise ValueError(
            f"{_flags(owl)} only tune{'s' if len(owl) == 1 else ''} allocation='owl' (--allocation owl), "
            f"and the allocation is {allocation}: add --allocation owl, or drop {_it(owl)}"
        )
    if owl:
        allocation = OWL(lam=asked.get("owl_lambda", OWL.lam), m=asked.get("owl_m", OWL.m))
    keys = [k for k in (*PER_LAYER_OPTIONS, *COMMON_OPTIONS) if k in asked and k not in OWL_OPTIONS]
    settings = {k: asked[k] for k in keys}
    if owl:
        settings["allocation"] = allocation
    config = PruneConfig(method=obj, sparsity=pattern, **settings)
    solve = [k for k in SOLVE_OPTIONS if k in asked]
    if solve and name in _NO_SOLVE and config.update.name != "sparsegpt":
        raise ValueError(
            f"{_flags(solve)} only tune{'s' if len(solve) == 1 else ''} SparseGPT's solve, which {name} "
            f"with update={config.update.name!r} does not run: drop {_it(solve)}, "
            "or use --method sparsegpt / --update sparsegpt"
        )
    if not config.needs_calibration:
        _refuse_unused(
            config.label,
            [k for k in FORWARD_OPTIONS if k in asked],
            f"{config.label} reads no calibration data and runs no calibration forwards",
        )
    return PruneRequest(obj, False, config, config.needs_calibration)


def _check_calibration_inputs(request: PruneRequest, asked: dict[str, Any], calib_is_data: bool) -> None:
    inputs = [k for k in CALIBRATION_INPUTS if k in asked]
    name = getattr(request.config, "label", None) or request.method.name
    if not request.needs_calibration:
        _refuse_unused(name, inputs, f"{name} reads no calibration data")
    shaping = [k for k in ("nsamples", "seqlen", "seed") if k in asked]
    if calib_is_data and shaping:
        raise ValueError(
            f"{_flags(shaping)} shape calibration drawn from text, and calib is token ids [n, L] already: "
            "drop them, or pass a corpus name / texts as calib"
        )
    for key, least in (("nsamples", 1), ("seqlen", 2)):
        if key in asked and not asked[key] >= least:
            raise ValueError(f"{key} (--{key}) must be >= {least}, got {asked[key]}")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def calibration_plan(
    request: PruneRequest,
    shape: ModelShape,
    model: nn.Module,
    nsamples: int,
    seqlen: int,
    tokenize: bool,
    device: torch.device,
) -> CalibrationPlan:
    """What ``request`` will hold while it calibrates ``model`` on ``nsamples`` x ``seqlen`` tokens."""
    model_dtype = _model_dtype(model)
    config = request.config
    if request.structured:
        forward_dtype = model_dtype
        copies, stored = 2, 0
        if isinstance(request.method, Angular):
            n = (
                config.remove_layers
                if config.remove_layers is not None
                else round(config.sparsity * shape.layers)
            )
            copies = n + 2  # the window of n + 1 states and the outputs
        if getattr(config, "repair", False):
            copies += 1  # block 0's inputs, kept for the repair pass
            boundary = nsamples * seqlen * shape.hidden * model_dtype.itemsize
            stored = boundary * (shape.layers + 1) if boundary * (shape.layers + 1) <= 4 * 2**30 else 0
            if getattr(config, "repair_fit", "map") == "weights":  # down_proj's normal equations, float64
                stored += 8 * shape.intermediate * (shape.intermediate + shape.hidden + 1)
        if getattr(config, "refit", False):
            copies += 1  # block 0's inputs, kept for the refit pass (its Grams: gram=True below)
        if getattr(request.method, "stores_block_states", False):  # every block's input, kept
            stored = nsamples * seqlen * shape.hidden * model_dtype.itemsize * (shape.layers + 1)
        whole = getattr(request.method, "whole_model", "")
        return CalibrationPlan(
            nsamples, seqlen, config.batch_size, copies, forward_dtype.itemsize, model_dtype.itemsize,
            gram=getattr(config, "refit", False), tokenize=tokenize, stored_bytes=stored,
            whole_model=whole, model_on_device=whole == "forward" and device != _model_device(model),
        )  # fmt: skip
    from sparsekit.pruning.capture import resolve_forward_precision

    precision = resolve_forward_precision(config.forward_dtype, model_dtype, device)
    statistic = config.statistic
    gram = statistic is not None and "gram" in statistic.name.split("+")
    weight_copies = 1 + precision.copies_block(model_dtype) + bool(config.measure_error)
    return CalibrationPlan(
        nsamples, seqlen, config.batch_size, 3, precision.states_dtype(model_dtype).itemsize,
        model_dtype.itemsize, gram=gram,
        tokenize=tokenize, block_weight_copies=weight_copies,
    )  # fmt: skip


def check_calibration_memory(
    request: PruneRequest, model: nn.Module, nsamples: int, seqlen: int, tokenize: bool = True
) -> None:
    """Refuse, before calibration, a run whose estimated memory exceeds what is free (see
    ``hf.resources``). Does nothing for a method that reads no calibration data."""
    if not request.needs_calibration:
        return
    try:
        shape = ModelShape.from_model(model)
    except ValueError as exc:  # a model without a transformers config: nothing to estimate from
        log.info("%s; calibration memory is not checked", exc)
        return
    device = request.device or _model_device(model)
    plan = calibration_plan(request, shape, model, nsamples, seqlen, tokenize, device)
    estimates = calibration_memory(shape, plan, device)
    host_weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cpu")
    check_memory(estimates, plan, host_weights)
