"""Pruning a model whose blocks accelerate offloaded to disk: as in memory, weights written back."""

import pytest
import torch

from sparsekit.pruning import PruneConfig, prune_model
from sparsekit.pruning.offload import offloaded_modules

DISK_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def _offloaded(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", device_map=DISK_MAP, offload_folder=str(tmp_path / "offload")
    )
    return model.eval()


@pytest.mark.parametrize("method,sparsity", [("sparsegpt", "2:4"), ("wanda", 0.5), ("magnitude", "4:8")])
def test_disk_offloaded_model_prunes_like_the_in_memory_one(saved_llama, method, sparsity):
    reference, tmp_path = saved_llama
    offloaded = _offloaded(tmp_path)
    blocks = offloaded.model.layers
    assert offloaded_modules(blocks[0]) and blocks[0].self_attn.q_proj.weight.device.type == "meta"
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    config = PruneConfig(method=method, sparsity=sparsity, show_progress=False)
    expected = prune_model(reference, ids, config)
    got = prune_model(offloaded, ids, config)

    assert [layer.sparsity for layer in got.layers] == [layer.sparsity for layer in expected.layers]
    assert got.block_rel_errors == pytest.approx(expected.block_rel_errors, rel=1e-5, abs=1e-9)
    # still offloaded: the pruned weights live in the offload folder and come back for each forward
    assert blocks[1].mlp.down_proj.weight.device.type == "meta"
    assert (tmp_path / "offload" / "model.layers.1.mlp.down_proj.weight.dat").is_file()
    probe = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(offloaded(probe).logits, reference(probe).logits, rtol=1e-5, atol=1e-5)


def test_offload_without_a_folder_to_write_to_is_refused(saved_llama):
    _, tmp_path = saved_llama
    offloaded = _offloaded(tmp_path)
    for module in offloaded_modules(offloaded):
        module._hf_hook.weights_map.dataset.save_folder = None
    with pytest.raises(ValueError, match="offload_folder"):
        prune_model(offloaded, None, PruneConfig(method="magnitude", sparsity=0.5, show_progress=False))


def test_cli_prunes_a_disk_offloaded_model(saved_llama):
    from transformers import AutoModelForCausalLM

    from sparsekit.cli import main

    _, tmp_path = saved_llama
    out, offload = tmp_path / "pruned", tmp_path / "offload"
    args = ["prune", str(tmp_path / "dense"), "--method", "magnitude", "--sparsity", "2:4"]
    args += ["--offload-folder", str(offload), "--max-cpu-memory", "64KB", "--out", str(out)]
    assert main(args) == 2  # compressed output would load every layer: refused, named fix
    assert main([*args, "--save-format", "dense"]) == 0
    assert any(offload.glob("model.layers.*.dat")), "blocks were offloaded to disk"
    pruned = AutoModelForCausalLM.from_pretrained(out)
    for block in pruned.model.layers:
        weight = block.mlp.up_proj.weight
        assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
