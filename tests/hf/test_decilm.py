"""The DeciLM / Nemotron-NAS export against the format's documented fields: the block_configs
fields NVIDIA's ``block_config.py`` accepts, the tensor names a DeciLM layer built from those
configs holds (vLLM's ``DeciLMDecoderLayer``: no norm and no weights for a no-op sub-block), and
an independent forward written from the format (RMSNorm, RoPE, GQA, SwiGLU, per-layer KV heads
and widths from block_configs) giving the pruned model's logits from the exported files alone."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import sparsekit
from sparsekit.hf.decilm import export_decilm, ffn_mult_to_intermediate
from sparsekit.models import describe
from sparsekit.pruning.structured import skip_subblock
from sparsekit.pruning.structured.layout import keep_heads

# fields of NVIDIA's DeciLM block_config.py dataclasses (SubblockConfig + AttentionConfig / FFNConfig)
SUBBLOCK = {"no_op", "replace_with_linear", "sparsify"}
ATTENTION = SUBBLOCK | {
    "n_heads_in_group",
    "window_length",
    "num_sink_tokens",
    "use_prefill_window_in_sink_attention",
    "unshifted_sink",
}
FFN = SUBBLOCK | {"ffn_mult"}


def tiny_llama(layers: int = 4, intermediate: int = 512):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(x.shape[-2], dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def decilm_reference_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the exported DeciLM folder, computed from config.json and model.safetensors only."""
    cfg = json.loads((folder / "config.json").read_text())
    w = load_file(str(folder / "model.safetensors"))
    hidden, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["rms_norm_eps"]
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    head_dim = cfg["head_dim"]
    x = w["model.embed_tokens.weight"][ids]

    def linear(h, name):
        return h @ w[name + ".weight"].T + w.get(name + ".bias", 0.0)

    b, length = ids.shape
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i, block in enumerate(cfg["block_configs"]):
        p = f"model.layers.{i}."
        if not block["attention"]["no_op"]:
            kv = heads // block["attention"]["n_heads_in_group"]
            h = _rms(x, w[p + "input_layernorm.weight"], eps)
            q = linear(h, p + "self_attn.q_proj").view(b, length, heads, head_dim).transpose(1, 2)
            k = linear(h, p + "self_attn.k_proj").view(b, length, kv, head_dim).transpose(1, 2)
            v = linear(h, p + "self_attn.v_proj").view(b, length, kv, head_dim).transpose(1, 2)
            q, k = _rope(q, theta), _rope(k, theta)
            k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
            att = (q @ k.transpose(-1, -2) / math.sqrt(head_dim) + mask).softmax(-1) @ v
            x = x + linear(att.transpose(1, 2).reshape(b, length, -1), p + "self_attn.o_proj")
        if not block["ffn"]["no_op"]:
            width = ffn_mult_to_intermediate(block["ffn"]["ffn_mult"], hidden)
            assert w[p + "mlp.gate_proj.weight"].shape == (width, hidden)
            h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
            gate, up = linear(h, p + "mlp.gate_proj"), linear(h, p + "mlp.up_proj")
            x = x + linear(F.silu(gate) * up, p + "mlp.down_proj")
    x = _rms(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def expected_names(cfg: dict) -> set[str]:
    """The tensors a DeciLM model built from ``cfg`` holds (vLLM's DeciLMDecoderLayer)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.get("tie_word_embeddings"):
        names.add("lm_head.weight")
    for i, block in enumerate(cfg["block_configs"]):
        p = f"model.layers.{i}."
        kinds = ("weight", "bias") if cfg.get("attention_bias") else ("weight",)
        if not block["attention"]["no_op"]:
            names |= {p + "input_layernorm.weight"}
            names |= {f"{p}self_attn.{n}_proj.{k}" for n in "qkvo" for k in kinds}
        kinds = ("weight", "bias") if cfg.get("mlp_bias") else ("weight",)
        if not block["ffn"]["no_op"]:
            names |= {p + "post_attention_layernorm.weight"}
            names |= {f"{p}mlp.{n}_proj.{k}" for n in ("gate", "up", "down") for k in kinds}
    return names


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _check_export(model, folder):
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert "quantization_config" not in cfg and "block_widths" not in cfg
    anatomy = describe(model)
    assert len(cfg["block_configs"]) == cfg["num_hidden_layers"] == len(anatomy)
    for block, bc in zip(anatomy, cfg["block_configs"], strict=True):
        assert set(bc) == {"attention", "ffn"}
        assert set(bc["attention"]) <= ATTENTION and set(bc["ffn"]) <= FFN
        assert bc["attention"]["no_op"] == ("attention" in block.skipped)
        assert bc["ffn"]["no_op"] == ("mlp" in block.skipped)
        if block.attention is not None:
            assert (
                cfg["num_attention_heads"] // bc["attention"]["n_heads_in_group"] == block.attention.kv_heads
            )
        if block.mlp is not None:
            assert (
                ffn_mult_to_intermediate(bc["ffn"]["ffn_mult"], cfg["hidden_size"]) == block.mlp.intermediate
            )
    tensors = load_file(str(folder / "model.safetensors"))
    assert set(tensors) == expected_names(cfg)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        decilm_reference_logits(folder, ids), _logits(model, ids), rtol=1e-4, atol=1e-4
    )


def test_removed_subblocks_export_as_no_ops_that_compute_the_same_logits(tmp_path):
    model = tiny_llama()
    anatomy = describe(model)
    skip_subblock(anatomy[0], "attention")
    skip_subblock(anatomy[2], "mlp")
    skip_subblock(anatomy[3], "attention")
    export_decilm(model, tmp_path / "decilm")
    _check_export(model, tmp_path / "decilm")


def test_blockpruner_checkpoint_exports_from_the_cli(tmp_path):
    from sparsekit.cli import main

    model = tiny_llama()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    report = sparsekit.prune(model, method="blockpruner", sparsity=0.3, calib=ids, show_progress=False)
    assert report.removed_subblocks
    sparsekit.save(model, tmp_path / "ck")
    assert main(["export", str(tmp_path / "ck"), "--decilm", "--out", str(tmp_path / "decilm")]) == 0
    _check_export(sparsekit.load(tmp_path / "ck"), tmp_path / "decilm")


def test_kv_group_pruning_and_widths_of_256_export(tmp_path):
    model = tiny_llama(intermediate=768)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    sparsekit.prune(
        model,
        method="flap",
        sparsity=0.3,
        widths="adaptive",
        channel_multiple=256,
        calib=ids,
        show_progress=False,
    )
    widths = {b.mlp.intermediate for b in describe(model)}
    export_decilm(model, tmp_path / "decilm")
    _check_export(model, tmp_path / "decilm")
    assert widths <= {256, 512, 768}


def test_what_decilm_cannot_say_is_refused_before_writing(tmp_path):
    model = tiny_llama(intermediate=128)  # no ffn_mult gives a width that is not a multiple of 256
    with pytest.raises(ValueError, match="multiples of 256"):
        export_decilm(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    from sparsekit.bench.coverage import tiny_model

    with pytest.raises(ValueError, match="Llama layout"):
        export_decilm(tiny_model("gpt2"), tmp_path / "b")
    queries = tiny_llama()
    keep_heads(
        describe(queries)[1], torch.tensor([0, 2]), torch.tensor([0, 1])
    )  # 2 of 4 query heads, both KV
    with pytest.raises(ValueError, match="query heads"):
        export_decilm(copy.deepcopy(queries), tmp_path / "c")
    assert not any(tmp_path.iterdir())
