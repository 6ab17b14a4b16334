"""sparsekit's kernel layer: Triton kernels and their torch references (torch + triton only)."""

from .calib_stats import accumulate_gram, accumulate_sq_sum
from .mask_bits import pack_mask, unpack_mask
from .obs_solve import obs_block_solve, obs_block_solve_ref
from .topk_select import keep_count, nm_keep_mask, topk_keep_mask
from .wanda_mask import wanda_mask, wanda_mask_ref, wanda_mask_torch

__all__ = [
    "accumulate_gram",
    "accumulate_sq_sum",
    "keep_count",
    "nm_keep_mask",
    "obs_block_solve",
    "obs_block_solve_ref",
    "pack_mask",
    "topk_keep_mask",
    "unpack_mask",
    "wanda_mask",
    "wanda_mask_ref",
    "wanda_mask_torch",
]
