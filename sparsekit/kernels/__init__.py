"""sparsekit's kernel layer: Triton kernels and their torch references (torch + triton only)."""

from ._backend import Backend, CpuIsa, current_backend, current_cpu_isa, use_backend, use_cpu_isa
from .bitmap import bitmap_mm, bitmap_mm_ref, compress_bitmap, decompress_bitmap
from .calib_stats import accumulate_gram, accumulate_sq_sum
from .mask_bits import pack_mask, unpack_mask
from .masked_mm import masked_mm, masked_mm_ref
from .obs_solve import obs_block_solve, obs_block_solve_ref
from .sparse24 import compress_24, decompress_24, sparse24_mm, sparse24_mm_ref
from .topk_select import keep_count, nm_keep_mask, topk_keep_mask
from .wanda_mask import wanda_mask, wanda_mask_ref, wanda_mask_torch

__all__ = [
    "Backend",
    "CpuIsa",
    "current_backend",
    "current_cpu_isa",
    "use_backend",
    "use_cpu_isa",
    "accumulate_gram",
    "accumulate_sq_sum",
    "bitmap_mm",
    "bitmap_mm_ref",
    "compress_24",
    "compress_bitmap",
    "decompress_24",
    "decompress_bitmap",
    "keep_count",
    "masked_mm",
    "masked_mm_ref",
    "nm_keep_mask",
    "obs_block_solve",
    "obs_block_solve_ref",
    "pack_mask",
    "sparse24_mm",
    "sparse24_mm_ref",
    "topk_keep_mask",
    "unpack_mask",
    "wanda_mask",
    "wanda_mask_ref",
    "wanda_mask_torch",
]
