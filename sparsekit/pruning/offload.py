"""Decoder blocks whose weights accelerate offloaded (``device_map`` with "cpu"/"disk" entries).

A model loaded with ``from_pretrained(..., device_map=..., offload_folder=...)`` keeps offloaded
weights on the meta device; accelerate's ``AlignDevicesHook`` on each module loads them from its
``weights_map`` for every forward and drops them after. To prune such a block, ``materialized``
loads its tensors once onto the compute device and pauses the hooks' offloading; on exit the
weights of the modules the caller marked as changed are written back (to the offload folder for
disk, in place for CPU RAM) and the block returns to meta, so the model still never holds more
than one block's weights. Duck-typed on the hook's attributes: accelerate is imported only when
an offloaded module is present.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)


def _offloading_hook(module: nn.Module):
    hook = getattr(module, "_hf_hook", None)
    return (
        hook if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None else None
    )


def offloaded_modules(root: nn.Module) -> list[nn.Module]:
    """Modules under ``root`` (itself included) whose tensors an accelerate hook offloads."""
    return [m for m in root.modules() if _offloading_hook(m) is not None]


def _hooked_tensor_names(module: nn.Module, hook) -> list[str]:
    from accelerate.utils import named_module_tensors

    return [
        name
        for name, _ in named_module_tensors(
            module,
            include_buffers=hook.offload_buffers,
            recurse=hook.place_submodules,
            remove_non_persistent=True,
        )
    ]


def _write_back(weights_map, name: str, tensor: torch.Tensor) -> None:
    """Store ``tensor`` as the offloaded value of ``name`` (a PrefixedDataset over accelerate's loader)."""
    value = tensor.detach().to("cpu").contiguous()
    if isinstance(weights_map, dict):
        weights_map[name] = value
        return
    loader, key = weights_map.dataset, weights_map.prefix + name
    if key in loader.state_dict:  # offloaded to CPU RAM
        loader.state_dict[key] = value
        return
    if loader.save_folder is None:
        raise ValueError(
            f"{key} is offloaded to the checkpoint's own files and there is no offload folder to write "
            "its pruned value to: load the model with from_pretrained(..., offload_folder=DIR)"
        )
    from accelerate.utils import offload_weight

    offload_weight(value, key, loader.save_folder, loader.index)  # the index now points at the new file


def check_writable_offload(root: nn.Module) -> None:
    """Before any weight changes: every offloaded tensor that lives in the checkpoint's own files
    needs an offload folder to take its pruned value (otherwise the write-back would fail midway)."""
    for module in offloaded_modules(root):
        weights_map = _offloading_hook(module).weights_map
        if isinstance(weights_map, dict):
            continue
        loader = weights_map.dataset
        for name in _hooked_tensor_names(module, _offloading_hook(module)):
            key = weights_map.prefix + name
            if key not in loader.state_dict and loader.save_folder is None:
                raise ValueError(
                    f"{key} is offloaded to the checkpoint's own files and there is no offload folder to "
                    "write its pruned value to: load the model with from_pretrained(..., offload_folder=DIR)"
                )


@contextmanager
def materialized(block: nn.Module, device: torch.device) -> Iterator[set[nn.Module]]:
    """Load ``block``'s offloaded tensors onto ``device`` for the duration; yields a set to which the
    caller adds the modules it changed, whose tensors are written back on exit. No-op otherwise."""
    hooked = [(m, _offloading_hook(m)) for m in offloaded_modules(block)]
    changed: set[nn.Module] = set()
    if not hooked:
        yield changed
        return
    from accelerate.utils import set_module_tensor_to_device

    saved = []
    for module, hook in hooked:
        names = _hooked_tensor_names(module, hook)
        for name in names:
            set_module_tensor_to_device(module, name, device, value=hook.weights_map[name])
        saved.append((names, hook.offload, hook.execution_device))
        hook.offload, hook.execution_device = False, device  # forwards now run on what we loaded
    try:
        yield changed
    finally:
        written = 0
        for (module, hook), (names, offload, execution_device) in zip(hooked, saved, strict=True):
            touched = any(m in changed for m in module.modules())
            for name in names:
                if touched:
                    _write_back(hook.weights_map, name, _tensor(module, name))
                    written += 1
                set_module_tensor_to_device(module, name, "meta")
            hook.offload, hook.execution_device = offload, execution_device
        log.debug("offloaded block: wrote back %d tensors", written)


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]
