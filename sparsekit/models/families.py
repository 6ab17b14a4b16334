"""What structure cannot tell: the names projections go by, and the few declarative family entries.

The anatomy finds blocks, attention and MLP modules, widths and norms from the module tree and
the shapes. Two things it cannot see: which linear of an attention module is k and which is v
(both are [kv_heads * head_dim, hidden]), and how a fused projection orders its rows. The first
is the naming convention every family follows (``ROLE_NAMES``); the second is a ``Family`` entry
for the families whose fused projection is not ``[q | k | v]`` / ``[gate | up]``.

Adding a family the anatomy cannot infer is one entry here (see docs/design.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The linear of each role, by its attribute name. The attention module is the parent of q/k/v
# (or a fused qkv); its output projection is the one of ``o`` under the same parent; the MLP is
# the parent of up/down (or a fused gate_up) that is not the attention module.
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "query", "wq"),
    "k": ("k_proj", "key", "wk"),
    "v": ("v_proj", "value", "wv"),
    "qkv": ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "wqkv"),
    "o": ("o_proj", "out_proj", "dense", "c_proj", "wo"),
    "gate": ("gate_proj", "w1"),
    "up": ("up_proj", "w3", "fc1", "c_fc", "dense_h_to_4h", "fc_in"),
    "down": ("down_proj", "w2", "fc2", "c_proj", "dense_4h_to_h", "fc_out"),
    "gate_up": ("gate_up_proj",),
}
# per-head or all-heads norms on the queries and keys
QK_NORM_NAMES: dict[str, tuple[str, ...]] = {
    "q": ("q_norm", "q_layernorm", "query_layernorm"),
    "k": ("k_norm", "k_layernorm", "key_layernorm"),
}
# attributes of an attention module that hold its head counts (updated when heads are removed)
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
# attributes of an MLP module that hold its intermediate width
# attention modules that hand their keys / values on to later layers or read another layer's
# (Gemma-3n / Gemma-4 KV sharing): such an attention cannot be removed on its own
KV_SHARING_ATTRS = ("is_kv_shared_layer", "store_full_length_kv")
MLP_WIDTH_ATTRS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
# config keys of the MLP width, tried in order (the first one the config has)
CONFIG_MLP_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")

# row layouts of a fused q/k/v projection
QKV_CONCAT = "concat"  # [q heads | k heads | v heads] (phi3, gpt2, falcon multi-query)
QKV_PER_HEAD = "per_head"  # [heads, (q, k, v), head_dim] (gpt_neox; MHA only)
QKV_GROUPED = "grouped"  # [kv_heads, (g queries, k, v), head_dim] (falcon's new decoder architecture)


@dataclass(frozen=True)
class Family:
    """The facts of one ``model_type`` that structure cannot tell.

    qkv_layout: how the fused q/k/v projection orders its rows (a layout name, or a function of
      the config giving one).
    mlp_width_config: config settings written beside the MLP width after a width cut, where the
      family derives its MLP width from the config value (LFM2 rescales it unless told not to).
    per_layer_weights: model-level weights (outside the blocks) that hold one slice per decoder
      block, by module name -> the weight dimension laid out as [blocks, width] (Gemma-4's
      per-layer input embedding and its projection); removing blocks removes their slices.
    """

    qkv_layout: str | Callable[[Any], str] = QKV_CONCAT
    mlp_width_config: dict[str, Any] = field(default_factory=dict)
    per_layer_weights: dict[str, int] = field(default_factory=dict)

    def layout(self, config: Any) -> str:
        return self.qkv_layout(config) if callable(self.qkv_layout) else self.qkv_layout


FAMILIES: dict[str, Family] = {
    "gpt_neox": Family(qkv_layout=QKV_PER_HEAD),
    "falcon": Family(
        qkv_layout=lambda c: (
            QKV_GROUPED
            if getattr(c, "new_decoder_architecture", False)
            else QKV_CONCAT
            if getattr(c, "multi_query", False)
            else QKV_PER_HEAD
        )
    ),
    "lfm2": Family(mlp_width_config={"block_auto_adjust_ff_dim": False}),
    "gemma4_text": Family(per_layer_weights={"embed_tokens_per_layer": 1, "per_layer_model_projection": 0}),
}


def family(model_type: str | None) -> Family:
    """The entry of ``model_type`` (the defaults where it has none)."""
    return FAMILIES.get(model_type or "", Family())
