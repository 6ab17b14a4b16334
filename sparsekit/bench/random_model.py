"""Random-weight Llama models built from the shipped shape configs (``sparsekit/bench_shapes``).

Speed does not depend on weight values, so an offline GPU machine can time Llama-2-7B or
Llama-3-8B decode without downloading them: ``random_model("llama-2-7b", torch.bfloat16, "cuda")``
builds the real architecture (hidden size, MLP width, GQA heads, vocabulary, layer count) with
transformers' own initialisation, directly on the device. ``shrink`` scales a config down
proportionally for a CPU dry run of the same code.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekit.bench.layers import load_shape_config

_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "vocab_size",
    "head_dim",
)


def shape_config(name: str, num_layers: int | None = None, shrink: int = 1) -> dict:
    """The Llama fields of a shipped config; ``shrink`` > 1 divides the widths and the vocabulary by it
    (keeping the GQA ratio; head_dim at most 32; MLP width a multiple of 8), ``num_layers`` overrides
    the depth."""
    cfg = load_shape_config(name)
    fields = {k: cfg[k] for k in _FIELDS if k in cfg}
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    if shrink > 1:
        group = max(1, fields["num_attention_heads"] // fields["num_key_value_heads"])
        head_dim = min(fields["head_dim"], 32)
        heads = max(group, (fields["hidden_size"] // shrink // head_dim) // group * group)
        fields |= {
            "num_attention_heads": heads,
            "num_key_value_heads": heads // group,
            "head_dim": head_dim,
            "hidden_size": heads * head_dim,
            "intermediate_size": max(8, (fields["intermediate_size"] // shrink) // 8 * 8),
            "vocab_size": max(64, fields["vocab_size"] // shrink),
        }
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    fields["name"] = cfg.get("name", name) + (f" (1/{shrink} width)" if shrink > 1 else "")
    return fields


def random_model(
    name: str,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    num_layers: int | None = None,
    shrink: int = 1,
    seed: int = 0,
    max_position_embeddings: int = 4096,
) -> nn.Module:
    """A ``LlamaForCausalLM`` of a shipped config's shape with random weights, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    fields = shape_config(name, num_layers, shrink)
    label = fields.pop("name")
    config = LlamaConfig(**fields, max_position_embeddings=max_position_embeddings, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.name_or_path = f"random {label}"
    return model.eval()
