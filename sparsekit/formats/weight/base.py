"""What a weight format is, and the registry that picks one by name or by the weight's zeros.

A format is a small stateless object that knows how a pruned weight W [N, K] (out_features x
in_features, zeros at the pruned entries) is stored and multiplied: the tensors a layer holds
(``layout``), how to build them from W (``compress``), how to get W back (``to_dense``), the
matmul ``y [..., N] = x [..., K] @ W.T + bias``, the bytes it costs and what a checkpoint must
satisfy (``validate``). The tensors themselves live on the layer that holds them (``SparseLinear``),
or on any object with those attribute names (a checkpoint's tensors in a ``SimpleNamespace``).

A new format is one file: a ``WeightFormat`` subclass decorated with ``@register``, imported
from ``sparsekit/formats/weight/__init__.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sparsekit.kernels import Backend
from sparsekit.kernels._backend import CpuIsa

_REGISTRY: dict[str, WeightFormat] = {}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a format stores: its shape, its dtype (None: the layer's float dtype) and whether
    it is a trainable ``nn.Parameter`` (else a buffer)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None
    parameter: bool = False


class WeightFormat:
    """Base class; see the module docstring. Subclasses set ``name`` and implement the methods."""

    name: ClassVar[str]
    trainable: ClassVar[bool] = False  # True: the weight is a Parameter an optimizer may update
    structured: ClassVar[bool] = False  # True: preferred by ``choose_format`` whenever it fits
    # True: stores an approximation of W (quantized); never chosen by ``choose_format``, and its
    # contract is F.linear(x, to_dense()) rather than F.linear(x, W)
    lossy: ClassVar[bool] = False

    # ---------------------------------------------------------------- layout
    def layout(self, out_features: int, in_features: int, nnz: int = 0) -> list[TensorSpec]:
        raise NotImplementedError

    def check_shape(self, out_features: int, in_features: int) -> None:
        """Raise a ValueError when this format cannot hold a weight of this shape."""

    def nbytes(self, out_features: int, in_features: int, nnz: int, element_size: int) -> int:
        """Bytes of the stored weight tensors (bias excluded)."""
        total = 0
        for spec in self.layout(out_features, in_features, nnz):
            size = element_size if spec.dtype is None else torch.empty((), dtype=spec.dtype).element_size()
            total += math.prod(spec.shape) * size
        return total

    # ---------------------------------------------------------------- conversion
    def fits(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` [N, K] (zeros pruned) can be stored exactly in this format."""
        return True

    def compress(self, weight: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """weight [N, K] with zeros at pruned entries (``mask``: bool [N, K], True = keep, or None
        for the nonzeros) -> the tensors of ``layout``, by name."""
        raise NotImplementedError

    def to_dense(self, t: Any, out_features: int, in_features: int) -> torch.Tensor:
        """W [N, K] with zeros from the stored tensors (attributes of ``t``)."""
        raise NotImplementedError

    def mask(self, t: Any, out_features: int, in_features: int) -> torch.Tensor:
        """bool [N, K], True = kept (by default: the nonzeros)."""
        return self.to_dense(t, out_features, in_features) != 0

    def nnz(self, t: Any, out_features: int, in_features: int) -> int:
        return int(self.mask(t, out_features, in_features).sum())

    def stored_nnz(self, t: Any) -> int:
        """The ``nnz`` argument of ``layout`` for tensors already stored (formats sized by nnz)."""
        return 0

    # ---------------------------------------------------------------- compute
    def matmul(self, t: Any, x: torch.Tensor, bias: torch.Tensor | None, backend: Backend | None):
        """y [..., N] = x [..., K] @ W.T + bias; ``backend`` None follows ``use_backend``."""
        raise NotImplementedError

    def bind_cpu(
        self, t: Any, isa: CpuIsa | str | None = None
    ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
        """``fn(x, bias) -> y`` for CPU forwards of these stored tensors with every check done
        once, now (the eager hot path of ``SparseLinear``), running the C++ kernels at ``isa``
        (None: ``use_cpu_isa`` / SPARSEKIT_CPU_ISA); None: no such path, use ``matmul``."""
        return None

    # ---------------------------------------------------------------- checkpoints
    def validate(self, t: Any, out_features: int, in_features: int, where: str) -> None:
        """Raise a ValueError naming ``where`` when the stored tensors do not fit this format."""
        for spec in self.layout(out_features, in_features, self.stored_nnz(t)):
            tensor = getattr(t, spec.name, None)
            if tensor is None:
                raise ValueError(f"{where}.{spec.name} is missing ({self.name} format)")
            if tuple(tensor.shape) != spec.shape:
                raise ValueError(
                    f"{where}.{spec.name} has shape {tuple(tensor.shape)}, the {self.name} format of a "
                    f"[{out_features}, {in_features}] weight needs {spec.shape}"
                )
            if spec.dtype is not None and tensor.dtype != spec.dtype:
                raise ValueError(
                    f"{where}.{spec.name} is {tensor.dtype}, the {self.name} format needs {spec.dtype}"
                )
            if spec.dtype is None and not tensor.is_floating_point():
                raise ValueError(f"{where}.{spec.name} is {tensor.dtype}, it must be floating point")
        self.check_contents(t, out_features, in_features, where)

    def check_contents(self, t: Any, out_features: int, in_features: int, where: str) -> None:
        """Raise a ValueError naming ``where`` when the stored values break the format's invariants
        (indices out of range, counts that disagree): what a kernel would index with."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def register(cls: type[WeightFormat]) -> type[WeightFormat]:
    """Class decorator: make ``cls()`` available under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"weight format {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def weight_format(fmt: str | WeightFormat) -> WeightFormat:
    """The registered format for a name ('2:4', 'bitmap', 'masked', 'dense'), or ``fmt`` itself."""
    if isinstance(fmt, WeightFormat):
        return fmt
    try:
        return _REGISTRY[fmt]
    except KeyError:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(_REGISTRY)}") from None


def format_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def choose_format(weight: torch.Tensor) -> WeightFormat:
    """The format ``format="auto"`` stores ``weight`` [N, K] in: a structured format that fits it
    (2:4, whose kernels are the fastest), else the fewest bytes among the others (bitmap where the
    weight is sparse enough, else dense). Trainable and lossy (quantized) formats are never chosen."""
    candidates = [f for f in _REGISTRY.values() if not f.trainable and not f.lossy and f.fits(weight)]
    structured = [f for f in candidates if f.structured]
    if structured:
        return structured[0]
    n, k = weight.shape
    nnz = int((weight != 0).sum())
    return min(candidates, key=lambda f: f.nbytes(n, k, nnz, weight.element_size()))
