"""Plain transformers: from_pretrained of a sparsekit checkpoint gives SparseLinear layers."""

import pytest
import torch

from sparsekit.hf.checkpoint import save
from sparsekit.hf.quantizer import register_with_transformers
from sparsekit.nn import SparseLinear, sparsify
from sparsekit.pruning import PruneConfig, prune_model
from tests.conftest import tiny_model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_from_pretrained_finds_the_plugin(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    register_with_transformers()
    register_with_transformers()  # idempotent
    model = tiny_model(arch)
    prune_model(model, None, PruneConfig(method="magnitude", sparsity="2:4", show_progress=False))
    sparsify(model)
    save(model, tmp_path / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    swapped = [m for m in loaded.modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == sum(isinstance(m, SparseLinear) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
