"""What this machine offers, checked before any work: the compute device and the memory calibration needs.

``check_device`` parses a device name, checks that its backend works here and that the index exists,
and names the devices that do. ``calibration_memory`` estimates, from the model config alone, what
one-shot pruning's calibration holds on the compute device and on the host: the decoder-block
inputs and outputs kept across blocks (``copies x nsamples x seqlen x hidden_size`` in the forward
dtype), one block's statistics (a float64 Gram matrix ``in_features^2`` per distinct linear input
for SparseGPT / ADMM, a vector otherwise), one block's weights and one batch's activations, and on
the host the tokenized calibration pool. ``check_memory`` refuses an estimate larger than what is
free (``/proc/meminfo`` MemAvailable for the host, ``torch.cuda.mem_get_info`` for CUDA), with the
estimate, the memory available and what to change. The estimate is a floor, not a bound: attention
scores, allocator slack and other processes come on top.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from sparsekit._memory import host_available_bytes

log = logging.getLogger(__name__)

GIB = 2**30
_POOL_FACTOR = 4  # calibration_ids tokenizes until it holds 4x the tokens it needs
_POOL_BYTES_PER_TOKEN = 8 + 28 + 8  # a Python list slot and int, then the int64 tensor built from it
_GRAM_BYTES = 8 + 4  # float64 running total + the fp32 partial of the current chunk (then fp32 value)
_BACKENDS = ("cuda", "mps", "xpu")
HEADROOM = 0.9  # calibration may plan on this fraction of the free memory (the estimate is a floor)


def _backend_count(kind: str) -> int:
    """Devices of a torch backend usable here (0 when torch lacks it or finds none)."""
    if kind == "cpu":
        return 1
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return 1 if mps is not None and mps.is_available() else 0
    module = getattr(torch, kind, None)
    is_available = getattr(module, "is_available", None)
    if not callable(is_available) or not is_available():
        return 0
    count = getattr(module, "device_count", None)
    return int(count()) if callable(count) else 1


def available_devices() -> list[str]:
    """Every device a tensor can go to here: 'cpu', then 'cuda:0', ..., 'mps', 'xpu:0', ..."""
    names = ["cpu"]
    for kind in _BACKENDS:
        count = _backend_count(kind)
        names += [kind] if kind == "mps" and count else [f"{kind}:{i}" for i in range(count)]
    return names


def _why_unavailable(kind: str) -> str:
    if kind == "cuda":
        if torch.version.cuda is None:
            return f"this torch ({torch.__version__}) is built without CUDA"
        return "torch finds no CUDA GPU (driver, CUDA_VISIBLE_DEVICES?)"
    if getattr(torch, kind, None) is None and kind != "mps":
        return f"this torch ({torch.__version__}) has no {kind} backend"
    return f"torch finds no {kind} device here"


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` if tensors can run there; else ValueError naming what can.

    Checks that the name parses, that its backend is built into torch and finds a device, and
    that the index is below the number of devices. Nothing is allocated.
    """
    available = ", ".join(available_devices())
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"device {str(device)!r} is not a device name ({reason}); available here: {available}"
        ) from None
    if parsed.type == "meta":
        raise ValueError(f"device 'meta' holds no data to compute with; available here: {available}")
    if parsed.type == "cpu":
        return parsed
    count = _backend_count(parsed.type)
    if count == 0:
        raise ValueError(
            f"device {str(device)!r}: {_why_unavailable(parsed.type)}; available here: {available}"
        )
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(
            f"device {str(device)!r}: there {'is' if count == 1 else 'are'} only {count} {parsed.type} "
            f"device{'s' if count > 1 else ''} here; available here: {available}"
        )
    return parsed


@dataclass(frozen=True)
class ModelShape:
    """The sizes calibration memory depends on (the widest block of the model's anatomy)."""

    hidden: int
    layers: int
    intermediate: int
    attention_width: int  # heads x head_dim: o_proj's input
    kv_width: int  # kv heads x head_dim: k_proj's and v_proj's output
    gated: bool = True  # gate/up/down MLP (LLaMA-style) or up/down (GPT-2, OPT)
    vocab: int = 0  # the lm_head's outputs (0: unknown)
    params: int = 0  # every parameter of the model (0: unknown)

    @classmethod
    def from_model(cls, model) -> ModelShape:
        """The sizes of the model's widest decoder block, from its anatomy (``sparsekit.models``):
        per-block head counts and widths (Gemma-4's global layers, hybrid blocks) as they are."""
        from sparsekit.models import UnsupportedArchitecture, describe, in_out_features

        try:
            anatomy = describe(model)
        except UnsupportedArchitecture as exc:
            raise ValueError(f"cannot estimate calibration memory: {exc}") from None
        hidden = anatomy.hidden_size or max(in_out_features(m)[0] for m in anatomy[0].linears.values())
        attention = max((b.attention.heads * b.attention.head_dim for b in anatomy if b.attention), default=0)
        kv = max((b.attention.kv_heads * b.attention.head_dim for b in anatomy if b.attention), default=0)
        inter = max((b.mlp.intermediate for b in anatomy if b.mlp), default=4 * hidden)
        gated = any(b.mlp is not None and b.mlp.gate is not None for b in anatomy)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = int(head.weight.shape[0]) if getattr(head, "weight", None) is not None else 0
        params = sum(p.numel() for p in model.parameters())
        return cls(hidden, len(anatomy), inter, attention or hidden, kv or hidden, gated, vocab, params)

    @property
    def block_params(self) -> int:
        attention = 2 * self.hidden * self.attention_width + 2 * self.hidden * self.kv_width
        return attention + (3 if self.gated else 2) * self.hidden * self.intermediate

    @property
    def linear_inputs(self) -> tuple[int, ...]:
        """in_features of each distinct linear input of a block: q/k/v, o_proj, gate/up, down_proj."""
        return (self.hidden, self.attention_width, self.hidden, self.intermediate)


@dataclass
class CalibrationPlan:
    """What a prune will calibrate with: sizes, dtypes' bytes, and what it keeps across blocks.

    copies: hidden-state tensors [nsamples, seqlen, hidden] alive at once (the per-layer engine:
    a block's inputs, dense outputs and pruned outputs; depth methods: their window of states).
    gram: the statistics are Gram matrices (SparseGPT, update='sparsegpt' / 'admm').
    tokenize: the calibration ids come from text (a pool of 4x the needed tokens on the host).
    stored_bytes: anything else kept on the compute device (a depth repair's dense states).
    whole_model: "" (block by block), "forward" (the whole model runs a batch to its loss: the
    shortened-ppl criterion) or "backward" (and back: gradients of every block, shortened-taylor).
    model_on_device: the whole model's weights move to the compute device for it.
    """

    nsamples: int
    seqlen: int
    batch_size: int
    copies: int
    forward_bytes: int
    model_bytes: int
    gram: bool = False
    tokenize: bool = True
    block_weight_copies: int = 1  # the block itself, a forward-dtype copy, the dense weights kept
    stored_bytes: int = 0
    whole_model: str = ""
    model_on_device: bool = False


@dataclass
class MemoryEstimate:
    """Bytes one place (the compute device or the host) holds: ``parts`` by name; ``per_sample``:
    the part that grows with each calibration sample (for 'at most N samples fit')."""

    where: str
    parts: dict[str, int] = field(default_factory=dict)
    per_sample: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return "; ".join(f"{name}: {_gib(b)}" for name, b in self.parts.items() if b > 0)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def calibration_memory(
    shape: ModelShape, plan: CalibrationPlan, device: torch.device
) -> list[MemoryEstimate]:
    """Estimates for the compute device and the host (one entry when the device is the CPU)."""
    tokens = plan.nsamples * plan.seqlen
    sample_states = plan.copies * plan.seqlen * shape.hidden * plan.forward_bytes
    on_device = {
        f"block inputs/outputs ({plan.copies} x {plan.nsamples} x {plan.seqlen} x {shape.hidden} x "
        f"{plan.forward_bytes} bytes)": plan.nsamples * sample_states,
        "one block's weights": shape.block_params * plan.model_bytes * plan.block_weight_copies,
        "one batch's activations": plan.batch_size
        * plan.seqlen
        * (3 * shape.intermediate + 4 * shape.hidden)
        * plan.forward_bytes,
    }
    if plan.gram:
        on_device["one block's Gram statistics (float64)"] = (
            sum(k * k for k in shape.linear_inputs) * _GRAM_BYTES
        )
    else:
        on_device["one block's statistics"] = sum(shape.linear_inputs) * 3 * 8
    if plan.stored_bytes:
        on_device["hidden states kept across blocks (a repair, a sub-block search)"] = plan.stored_bytes
    whole_device, whole_host = _whole_model_parts(shape, plan)
    on_device |= whole_device
    host_per_sample = plan.seqlen * 8 + (
        _POOL_FACTOR * plan.seqlen * _POOL_BYTES_PER_TOKEN if plan.tokenize else 0
    )
    host = {"calibration token ids": tokens * 8} | whole_host
    if plan.tokenize:
        host[f"tokenized text pool ({_POOL_FACTOR}x the tokens)"] = (
            tokens * _POOL_FACTOR * _POOL_BYTES_PER_TOKEN
        )
    if device.type == "cpu":
        return [MemoryEstimate("cpu", on_device | host, sample_states + host_per_sample)]
    return [
        MemoryEstimate(str(device), on_device, sample_states),
        MemoryEstimate("host", host, host_per_sample),
    ]


def _whole_model_parts(shape: ModelShape, plan: CalibrationPlan) -> tuple[dict[str, int], dict[str, int]]:
    """(device parts, host parts) of a criterion that runs a batch to the model's loss besides the
    block-wise parts: the batch's logits (and their fp32 log-softmax); with a backward
    (``block_gradients``: one block at a time) every block's input for one batch (on the host when
    the device is an accelerator), one block's activations and weight gradients, and the gradient
    sums over the batches (float64 at most, on the host); the weights when they move to the device."""
    if not plan.whole_model:
        return {}, {}
    backward = plan.whole_model == "backward"
    tokens = plan.batch_size * plan.seqlen
    device = {
        f"one batch's logits ({tokens} tokens x {shape.vocab} x fp32, {3 if backward else 2} copies)": tokens
        * shape.vocab
        * 4
        * (3 if backward else 2)
    }
    host: dict[str, int] = {}
    if backward:
        per_block = tokens * (3 * shape.intermediate + 6 * shape.hidden + 2 * shape.attention_width)
        device["one block's activations for its backward"] = per_block * plan.model_bytes
        device["one block's weight gradients"] = shape.block_params * plan.model_bytes
        host["every block's input for one batch"] = (
            tokens * shape.hidden * (shape.layers + 1) * plan.model_bytes
        )
        host["gradient sums of every block (float64)"] = shape.block_params * shape.layers * 8
    if plan.model_on_device:
        device["the whole model's weights"] = shape.params * plan.model_bytes
    return device, host


def available_memory(where: str) -> tuple[int, str] | None:
    """(free bytes, where the number comes from) for 'cpu' / 'host' or a CUDA device; None if unknown."""
    if where in ("cpu", "host"):
        free = host_available_bytes()
        return None if free is None else (free, "MemAvailable in /proc/meminfo")
    device = torch.device(where)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"torch.cuda.mem_get_info({device})"
    return None


def check_memory(estimates: list[MemoryEstimate], plan: CalibrationPlan, host_weights_bytes: int = 0) -> None:
    """Raise ValueError when an estimate exceeds the free memory of its place, with what to change.

    host_weights_bytes: the model's weights already on the host (suggests --offload-folder when
    they are a large part of it).
    """
    for estimate in estimates:
        found = available_memory(estimate.where)
        if found is None:
            log.info(
                "no free-memory figure for %s: calibration needs about %s there",
                estimate.where,
                _gib(estimate.total),
            )
            continue
        free, source = found
        log.debug("calibration on %s: about %s of %s free", estimate.where, _gib(estimate.total), _gib(free))
        if estimate.total <= HEADROOM * free:
            continue
        raise ValueError(_too_big(estimate, free, source, plan, host_weights_bytes))


def _too_big(
    estimate: MemoryEstimate, free: int, source: str, plan: CalibrationPlan, host_weights: int
) -> str:
    fixed = estimate.total - plan.nsamples * estimate.per_sample
    budget = int(HEADROOM * free)
    fit = (budget - fixed) // estimate.per_sample if estimate.per_sample else 0
    if fit >= 1:
        fewer = f"fewer samples (nsamples / --nsamples: at most {fit} fit at seqlen {plan.seqlen})"
    else:
        fewer = f"fewer samples cannot help: the fixed part alone ({_gib(fixed)}) does not fit"
    advice = [fewer, "shorter sequences (seqlen / --seqlen)"]
    batch = next((b for name, b in estimate.parts.items() if name.startswith("one batch")), 0)
    if plan.batch_size > 1 and batch > estimate.total / 10:
        advice.append("a smaller batch_size / --batch-size")
    if estimate.where in ("cpu", "host") and host_weights > free // 4:
        advice.append(
            f"keeping the model's weights ({_gib(host_weights)} on the host) on disk with --offload-folder "
            "(load_model(..., offload_folder=))"
        )
    elif estimate.where not in ("cpu", "host"):
        advice.append("another device (--device / device=) with more free memory")
    return (
        f"calibration would hold about {_gib(estimate.total)} on {estimate.where}, but {_gib(free)} is "
        f"free there ({source}; calibration plans on {round(100 * HEADROOM)}% of it): {estimate.describe()}. "
        "Use " + ", or ".join(advice)
    )
