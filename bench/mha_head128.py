"""A Llama model re-expressed exactly as multi-head attention with head_dim 128: the only form
FLAP's original code runs on (issue 28).

FLAP's code (CASIA-IVA-Lab/FLAP) hard-codes LLaMA-1's head width (``repeat_interleave(128)``,
``head_dim = 128``, the 512/3 ratio of a head's parameters to an MLP channel's) and cuts q, k and
v with one head mask, so it needs as many KV heads as query heads. SmolLM2 has 9 query heads of
64 channels over 3 KV heads, and no MHA model with 128-channel heads ships offline. The same
function fits in that larger shape:

- each KV head is copied to the query heads that read it (GQA -> MHA);
- each head's channels move into a head of ``width`` channels: channel j of the first rotary half
  goes to j * r and channel j of the second half to width / 2 + j * r (r = width / head_dim), the
  slots that turn at the same rotary frequency; every other channel is zero;
- q is scaled by sqrt(r), so q.k / sqrt(width) equals the old q.k / sqrt(head_dim).

The residual stream, norms, MLPs, embeddings and lm_head are untouched. Logits agree with the
source to float rounding (the tests and ``--check``). Both tools of a comparison then prune this one
model; its zero channels count as parameters for both (a head holds 4 x hidden x width of them).

    python bench/mha_head128.py --out reports/smollm2-mha128     # the embedded SmolLM2, checked
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
from pathlib import Path

import torch

log = logging.getLogger("mha_head128")


def rotary_slots(head_dim: int, width: int) -> torch.Tensor:
    """Where each of a head's ``head_dim`` channels goes in a ``width``-channel head: [head_dim]
    int64, the rotary pair (j, j + head_dim / 2) landing on a pair with the same frequency."""
    r = width // head_dim
    half = torch.arange(head_dim // 2) * r
    return torch.cat([half, half + width // 2])


def _check_convertible(config, width: int) -> None:
    """Refuse what the re-expression would change: a clear error before any weight is copied."""
    if config.model_type != "llama":
        raise ValueError(f"expected a Llama model, got model_type {config.model_type!r}")
    rope = getattr(config, "rope_parameters", None) or {}
    partial = getattr(config, "partial_rotary_factor", None) or 1
    if rope.get("rope_type", "default") != "default" or partial != 1:
        raise ValueError(
            f"rotary {rope} is not the default full rotation: the frequencies of a wider head would "
            "not line up with the old ones"
        )
    head_dim = config.head_dim
    if width % head_dim or width < head_dim or head_dim % 2:
        raise ValueError(f"width {width} must be a multiple of the head_dim {head_dim} (an even number)")


def _place(weight: torch.Tensor, heads: int, head_dim: int, width: int, slots: torch.Tensor) -> torch.Tensor:
    """Rows [heads * head_dim, ...] -> [heads * width, ...], head h's row c at h * width + slots[c]."""
    rows = weight.reshape(heads, head_dim, *weight.shape[1:])
    out = rows.new_zeros(heads, width, *weight.shape[1:])
    out[:, slots] = rows
    return out.reshape(heads * width, *weight.shape[1:])


def as_mha(model, width: int = 128):
    """A copy of the Llama ``model`` with ``num_key_value_heads = num_attention_heads`` and
    ``head_dim = width``, computing the same logits (module docstring). fp32 weights stay fp32."""
    from transformers import AutoModelForCausalLM

    config = model.config
    _check_convertible(config, width)
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    group = heads // kv_heads
    slots = rotary_slots(head_dim, width)
    scale = math.sqrt(width / head_dim)
    new_config = copy.deepcopy(config)
    new_config.head_dim, new_config.num_key_value_heads = width, heads
    wide = AutoModelForCausalLM.from_config(new_config, dtype=next(model.parameters()).dtype)
    state = {}
    for name, tensor in model.state_dict().items():
        if ".self_attn.q_proj." in name:
            tensor = _place(tensor, heads, head_dim, width, slots) * scale
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            per_kv = tensor.reshape(kv_heads, head_dim, *tensor.shape[1:]).repeat_interleave(group, dim=0)
            tensor = _place(
                per_kv.reshape(heads * head_dim, *tensor.shape[1:]), heads, head_dim, width, slots
            )
        elif ".self_attn.o_proj.weight" in name:
            tensor = _place(tensor.t(), heads, head_dim, width, slots).t()
        state[name] = tensor
    missing, unexpected = wide.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight" or not config.tie_word_embeddings]:
        raise RuntimeError(f"the re-expression does not fit the wider model: {missing[:3]} {unexpected[:3]}")
    return wide.eval()


def checked_mha(model, width: int = 128, tolerance: float = 1e-4):
    """(``as_mha(model, width)``, its largest logit difference from ``model`` relative to the largest
    logit, on two random 64-token windows); a SystemExit above ``tolerance``."""
    wide = as_mha(model, width)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    gap = max_logit_difference(model, wide, ids)
    if gap > tolerance:
        raise SystemExit(f"the re-expressed model's logits differ by {gap:.2e} of the largest logit")
    return wide, gap


def max_logit_difference(a, b, ids: torch.Tensor) -> float:
    """Largest |logit difference| of two models on ``ids`` [batch, seq], relative to a's largest |logit|."""
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    return float((la - lb).abs().max() / la.abs().max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="smollm2", help="a model spec sparsekit loads (default: the embedded SmolLM2)"
    )
    p.add_argument("--width", type=int, default=128, help="the new head_dim")
    p.add_argument("--out", required=True, help="folder for the re-expressed model (safetensors + tokenizer)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        p.error(f"{out} exists: remove it or pick another --out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from sparsekit.hf.models import load_model

    model, tok = load_model(args.model, dtype=torch.float32)
    wide, gap = checked_mha(model, args.width)
    tmp = out.with_name(out.name + ".tmp")
    wide.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    log.info("wrote %s (logits within %.1e of the source, relative)", out, gap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
