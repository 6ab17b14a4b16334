"""sparsekit: one-shot LLM pruning with kernels that make the pruned model smaller and faster.

The package imports lazily: ``import sparsekit.kernels`` (or ``sparsekit.formats``, ...) loads
torch and triton only, never transformers. The names below load their module on first use.
``import sparsekit`` also makes transformers' ``from_pretrained`` read sparsekit checkpoints: the
quantizer plugin registers as soon as transformers is (or already was) imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "perplexity": "sparsekit.api",
    "prune": "sparsekit.api",
    "zero_shot": "sparsekit.api",
    "NMPattern": "sparsekit.formats",
    "Unstructured": "sparsekit.formats",
    "parse_sparsity": "sparsekit.formats",
    "export_dense": "sparsekit.hf.checkpoint",
    "load": "sparsekit.hf.checkpoint",
    "save": "sparsekit.hf.checkpoint",
    "finetune": "sparsekit.hf.finetune",
    "train": "sparsekit.hf.trainer",
    "TrainConfig": "sparsekit.hf.trainer",
    "learn_masks": "sparsekit.hf.maskllm",
    "register_with_transformers": "sparsekit.hf.quantizer",
    "SparseLinear": "sparsekit.nn",
    "sparsify": "sparsekit.nn",
    "PruneConfig": "sparsekit.pruning",
    "PruneReport": "sparsekit.pruning",
    "PruningMethod": "sparsekit.pruning",
    "magnitude_prune": "sparsekit.pruning",
    "prune_model": "sparsekit.pruning",
    "sparsegpt_prune": "sparsekit.pruning",
    "wanda_prune": "sparsekit.pruning",
    "ria_prune": "sparsekit.pruning",
    "admm_update": "sparsekit.kernels.admm",
    "dsnot_refine": "sparsekit.kernels.dsnot",
    "channel_permutation": "sparsekit.pruning.permute",
    "use_backend": "sparsekit.kernels",
    "StructuredConfig": "sparsekit.pruning.structured",
    "StructuredReport": "sparsekit.pruning.structured",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparsekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def _register_quantizer() -> None:
    """Importing the plugin module registers it (a module already importing finishes that itself)."""
    if "sparsekit.hf.quantizer" not in sys.modules:
        importlib.import_module("sparsekit.hf.quantizer")


class _OnTransformersImport(importlib.abc.MetaPathFinder):
    """Registers sparsekit's quantizer right after ``import transformers`` finishes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:
            exec_module(module)
            _register_quantizer()

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register_quantizer()
elif not any(isinstance(f, _OnTransformersImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _OnTransformersImport())
