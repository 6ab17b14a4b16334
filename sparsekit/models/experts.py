"""Mixture-of-Experts blocks in transformers 5.x: fused 3-D experts, their router, shared experts.

transformers 5.x stores a block's experts as two 3-D parameters, ``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I] (transposed: [E, H, 2I] and [E, I, H]; GPT-OSS interleaves gate and up
rows and adds biases ``gate_up_proj_bias`` [E, 2I], ``down_proj_bias`` [E, H]); the experts
module says which with the flags of ``@use_experts_implementation`` (``is_transposed``,
``is_concatenated``, ``has_bias``, ``has_gate``), and where a module has no flags the shapes
tell (H is the model's hidden size). The router is a sibling module holding a ``weight`` [E, H]
(plus ``bias`` or DeepSeek's ``e_score_correction_bias`` buffer, one entry per expert).

``ExpertMatrix`` presents one expert's gate_up (or down) matrix as a linear layer [out, in] whose
weight is a view into the 3-D parameter, so the pruning engine's hooks, methods and write-back
work on experts as on any linear; ``routed_forward`` is the experts' routed sum computed through
those matrices (checked against the module's own forward before it is used).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .modules import int_attr

EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_ATTRS = ("top_k", "num_experts_per_tok")
GROUP_ATTRS = ("num_group", "n_group")
TOPK_GROUP_ATTRS = ("topk_group",)


@dataclass
class ExpertsAnatomy:
    """One MoE block. Paths are relative to the decoder block."""

    moe: str  # the MoE module (router + experts + shared experts)
    experts: str  # the fused experts module
    router: str  # the module holding the router weight [E, H]
    num_experts: int
    top_k: int
    intermediate: int
    hidden: int
    transposed: bool
    concatenated: bool  # [gate | up] rows (True) or interleaved gate/up rows (GPT-OSS)
    has_gate: bool
    bias: bool
    routed_inputs: bool  # forward(hidden, top_k_index, top_k_weights) (False: Llama-4's pre-scaled rows)
    router_rows: tuple[str, ...] = ()  # router tensors with one entry per expert
    moe_rows: tuple[str, ...] = ()  # the MoE module's own such tensors (MiniMax-M2's correction bias)
    shared: tuple[str, ...] = ()  # shared-expert modules (dense MLPs beside the experts)
    routing_linears: tuple[str, ...] = ()  # linears that only route or gate (kept dense)
    groups: int = 1  # group-limited routing (DeepSeek-V3, GLM-4.5): experts per group = E / groups
    topk_group: int = 1
    counts: dict[str, Any] = field(default_factory=dict)  # module attributes holding E, by path

    @property
    def gate_up_name(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"


def find_experts(block: nn.Module, config: Any) -> ExpertsAnatomy | None:
    """The MoE part of a decoder block, or None for a dense block. Raises ValueError naming what it
    could not understand."""
    found = [
        (n, m) for n, m in block.named_modules() if isinstance(getattr(m, "down_proj", None), nn.Parameter)
    ]
    found = [(n, m) for n, m in found if m.down_proj.dim() == 3]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"more than one fused experts module ({', '.join(n for n, _ in found)})")
    path, experts = found[0]
    moe_path = path.rpartition(".")[0]
    moe = block.get_submodule(moe_path) if moe_path else block
    down = experts.down_proj
    count = down.shape[0]
    hidden = getattr(config, "hidden_size", None)
    has_gate = bool(
        getattr(experts, "has_gate", isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter))
    )
    up = experts.gate_up_proj if has_gate else getattr(experts, "up_proj", None)
    if not isinstance(up, nn.Parameter) or up.dim() != 3 or up.shape[0] != count:
        raise ValueError(f"{path}: no 3-D gate_up_proj / up_proj beside down_proj {tuple(down.shape)}")
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:
        if hidden is None or down.shape[1] == down.shape[2]:
            raise ValueError(f"{path}: down_proj {tuple(down.shape)} does not say which side is hidden")
        transposed = down.shape[2] == hidden
    inter = down.shape[1] if transposed else down.shape[2]
    hidden = down.shape[2] if transposed else down.shape[1]
    rows = up.shape[2] if transposed else up.shape[1]
    if rows != (2 if has_gate else 1) * inter:
        raise ValueError(
            f"{path}: {tuple(up.shape)} does not hold {'gate and up' if has_gate else 'up'} of {inter}"
        )
    router_path, router_rows = _router(moe, moe_path, count, hidden, path)
    router = block.get_submodule(router_path)
    top_k = (
        int_attr(router, TOP_K_ATTRS)
        or int_attr(moe, TOP_K_ATTRS)
        or int_attr(config, ("num_experts_per_tok",))
    )
    if not top_k:
        raise ValueError(f"{moe_path}: no top_k on the router, the MoE module or the config")
    routed = len(inspect.signature(experts.forward).parameters) >= 3
    anatomy = ExpertsAnatomy(
        moe=moe_path,
        experts=path,
        router=router_path,
        num_experts=count,
        top_k=top_k,
        intermediate=inter,
        hidden=hidden,
        transposed=bool(transposed),
        concatenated=bool(getattr(experts, "is_concatenated", True)),
        has_gate=has_gate,
        bias=isinstance(getattr(experts, "down_proj_bias", None), nn.Parameter),
        routed_inputs=routed,
        router_rows=router_rows,
        groups=int_attr(router, GROUP_ATTRS) or int_attr(moe, GROUP_ATTRS) or 1,
        topk_group=int_attr(router, TOPK_GROUP_ATTRS) or int_attr(moe, TOPK_GROUP_ATTRS) or 1,
    )
    anatomy.shared, anatomy.routing_linears = _shared(moe, moe_path, path, router_path, count)
    anatomy.moe_rows = tuple(
        n
        for n, t in (*moe.named_parameters(recurse=False), *moe.named_buffers(recurse=False))
        if t.dim() >= 1 and t.shape[0] == count
    )
    anatomy.counts = {
        p: [
            a for a in EXPERT_COUNT_ATTRS if getattr(block.get_submodule(p) if p else block, a, None) == count
        ]
        for p in dict.fromkeys((path, router_path, moe_path))
    }
    return anatomy


def _join(parent: str, leaf: str) -> str:
    return f"{parent}.{leaf}" if parent else leaf


def _router(
    moe: nn.Module, moe_path: str, count: int, hidden: int, experts_path: str
) -> tuple[str, tuple[str, ...]]:
    """The sibling module whose ``weight`` is [E, H], and its tensors with one entry per expert."""
    for name, child in moe.named_children():
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (count, hidden):
            rows = [
                n
                for n, t in (*child.named_parameters(recurse=False), *child.named_buffers(recurse=False))
                if t.dim() >= 1 and t.shape[0] == count
            ]
            return _join(moe_path, name), tuple(rows)
    raise ValueError(f"{experts_path}: no router beside it (a module with a weight [{count}, {hidden}])")


def _shared(moe: nn.Module, moe_path: str, experts_path: str, router_path: str, count: int):
    """(shared-expert modules, routing-only linears) among the MoE module's other children."""
    shared, routing = [], []
    for name, child in moe.named_children():
        path = _join(moe_path, name)
        if path in (experts_path, router_path):
            continue
        if isinstance(child, nn.Linear):
            if child.out_features in (1, count):
                routing.append(path)  # Qwen2-MoE's shared_expert_gate [1, H]
            continue
        if any(isinstance(m, nn.Linear) for m in child.modules()):
            shared.append(path)
    return tuple(shared), tuple(routing)


# ----------------------------------------------------------------------------- expert matrices
class ExpertMatrix(nn.Module):
    """One expert's gate_up (or up, or down) matrix as a linear layer: ``weight`` [out, in] is a view
    into the fused 3-D parameter (writing it writes the expert), ``bias`` [out] likewise."""

    def __init__(self, experts: nn.Module, part: str, index: int, anatomy: ExpertsAnatomy) -> None:
        super().__init__()
        self._experts = [experts]  # not a submodule: the experts stay where they are
        self.part, self.index, self.anatomy = part, index, anatomy

    @property
    def _param(self) -> nn.Parameter:
        name = self.anatomy.gate_up_name if self.part == "gate_up" else "down_proj"
        return getattr(self._experts[0], name)

    @property
    def weight(self) -> torch.Tensor:
        w = self._param[self.index]
        return w.T if self.anatomy.transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        if not self.anatomy.bias:
            return None
        name = f"{self.anatomy.gate_up_name}_bias" if self.part == "gate_up" else "down_proj_bias"
        return getattr(self._experts[0], name)[self.index]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def expert_matrices(block: nn.Module, anatomy: ExpertsAnatomy) -> dict[str, ExpertMatrix]:
    """Every expert's matrices of ``block`` (the block itself or a copy with the same structure)."""
    experts = block.get_submodule(anatomy.experts)
    out = {}
    for e in range(anatomy.num_experts):
        for part in ("gate_up", "down"):
            out[f"{anatomy.experts}.{e}.{part}"] = ExpertMatrix(experts, part, e, anatomy)
    return out


def _apply_gate(experts: nn.Module, anatomy: ExpertsAnatomy, gate_up: torch.Tensor) -> torch.Tensor:
    """The experts' own activation of [T, 2I] gate/up outputs (or [T, I] up outputs) -> [T, I]."""
    if not anatomy.has_gate:
        return experts.act_fn(gate_up)
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def routed_forward(
    experts: nn.Module,
    anatomy: ExpertsAnatomy,
    matrices: dict[str, ExpertMatrix],
    all_tokens: bool = False,
    observe=None,
):
    """A forward for the experts module that computes each expert through its ``ExpertMatrix``
    modules (so their hooks see exactly the tokens the router sends, or every token with
    ``all_tokens``: what a port that ignores routing would calibrate on). Same output as the
    module's own forward (routing weights applied); ``all_tokens`` changes only what the
    matrices see, not the output. ``observe(e, weights [t] | None, y [t, H])`` is called with each
    expert's routed outputs before weighting (weights None where the router pre-scaled the input)."""
    prefix = anatomy.experts

    def run(e: int, x: torch.Tensor) -> torch.Tensor:
        h = _apply_gate(experts, anatomy, matrices[f"{prefix}.{e}.gate_up"](x))
        return matrices[f"{prefix}.{e}.down"](h)

    if all_tokens and not anatomy.routed_inputs:
        raise ValueError(
            f"{prefix} receives its tokens already scaled by the router (Llama-4), so unrouted "
            "statistics cannot be taken: use the routed ones"
        )

    def forward(hidden: torch.Tensor, top_k_index: torch.Tensor | None = None, top_k_weights=None):
        if not anatomy.routed_inputs:  # Llama-4: rows [E * T, H], each expert's block pre-scaled
            rows = hidden.view(anatomy.num_experts, -1, hidden.shape[-1])
            out = torch.zeros_like(rows)
            for e in range(anatomy.num_experts):
                hit = rows[e].abs().sum(-1) > 0  # the tokens routed to e (the others are zero rows)
                if hit.any():
                    y = run(e, rows[e][hit])
                    if observe is not None:
                        observe(e, None, y)
                    out[e, hit] = y.to(out.dtype)
            return out.view(-1, hidden.shape[-1])
        out = torch.zeros_like(hidden)
        for e in range(anatomy.num_experts):
            token, slot = torch.where(top_k_index == e)
            if all_tokens:
                y_all = run(e, hidden)
                y = y_all[token]
            elif len(token):
                y = run(e, hidden[token])
            else:
                continue
            if observe is not None and len(token):
                observe(e, top_k_weights[token, slot], y)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    return forward
