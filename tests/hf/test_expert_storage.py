"""Fused MoE expert tensors in compressed checkpoints: stored in their format, loaded back 3-D."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open

import sparsekit
from sparsekit.bench.coverage import calib_ids, logits, tiny_model
from sparsekit.hf.checkpoint import CheckpointError, export_dense


def _pruned(family: str, sparsity: str):
    model = tiny_model(family)
    sparsekit.prune(model, method="wanda", sparsity=sparsity, calib=calib_ids(), show_progress=False)
    return model


def _experts_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 3}


@pytest.mark.parametrize(
    ("family", "sparsity", "fmt"), [("mixtral", "2:4", "2:4"), ("gpt_oss", "0.6", "bitmap")]
)
def test_sparse_experts_are_stored_compressed_and_load_back_3d(tmp_path, family, sparsity, fmt):
    model = _pruned(family, sparsity)
    fused = _experts_params(model)
    ids = calib_ids(2, 12)
    want = logits(model, ids)
    sparsekit.sparsify(model)
    sparsekit.save(model, tmp_path / "c")
    model.save_pretrained(tmp_path / "plain")  # the same model, experts dense with zeros
    stored = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]["experts"]
    assert set(stored) == set(fused) and {v["format"] for v in stored.values()} == {fmt}
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    assert not keys & set(fused) and all(f"{name}.values" in keys for name in fused)
    expert_bytes = sum(t.numel() * t.element_size() for t in fused.values())
    saved = (tmp_path / "c" / "model.safetensors").stat().st_size
    assert saved < (tmp_path / "plain" / "model.safetensors").stat().st_size - expert_bytes // 4
    for loaded in (
        sparsekit.load(tmp_path / "c"),
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval(),
    ):
        got = _experts_params(loaded)
        assert set(got) == set(fused) and all(torch.equal(got[n], fused[n]) for n in fused)
        torch.testing.assert_close(logits(loaded, ids), want)
    export_dense(tmp_path / "c", tmp_path / "dense")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert getattr(plain.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(plain, ids), want)


def test_dense_experts_stay_plain_tensors(tmp_path):
    model = tiny_model("qwen3_moe")
    sparsekit.save(model, tmp_path / "c")
    assert "experts" not in json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]


def test_an_expert_entry_that_does_not_match_the_model_is_refused(tmp_path):
    model = _pruned("mixtral", "2:4")
    sparsekit.save(model, tmp_path / "c")
    cfg_path = tmp_path / "c" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    name = next(iter(cfg["quantization_config"]["experts"]))
    cfg["quantization_config"]["experts"][name]["experts"] = 4
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="different models"):
        sparsekit.load(tmp_path / "c")
