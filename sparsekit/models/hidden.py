"""Where the hidden (residual-stream) dimension lives: every tensor a hidden-size cut must slice.

A model's hidden size is the width of its residual stream. The embedding writes it, every block's
norms read it (and scale it per channel), the attention and MLP input projections read it, their
output projections write it, and the final norm and the lm_head read it. ``hidden_map(model)``
lists all of these from the model anatomy (a hybrid's mixer linears too: ``linear_role``), and
lists as ``problems`` anything else in the model with a dimension of the hidden size that it
cannot place (routed experts, Gemma-4's model-level per-layer projection), so a cut never leaves
a tensor of the old width behind.

Norms are found by shape: a module (not a linear, not a q/k norm) whose own parameters are all
vectors of the hidden size. The q/k norms and attention sinks span heads, not the hidden size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .anatomy import ModelAnatomy, describe
from .families import ROLE_NAMES
from .modules import UnsupportedArchitecture, in_out_features, is_conv1d, is_linear_like

READS, WRITES = "reads", "writes"  # a linear's input columns / output rows are hidden channels


@dataclass
class HiddenMap:
    """Every place the hidden size ``size`` appears, by qualified module name.

    reads / writes: linears whose input columns / output rows (and bias) are hidden channels.
    norms: residual-stream norms inside the blocks, in block order (their outputs score channels).
    final_norms: norms outside the blocks (the final norm): their input is the last block's output.
    vectors: (module, parameter, dim) of every other hidden-sized axis (the embedding's columns,
      position embeddings, a tied or untied lm_head's columns, each norm's weight and bias).
    embedding_gain: the factor the embedding module multiplies its rows by (Gemma: sqrt(hidden)).
    problems: what has a hidden-sized dimension and is none of the above.
    """

    size: int
    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    final_norms: list[str] = field(default_factory=list)
    vectors: list[tuple[str, str, int]] = field(default_factory=list)
    embedding: str | None = None
    embedding_gain: float = 1.0
    problems: list[str] = field(default_factory=list)

    @property
    def gain_follows_size(self) -> bool:
        """The embedding scale is sqrt(hidden size), so the family's code rebuilds it from the
        config (Gemma's scaled embedding): a cut changes it."""
        return self.embedding_gain != 1.0 and math.isclose(self.embedding_gain, self.size**0.5, rel_tol=1e-3)


def _own_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters(recurse=False))


def is_hidden_norm(module: nn.Module, size: int) -> bool:
    """A norm over the residual stream: not a linear, its own parameters all vectors of ``size``."""
    own = _own_params(module)
    return (
        bool(own)
        and not is_linear_like(module)
        and not isinstance(module, nn.Embedding)
        and all(tuple(p.shape) == (size,) for p in own.values())
    )


def _linear_dims(module: nn.Module, role: str) -> list[tuple[str, int]]:
    """(parameter, dim) of a linear's hidden axis: its input columns or its output rows and bias."""
    conv = is_conv1d(module)
    if role == READS:
        return [("weight", 0 if conv else 1)]
    dims = [("weight", 1 if conv else 0)]
    return dims + ([("bias", 0)] if getattr(module, "bias", None) is not None else [])


def embedding_gain(embedding: nn.Module) -> float:
    """What the embedding module multiplies a row of its weight by (1.0 for a plain nn.Embedding)."""
    if embedding.weight.is_meta:
        return 1.0
    ids = torch.arange(min(4, embedding.weight.shape[0]), device=embedding.weight.device)
    with torch.no_grad():
        out = embedding(ids).double()
        rows = embedding.weight[ids].double()
    denom = (rows * rows).sum()
    return 1.0 if denom == 0 else round(float((out * rows).sum() / denom), 6)


def linear_role(name: str, module: nn.Module, size: int) -> str | None:
    """Whether a linear outside the attention and MLP (a mixer's, a per-layer input gate's) reads
    or writes the residual stream: by its shape where one side only is the hidden size, by its
    name (an output projection: ``ROLE_NAMES["o"]``) where both are; None where neither tells."""
    in_f, out_f = in_out_features(module)
    if in_f == size and out_f != size:
        return READS
    if out_f == size and in_f != size:
        return WRITES
    if in_f == out_f == size:
        leaf = name.rpartition(".")[2]
        return WRITES if leaf in ROLE_NAMES["o"] else READS if leaf.startswith("in_proj") else None
    return None


def _block_parts(anatomy: ModelAnatomy, out: HiddenMap) -> set[str]:
    """Fill reads / writes / norms from the blocks; the qualified names of what was placed."""
    placed: set[str] = set()
    for b in anatomy:
        prefix = anatomy.block_name(b.index)
        if b.experts is not None:
            out.problems.append(
                f"{prefix}: routed experts ({b.experts.moe}) are not cut along the hidden size"
            )
        roles: dict[str, str] = {}
        if b.mixer is not None:  # its inside (a convolution over its own channels) is not the stream
            placed.add(f"{prefix}.{b.mixer}")
        if b.attention is not None:
            roles |= {n: READS for n in b.attention.producers} | {b.attention.o: WRITES}
            placed |= {f"{prefix}.{n.path}" for n in b.attention.norms}
            if b.attention.path:
                placed.add(f"{prefix}.{b.attention.path}")
        if b.mlp is not None:
            roles |= {n: READS for n in b.mlp.producers} | {b.mlp.down: WRITES}
        for name, module in b.linears.items():
            if name not in roles:
                role = linear_role(name, module, out.size)
                if role is None:
                    out.problems.append(
                        f"{prefix}.{name}: a linear beside attention and MLP whose hidden side is unclear"
                    )
                else:
                    roles[name] = role
        for name, role in roles.items():
            (out.reads if role == READS else out.writes).append(f"{prefix}.{name}")
            placed.add(f"{prefix}.{name}")
        for name, module in b.module.named_modules():
            full = f"{prefix}.{name}" if name else prefix
            if not _inside(full, placed) and is_hidden_norm(module, out.size):
                out.norms.append(full)
                placed.add(full)
    return placed


def hidden_map(model: nn.Module) -> HiddenMap:
    """The hidden-size map of ``model`` (``problems`` empty when a hidden cut can be done)."""
    anatomy = describe(model)
    size = anatomy.hidden_size
    if not isinstance(size, int):
        return HiddenMap(0, problems=["the config states no hidden_size"])
    out = HiddenMap(size, embedding=anatomy.embedding)
    placed = _block_parts(anatomy, out)
    for name in out.reads + out.writes:
        module = model.get_submodule(name)
        out.vectors += [(name, p, d) for p, d in _linear_dims(module, READS if name in out.reads else WRITES)]
    out.vectors += [(n, p, 0) for n in out.norms for p in _own_params(model.get_submodule(n))]
    blocks = anatomy.blocks_path + "."
    seen: set[int] = set()
    for name, module in model.named_modules():
        if name == anatomy.blocks_path or name.startswith(blocks) or name in placed:
            continue
        own = {p: t for p, t in _own_params(module).items() if id(t) not in seen}
        seen |= {id(t) for t in own.values()}
        if not own:
            continue
        if name in (anatomy.embedding, anatomy.lm_head) or (
            isinstance(module, nn.Embedding) and module.embedding_dim == size
        ):
            if module.weight.shape[-1] != size:
                out.problems.append(f"{name}: weight {tuple(module.weight.shape)} has no hidden-size columns")
            out.vectors.append((name, "weight", 1))
            continue
        if is_hidden_norm(module, size):
            out.final_norms.append(name)
            out.vectors += [(name, p, 0) for p in own]
            continue
        role = linear_role(name, module, size) if is_linear_like(module) else None
        if role is not None:  # outside the blocks, e.g. Gemma-4's per-layer-input projection of the embedding
            (out.reads if role == READS else out.writes).append(name)
            out.vectors += [(name, p, d) for p, d in _linear_dims(module, role)]
            continue
        for p, t in own.items():
            if size in t.shape:
                out.problems.append(f"{name}.{p} {tuple(t.shape)}: a hidden-size axis of unknown role")
    for name in (
        anatomy.blocks_path,
        *(n for n, _ in anatomy.blocks.named_modules(prefix=anatomy.blocks_path)),
    ):
        module = model.get_submodule(name)
        if name in placed or is_hidden_norm(module, size) or is_linear_like(module):
            continue
        for p, t in _own_params(module).items():
            if size in t.shape and not _inside(name, placed):
                out.problems.append(f"{name}.{p} {tuple(t.shape)}: a hidden-size axis of unknown role")
    if anatomy.embedding is not None:
        out.embedding_gain = embedding_gain(model.get_submodule(anatomy.embedding))
    return out


def _inside(name: str, placed: set[str]) -> bool:
    """``name`` is one of ``placed`` or inside one (a linear's own submodules)."""
    return any(name == p or name.startswith(p + ".") for p in placed)


def require_hidden_cut(hmap: HiddenMap, what: str) -> None:
    if hmap.problems:
        shown = "; ".join(hmap.problems[:3])
        more = f" (and {len(hmap.problems) - 3} more)" if len(hmap.problems) > 3 else ""
        raise UnsupportedArchitecture(
            f"{what} cannot cut this model's hidden size: {shown}{more}. Cut MLP channels and heads "
            "only (axes='mlp,heads'), or use another width method"
        )
