"""Backend choice shared by every kernel op.

CUDA tensors run the compiled Triton kernel; CPU tensors run a fast torch path.
``SPARSEKIT_BACKEND=triton`` forces the Triton kernel, which on CPU tensors needs
``TRITON_INTERPRET=1`` set before triton is imported (that is how the tests check kernels
without a GPU). ``SPARSEKIT_BACKEND=torch`` forces the torch path everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

_BACKENDS = ("auto", "triton", "torch")

try:  # triton ships wheels for Linux x86_64 only
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    backend = os.environ.get("SPARSEKIT_BACKEND", "auto").lower()
    if backend not in _BACKENDS:
        raise ValueError(f"SPARSEKIT_BACKEND must be one of {_BACKENDS}, got {backend!r}")
    return backend


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` should launch its Triton kernel."""
    backend = requested_backend()
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and HAS_TRITON
    if not HAS_TRITON:
        raise RuntimeError("SPARSEKIT_BACKEND=triton but triton is not installed: pip install triton")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "SPARSEKIT_BACKEND=triton on CPU tensors needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 before triton is imported"
        )
    return True


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Raise a ValueError naming the tensors if they live on different devices."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {name: t.device for name, t in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listing}; move them with .to(device)")
    return next(iter(devices.values()))


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name} must be one of {names}, got {str(t.dtype).replace('torch.', '')}")


def launch(kernel: Any, grid: Callable[[dict], tuple] | tuple, interpret_config: dict, *args, **kwargs):
    """Launch an autotuned kernel, or its ``.fn`` with one fixed config under the interpreter.

    ``@triton.autotune`` needs an active GPU driver to benchmark configs; the interpreter has
    none ("0 active drivers"), so there we launch the undecorated kernel with
    ``interpret_config`` (block sizes as constexpr keywords, plus num_warps/num_stages).
    """
    if interpreting():
        fn = kernel.fn if hasattr(kernel, "fn") else kernel
        meta = {k: v for k, v in interpret_config.items() if k not in ("num_warps", "num_stages")}
        g = grid(meta) if callable(grid) else grid
        return fn[g](*args, **kwargs, **meta)
    return kernel[grid](*args, **kwargs)
