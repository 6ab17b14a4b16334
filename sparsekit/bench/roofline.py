"""The measured roofline of this machine: copy bandwidth (GB/s) and dense matmul throughput (TFLOP/s).

Measured, not taken from a spec sheet: ``% of roofline`` beside a benchmark row is the time the
roofline allows, max(bytes / copy GB/s, flops / matmul TFLOP/s), over the measured time.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass

import torch

from sparsekit.bench.timing import time_fn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Roofline:
    device: str
    dtype: str
    copy_gbps: float  # read + write bytes per second of a large device-to-device copy
    matmul_tflops: float  # 2*n^3 / time of a square dense matmul
    copy_mib: int
    matmul_n: int
    read_gbps: float = float("nan")  # bytes per second of a large sum: what streaming weights can reach

    def bound_ms(self, bytes_moved: float, flops: float) -> float:
        """The fastest time the roofline allows for ``bytes_moved`` and ``flops``, in ms."""
        return max(bytes_moved / (self.copy_gbps * 1e9), flops / (self.matmul_tflops * 1e12)) * 1e3

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=8)
def measure_roofline(device: str = "cpu", dtype: torch.dtype = torch.float32) -> Roofline:
    """Copy GB/s and square-matmul TFLOP/s on ``device`` in ``dtype`` (cached per process).

    Sizes: a 1 GiB copy and n = 8192 matmul on CUDA; on the CPU a copy of 4x the last-level
    cache (at least 64 MiB: smaller copies measure the cache, not DRAM) and n = 2048 (large
    enough to reach BLAS's peak, which n = 1024 does not on 2 cores; a second or two). The read
    bandwidth (a sum over the copy's source) is the floor for streaming a model's weights once.
    """
    from sparsekit.kernels.cpu_ext import llc_bytes

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    copy_mib = 1024 if cuda else min(2048, max(64, 4 * llc_bytes() // 2**20))
    n = 8192 if cuda else 2048
    if not cuda and dtype in (torch.float16, torch.bfloat16):
        n = 512  # CPU half-precision matmuls are slow on most CPUs; keep the probe short
    src = torch.empty(copy_mib * 2**20 // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), dev, min_time_s=0.3, max_repeats=50)
    copy_gbps = 2 * src.numel() * src.element_size() / (t_copy.median_ms * 1e-3) / 1e9
    t_read = time_fn(lambda: src.sum(), dev, min_time_s=0.3, max_repeats=50)
    read_gbps = src.numel() * src.element_size() / (t_read.median_ms * 1e-3) / 1e9
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    t_mm = time_fn(lambda: a @ b, dev, min_time_s=0.3, max_repeats=50)
    tflops = 2 * n**3 / (t_mm.median_ms * 1e-3) / 1e12
    roof = Roofline(str(dev), str(dtype).replace("torch.", ""), copy_gbps, tflops, copy_mib, n, read_gbps)
    log.info(
        "roofline on %s (%s): copy %.1f GB/s, read %.1f GB/s, matmul %.3f TFLOP/s",
        dev,
        roof.dtype,
        copy_gbps,
        read_gbps,
        tflops,
    )
    return roof
