"""Compressed sparse checkpoints: save, load, and export to an ordinary dense HF checkpoint.

A checkpoint folder holds:
  model.safetensors   the model's state dict with every SparseLinear in its compressed form
                      (header metadata: ``sparsekit_format_version`` and the per-layer formats)
  config.json         the HF config plus ``quantization_config = {"quant_method": "sparsekit",
                      "format_version": 1, "layers": {name: {format, in_features, ...}}}`` so
                      that ``AutoModelForCausalLM.from_pretrained`` finds sparsekit's quantizer
  tokenizer files, generation_config.json (when given / present)
Only safetensors is ever read (no pickle). Writes go to a temporary folder that is renamed into
place, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparsekit._io import atomic_dir
from sparsekit.formats.weight import weight_format
from sparsekit.models import is_conv1d, set_submodule
from sparsekit.nn import SparseLinear
from sparsekit.pruning.structured import resize_to_widths

from .expert_storage import compress_experts, dense_expert_tensor, densify_experts, install_expert_shells

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
QUANT_METHOD = "sparsekit"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A sparsekit checkpoint that cannot be read: the message names the problem and the fix."""


# ----------------------------------------------------------------------------- metadata
def layer_metadata(model: nn.Module) -> dict[str, dict[str, Any]]:
    """name -> {format, in_features, out_features, bias, nnz, conv1d} for every SparseLinear."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            layers[name] = {
                "format": module.format,
                "in_features": module.in_features,
                "out_features": module.out_features,
                "bias": module.bias is not None,
                "nnz": module.weight_format.stored_nnz(module) or None,
                "conv1d": bool(module.conv1d),
            }
    return layers


def quantization_config_dict(model: nn.Module) -> dict[str, Any]:
    qc = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "layers": layer_metadata(model)}
    widths = getattr(getattr(model, "config", None), "block_widths", None)
    if widths:  # per-block widths of an adaptively width-pruned model
        qc["widths"] = widths
    return qc


def install_widths(model: nn.Module, widths: list[dict[str, int]] | None) -> None:
    """Resize the blocks of a freshly built model to a checkpoint's per-block widths."""
    if not widths:
        return
    try:
        resize_to_widths(model, widths)
    except ValueError as exc:
        raise CheckpointError(
            f"config.json quantization_config.widths: {exc}; save the model again"
        ) from None
    model.config.block_widths = widths


def check_format_version(version: Any, where: str) -> None:
    if version is None:
        raise CheckpointError(
            f"{where} has no sparsekit format version; it was not written by sparsekit.save"
        )
    if int(version) != FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has sparsekit format version {version}, this sparsekit reads version {FORMAT_VERSION}; "
            f"install the sparsekit release that wrote it, or re-save the model with this one"
        )


def install_sparse_shells(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Put empty SparseLinear modules (meta device) where the checkpoint has compressed layers."""
    for name, info in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"checkpoint layer {name} does not exist in {type(model).__name__}; the config.json and "
                "model.safetensors come from different models: re-save the model with sparsekit.save"
            ) from None
        if not (isinstance(old, (nn.Linear, SparseLinear)) or is_conv1d(old)):
            raise CheckpointError(
                f"checkpoint layer {name} is a {type(old).__name__} here, not a linear layer"
            )
        if isinstance(old, SparseLinear):
            shape = (old.out_features, old.in_features)
        else:
            shape = tuple(old.weight.T.shape if is_conv1d(old) else old.weight.shape)
        if shape != (info["out_features"], info["in_features"]):
            raise CheckpointError(
                f"checkpoint layer {name} is [{info['out_features']}, {info['in_features']}] but its "
                f"config.json builds it as {list(shape)}; the config and the weights come from "
                "different models: save the model again with sparsekit.save"
            )
        dtype = next((t.dtype for t in old.parameters() if t.is_floating_point()), None)
        shell = SparseLinear(
            info["in_features"],
            info["out_features"],
            bias=info["bias"],
            format=info["format"],
            nnz=info.get("nnz") or 0,
            device="meta",
            dtype=dtype,
        )
        shell.conv1d = bool(info.get("conv1d", False))
        set_submodule(model, name, shell)


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (tied embeddings); return (state, {dropped: kept})."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out, aliases


def is_checkpoint(path: str | Path) -> bool:
    """A folder written by ``save`` (``quant_method: "sparsekit"`` in its config.json)."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == QUANT_METHOD


def save(
    model: nn.Module,
    save_directory: str | Path,
    tokenizer=None,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (with its SparseLinear layers compressed) to ``save_directory``, atomically.

    ``extra_json`` {file name: JSON-able} lands in the same folder (e.g. the prune report).
    Returns the folder. Load it with ``sparsekit.load(dir)`` or, after ``import sparsekit``,
    ``AutoModelForCausalLM.from_pretrained(dir)``.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("sparsekit.save needs a Hugging Face model (one with .config)")
    qconfig = quantization_config_dict(model)
    state, aliases = _dedupe_shared(model.state_dict())
    experts = compress_experts(model, state)
    if experts:  # fused routed-expert tensors stored compressed (dense again once loaded)
        qconfig["experts"] = experts
    metadata = {
        "format": "pt",
        "sparsekit_format_version": str(FORMAT_VERSION),
        "sparsekit_layers": json.dumps({k: v["format"] for k, v in qconfig["layers"].items()}),
        "sparsekit_aliases": json.dumps(aliases),
        "sparsekit_checksums": json.dumps({k: tensor_checksum(v) for k, v in state.items()}),
    }
    config = copy.deepcopy(config)
    if hasattr(config, "block_widths"):
        del config.block_widths  # kept in quantization_config, where the loader reads it
    config.quantization_config = qconfig
    with atomic_dir(save_directory) as tmp:
        config.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS_NAME), metadata=metadata)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for file_name, data in (extra_json or {}).items():
            (tmp / file_name).write_text(json.dumps(data, indent=2))
    log.info(
        "saved %d sparse layers and %d compressed expert tensors to %s",
        len(qconfig["layers"]),
        len(experts),
        save_directory,
    )
    return Path(save_directory)


# ----------------------------------------------------------------------------- integrity
def tensor_checksum(t: torch.Tensor) -> str:
    """crc32 of a tensor's bytes, as 8 hex digits."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(data):08x}"


def validate_state(
    state: dict[str, torch.Tensor], metadata: dict[str, str], layers: dict[str, dict[str, Any]], where: str
) -> None:
    """Refuse a damaged checkpoint before a kernel indexes with it, naming the tensor.

    Checks: every tensor the writer recorded is present, with the crc32 it had when written, and
    none was added; every compressed layer's (and fused expert tensor's) tensors fit its format
    (shapes, dtypes, and contents: 2:4 positions distinct and ascending, bitmap bit counts and tile
    offsets consistent); every floating-point tensor is finite.
    """
    fix = "the file is damaged: save the model again (or copy the folder again)"
    recorded = metadata.get("sparsekit_checksums")
    if recorded is None:
        log.warning("%s carries no per-tensor checksums (written by an older sparsekit); not verified", where)
    else:
        checksums = json.loads(recorded)
        missing = [k for k in checksums if k not in state]
        extra = [k for k in state if k not in checksums]
        if missing or extra:
            raise CheckpointError(f"{where}: tensors missing {missing[:5]}, unexpected {extra[:5]}; {fix}")
        for name, crc in checksums.items():
            if tensor_checksum(state[name]) != crc:
                raise CheckpointError(f"{where}: tensor {name} does not match its checksum; {fix}")
    for name, info in layers.items():
        fmt = weight_format(info["format"])
        tensors = SimpleNamespace(**{s.name: state.get(f"{name}.{s.name}") for s in fmt.layout(1, 4)})
        try:
            fmt.validate(tensors, info["out_features"], info["in_features"], name)
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: tensor {name} holds NaN or Inf values; {fix}")


def verify_file(path: str | Path, layers: dict[str, dict[str, Any]]) -> None:
    """``validate_state`` on a checkpoint file on disk (the ``from_pretrained`` path)."""
    path = Path(path)
    metadata = _check_safetensors_file(path)
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    validate_state(state, metadata, layers, str(path))


# ----------------------------------------------------------------------------- reading
def _check_safetensors_file(path: Path) -> dict[str, str]:
    """Validate the header and the file length of a safetensors file; return its metadata."""
    fix = "the file is damaged: save the model again with sparsekit.save (or copy the folder again)"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes, no safetensors header); {fix}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is truncated: its header claims {header_len} bytes, the file has {size}; {fix}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header; {fix}") from None
    data_len = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_len != size:
        raise CheckpointError(
            f"{path} is truncated or padded: header and tensors need {8 + header_len + data_len} bytes, "
            f"the file has {size}; {fix}"
        )
    return header.get("__metadata__") or {}


def read_state(
    directory: str | Path, layers: dict[str, dict[str, Any]] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with tied aliases restored, safetensors metadata) of a sparsekit checkpoint,
    validated (``validate_state``) against the compressed ``layers`` of its config when given."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} in {directory}; write one with sparsekit.save(model, dir)"
        )
    metadata = _check_safetensors_file(path)
    check_format_version(metadata.get("sparsekit_format_version"), str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own error type for a bad file
        raise CheckpointError(f"{path} could not be read ({exc}); save the model again") from exc
    if layers is not None:
        validate_state(state, metadata, layers, str(path))
    for alias, source in json.loads(metadata.get("sparsekit_aliases", "{}")).items():
        state[alias] = state[source]
    return state, metadata


def _materialize_computed_buffers(model: nn.Module) -> None:
    """After ``load_state_dict(assign=True)`` on a model built on the meta device, give the buffers
    the checkpoint does not hold (rotary ``inv_freq`` tables, Gemma's ``embed_scale``) their computed
    values the way transformers computes them: its own ``_init_weights`` of that module, run on a
    stand-in with fresh CPU tensors where the module also holds loaded parameters (so the loaded
    weights are never re-initialised)."""
    for module in model.modules():
        meta = [k for k, b in module._buffers.items() if b is not None and b.device.type == "meta"]
        if not meta:
            continue
        target = module
        if any(True for _ in module.parameters(recurse=False)):
            target = copy.copy(module)
            target._parameters = {
                k: None if p is None else nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=False)
                for k, p in module._parameters.items()
            }
            target._buffers = dict(module._buffers)
        for key in meta:
            target._buffers[key] = torch.empty_like(module._buffers[key], device="cpu")
        for attr, value in vars(module).items():  # plain tensor attributes beside the buffers
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                setattr(target, attr, torch.empty_like(value, device="cpu"))
        model._init_weights(target)
        if target is not module:
            for key in meta:
                module._buffers[key] = target._buffers[key]
            for attr, value in vars(target).items():
                if isinstance(value, torch.Tensor) and getattr(module, attr, None) is not None:
                    if getattr(module, attr).device.type == "meta":
                        setattr(module, attr, value)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"tensors {left[:5]} were neither in the checkpoint nor computable")


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not fit the model its config.json describes: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; the config and the weights come from different models, "
            "save the model again with sparsekit.save"
        )
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(
                f"{where}: {k} has shape {tuple(t.shape)}, the model expects {tuple(expected[k].shape)}; "
                "the config and the weights come from different models: save the model again"
            )


def load_config(directory: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a checkpoint folder")
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(
            f"{directory} is not a sparsekit checkpoint (config.json has no sparsekit quantization_config); "
            "load an ordinary checkpoint with transformers' from_pretrained or sparsekit.hf.models.load_model"
        )
    check_format_version(qc.get("format_version"), str(directory / CONFIG_NAME))
    return config, qc


def stored_tensors(qc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every compressed entry of a checkpoint's quantization_config: linear layers and fused experts."""
    return {**qc.get("layers", {}), **qc.get("experts", {})}


def load(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Rebuild the model of a sparsekit checkpoint with its SparseLinear layers (eval mode).

    The skeleton is built on the meta device (``with torch.device("meta")``), then the
    checkpoint's tensors are assigned (``load_state_dict(state, assign=True)``): the dense
    weights never exist in memory. Computed buffers (rotary tables) are then filled in.
    ``dtype`` casts floating tensors after loading.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    config, qc = load_config(directory, trust_remote_code)
    state, _ = read_state(directory, stored_tensors(qc))
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    install_widths(model, qc.get("widths"))
    install_sparse_shells(model, qc.get("layers", {}))
    install_expert_shells(model, qc.get("experts", {}), CheckpointError)
    _check_shapes(model, state, str(directory / WEIGHTS_NAME))
    model.load_state_dict(state, strict=True, assign=True)
    densify_experts(model)
    _materialize_computed_buffers(model)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    if dtype is not None:
        model.to(dtype)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- export
def _dense_tensors(state: dict[str, torch.Tensor], name: str, info: dict[str, Any]) -> torch.Tensor:
    """Pop layer ``name``'s stored tensors from ``state``; return its dense weight (checkpoint layout)."""
    fmt = weight_format(info["format"])
    n, k = info["out_features"], info["in_features"]
    names = [spec.name for spec in fmt.layout(n, k)]
    tensors = SimpleNamespace(**{key: state.pop(f"{name}.{key}") for key in names})
    weight = fmt.to_dense(tensors, n, k)
    return weight.T.contiguous() if info.get("conv1d") else weight


def export_dense(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Write an ordinary HF checkpoint (zeros kept, no quantization_config) that any engine loads.

    Tensors are decompressed straight from the safetensors file; no model is built.
    """
    from transformers import AutoConfig

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if src_dir.resolve() == out_dir.resolve():
        raise ValueError("export_dense needs an --out folder other than the source checkpoint")
    _, qc = load_config(src_dir)
    state, metadata = read_state(src_dir, stored_tensors(qc))
    aliases = json.loads(metadata.get("sparsekit_aliases", "{}"))
    for alias in aliases:  # transformers ties them again on load
        state.pop(alias, None)
    for name, info in qc.get("layers", {}).items():
        state[f"{name}.weight"] = _dense_tensors(state, name, info)
    for name, info in qc.get("experts", {}).items():
        state[name] = dense_expert_tensor(state, name, info)
    with atomic_dir(out_dir) as tmp:
        for item in src_dir.iterdir():
            if item.is_file() and item.name not in (WEIGHTS_NAME, CONFIG_NAME):
                shutil.copy2(item, tmp / item.name)
        config = AutoConfig.from_pretrained(src_dir)
        del config.quantization_config
        config.save_pretrained(tmp)
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    log.info("exported %s as a dense checkpoint to %s", src_dir, out_dir)
    return out_dir
