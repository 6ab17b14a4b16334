"""SmolLM2-135M pruned 2:4, sparsified: same logits and greedy tokens, fewer bytes, exact round trip."""

import copy

import pytest
import torch

from sparsekit.eval.perplexity import perplexity_of_ids
from sparsekit.hf.checkpoint import export_dense, load, save
from sparsekit.hf.data import calibration_ids, evaluation_ids
from sparsekit.hf.finetune import finetune
from sparsekit.hf.quantizer import register_with_transformers
from sparsekit.models import model_bytes
from sparsekit.nn import SparseLinear, sparsify
from sparsekit.pruning import PruneConfig, prune_model
from tests.conftest import TOL

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def pruned_and_sparse(smollm2):
    model, tokenizer = smollm2
    dense = copy.deepcopy(model)
    prune_model(dense, None, PruneConfig(method="magnitude", sparsity="2:4", show_progress=False))
    sparse = copy.deepcopy(dense)
    report = sparsify(sparse)
    return dense, sparse, report, tokenizer


def test_sparsify_swaps_every_block_linear_and_drops_the_bytes(pruned_and_sparse):
    dense, sparse, report, _ = pruned_and_sparse
    assert len(report.layers) == 30 * 7 and set(report.layers.values()) == {"2:4"}
    assert report.model_bytes_before == model_bytes(dense)
    # fp32 2:4: 2.125 of 4 bytes per linear weight; embeddings (tied lm_head) stay dense
    assert report.layer_bytes_after / report.layer_bytes_before == pytest.approx(2.125 / 4, rel=0.01)
    saved = report.layer_bytes_before - report.layer_bytes_after
    assert report.model_bytes_before - report.model_bytes_after == pytest.approx(saved, rel=0.01)
    assert not isinstance(sparse.lm_head, SparseLinear)


def test_same_logits_and_same_greedy_tokens(pruned_and_sparse):
    dense, sparse, _, tokenizer = pruned_and_sparse
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
        kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert torch.equal(sparse.generate(ids, **kw), dense.generate(ids, **kw))


def test_round_trip_and_from_pretrained(pruned_and_sparse, tmp_path):
    from transformers import AutoModelForCausalLM

    _, sparse, _, tokenizer = pruned_and_sparse
    save(sparse, tmp_path / "ck", tokenizer=tokenizer)
    loaded = load(tmp_path / "ck")
    state = sparse.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    register_with_transformers()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert sum(isinstance(m, SparseLinear) for m in hf.modules()) == 210
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        ref = sparse(ids).logits
        assert torch.equal(loaded(ids).logits, ref)
        assert torch.equal(hf(ids).logits, ref)
    export_dense(tmp_path / "ck", tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not any(isinstance(m, SparseLinear) for m in plain.modules())
    assert getattr(plain.config, "quantization_config", None) is None
    with torch.no_grad():
        # dense GEMM vs the 2:4 kernel: the same products summed in another order (fp32 tolerance)
        rtol, atol = TOL[torch.float32]
        torch.testing.assert_close(plain(ids).logits, ref, rtol=rtol, atol=atol)


def test_short_finetune_lowers_perplexity_and_keeps_the_2_4_masks(pruned_and_sparse):
    _, sparse, _, tokenizer = pruned_and_sparse
    model = copy.deepcopy(sparse)
    train_ids = calibration_ids(tokenizer, "wiki-offline", 16, 128, seed=3)
    eval_ids = evaluation_ids(tokenizer, "wiki-offline", max_tokens=2048)
    report = finetune(
        model,
        input_ids=train_ids,
        steps=8,
        lr=1e-4,
        batch_size=2,
        evaluate=lambda m: perplexity_of_ids(m, eval_ids, 256).ppl,
    )
    assert report.masks_exact
    assert report.ppl_after < 0.9 * report.ppl_before, (report.ppl_before, report.ppl_after)
    formats = {m.format for m in model.modules() if isinstance(m, SparseLinear)}
    assert formats == {"2:4"}


@pytest.mark.parametrize("isa", ["avx512-bf16", "avx512", "avx2", "scalar"])
def test_bf16_model_on_every_cpu_isa_is_as_close_to_fp32_as_dense_bf16(pruned_and_sparse, isa):
    """The real model in bf16 through each ISA level's kernels (the bf16-dot ones at avx512-bf16):
    its logits are as far from the fp32 model's as the dense bf16 model's are, at a decode-sized M
    (every level's direct kernel) and at 2 x 13 rows (avx512-bf16 direct, the others blas)."""
    from sparsekit.kernels import cpu_ext
    from sparsekit.kernels._backend import CpuIsa, use_cpu_isa

    if cpu_ext.ISA_LEVEL[CpuIsa.of(isa)] > cpu_ext.ISA_LEVEL[cpu_ext.supported_isa()]:
        pytest.skip(
            f"this CPU runs at most {cpu_ext.supported_isa().value}, not {isa}: the {isa} case runs on a CPU "
            "that has it (avx512-bf16: AVX512_BF16 + VBMI2, e.g. Zen 4 or Sapphire Rapids)"
        )
    dense, sparse, _, tokenizer = pruned_and_sparse
    dense16, sparse16 = copy.deepcopy(dense).bfloat16(), copy.deepcopy(sparse).bfloat16()
    prompts = [
        "The capital of France is Paris, and the capital of Italy is",
        "Water boils at a temperature of",
    ]
    for ids in (
        tokenizer(prompts[1], return_tensors="pt").input_ids,
        tokenizer(prompts, return_tensors="pt", padding=True).input_ids,
    ):
        with torch.no_grad():
            want = dense(ids).logits
            base = (dense16(ids).logits.float() - want).norm() / want.norm()
            with use_cpu_isa(isa):
                got = (sparse16(ids).logits.float() - want).norm() / want.norm()
        assert got <= 1.25 * base + 1e-3, (ids.shape, float(got), float(base))
