"""Test-session setup.

Triton kernels run on CPU tensors through the interpreter, which must be switched on before
triton is first imported, so it is set here, ahead of any sparsekit import.
"""

import os
import shutil
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tolerances per dtype (rtol, atol): one table for every kernel test.
TOL = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def extension_must_build() -> bool:
    """On x86-64 Linux with a C++ compiler (and the extension not switched off by
    SPARSEKIT_CPU_EXT=0) the C++ CPU extension builds; a failure there is a bug."""
    import platform

    return (
        platform.system() == "Linux"
        and platform.machine() == "x86_64"
        and os.environ.get("SPARSEKIT_CPU_EXT", "1") != "0"
        and any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    )


def require_cpu_extension():
    """The compiled C++ CPU extension, for tests of what only it does: fails where it must build and
    did not, skips (saying why) where it cannot build (no compiler, not x86-64, or switched off)."""
    from sparsekit.kernels import cpu_ext

    module = cpu_ext.extension()
    if module is None:
        if extension_must_build():
            pytest.fail(f"the C++ CPU extension failed to build: {cpu_ext.build_error()}")
        pytest.skip(
            "no C++ compiler, not x86-64, or SPARSEKIT_CPU_EXT=0: the extension cannot build here; these "
            "tests run on CI and on any x86-64 Linux machine with g++ after `make setup`"
        )
    return module


_GGUF_CACHE: list[str] = []


def pytest_configure(config):
    """The session converts the embedded GGUF once into its own cache folder (inherited by the
    CLI subprocesses), so the conversion path runs in every session and no user cache is touched."""
    if "SPARSEKIT_GGUF_CACHE" not in os.environ:
        _GGUF_CACHE.append(tempfile.mkdtemp(prefix="sparsekit-gguf-cache-"))
        os.environ["SPARSEKIT_GGUF_CACHE"] = _GGUF_CACHE[0]


def pytest_unconfigure(config):
    for folder in _GGUF_CACHE:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    """Each test module starts with torch.compile's caches empty: compiled layers of every module
    share ``SparseLinear.forward``'s code object, whose cache (8 entries) the whole suite would fill."""
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct, fp32, CPU) and its tokenizer, loaded once.

    Tests that change the model must work on ``copy.deepcopy(model)``.
    """
    from sparsekit.hf.models import load_model

    model, tokenizer = load_model("smollm2")
    return model, tokenizer


def require_avx512_bf16(what: str) -> None:
    """Skip, saying where ``what`` runs, unless this CPU runs the ``avx512-bf16`` level (checked
    through the C++ extension, which must build here: ``require_cpu_extension``)."""
    from sparsekit.kernels import cpu_ext
    from sparsekit.kernels._backend import CpuIsa

    require_cpu_extension()
    best = cpu_ext.supported_isa()
    if best is not CpuIsa.AVX512_BF16:
        pytest.skip(
            f"this CPU runs at most {best.value}; {what} needs avx512-bf16 (AVX-512 + AVX512_BF16 + "
            "VBMI2) and runs on such a CPU: AMD Zen 4 and later, Intel Sapphire Rapids and later (the "
            "EPYC-512 of docs/results.md)"
        )


def require_avx2(what: str) -> None:
    """Skip, saying where ``what`` runs, unless this CPU runs the ``avx2`` level or above (checked
    through the C++ extension, which must build here: ``require_cpu_extension``)."""
    from sparsekit.kernels import cpu_ext
    from sparsekit.kernels._backend import CpuIsa

    require_cpu_extension()
    best = cpu_ext.supported_isa()
    if best is CpuIsa.SCALAR:
        pytest.skip(
            f"this CPU runs no AVX2; {what} needs AVX2 + FMA and runs on CI's machines and any x86-64 "
            "CPU since Haswell / Zen 1 (the Zen 3 of docs/results.md)"
        )


def tiny_config(model_type: str):
    """A tiny random config (2 layers, hidden 64) of a supported architecture; no downloads."""
    import transformers

    common = dict(vocab_size=128, num_hidden_layers=2, num_attention_heads=4)
    if model_type == "gpt2":
        return transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    if model_type == "opt":
        return transformers.OPTConfig(
            hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64, **common
        )
    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma": transformers.GemmaConfig,
    }
    extra = {"head_dim": 16} if model_type in ("gemma", "qwen3") else {}
    return classes[model_type](
        hidden_size=64,
        intermediate_size=128,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **common,
        **extra,
    )


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "opt", "gpt2")


def tiny_model(model_type: str):
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type))
    return model.eval()
