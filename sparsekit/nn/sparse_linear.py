"""SparseLinear: a linear layer that holds its pruned weight compressed.

Formats (what ``state_dict()`` holds, W = [out_features N, in_features K]):
  ``2:4``     values [N, K/2] + meta [N, ceil(K/8)] uint8 (buffers): 1.125 bytes/weight at fp16
  ``bitmap``  values [nnz] + mask_bits [N, ceil(K/8)] uint8 + offsets [N, ceil(K/64)] int32 (buffers)
  ``masked``  weight [N, K] (Parameter, zeros kept) + mask_bits (buffer): for sparse fine-tuning,
              the gradient of pruned entries is zero so the mask survives any optimizer step
  ``dense``   weight [N, K] (Parameter, zeros kept): the reference every format must reproduce
plus ``bias`` [N] (Parameter) or None. Forward: y [..., N] = F.linear(x [..., K], W_with_zeros, bias).

Backends (``backend=``, or set the attribute): ``auto`` picks by device and batch rows M:
on CUDA, 2:4 runs the Triton ``sparse24_mm`` for M < ``SEMI_STRUCTURED_MIN_M`` and torch's
semi-structured sparsity (cuSPARSELt / CUTLASS sparse tensor cores) above it where the dtype and
shape allow; bitmap runs Triton ``bitmap_mm``; masked runs ``masked_mm``. On CPU each op takes
its fast CPU path (``cpu``). ``torch`` forces decompress + ``F.linear``; ``triton`` forces the kernel op;
``semi_structured`` forces torch's sparse tensor cores (2:4 on CUDA only).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.arch import is_conv1d, linear_weight
from sparsekit.kernels import (
    bitmap_mm,
    compress_24,
    compress_bitmap,
    decompress_24,
    decompress_bitmap,
    masked_mm,
    pack_mask,
    sparse24_mm,
    unpack_mask,
)

log = logging.getLogger(__name__)

FORMATS = ("2:4", "bitmap", "masked", "dense")
BACKENDS = ("auto", "torch", "triton", "semi_structured")
# Rows of x at which 2:4 on CUDA switches from the Triton kernel (weight-stream bound, decode) to
# sparse tensor cores (compute bound, prefill); Triton has no sparse MMA.
SEMI_STRUCTURED_MIN_M = 128


def is_24(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row has at most 2 nonzeros."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def format_bytes(fmt: str, out_features: int, in_features: int, nnz: int, element_size: int) -> int:
    """Bytes a weight of ``fmt`` holds (bias excluded)."""
    mask_bytes = out_features * math.ceil(in_features / 8)
    if fmt == "2:4":
        return out_features * in_features // 2 * element_size + mask_bytes
    if fmt == "bitmap":
        return nnz * element_size + mask_bytes + out_features * math.ceil(in_features / 64) * 4
    if fmt == "masked":
        return out_features * in_features * element_size + mask_bytes
    return out_features * in_features * element_size


def choose_format(weight: torch.Tensor) -> str:
    """'2:4' when every group is 2:4, else 'bitmap'."""
    return "2:4" if is_24(weight) else "bitmap"


def _semi_structured_ok(values: torch.Tensor, out_features: int, in_features: int) -> bool:
    if not values.is_cuda or values.dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(values.device) < (8, 0):
        return False
    # cuSPARSELt / CUTLASS need the sparse operand in whole 32-row x 64-column tiles
    return out_features % 64 == 0 and in_features % 64 == 0


class SparseLinear(nn.Module):
    """A linear layer with a compressed sparse weight; see the module docstring for formats."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        format: str = "2:4",
        nnz: int | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """An uninitialised layer of ``format`` (use ``from_linear`` to build one from a weight).

        ``nnz`` sizes the bitmap values buffer (default 0; ``load_state_dict`` resizes it).
        """
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"unknown SparseLinear format {format!r}; choose one of {', '.join(FORMATS)}")
        if format == "2:4" and in_features % 4:
            raise ValueError(f"2:4 needs in_features % 4 == 0, got {in_features}; use format='bitmap'")
        self.in_features, self.out_features, self.format = in_features, out_features, format
        self.backend = backend
        self._semi = None  # lazily built semi-structured weight (CUDA, 2:4), never saved
        self.conv1d = False  # built from a GPT-2 Conv1D (its checkpoints store the weight as [in, out])
        kw = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        n, k = out_features, in_features
        mask_shape = (n, (k + 7) // 8)
        if format == "2:4":
            self.register_buffer("values", torch.empty(n, k // 2, **kw))
            self.register_buffer("meta", torch.empty(mask_shape, dtype=torch.uint8, device=device))
        elif format == "bitmap":
            self.register_buffer("values", torch.empty(nnz or 0, **kw))
            self.register_buffer("mask_bits", torch.empty(mask_shape, dtype=torch.uint8, device=device))
            offsets = torch.empty(n, (k + 63) // 64, dtype=torch.int32, device=device)
            self.register_buffer("offsets", offsets)
        else:
            self.weight = nn.Parameter(torch.empty(n, k, **kw), requires_grad=format == "masked")
            if format == "masked":
                self.register_buffer("mask_bits", torch.empty(mask_shape, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(n, **kw)) if bias else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        mask: torch.Tensor | None = None,
        format: str = "auto",
        backend: str = "auto",
    ) -> SparseLinear:
        """nn.Linear (or GPT-2 Conv1D) -> SparseLinear holding ``weight * mask``.

        mask: bool [out_features, in_features], True = keep; None keeps the weight's nonzeros.
        format: 'auto' picks '2:4' when every group of 4 inputs is 2:4, else 'bitmap'.
        """
        weight = linear_weight(linear).detach()
        if mask is not None:
            if mask.shape != weight.shape or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be bool {tuple(weight.shape)} ([out_features, in_features], True = keep), "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            weight = weight * mask.to(weight.device)
        if format == "auto":
            format = choose_format(weight)
        n, k = weight.shape
        bias = linear.bias
        module = cls(k, n, bias is not None, format, backend=backend, device="meta", dtype=weight.dtype)
        if format == "2:4":
            values, meta = compress_24(weight.contiguous())
            module.values, module.meta = values, meta
        elif format == "bitmap":
            module.values, module.mask_bits, module.offsets = compress_bitmap(weight.contiguous())
        else:
            module.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=format == "masked")
            if format == "masked":
                keep = mask.to(weight.device) if mask is not None else weight != 0
                module.mask_bits = pack_mask(keep)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        module.conv1d = is_conv1d(linear) or getattr(linear, "conv1d", False)
        return module

    def to_format(self, format: str) -> SparseLinear:
        """The same weight in another format (masked keeps this layer's mask, not just its nonzeros)."""
        if format == self.format:
            return self
        lin = self.to_dense()
        mask = self.mask() if format == "masked" else None
        out = SparseLinear.from_linear(lin, mask=mask, format=format, backend=self.backend)
        if self.bias is not None:
            out.bias.requires_grad_(self.bias.requires_grad)
        out.conv1d = self.conv1d
        return out

    def dense_weight(self) -> torch.Tensor:
        """W [out_features, in_features] with zeros at the pruned entries."""
        if self.format == "2:4":
            return decompress_24(self.values, self.meta)
        if self.format == "bitmap":
            return decompress_bitmap(self.values, self.mask_bits, self.offsets, self.in_features)
        if self.format == "masked":
            return self.weight * self.mask().to(self.weight.dtype)
        return self.weight

    def mask(self) -> torch.Tensor:
        """bool [out_features, in_features], True = kept (2:4 and dense: the nonzeros)."""
        if self.format in ("bitmap", "masked"):
            return unpack_mask(self.mask_bits, (self.out_features, self.in_features))
        return self.dense_weight() != 0

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with the pruned entries as zeros."""
        weight = self.dense_weight().detach()
        lin = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device="meta", dtype=weight.dtype
        )
        lin.weight = nn.Parameter(weight.clone())
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().clone())
        return lin

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # bitmap values are [nnz]: take the checkpoint's length instead of failing on a size mismatch
        key = prefix + "values"
        if self.format == "bitmap" and key in state_dict and state_dict[key].dim() == 1:
            if state_dict[key].shape != self.values.shape:
                self.values = self.values.new_empty(state_dict[key].shape)
        self._semi = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._semi = None  # .to(device/dtype) invalidates the cached semi-structured weight
        return super()._apply(fn, recurse)

    @property
    def dtype(self) -> torch.dtype:
        return (self.values if self.format in ("2:4", "bitmap") else self.weight).dtype

    @property
    def device(self) -> torch.device:
        return (self.values if self.format in ("2:4", "bitmap") else self.weight).device

    def nnz(self) -> int:
        if self.format == "bitmap":
            return self.values.numel()
        return int((self.dense_weight() != 0).sum())

    def density(self) -> float:
        return self.nnz() / max(self.in_features * self.out_features, 1)

    def weight_bytes(self) -> int:
        """Bytes of the stored weight tensors (bias excluded)."""
        names = {"2:4": ("values", "meta"), "bitmap": ("values", "mask_bits", "offsets")}
        names = names.get(self.format, ("weight", "mask_bits") if self.format == "masked" else ("weight",))
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    # ------------------------------------------------------------------ forward
    def resolved_backend(self, rows: int | None = None) -> str:
        """The backend a forward with ``rows`` rows of x would use: torch|cpu|triton|semi_structured."""
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.format == "dense":
            return "torch"
        if self.backend == "semi_structured":
            if self.format != "2:4" or not self.device.type == "cuda":
                raise ValueError("backend='semi_structured' needs a 2:4 layer on CUDA; use 'auto'")
            return "semi_structured"
        if self.backend != "auto":
            return self.backend
        if self.device.type != "cuda":
            return "cpu"  # the kernel op's fast CPU path (a custom op: opaque to torch.compile)
        if (
            self.format == "2:4"
            and rows is not None
            and rows >= SEMI_STRUCTURED_MIN_M
            and not torch.compiler.is_compiling()
            and _semi_structured_ok(self.values, self.out_features, self.in_features)
        ):
            return "semi_structured"
        return "triton"

    def _semi_weight(self):
        if self._semi is None:
            self._semi = torch.sparse.to_sparse_semi_structured(self.dense_weight())
        return self._semi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        backend = self.resolved_backend(rows)
        if backend == "torch" or self.format == "dense":
            if self.format == "masked":
                return masked_mm(x, self.weight, self.mask_bits, self.bias)  # keeps the masked gradient
            return F.linear(x, self.dense_weight(), self.bias)
        if backend == "semi_structured":
            y = F.linear(x.reshape(-1, self.in_features), self._semi_weight(), self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        if self.format == "2:4":
            return sparse24_mm(x, self.values, self.meta, self.bias)
        if self.format == "bitmap":
            return bitmap_mm(x, self.values, self.mask_bits, self.offsets, self.bias)
        return masked_mm(x, self.weight, self.mask_bits, self.bias)

    def extra_repr(self) -> str:
        try:
            density = f"{self.density():.3f}"
        except (NotImplementedError, RuntimeError):  # meta tensors hold no values
            density = "?"
        backend = self.backend
        if backend == "auto" and self.device.type != "meta":
            backend = f"auto->{self.resolved_backend(1)}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format}, backend={backend}, density={density}"
        )
