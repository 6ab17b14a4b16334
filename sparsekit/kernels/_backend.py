"""Which implementation a kernel op runs: one explicit selection, honoured everywhere.

``Backend.AUTO`` runs the compiled Triton kernel on CUDA tensors and the fast torch / C++ path on
CPU tensors; ``Backend.TRITON`` forces the Triton kernel (on CPU tensors only under the Triton
interpreter, ``TRITON_INTERPRET=1`` set before triton is imported: that is how the tests check
kernels without a GPU; otherwise it is refused with an error saying so); ``Backend.TORCH`` forces
the torch path everywhere.

Choose it with ``use_backend(...)`` (a context manager; process-wide like ``torch.backends``
flags, so torch.compile reads and guards on it), or pass ``backend=`` to an op or to
``SparseLinear``. ``SPARSEKIT_BACKEND`` only sets the process default, read once at import.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

try:  # triton ships wheels for Linux x86_64 only
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False


class Backend(enum.Enum):
    """The implementation family a kernel op runs (see the module docstring)."""

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"

    @classmethod
    def of(cls, value: Backend | str) -> Backend:
        """A Backend from itself or its name; a clear error for anything else."""
        if isinstance(value, Backend):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(b.value for b in cls)
            raise ValueError(f"unknown kernel backend {value!r}; choose one of {names}") from None


def _default_from_env() -> Backend:
    value = os.environ.get("SPARSEKIT_BACKEND", "auto")
    try:
        return Backend.of(value)
    except ValueError as exc:
        raise ValueError(f"SPARSEKIT_BACKEND: {exc}") from None


_SELECTED: list[Backend] = [_default_from_env()]  # [default, *innermost use_backend last]
# bumped on entering and leaving every use_backend / use_cpu_isa block: a layer's memoised CPU
# call is valid while this is unchanged (one int compare on the hot path, not two lookups)
SELECTION_EPOCH: list[int] = [0]


def current_backend() -> Backend:
    """The backend selected by the innermost ``use_backend``, else the process default."""
    return _SELECTED[-1]


@contextlib.contextmanager
def use_backend(backend: Backend | str) -> Iterator[Backend]:
    """Run the ops inside the block with ``backend`` (``"auto"``, ``"triton"``, ``"torch"``)."""
    selected = Backend.of(backend)
    _SELECTED.append(selected)
    SELECTION_EPOCH[0] += 1
    try:
        yield selected
    finally:
        _SELECTED.pop()
        SELECTION_EPOCH[0] += 1


class CpuIsa(enum.Enum):
    """The x86-64 instruction-set level the C++ CPU kernels run (see ``sparsekit.kernels.cpu_ext``).

    ``AUTO`` is the best level this CPU runs; ``AVX512_BF16`` (AVX-512 + AVX512_BF16 + VBMI2: the
    bf16 direct kernels of 2:4, 2:4 + int8 and bitmap on vdpbf16ps, every other kernel as
    ``AVX512``), ``AVX512`` (F, BW, VL), ``AVX2``
    (+ FMA, F16C) and ``SCALAR`` (no hand-written SIMD) force one, so a machine with the highest
    level can test and measure every path. Choose it with ``use_cpu_isa(...)``, or pass ``isa=`` to a
    CPU kernel or ``cpu_isa=`` to ``SparseLinear``; ``SPARSEKIT_CPU_ISA`` only sets the process
    default, read once at import.
    """

    AUTO = "auto"
    AVX512_BF16 = "avx512-bf16"
    AVX512 = "avx512"
    AVX2 = "avx2"
    SCALAR = "scalar"

    @classmethod
    def of(cls, value: CpuIsa | str) -> CpuIsa:
        """A CpuIsa from itself or its name; a clear error for anything else."""
        if isinstance(value, CpuIsa):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            names = ", ".join(i.value for i in cls)
            raise ValueError(f"unknown CPU ISA {value!r}; choose one of {names}") from None


def _cpu_isa_from_env() -> CpuIsa:
    value = os.environ.get("SPARSEKIT_CPU_ISA", "auto")
    try:
        return CpuIsa.of(value)
    except ValueError as exc:
        raise ValueError(f"SPARSEKIT_CPU_ISA: {exc}") from None


_SELECTED_ISA: list[CpuIsa] = [_cpu_isa_from_env()]  # [default, *innermost use_cpu_isa last]


def current_cpu_isa() -> CpuIsa:
    """The CPU ISA selected by the innermost ``use_cpu_isa``, else the process default."""
    return _SELECTED_ISA[-1]


def cpu_isa_is_default() -> bool:
    """True when no ``use_cpu_isa`` block is active (the ISA came from SPARSEKIT_CPU_ISA or auto)."""
    return len(_SELECTED_ISA) == 1


@contextlib.contextmanager
def use_cpu_isa(isa: CpuIsa | str) -> Iterator[CpuIsa]:
    """Run the CPU kernels inside the block at ``isa`` ("auto", "avx512-bf16", "avx512", "avx2", "scalar")."""
    selected = CpuIsa.of(isa)
    _SELECTED_ISA.append(selected)
    SELECTION_EPOCH[0] += 1
    try:
        yield selected
    finally:
        _SELECTED_ISA.pop()
        SELECTION_EPOCH[0] += 1


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor, backend: Backend | str | None = None) -> bool:
    """Whether an op on ``tensors`` launches its Triton kernel under ``backend`` (default: current)."""
    backend = current_backend() if backend is None else Backend.of(backend)
    if backend is Backend.TORCH:
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend is Backend.AUTO:
        return on_cuda and HAS_TRITON
    if not HAS_TRITON:
        raise RuntimeError("backend 'triton' needs triton: pip install triton (Linux x86-64)")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "triton is imported, move the tensors to CUDA, or use backend 'auto' / 'torch'"
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
