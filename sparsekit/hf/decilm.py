"""Export to the DeciLM / Nemotron-NAS ``block_configs`` form, which vLLM runs natively.

NVIDIA's Nemotron-NAS checkpoints (``DeciLMForCausalLM``, config ``model_type`` "nemotron-nas")
are Llama models whose config lists one ``block_configs`` entry per layer:
``{"attention": {"no_op": bool, "replace_with_linear": bool, "n_heads_in_group": int | None},
"ffn": {"no_op": bool, "replace_with_linear": bool, "ffn_mult": float | None}}``. A no-op attention
layer has no ``input_layernorm`` and no ``self_attn`` weights, a no-op FFN no
``post_attention_layernorm`` and no ``mlp``; ``num_key_value_heads = num_attention_heads //
n_heads_in_group``; the MLP width is ``ffn_mult_to_intermediate(ffn_mult, hidden_size)`` below
(ffn_mult rounded to 6 decimals, the width rounded up to a multiple of 256). Every layer keeps the
model's query-head count.

That covers Llama-family models after sub-block removal (``blockpruner``), depth pruning, or
width pruning whose per-block MLP widths are multiples of 256 and whose query heads are whole.
The config names NVIDIA's configuration / modeling code on the hub in ``auto_map`` (as their own
checkpoints do), so transformers needs ``trust_remote_code=True`` to build it; vLLM's own
``DeciLMForCausalLM`` runs the weights.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparsekit._io import atomic_dir
from sparsekit.models import describe
from sparsekit.nn import SparseLinear

log = logging.getLogger(__name__)

DECILM_MODEL_TYPE = "nemotron-nas"
DECILM_ARCHITECTURE = "DeciLMForCausalLM"
DECILM_CODE_REPO = "nvidia/Llama-3_1-Nemotron-51B-Instruct"  # configuration_decilm.py, modeling_decilm.py
DECILM_FAMILIES = ("llama",)  # DeciLM's layer: q/k/v/o attention with RoPE, SwiGLU gate/up/down, RMSNorm
ATTENTION_FIELDS = ("no_op", "replace_with_linear", "n_heads_in_group")
FFN_FIELDS = ("no_op", "replace_with_linear", "ffn_mult")
WIDTH_MULTIPLE = 256


def ffn_mult_to_intermediate(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width a DeciLM FFN config gives: int(2 * round(ffn_mult, 6) * hidden / 3), rounded
    up to a multiple of 256."""
    width = int(2 * round(ffn_mult, 6) * hidden_size / 3)
    return width if width % WIDTH_MULTIPLE == 0 else width + WIDTH_MULTIPLE - width % WIDTH_MULTIPLE


def intermediate_to_ffn_mult(intermediate: int, hidden_size: int, block: int) -> float:
    """The ffn_mult that gives ``intermediate`` channels, or ValueError naming why none does."""
    mult = round(1.5 * intermediate / hidden_size, 6)
    for candidate in (mult, round(mult + 1e-6, 6)):
        if ffn_mult_to_intermediate(candidate, hidden_size) == intermediate:
            return candidate
    raise ValueError(
        f"block {block}: an MLP of {intermediate} channels has no DeciLM ffn_mult (DeciLM widths are "
        f"multiples of {WIDTH_MULTIPLE}): prune the MLP to a multiple of {WIDTH_MULTIPLE} "
        "(--channel-multiple 256) or save a sparsekit checkpoint instead"
    )


def decilm_block_configs(model: nn.Module) -> list[dict[str, dict[str, Any]]]:
    """One block config per decoder block of ``model`` (a Llama-family model, possibly with removed
    sub-blocks or per-block widths); ValueError naming what DeciLM cannot express."""
    anatomy = describe(model)
    if anatomy.model_type not in DECILM_FAMILIES:
        raise ValueError(
            f"the DeciLM / Nemotron-NAS form is a Llama layout; {anatomy.model_type} is not one "
            f"({', '.join(DECILM_FAMILIES)} only): save a sparsekit checkpoint instead (sparsekit.save)"
        )
    if anatomy.compressed_layers():
        raise ValueError("the DeciLM export writes dense weights: sparsekit.densify(model) first")
    config = model.config
    heads, hidden = config.num_attention_heads, config.hidden_size
    out = []
    for block in anatomy:
        attention: dict[str, Any] = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
        ffn: dict[str, Any] = {"no_op": True, "replace_with_linear": False, "ffn_mult": None}
        a = block.attention
        if a is not None:
            if a.heads != heads:
                raise ValueError(
                    f"block {block.index} keeps {a.heads} of {heads} query heads; DeciLM layers keep every "
                    "query head (only KV groups vary): prune heads with --heads query off, or save a "
                    "sparsekit checkpoint"
                )
            attention.update(no_op=False, n_heads_in_group=heads // a.kv_heads)
        elif "attention" not in block.skipped:
            raise ValueError(f"block {block.index} has no attention the anatomy understands")
        if block.mlp is not None:
            mult = intermediate_to_ffn_mult(block.mlp.intermediate, hidden, block.index)
            ffn.update(no_op=False, ffn_mult=mult)
        elif "mlp" not in block.skipped:
            raise ValueError(f"block {block.index} has no MLP the anatomy understands")
        out.append({"attention": attention, "ffn": ffn})
    return out


NORM_BEFORE = {"attention": "input_layernorm", "ffn": "post_attention_layernorm"}  # Llama's names


def decilm_state(model: nn.Module, block_configs: list[dict]) -> dict[str, torch.Tensor]:
    """The model's tensors as DeciLM names them: a no-op sub-block's norm dropped, the tied lm_head
    left to the embedding, every tensor contiguous and unshared."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    anatomy = describe(model)
    drop = [
        f"{anatomy.block_name(index)}.{NORM_BEFORE[kind]}."
        for index, cfg in enumerate(block_configs)
        for kind in ("attention", "ffn")
        if cfg[kind]["no_op"]
    ]
    state = {k: v for k, v in state.items() if not k.startswith(tuple(drop))}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def decilm_config(model: nn.Module, block_configs: list[dict]) -> dict[str, Any]:
    """config.json of the export: the Llama config, DeciLM's type, architecture and block configs."""
    config = model.config.to_dict()
    for key in (
        "quantization_config",
        "block_widths",
        "auto_map",
        "num_key_value_heads",
        "intermediate_size",
    ):
        config.pop(key, None)
    config.update(
        model_type=DECILM_MODEL_TYPE,
        architectures=[DECILM_ARCHITECTURE],
        block_configs=block_configs,
        auto_map={
            "AutoConfig": f"{DECILM_CODE_REPO}--configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": f"{DECILM_CODE_REPO}--modeling_decilm.DeciLMForCausalLM",
        },
    )
    config.setdefault("head_dim", model.config.hidden_size // model.config.num_attention_heads)
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:  # the older DeciLM config code reads the top-level key
        config.setdefault("rope_theta", rope["rope_theta"])
    return config


def export_decilm(model: nn.Module, out_dir: str | Path, source_dir: str | Path | None = None) -> Path:
    """Write ``model`` to ``out_dir`` (a new folder, atomically) in the DeciLM block_configs form;
    tokenizer and generation files are copied from ``source_dir`` when given."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"--out {out_dir} exists; choose a new folder")
    if any(isinstance(m, SparseLinear) for m in model.modules()):
        raise ValueError("the DeciLM export writes dense weights: sparsekit.densify(model) first")
    block_configs = decilm_block_configs(model)  # refuses before anything is written
    state = decilm_state(model, block_configs)
    config = decilm_config(model, block_configs)
    with atomic_dir(out_dir) as tmp:
        if source_dir is not None:
            for item in Path(source_dir).iterdir():
                if (
                    item.is_file()
                    and item.suffix != ".safetensors"
                    and item.name
                    not in (
                        "config.json",
                        "prune_report.json",
                    )
                ):
                    shutil.copy2(item, tmp / item.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    no_ops = sum(c[k]["no_op"] for c in block_configs for k in ("attention", "ffn"))
    log.info(
        "exported %d layers (%d no-op sub-blocks) in DeciLM form to %s", len(block_configs), no_ops, out_dir
    )
    return out_dir
