"""The model described once: decoder blocks, and per block its attention, MLP and other linears.

``describe(model)`` finds the structure from the module tree, the shapes and the config:
- the decoder stack: the shallowest ``ModuleList`` of ``config.num_hidden_layers`` blocks that all
  hold linear layers (``nn.Linear``, GPT-2's ``Conv1D``, or a registered ``SparseLinear``);
- per block, the attention: the module holding q/k/v projections (separate, or one fused
  projection whose row layout ``families.Family`` names) and its output projection, with
  head_dim, query heads, KV heads, queries per head row (Qwen3.5's gated queries are two), the
  q/k norms (per head, left alone by width cuts, or over all heads, sliced) and per-head
  parameters (attention sinks);
- per block, the MLP: gated (gate, up, down; or a fused ``gate_up``) or plain (up, down);
- everything else a block holds (a linear-attention or convolution mixer of a hybrid model,
  Gemma-4's per-layer input gates) stays in ``linears``: unstructured methods prune it, width
  methods leave it whole;
- the config lists with one entry per block (``layer_types``), the embedding and the lm_head.

Pruning code asks this description for projections, heads and channels; it never names a module.
What the anatomy cannot describe is recorded per block (``BlockAnatomy.problems``) and refused
by the methods that need it, naming the module and what was not understood.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .experts import ExpertsAnatomy, expert_matrices, find_experts
from .families import (
    HEAD_COUNT_ATTRS,
    KV_COUNT_ATTRS,
    QK_NORM_NAMES,
    QKV_CONCAT,
    QKV_GROUPED,
    QKV_PER_HEAD,
    ROLE_NAMES,
    family,
)
from .modules import UnsupportedArchitecture, in_out_features, int_attr, is_linear_like, is_prunable_linear
from .skipped import SKIPPED_KINDS, skipped_parts

SEPARATE = "separate"


def head_channels(heads: torch.Tensor, width: int) -> torch.Tensor:
    """Channel indices [len(heads) * width] of the given head indices (in order)."""
    heads = heads.reshape(-1).long()
    return (heads[:, None] * width + torch.arange(width, device=heads.device)).reshape(-1)


@dataclass
class QKNorm:
    """A norm on the queries or keys: ``per_head`` (weight [head_dim], shared by every head),
    ``all_heads`` (weight [heads * head_dim]), ``head_rows`` (weight [heads, head_dim]) or
    ``head_list`` (a ModuleList with one norm per head)."""

    path: str  # relative to the block
    role: str  # "q" | "k"
    kind: str


@dataclass
class AttentionAnatomy:
    """Where the heads of one attention module live. Names are relative to the block."""

    path: str
    q: str
    k: str
    v: str
    o: str
    layout: str  # SEPARATE, or a fused layout of families (concat, per_head, grouped)
    head_dim: int
    heads: int  # query heads
    kv_heads: int
    q_width: int = 1  # query rows per head / head_dim (2: [q_h, gate_h] gated queries)
    norms: list[QKNorm] = field(default_factory=list)
    head_params: list[str] = field(default_factory=list)  # attention parameters with one row per head

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    @property
    def producers(self) -> tuple[str, ...]:
        """The distinct linears that make q, k and v."""
        return tuple(dict.fromkeys((self.q, self.k, self.v)))

    def producer_rows(self, q_heads: torch.Tensor, kv_heads: torch.Tensor) -> dict[str, torch.Tensor]:
        """Output rows of each producer that belong to the given query and KV heads, in the order
        the attention module reads them once the other heads are gone."""
        hd, qw = self.head_dim, self.q_width
        if self.layout == SEPARATE:
            return {
                self.q: head_channels(q_heads, hd * qw),
                self.k: head_channels(kv_heads, hd),
                self.v: head_channels(kv_heads, hd),
            }
        if self.layout == QKV_CONCAT:
            q_rows = self.heads * hd * qw
            kv_rows = self.kv_heads * hd
            rows = [head_channels(q_heads, hd * qw), q_rows + head_channels(kv_heads, hd)]
            rows.append(q_rows + kv_rows + head_channels(kv_heads, hd))
            return {self.q: torch.cat(rows)}
        if self.layout == QKV_PER_HEAD:
            return {self.q: head_channels(q_heads, 3 * hd)}
        if self.layout == QKV_GROUPED:
            g = self.group_size
            rows = []
            for kv in kv_heads.tolist():
                base = kv * (g + 2) * hd
                local = [h - kv * g for h in q_heads.tolist() if h // g == kv]
                rows.append(
                    base + head_channels(torch.tensor(local + [g, g + 1], device=kv_heads.device), hd)
                )
            return {self.q: torch.cat(rows)}
        raise UnsupportedArchitecture(f"unknown q/k/v layout {self.layout!r}")

    def o_columns(self, q_heads: torch.Tensor) -> torch.Tensor:
        return head_channels(q_heads, self.head_dim)


@dataclass
class MLPAnatomy:
    """Where the intermediate channels of one MLP live. Names are relative to the block."""

    path: str
    up: str
    down: str
    gate: str | None  # None: a plain (non-gated) MLP; == up for a fused [gate | up] projection
    intermediate: int

    @property
    def fused(self) -> bool:
        return self.gate == self.up

    @property
    def producers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for n in (self.gate, self.up) if n is not None))

    def producer_rows(self, channels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Output rows of each producer that make the given intermediate channels."""
        if self.fused:
            return {self.up: torch.cat([channels, self.intermediate + channels])}
        return {name: channels for name in self.producers}


@dataclass
class BlockAnatomy:
    """One decoder block: its linears by name, its attention and MLP where they are understood."""

    index: int
    module: nn.Module
    linears: dict[str, nn.Module]  # linear-like layers (SparseLinear included), by name
    attention: AttentionAnatomy | None = None
    mlp: MLPAnatomy | None = None
    mixer: str | None = None  # a token mixer that is not attention (linear attention, convolution)
    experts: ExpertsAnatomy | None = None  # a Mixture-of-Experts block's experts, router, shared experts
    problems: list[str] = field(default_factory=list)  # what width pruning could not understand
    skipped: dict[str, str] = field(default_factory=dict)  # removed sub-blocks: kind -> stand-in's path

    def linear(self, name: str) -> nn.Module:
        return self.module.get_submodule(name)

    def prunable(self, module: nn.Module | None = None, routers: bool = False) -> dict[str, nn.Module]:
        """What unstructured methods prune in this block (or in ``module``, a copy of it): its dense
        linears, every expert's matrices (``ExpertMatrix`` views into the fused 3-D experts), and,
        only with ``routers``, the linears that route (kept dense by default)."""
        module = self.module if module is None else module
        linears = block_linears(module)
        if self.experts is not None:
            if not routers:
                skip = (self.experts.router, *self.experts.routing_linears)
                linears = {n: m for n, m in linears.items() if n not in skip}
            linears |= expert_matrices(module, self.experts)
        return linears

    def refresh_linears(self) -> None:
        """Re-read the linears after modules were replaced (a width cut, a SparseLinear swap)."""
        self.linears = linear_like(self.module)


@dataclass
class ModelAnatomy:
    """The whole model: decoder blocks and the facts around them."""

    model_type: str
    blocks_path: str
    blocks: nn.ModuleList
    block_list: list[BlockAnatomy]
    hidden_size: int | None
    layer_config_keys: tuple[str, ...]  # config lists with one entry per decoder block
    embedding: str | None
    lm_head: str | None
    tied: bool

    def __len__(self) -> int:
        return len(self.block_list)

    def __getitem__(self, index: int) -> BlockAnatomy:
        return self.block_list[index]

    def __iter__(self):
        return iter(self.block_list)

    def block_name(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def width_problems(self) -> list[str]:
        """Why width pruning cannot cut this model (empty when it can)."""
        problems = []
        for b in self.block_list:
            problems += [f"block {b.index}: {p}" for p in b.problems]
        if not any(b.attention is not None for b in self.block_list):
            problems.append("no block has an attention module the anatomy understands")
        return problems

    def compressed_layers(self) -> list[str]:
        """Block layers held in a compressed form (SparseLinear), by qualified name (read afresh)."""
        return [
            f"{self.block_name(b.index)}.{n}"
            for b in self.block_list
            for n, m in linear_like(b.module).items()
            if not is_prunable_linear(m)
        ]

    def require_dense(self, what: str) -> None:
        """Refuse to prune a model whose block linears are compressed (they would be skipped)."""
        layers = self.compressed_layers()
        if layers:
            raise UnsupportedArchitecture(
                f"{what} prunes dense linear layers, and {len(layers)} block layers of this model are "
                f"compressed SparseLinear ({layers[0]}, ...): decompress them first with "
                "sparsekit.densify(model) (sparsekit.prune and the CLI do this for you)"
            )

    def require_width(self, what: str) -> None:
        problems = self.width_problems()
        if problems:
            raise UnsupportedArchitecture(
                f"{what} cannot cut {self.model_type}: {'; '.join(problems[:3])}. Depth and unstructured "
                "methods still work on it; a family whose fused layout the anatomy cannot infer needs an "
                "entry in sparsekit/models/families.py (docs/design.md)"
            )


# ----------------------------------------------------------------------------- finding blocks
def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Dense linear layers (nn.Linear, Conv1D) of one block, by name relative to the block: what
    the unstructured methods prune."""
    return {name: m for name, m in block.named_modules() if name and is_prunable_linear(m)}


def linear_like(block: nn.Module) -> dict[str, nn.Module]:
    """Linear layers and their compressed replacements (SparseLinear) of one block, by name."""
    return {name: m for name, m in block.named_modules() if name and is_linear_like(m)}


def _num_layers(config: Any) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _is_skipped(module: nn.Module) -> bool:
    """A removed sub-block's stand-in (a block whose attention and MLP are both gone has no linear)."""
    return isinstance(module, tuple(SKIPPED_KINDS.values()))


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks, or ``UnsupportedArchitecture``."""
    expected = _num_layers(getattr(model, "config", None))
    candidates, seen = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        seen.append(f"{name} ({len(module)})")
        if expected is not None and len(module) != expected:
            continue
        if all(any(is_linear_like(m) or _is_skipped(m) for m in block.modules()) for block in module):
            candidates.append((name, module))
    if not candidates:
        raise UnsupportedArchitecture(
            f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of {expected} "
            f"blocks that all hold linear layers or removed sub-blocks (module lists: "
            f"{', '.join(seen) or 'none'})"
        )
    return min(candidates, key=lambda item: item[0].count("."))


# ----------------------------------------------------------------------------- describing a block
def _by_parent(linears: dict[str, nn.Module]) -> dict[str, dict[str, str]]:
    """{parent path: {leaf name: full name}}."""
    out: dict[str, dict[str, str]] = {}
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        out.setdefault(parent, {})[leaf] = name
    return out


def _role(leaves: dict[str, str], role: str, exclude: tuple[str, ...] = ()) -> str | None:
    for leaf in ROLE_NAMES[role]:
        if leaf in leaves and leaves[leaf] not in exclude:
            return leaves[leaf]
    return None


def _join(parent: str, leaf: str) -> str:
    return f"{parent}.{leaf}" if parent else leaf


def _attention_parent(groups: dict[str, dict[str, str]]) -> tuple[str, dict[str, str]] | None:
    for parent, leaves in groups.items():
        if all(_role(leaves, r) for r in ("q", "k", "v")) or _role(leaves, "qkv"):
            return parent, leaves
    return None


def _head_dim(attn: nn.Module, config: Any, heads_hint: int | None) -> int | None:
    value = int_attr(attn, ("head_dim", "head_size"))
    if value:
        return value
    value = getattr(config, "head_dim", None)
    if isinstance(value, int) and value > 0:
        return value
    hidden, heads = (
        getattr(config, "hidden_size", None),
        heads_hint or getattr(config, "num_attention_heads", 0),
    )
    return hidden // heads if hidden and heads and hidden % heads == 0 else None


def _describe_attention(
    block: nn.Module, linears: dict[str, nn.Module], parent: str, leaves: dict[str, str], config: Any
) -> AttentionAnatomy:
    """Raises ValueError naming what it did not understand."""
    attn = block.get_submodule(parent) if parent else block
    fused = _role(leaves, "qkv")
    q, k, v = (fused,) * 3 if fused else (_role(leaves, "q"), _role(leaves, "k"), _role(leaves, "v"))
    o = _role(leaves, "o", exclude=(q, k, v))
    where = parent or "the block"
    if o is None:
        raise ValueError(
            f"{where} has q/k/v projections but no output projection ({'/'.join(ROLE_NAMES['o'])})"
        )
    o_in = in_out_features(linears[o])[0]
    heads_hint = int_attr(attn, HEAD_COUNT_ATTRS) or getattr(config, "num_attention_heads", None)
    hd = _head_dim(attn, config, heads_hint)
    if not hd or o_in % hd:
        raise ValueError(f"{where}: head_dim {hd} does not divide {o}'s {o_in} input features")
    heads = o_in // hd
    layout = family(getattr(config, "model_type", None)).layout(config) if fused else SEPARATE
    q_out = in_out_features(linears[q])[1]
    if layout == SEPARATE:
        kv_out = in_out_features(linears[k])[1]
        if in_out_features(linears[v])[1] != kv_out or kv_out % hd or q_out % (heads * hd):
            raise ValueError(f"{where}: q/k/v outputs {q_out}/{kv_out} do not split into heads of {hd}")
        kv_heads, q_width = kv_out // hd, q_out // (heads * hd)
    elif layout == QKV_CONCAT:
        rest = q_out - heads * hd
        if rest <= 0 or rest % (2 * hd):
            raise ValueError(f"{where}: fused {q} rows {q_out} are not [q | k | v] heads of {hd}")
        kv_heads, q_width = rest // (2 * hd), 1
    elif layout == QKV_PER_HEAD:
        if q_out != 3 * heads * hd:
            raise ValueError(f"{where}: fused {q} rows {q_out} are not [heads, 3, {hd}]")
        kv_heads, q_width = heads, 1
    else:  # grouped
        kv_heads = int_attr(attn, KV_COUNT_ATTRS) or 0
        if not kv_heads or heads % kv_heads or q_out != (heads + 2 * kv_heads) * hd:
            raise ValueError(f"{where}: fused {q} rows {q_out} are not [kv groups, queries + 2, {hd}]")
        q_width = 1
    if kv_heads == 0 or heads % kv_heads or q_width not in (1, 2):
        raise ValueError(f"{where}: {heads} query heads do not form whole groups over {kv_heads} KV heads")
    anatomy = AttentionAnatomy(parent, q, k, v, o, layout, hd, heads, kv_heads, q_width)
    anatomy.norms = _qk_norms(attn, parent, anatomy)
    anatomy.head_params = [
        n for n, p in attn.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == heads
    ]
    return anatomy


def _qk_norms(attn: nn.Module, parent: str, a: AttentionAnatomy) -> list[QKNorm]:
    norms = []
    for role, names in QK_NORM_NAMES.items():
        count = a.heads if role == "q" else a.kv_heads
        for leaf in names:
            norm = getattr(attn, leaf, None)
            if norm is None:
                continue
            path = _join(parent, leaf)
            if isinstance(norm, nn.ModuleList):
                if len(norm) != count:
                    raise ValueError(f"{path} holds {len(norm)} norms for {count} heads")
                norms.append(QKNorm(path, role, "head_list"))
                continue
            weight = getattr(norm, "weight", None)
            if weight is None:
                continue  # a parameter-free norm (RMS without scale) is the same for any head count
            shape = tuple(weight.shape)
            if shape == (a.head_dim,):
                kind = "per_head"
            elif shape == (count * a.head_dim,):
                kind = "all_heads"
            elif shape == (count, a.head_dim):
                kind = "head_rows"
            else:
                raise ValueError(f"{path} has weight {shape}, neither one head ({a.head_dim}) nor all heads")
            norms.append(QKNorm(path, role, kind))
    return norms


def _describe_mlp(
    linears: dict[str, nn.Module], groups: dict[str, dict[str, str]], skip: str | None
) -> MLPAnatomy | None:
    for parent, leaves in groups.items():
        if parent == skip:
            continue
        down = _role(leaves, "down")
        fused = _role(leaves, "gate_up")
        up = fused or _role(leaves, "up", exclude=(down,))
        if down is None or up is None:
            continue
        gate = fused or _role(leaves, "gate", exclude=(up, down))
        inter = in_out_features(linears[down])[0]
        expected = {up: 2 * inter if fused else inter}
        if gate is not None and not fused:
            expected[gate] = inter
        bad = {
            n: in_out_features(linears[n])[1]
            for n, rows in expected.items()
            if in_out_features(linears[n])[1] != rows
        }
        if bad:
            raise ValueError(f"MLP {parent or 'of the block'}: {bad} do not match {down}'s {inter} inputs")
        return MLPAnatomy(parent, up, down, gate, inter)
    return None


def describe_block(block: nn.Module, index: int, config: Any) -> BlockAnatomy:
    """The anatomy of one decoder block (``problems`` says what width pruning cannot cut)."""
    linears = linear_like(block)
    b = BlockAnatomy(index, block, linears, skipped=skipped_parts(block))
    try:
        b.experts = find_experts(block, config)
    except ValueError as exc:
        b.problems.append(f"MoE block not understood: {exc}")
    if b.experts is not None:  # the shared expert must not pass for the MLP
        skip = (b.experts.moe, *(f"{s}." for s in b.experts.shared))
        linears = {n: m for n, m in linears.items() if not n.startswith(skip)}
    groups = _by_parent(linears)
    found = _attention_parent(groups)
    if found is not None:
        try:
            b.attention = _describe_attention(block, linears, *found, config)
        except ValueError as exc:
            b.problems.append(str(exc))
    elif "attention" not in b.skipped:
        mixers = [p for p in groups if p and not _role(groups[p], "down")]
        b.mixer = mixers[0] if mixers else None
    try:
        b.mlp = _describe_mlp(linears, groups, found[0] if found else None)
    except ValueError as exc:
        b.problems.append(str(exc))
    if b.experts is not None:
        b.problems.append(
            f"{b.experts.moe} is a Mixture-of-Experts block: width pruning does not cut experts; remove "
            "whole experts with method='reap' (or 'ean', 'frequency')"
        )
    elif b.mlp is None and "mlp" not in b.skipped and not any("MLP" in p for p in b.problems):
        b.problems.append(f"no MLP with {'/'.join(ROLE_NAMES['up'])} and {'/'.join(ROLE_NAMES['down'])}")
    return b


# ----------------------------------------------------------------------------- the model
_CACHE: weakref.WeakKeyDictionary[nn.Module, ModelAnatomy] = weakref.WeakKeyDictionary()


def _layer_config_keys(config: Any, count: int) -> tuple[str, ...]:
    if config is None:
        return ()
    return tuple(
        k for k, v in vars(config).items() if isinstance(v, list) and len(v) == count and k != "architectures"
    )


def _module_path(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


def _embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    get_in, get_out = (
        getattr(model, "get_input_embeddings", None),
        getattr(model, "get_output_embeddings", None),
    )
    try:
        emb = get_in() if callable(get_in) else None
    except (NotImplementedError, AttributeError):
        emb = None
    try:
        head = get_out() if callable(get_out) else None
    except (NotImplementedError, AttributeError):
        head = None
    return emb, head


def describe(model: nn.Module, refresh: bool = False) -> ModelAnatomy:
    """The anatomy of ``model``, computed once and reused while its decoder stack is the same object.

    Raises ``UnsupportedArchitecture`` when no decoder stack is found (the message lists the module
    lists it saw). Blocks whose attention or MLP is not understood are described with
    ``problems``; only the methods that need those parts refuse them.
    """
    cached = _CACHE.get(model)
    if cached is not None and not refresh:
        current = model.get_submodule(cached.blocks_path)
        if current is cached.blocks and len(current) == len(cached.block_list):
            return cached
    path, blocks = find_decoder_blocks(model)
    config = getattr(model, "config", None)
    block_list = [describe_block(block, i, config) for i, block in enumerate(blocks)]
    emb, head = _embeddings(model)
    tied = emb is not None and head is not None and getattr(emb, "weight", None) is getattr(head, "weight", 0)
    anatomy = ModelAnatomy(
        model_type=str(getattr(config, "model_type", type(model).__name__)),
        blocks_path=path,
        blocks=blocks,
        block_list=block_list,
        hidden_size=getattr(config, "hidden_size", None),
        layer_config_keys=_layer_config_keys(config, len(blocks)),
        embedding=_module_path(model, emb),
        lm_head=_module_path(model, head),
        tied=tied,
    )
    _CACHE[model] = anatomy
    return anatomy


# ----------------------------------------------------------------------------- channel folds
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


def channel_folds(block: BlockAnatomy) -> list[ChannelFold]:
    """The foldable (producer rows -> consumer columns) pairs of one block: the MLP's intermediate
    channels (separate producers only) and the attention's value channels per KV head (separate
    v projection, no norm on v, one query row per head)."""
    folds = []
    mlp, attn = block.mlp, block.attention
    if mlp is not None and not mlp.fused:
        folds.append(ChannelFold(mlp.down, mlp.producers, mlp.intermediate))
    if attn is not None and attn.layout == SEPARATE and attn.q_width == 1:
        v_norm = any(n.role == "v" for n in attn.norms) or hasattr(
            block.module.get_submodule(attn.path), "v_norm"
        )
        if not v_norm:
            folds.append(ChannelFold(attn.o, (attn.v,), attn.head_dim, attn.kv_heads, attn.group_size))
    return folds
