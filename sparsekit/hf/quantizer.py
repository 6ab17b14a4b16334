"""transformers quantizer plugin: ``from_pretrained`` of a sparsekit checkpoint gives SparseLinear layers.

After ``register_with_transformers()`` (importing this module calls it; ``import sparsekit``
imports this module as soon as transformers is imported), a config.json whose
``quantization_config`` has ``quant_method: "sparsekit"`` makes transformers build the model on
the meta device, call our ``_process_model_before_weight_loading`` (which puts empty SparseLinear
modules where the checkpoint has compressed layers), and then load the compressed tensors into
their buffers like any other weight.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import (
    FORMAT_VERSION,
    QUANT_METHOD,
    WEIGHTS_NAME,
    CheckpointError,
    check_format_version,
    install_sparse_shells,
    install_widths,
    verify_file,
)
from .expert_storage import densify_experts, install_expert_shells


class SparsekitConfig(QuantizationConfigMixin):
    """``quantization_config`` of a sparsekit checkpoint: format version and per-layer formats."""

    def __init__(
        self,
        format_version: int = FORMAT_VERSION,
        layers: dict[str, Any] | None = None,
        widths: list[dict[str, int]] | None = None,
        experts: dict[str, Any] | None = None,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = layers or {}
        self.widths = widths
        self.experts = experts or {}

    def post_init(self) -> None:
        check_format_version(self.format_version, "quantization_config")


class SparsekitHfQuantizer(HfQuantizer):
    """Loads sparsekit's compressed layers; nothing to quantize (checkpoints are pre-compressed)."""

    requires_calibration = True  # only pre-compressed checkpoints: sparsify(model) makes them

    def __init__(self, quantization_config: SparsekitConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        check_format_version(quantization_config.format_version, "config.json quantization_config")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        layers = self.quantization_config.layers
        files = [f for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
        if not files:
            raise CheckpointError(
                f"a sparsekit checkpoint is one {WEIGHTS_NAME}; transformers found {checkpoint_files}: "
                "save the model again with sparsekit.save"
            )
        experts = self.quantization_config.experts
        for path in files:  # checksums, structure, finite values: before any weight is loaded
            verify_file(path, {**layers, **experts})
        install_widths(model, self.quantization_config.widths)
        install_sparse_shells(model, layers)
        install_expert_shells(model, experts, CheckpointError)
        # A parent's _init_weights may reach for child.weight (GPT-2 scales c_proj.weight), which a
        # compressed layer does not have; every tensor of the parents is loaded from the checkpoint.
        for name in layers:
            parent = name.rpartition(".")[0]
            model.get_submodule(parent)._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        densify_experts(model)  # fused experts run dense: back to their 3-D parameters
        return model

    def is_serializable(self) -> bool:
        return False  # save with sparsekit.save(model, dir), which writes the layer metadata afresh

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def register_with_transformers() -> None:
    """Make transformers' ``from_pretrained`` load sparsekit checkpoints (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SparsekitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SparsekitHfQuantizer)


register_with_transformers()
