"""Routed experts in a compressed checkpoint: each fused 3-D expert tensor in a sparse format.

transformers 5.x keeps a MoE block's experts as one parameter per matrix kind, [E, out, in]
(``gate_up_proj``, ``down_proj``; [E, in, out] where the family stores them transposed).
``compress_experts`` views the E experts of one such parameter as a single linear weight
[E * out, in] (each expert's rows in the linear layout, so an N:M group runs along the expert's
inputs, exactly as the pruning chose it) and stores it in the format ``format="auto"`` picks for a
linear layer (2:4 where it fits, bitmap where that is smaller than dense; dense tensors stay as
they are). Loading puts a ``StoredExperts`` module where the parameter was, so the checkpoint's
tensors go into its buffers (validated like any compressed layer), and ``densify_experts`` turns it
back into the 3-D parameter.

At inference the routed experts are dense: they run through the family's own experts code
(grouped_mm or its loop), so a compressed MoE checkpoint is smaller on disk and to load, and its
experts are no faster. Attention, dense MLPs and shared experts are linear layers and run sparse
(``SparseLinear``).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from sparsekit.formats.weight import choose_format, weight_format
from sparsekit.models import describe


class StoredExperts(nn.Module):
    """A fused expert tensor as its format's buffers while a checkpoint loads.

    ``rows`` = E * out, ``cols`` = in: the [E * out, in] linear view of the [E, out, in] (or
    transposed [E, in, out]) parameter."""

    def __init__(
        self,
        format: str,
        experts: int,
        rows: int,
        cols: int,
        transposed: bool,
        nnz: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.weight_format = weight_format(format)
        self.experts, self.rows, self.cols, self.transposed = experts, rows, cols, transposed
        for spec in self.weight_format.layout(rows, cols, nnz):
            t = torch.empty(spec.shape, dtype=spec.dtype or dtype or torch.get_default_dtype(), device=device)
            self.register_buffer(spec.name, t)

    def parameter(self) -> nn.Parameter:
        """The dense 3-D expert parameter, zeros where pruned."""
        dense = self.weight_format.to_dense(self, self.rows, self.cols)
        stacked = dense.reshape(self.experts, self.rows // self.experts, self.cols)
        if self.transposed:
            stacked = stacked.transpose(1, 2)
        return nn.Parameter(stacked.contiguous(), requires_grad=False)


def expert_parameters(model: nn.Module) -> dict[str, tuple[int, bool]]:
    """Full name of every fused routed-expert matrix parameter -> (experts, transposed)."""
    anatomy = describe(model)
    out = {}
    for block in anatomy:
        ex = block.experts
        if ex is None:
            continue
        path = f"{anatomy.blocks_path}.{block.index}.{ex.experts}"
        for name in (ex.gate_up_name, "down_proj"):
            out[f"{path}.{name}"] = (ex.num_experts, ex.transposed)
    return out


def _linear_view(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[E, out, in] (or [E, in, out] transposed) -> [E * out, in]."""
    if transposed:
        t = t.transpose(1, 2)
    return t.reshape(-1, t.shape[-1]).contiguous()


def compress_experts(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Replace each sparse fused expert tensor of ``state`` by its compressed tensors
    (``<name>.<tensor>``), in place; return {name: metadata} for the checkpoint's config."""
    infos = {}
    for name, (experts, transposed) in expert_parameters(model).items():
        if name not in state or state[name].dim() != 3:
            continue
        view = _linear_view(state[name], transposed)
        fmt = choose_format(view)
        if fmt.name == "dense":
            continue
        tensors = fmt.compress(view, None)
        del state[name]
        for key, value in tensors.items():
            state[f"{name}.{key}"] = value.contiguous()
        infos[name] = {
            "format": fmt.name,
            "experts": experts,
            "out_features": view.shape[0],
            "in_features": view.shape[1],
            "transposed": transposed,
            "nnz": fmt.stored_nnz(SimpleNamespace(**tensors)) or None,
        }
    return infos


def install_expert_shells(model: nn.Module, infos: dict[str, dict[str, Any]], error: type[Exception]) -> None:
    """Put an empty ``StoredExperts`` (meta device) where the checkpoint stores a fused expert
    tensor compressed; ``error`` is raised when the model has no such parameter of that shape."""
    for name, info in infos.items():
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            parent = None
        old = getattr(parent, "_parameters", {}).get(attr) if parent is not None else None
        if old is None or old.dim() != 3:
            raise error(
                f"checkpoint expert tensor {name} is not a 3-D parameter of {type(model).__name__}; the "
                "config.json and model.safetensors come from different models: save the model again"
            )
        experts, transposed = int(info["experts"]), bool(info["transposed"])
        shape = (old.shape[0], old.shape[1] * old.shape[0], old.shape[2])
        if transposed:
            shape = (old.shape[0], old.shape[2] * old.shape[0], old.shape[1])
        if (experts, info["out_features"], info["in_features"]) != shape:
            raise error(
                f"checkpoint expert tensor {name} holds {experts} experts as [{info['out_features']}, "
                f"{info['in_features']}] but the config builds {list(old.shape)}; the config and the "
                "weights come from different models: save the model again"
            )
        shell = StoredExperts(
            info["format"], experts, info["out_features"], info["in_features"], transposed,
            nnz=info.get("nnz") or 0, dtype=old.dtype, device="meta",
        )  # fmt: skip
        del parent._parameters[attr]
        parent.add_module(attr, shell)
        parent._is_hf_initialized = True  # its _init_weights would reach for the 3-D parameter


def densify_experts(model: nn.Module) -> int:
    """Turn every loaded ``StoredExperts`` back into its dense 3-D parameter; returns how many."""
    shells = [(n, m) for n, m in model.named_modules() if isinstance(m, StoredExperts)]
    for name, shell in shells:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        del parent._modules[attr]
        parent.register_parameter(attr, shell.parameter())
    return len(shells)


def dense_expert_tensor(state: dict[str, torch.Tensor], name: str, info: dict[str, Any]) -> torch.Tensor:
    """Pop a compressed expert tensor's stored tensors from ``state``; return the 3-D tensor."""
    fmt = weight_format(info["format"])
    specs = fmt.layout(info["out_features"], info["in_features"])
    shell = SimpleNamespace(**{spec.name: state.pop(f"{name}.{spec.name}") for spec in specs})
    dense = fmt.to_dense(shell, info["out_features"], info["in_features"])
    stacked = dense.reshape(int(info["experts"]), -1, info["in_features"])
    return (stacked.transpose(1, 2) if info["transposed"] else stacked).contiguous()
