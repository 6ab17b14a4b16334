"""Structured pruning: remove decoder blocks (depth), attention or MLP sub-blocks, heads and MLP
channels (width), or experts."""

from .base import (
    StructuredConfig,
    StructuredMethod,
    StructuredReport,
    block_param_count,
    is_structured,
    param_count,
    register_structured,
    structured_method,
    structured_method_names,
)
from .depth import Angular, DepthMethod, ShortenedPPL, ShortenedTaylor, ShortGPT, remove_blocks
from .experts import EAN, REAP, Frequency, RandomExperts, keep_experts
from .layout import BlockWidths, block_widths, resize_to_widths, skip_subblock
from .llm_pruner import LLMPruner
from .minitron import Minitron
from .subblock import BlockPruner, SubblockMethod, TwoSSP
from .width import FLAP, WandaSP, WidthMethod

__all__ = [
    "Minitron",
    "LLMPruner",
    "BlockPruner",
    "SubblockMethod",
    "TwoSSP",
    "skip_subblock",
    "EAN",
    "FLAP",
    "REAP",
    "Frequency",
    "RandomExperts",
    "keep_experts",
    "Angular",
    "DepthMethod",
    "ShortenedPPL",
    "ShortenedTaylor",
    "BlockWidths",
    "ShortGPT",
    "StructuredConfig",
    "StructuredMethod",
    "StructuredReport",
    "WandaSP",
    "WidthMethod",
    "block_param_count",
    "block_widths",
    "is_structured",
    "param_count",
    "register_structured",
    "remove_blocks",
    "resize_to_widths",
    "structured_method",
    "structured_method_names",
]
