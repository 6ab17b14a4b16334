"""transformers' 'sdpa' attention on the causal CPU kernels (bf16, fp32) inside ``calibration_attention``."""

import pytest
import torch
import transformers
from transformers.modeling_utils import AttentionInterface

import sparsekit
from sparsekit.hf import attention as hf_attention
from tests.conftest import require_avx2, require_avx512_bf16


@pytest.fixture
def spy(monkeypatch):
    """The kernel's calls through the wrapper, as (shape, dtype) (the kernel still runs)."""
    calls = []
    real = hf_attention.causal_attention_cpu

    def counted(*args, **kwargs):
        calls.append((args[0].shape, args[0].dtype))
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "causal_attention_cpu", counted)
    return calls


@pytest.fixture
def kernel_calls(spy):
    """``spy`` where the bf16 kernel runs."""
    require_avx512_bf16("the bf16 attention kernel")
    return spy


@pytest.fixture
def fp32_calls(spy):
    """``spy`` where the fp32 kernel runs."""
    require_avx2("the fp32 attention kernel")
    return spy


def _model(model_type: str):
    """A tiny random model with head dim 64 (the kernel's smallest)."""
    common = dict(
        vocab_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        hidden_size=256, intermediate_size=256, max_position_embeddings=128,
    )  # fmt: skip
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen3": lambda: transformers.Qwen3Config(**(common | {"hidden_size": 128}), head_dim=64),
        "mistral": lambda: transformers.MistralConfig(**common),
    }[model_type]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def _logits(model, ids, autocast=True, **kwargs):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(ids, use_cache=False, **kwargs).logits.float()


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral"])
def test_autocast_forward_takes_the_kernel_and_matches_sdpa(kernel_calls, model_type, caplog, monkeypatch):
    """Mixed-precision logits with the kernel are as close to the fp32 model's as SDPA's are; the
    first use is logged."""
    monkeypatch.setitem(hf_attention._state, "logged", False)
    caplog.set_level("INFO", logger="sparsekit.hf.attention")
    model = _model(model_type)
    ids = torch.randint(0, 128, (3, 70))
    exact = _logits(model, ids, autocast=False)
    sdpa = _logits(model, ids)
    assert not kernel_calls
    with hf_attention.calibration_attention():
        ours = _logits(model, ids)
    assert [dtype for _, dtype in kernel_calls] == [torch.bfloat16] * 2  # one per decoder block
    assert sum("causal bf16 CPU kernel" in r.message for r in caplog.records) == 1
    err, err_sdpa = (ours - exact).abs().max().item(), (sdpa - exact).abs().max().item()
    assert err <= 1.5 * err_sdpa + 1e-2, (err, err_sdpa)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral"])
def test_fp32_forward_takes_the_fp32_kernel_and_matches_sdpa(fp32_calls, model_type, caplog, monkeypatch):
    """fp32 logits with the kernel are as close to the float64 model's as fp32 SDPA's are; the first
    use is logged."""
    monkeypatch.setitem(hf_attention._state, "logged", False)
    caplog.set_level("INFO", logger="sparsekit.hf.attention")
    model = _model(model_type)
    ids = torch.randint(0, 128, (3, 70))
    sdpa = _logits(model, ids, autocast=False)
    assert not fp32_calls
    with hf_attention.calibration_attention():
        ours = _logits(model, ids, autocast=False)
    assert [dtype for _, dtype in fp32_calls] == [torch.float32] * 2  # one per decoder block
    assert sum("causal fp32 CPU kernel" in r.message for r in caplog.records) == 1
    exact = _logits(model.double(), ids, autocast=False)
    err, err_sdpa = (ours - exact).abs().max().item(), (sdpa - exact).abs().max().item()
    assert err <= 2 * err_sdpa + 1e-5, (err, err_sdpa)


def test_autocast_to_another_dtype_keeps_sdpa(fp32_calls):
    """fp32 q / k / v under CPU autocast to fp16: SDPA would compute in fp16, so neither kernel
    takes them (outside autocast the same tensors go to the fp32 kernel)."""
    module = _model("llama").model.layers[0].self_attn
    q, k, v = (torch.randn(1, n, 40, 64) for n in (4, 2, 2))
    args = (module, q, k, v, None, 0.0, True, None, {})
    assert hf_attention._kernel_inputs(*args) is not None
    with torch.autocast("cpu", dtype=torch.float16):
        assert hf_attention._kernel_inputs(*args) is None


def test_where_sdpa_differs_the_wrapper_keeps_sdpa(fp32_calls):
    """A padding mask, gradients, a single query and float64 all go to SDPA, unchanged (fp32 inputs,
    which the kernel takes otherwise: the last forward shows it does)."""
    model = _model("llama")
    ids = torch.randint(0, 128, (2, 40))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with hf_attention.calibration_attention():
        padded = _logits(model, ids, attention_mask=mask, autocast=False)
        one = _logits(model, ids[:, :1], autocast=False)
        model.train(False)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        wide = _logits(model.double(), ids, autocast=False)
        assert not fp32_calls
        _logits(model.float(), ids, autocast=False)
    assert len(fp32_calls) == 2
    assert torch.equal(padded, _logits(model, ids, attention_mask=mask, autocast=False))
    assert torch.equal(one, _logits(model, ids[:, :1], autocast=False))
    assert torch.equal(wide, _logits(model.double(), ids, autocast=False))


def test_restores_transformers_sdpa_even_on_error():
    original = AttentionInterface._global_mapping["sdpa"]
    with pytest.raises(RuntimeError, match="inside"):
        with hf_attention.calibration_attention():
            with hf_attention.calibration_attention():  # re-entrant
                assert AttentionInterface._global_mapping["sdpa"] is not original
            assert AttentionInterface._global_mapping["sdpa"] is not original
            raise RuntimeError("inside")
    assert AttentionInterface._global_mapping["sdpa"] is original


def test_env_switch_is_validated(monkeypatch):
    hf_attention.cpu_attention_mode.cache_clear()
    try:
        monkeypatch.setenv("SPARSEKIT_CPU_ATTENTION", "flash")
        with pytest.raises(ValueError, match="SPARSEKIT_CPU_ATTENTION is 'flash'.*auto, sdpa"):
            hf_attention.cpu_attention_mode()
        hf_attention.cpu_attention_mode.cache_clear()
        monkeypatch.setenv("SPARSEKIT_CPU_ATTENTION", "sdpa")
        original = AttentionInterface._global_mapping["sdpa"]
        with hf_attention.calibration_attention():
            assert AttentionInterface._global_mapping["sdpa"] is original
    finally:
        hf_attention.cpu_attention_mode.cache_clear()


def test_attention_mode_overrides_the_env_inside_and_restores_it(monkeypatch):
    hf_attention.cpu_attention_mode.cache_clear()
    monkeypatch.setenv("SPARSEKIT_CPU_ATTENTION", "auto")
    original = AttentionInterface._global_mapping["sdpa"]
    try:
        with pytest.raises(ValueError, match="attention mode 'flash': choose one of auto, sdpa"):
            with hf_attention.attention_mode("flash"):
                pass
        with hf_attention.attention_mode("sdpa"):
            assert hf_attention.active_attention_mode() == "sdpa"
            with hf_attention.calibration_attention():  # SDPA kept: nothing is swapped in
                assert AttentionInterface._global_mapping["sdpa"] is original
            with hf_attention.attention_mode("auto"):  # nested: the inner one wins, then unwinds
                assert hf_attention.active_attention_mode() == "auto"
            assert hf_attention.active_attention_mode() == "sdpa"
        with pytest.raises(RuntimeError), hf_attention.attention_mode("sdpa"):
            raise RuntimeError("a failed prune")
        assert hf_attention.active_attention_mode() == "auto"
        with hf_attention.calibration_attention():
            assert AttentionInterface._global_mapping["sdpa"] is not original
    finally:
        hf_attention.cpu_attention_mode.cache_clear()


def test_prune_runs_its_mixed_calibration_forwards_on_the_kernel(kernel_calls):
    """sparsekit.prune enters the context: bf16-mixed forwards reach the bf16 kernel, fp32 ones the
    fp32 kernel, and both prune to the same sparsity."""
    ids = torch.randint(0, 128, (4, 64))
    mixed, fp32 = _model("llama"), _model("llama")
    sparsekit.prune(mixed, "wanda", 0.5, calib=ids, forward_dtype="bf16-mixed", show_progress=False)
    assert kernel_calls and {dtype for _, dtype in kernel_calls} == {torch.bfloat16}
    n = len(kernel_calls)
    sparsekit.prune(fp32, "wanda", 0.5, calib=ids, forward_dtype="float32", show_progress=False)
    assert len(kernel_calls) > n and {dtype for _, dtype in kernel_calls[n:]} == {torch.float32}
    for a, b in zip(mixed.model.layers, fp32.model.layers, strict=True):
        for m1, m2 in ((a.mlp.down_proj, b.mlp.down_proj), (a.self_attn.q_proj, b.self_attn.q_proj)):
            assert (m1.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)
            assert (m2.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)


def test_prune_runs_its_fp32_calibration_forwards_on_the_fp32_kernel(fp32_calls):
    """On any AVX2 CPU: fp32 calibration forwards reach the fp32 kernel, and SPARSEKIT_CPU_ATTENTION's
    'sdpa' (here ``attention_mode``) keeps SDPA; both prune to half the weights."""
    ids = torch.randint(0, 128, (4, 64))
    ours, sdpa = _model("llama"), _model("llama")
    sparsekit.prune(ours, "wanda", 0.5, calib=ids, forward_dtype="float32", show_progress=False)
    assert fp32_calls and {dtype for _, dtype in fp32_calls} == {torch.float32}
    n = len(fp32_calls)
    with hf_attention.attention_mode("sdpa"):
        sparsekit.prune(sdpa, "wanda", 0.5, calib=ids, forward_dtype="float32", show_progress=False)
    assert len(fp32_calls) == n
    for a, b in zip(ours.model.layers, sdpa.model.layers, strict=True):
        for m in (a.mlp.down_proj, b.mlp.down_proj, a.self_attn.q_proj, b.self_attn.q_proj):
            assert (m.weight == 0).float().mean() == pytest.approx(0.5, abs=0.01)
