"""SparseLinear: a linear layer that holds its pruned weight in a weight format.

W = [out_features N, in_features K]; what ``state_dict()`` holds is the format's layout (see
``sparsekit.formats.weight``: ``2:4`` values + meta, ``bitmap`` values + mask_bits + offsets,
``masked`` weight + mask_bits for fine-tuning, ``dense`` weight) plus ``bias`` [N] or None.
Forward: y [..., N] = F.linear(x [..., K], W_with_zeros, bias), computed by the format.

Backends (``backend=``): ``auto`` follows ``sparsekit.kernels.use_backend`` (Triton kernels on CUDA,
the fast CPU paths on the CPU; 2:4 switches to torch's sparse tensor cores for large M on CUDA);
``torch`` forces the torch path; ``triton`` forces the Triton kernel (on CPU tensors only under
the Triton interpreter, else refused with an error saying so); ``semi_structured`` forces torch's
sparse tensor cores (2:4 on CUDA only).
"""

from __future__ import annotations

import copy
import functools
import logging

import torch
from torch import nn

from sparsekit.formats.weight import Sparse24, WeightFormat, choose_format, is_24, weight_format
from sparsekit.kernels import Backend, current_backend
from sparsekit.kernels._backend import SELECTION_EPOCH, CpuIsa, current_cpu_isa
from sparsekit.kernels.cpu_ext import resolve_isa
from sparsekit.models import is_conv1d, linear_weight, register_linear_like

from .cpu_rule import DECISION_GENERATION, check_cpu_rule, decided, default_rule, dense_wins, m_class
from .cpu_rule import MIN_M as CPU_RULE_MIN_M

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton", "semi_structured")
_KERNEL_BACKEND = {"auto": None, "torch": Backend.TORCH, "triton": Backend.TRITON}

__all__ = ["BACKENDS", "SparseLinear", "is_24"]


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown SparseLinear backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


@register_linear_like
class SparseLinear(nn.Module):
    """A linear layer whose weight is stored in a ``WeightFormat``; see the module docstring."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        format: str | WeightFormat = "2:4",
        nnz: int | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cpu_isa: str | None = None,
        cpu_rule: str | None = None,
    ) -> None:
        """An uninitialised layer of ``format`` (use ``from_linear`` to build one from a weight).

        ``nnz`` sizes formats stored by their number of kept weights (bitmap; default 0,
        ``load_state_dict`` resizes it). ``cpu_isa``: the ISA level of the C++ CPU kernels
        ('avx512-bf16', 'avx512', 'avx2', 'scalar', 'auto'); None follows ``use_cpu_isa`` / SPARSEKIT_CPU_ISA.
        ``cpu_rule``: 'sparse' (memory first: always the sparse kernel) or 'fastest' (per M class
        from 2 rows up, dense on a kept copy of the weight where that measured faster; see
        ``sparsekit.nn.cpu_rule``); None: the process default, ``SPARSEKIT_CPU_RULE``.
        """
        super().__init__()
        fmt = weight_format(format)
        fmt.check_shape(out_features, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight_format = fmt
        self.backend = backend
        self.cpu_isa = cpu_isa
        self.cpu_rule = default_rule() if cpu_rule is None else cpu_rule
        self.conv1d = False  # built from a GPT-2 Conv1D (its checkpoints store the weight as [in, out])
        self._cache: dict = {}  # derived tensors (the semi-structured weight), never saved
        float_dtype = dtype or torch.get_default_dtype()
        for spec in fmt.layout(out_features, in_features, nnz or 0):
            t = torch.empty(spec.shape, dtype=spec.dtype or float_dtype, device=device)
            if spec.parameter:
                setattr(self, spec.name, nn.Parameter(t, requires_grad=fmt.trainable))
            else:
                self.register_buffer(spec.name, t)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=float_dtype, device=device)) if bias else None
        )

    @property
    def format(self) -> str:
        """The weight format's name ('2:4', 'bitmap', 'masked', 'dense')."""
        return self.weight_format.name

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = _check_backend(value)
        if "_cache" in self.__dict__:
            self._cache.clear()

    @property
    def cpu_isa(self) -> CpuIsa | None:
        """The CPU kernels' ISA level for this layer (None: ``use_cpu_isa`` / SPARSEKIT_CPU_ISA)."""
        return self.__dict__.get("_cpu_isa")  # modules pickled before this attribute existed: None

    @cpu_isa.setter
    def cpu_isa(self, value: CpuIsa | str | None) -> None:
        self._cpu_isa = None if value is None else CpuIsa.of(value)
        for key in [k for k in self.__dict__.get("_cache", {}) if isinstance(k, int)]:
            del self._cache[key]  # the memoised calls were planned for the old ISA

    @property
    def cpu_rule(self) -> str:
        """'sparse' or 'fastest' (see ``sparsekit.nn.cpu_rule``)."""
        return self.__dict__.get("_cpu_rule") or default_rule()

    @cpu_rule.setter
    def cpu_rule(self, value: str) -> None:
        self._cpu_rule = check_cpu_rule(value)
        if value == "sparse" and "_cache" in self.__dict__:  # memory first: drop the rule's dense copy
            for key in [k for k in self._cache if k == "dense" or isinstance(k, int)]:
                del self._cache[key]  # the dense copy and the plans that run it

    def dense_copy_bytes(self) -> int:
        """Bytes of the dense weight copy ``cpu_rule='fastest'`` keeps (0 when none)."""
        dense = self._cache.get("dense")
        return 0 if dense is None else dense.numel() * dense.element_size()

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor) and "_cache" in self.__dict__:
            self._cache.clear()  # a new stored tensor: bound calls and derived weights are stale
        super().__setattr__(name, value)

    def __getstate__(self) -> dict:
        # copies and pickles never carry derived state (a bound call would point at the original)
        return {**super().__getstate__(), "_cache": {}}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        mask: torch.Tensor | None = None,
        format: str | WeightFormat = "auto",
        backend: str = "auto",
    ) -> SparseLinear:
        """nn.Linear (or GPT-2 Conv1D) -> SparseLinear holding ``weight * mask``.

        mask: bool [out_features, in_features], True = keep; None keeps the weight's nonzeros.
        format: 'auto' (``choose_format``: 2:4 where every group of 4 inputs is 2:4, else bitmap
        where that is smaller than dense, else dense), a format name, or a ``WeightFormat``.
        """
        weight = linear_weight(linear).detach()
        if mask is not None:
            if mask.shape != weight.shape or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be bool {tuple(weight.shape)} ([out_features, in_features], True = keep), "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            weight = weight * mask.to(weight.device)
        fmt = choose_format(weight) if format == "auto" else weight_format(format)
        n, k = weight.shape
        bias = linear.bias
        module = cls(k, n, bias is not None, fmt, backend=backend, device="meta", dtype=weight.dtype)
        for name, tensor in fmt.compress(weight, mask).items():
            if isinstance(getattr(module, name), nn.Parameter):
                setattr(module, name, nn.Parameter(tensor, requires_grad=fmt.trainable))
            else:
                setattr(module, name, tensor)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        module.conv1d = is_conv1d(linear) or getattr(linear, "conv1d", False)
        return module

    def to_format(self, format: str | WeightFormat) -> SparseLinear:
        """The same weight in another format (masked keeps this layer's mask, not just its nonzeros)."""
        fmt = weight_format(format)
        if fmt is self.weight_format:
            return self
        mask = self.mask() if fmt.trainable else None
        out = SparseLinear.from_linear(self.to_dense(), mask=mask, format=fmt, backend=self.backend)
        if self.bias is not None:
            out.bias.requires_grad_(self.bias.requires_grad)
        out.conv1d = self.conv1d
        out.cpu_isa = self.cpu_isa
        return out

    def dense_weight(self) -> torch.Tensor:
        """W [out_features, in_features] with zeros at the pruned entries."""
        return self.weight_format.to_dense(self, self.out_features, self.in_features)

    def mask(self) -> torch.Tensor:
        """bool [out_features, in_features], True = kept (2:4 and dense: the nonzeros)."""
        return self.weight_format.mask(self, self.out_features, self.in_features)

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
        # formats sized by nnz (bitmap values [nnz]) take the checkpoint's length
        key = prefix + "values"
        values = getattr(self, "values", None)
        if values is not None and values.dim() == 1 and key in state_dict and state_dict[key].dim() == 1:
            if state_dict[key].shape != values.shape:
                self.values = values.new_empty(state_dict[key].shape)
        self._cache.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._cache.clear()  # .to(device/dtype) invalidates derived weights
        return super()._apply(fn, recurse)

    def _stored(self) -> torch.Tensor:
        return next(t for t in (*self.parameters(recurse=False), *self.buffers(recurse=False)))

    @property
    def dtype(self) -> torch.dtype:
        return next(t.dtype for t in (*self.parameters(), *self.buffers()) if t.is_floating_point())

    @property
    def device(self) -> torch.device:
        return self._stored().device

    def nnz(self) -> int:
        return self.weight_format.nnz(self, self.out_features, self.in_features)

    def density(self) -> float:
        return self.nnz() / max(self.in_features * self.out_features, 1)

    def weight_bytes(self) -> int:
        """Bytes of the stored weight tensors (bias excluded)."""
        names = [s.name for s in self.weight_format.layout(self.out_features, self.in_features)]
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    # ------------------------------------------------------------------ forward
    def resolved_backend(self, rows: int | None = None) -> str:
        """What a forward with ``rows`` rows of x runs: torch | cpu | triton | semi_structured."""
        if self.format == "dense":
            return "torch"
        if self.backend == "semi_structured":
            if not isinstance(self.weight_format, Sparse24) or self.device.type != "cuda":
                raise ValueError("backend='semi_structured' needs a 2:4 layer on CUDA; use 'auto'")
            return "semi_structured"
        if self.backend != "auto":
            return self.backend
        if self.device.type != "cuda":
            return "cpu"  # the kernel op's fast CPU path
        if rows is not None and self._semi_structured(rows):
            return "semi_structured"
        return "triton"

    def _semi_structured(self, rows: int) -> bool:
        fmt = self.weight_format
        return isinstance(fmt, Sparse24) and fmt.wants_semi_structured(self, rows)

    def _bound_cpu(self, isa: CpuIsa | None = None):
        """(the format's pre-checked CPU call for the stored tensors, their dtype), built once per
        CPU ISA (``_cache`` is cleared by ``.to()`` and ``load_state_dict``); (None, None) where
        there is none."""
        isa = isa or self.__dict__.get("_cpu_isa") or current_cpu_isa()
        bound = self._cache.get(isa)
        if bound is None:
            fn = self.weight_format.bind_cpu(self, isa=isa) if self._backend in ("auto", "torch") else None
            bound = self._cache[isa] = (fn, self.dtype) if fn is not None else (None, None)
        return bound

    def _cpu_plan(self, dtype: torch.dtype, rows: int) -> tuple:
        """(dtype, selection epoch, rule generation, the eager CPU call of x or None for the
        general path), built for ``rows`` (0, or the rows class under the rule: every rows > 1024
        shares one) and memoised under that int key in ``_cache`` (cleared by ``.to()``,
        ``load_state_dict``, a new stored tensor and the ISA / rule setters)."""
        memo = (dtype, SELECTION_EPOCH[0], DECISION_GENERATION[0], None)
        if current_backend() is not Backend.TRITON:
            isa = self.__dict__.get("_cpu_isa") or current_cpu_isa()
            memo = (*memo[:3], self._build_cpu_plan(rows, isa, dtype, rows > 0))
        self._cache[rows] = memo
        return memo

    def _build_cpu_plan(self, rows: int, isa: CpuIsa, dtype: torch.dtype, rule: bool):
        fn, stored = self._bound_cpu(isa)
        if fn is None or dtype != stored:
            return None
        bias = self.bias
        dense = self._decide_dense(rows, fn, resolve_isa(isa)) if rule else None
        if dense is None:
            return functools.partial(fn, bias=bias)  # every bound CPU call is fn(x, bias)
        # F.linear on x as given: one call, no Python reshapes around it
        return functools.partial(torch.nn.functional.linear, weight=dense, bias=bias)

    def _rule_twin(self):
        """(the sparse CPU call of a copy of this layer, a function making a fresh dense weight):
        the rule's DRAM-cold measurement rotates over such copies, each side over as many as its
        own bytes take."""
        twin = copy.deepcopy(self)  # stored tensors copied; the derived-weight cache starts empty
        fn, _ = twin._bound_cpu()
        return (lambda x: fn(x, None)), (lambda: twin.dense_weight().detach().contiguous())

    def rule_key(self, rows: int, isa: CpuIsa | None = None) -> tuple:
        """The CPU rule's decision key for ``rows`` rows of x at ``isa`` (default: this layer's):
        (format, isa, dtype, N, K, M class), as ``cpu_rule.decided`` / ``measured`` / ``pin`` take.
        A format sized by its kept weights (bitmap) runs as fast as its density lets it, so its
        name carries the density to 2 decimals ('bitmap@0.70'): layers of one shape at 50% and 70%
        (OWL's per-layer ratios) are decided apart."""
        isa = resolve_isa(isa or self.__dict__.get("_cpu_isa") or current_cpu_isa())
        fmt = self.format
        stored = self.weight_format.stored_nnz(self)
        if stored:
            fmt = f"{fmt}@{stored / max(self.out_features * self.in_features, 1):.2f}"
        return (fmt, isa.value, str(self.dtype), self.out_features, self.in_features, m_class(rows))

    def _decide_dense(self, rows: int, fn, isa) -> torch.Tensor | None:
        key = self.rule_key(rows, isa)
        bucket = key[-1]
        if bucket < CPU_RULE_MIN_M:
            return None
        won, candidate = decided(key), self._cache.get("dense")
        if won is None:
            candidate = self.dense_weight().detach().contiguous() if candidate is None else candidate
            won = dense_wins(
                key, lambda x: fn(x, None), candidate, bucket, self._rule_twin, self.weight_bytes()
            )
        if not won:
            return None
        if "dense" not in self._cache:  # the measured copy when there was one: decompressed once
            self._cache["dense"] = (
                self.dense_weight().detach().contiguous() if candidate is None else candidate
            )
            mib = self.dense_copy_bytes() / 2**20
            shape = (self.out_features, self.in_features, self.format, bucket)
            log.info(
                "SparseLinear [%d, %d] (%s) keeps a dense copy from M class %d on: %.2f MiB more", *shape, mib
            )
        return self._cache["dense"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.__dict__
        if x.shape[-1] != d["in_features"]:
            raise ValueError(f"SparseLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")
        # eager CPU hot path: one memo lookup, then the call planned with every check made; the
        # plan is rebuilt when the dtype, the rows class (under the rule), a use_backend /
        # use_cpu_isa block or the rule's decisions change (few lookups: between the heavy calls
        # of a model's forward, each costs a cache miss)
        if x.is_cpu and not x.requires_grad and not torch.compiler.is_compiling():
            rows = min(x.numel() // d["in_features"], 1025) if d.get("_cpu_rule") == "fastest" else 0
            memo = d["_cache"].get(rows)
            if (
                memo is None
                or memo[0] is not x.dtype
                or memo[1] != SELECTION_EPOCH[0]
                or memo[2] != DECISION_GENERATION[0]
            ):
                memo = self._cpu_plan(x.dtype, rows)
            if memo[3] is not None:
                return memo[3](x)
        fmt = self.weight_format
        backend = self._backend
        if backend == "semi_structured" or (
            backend == "auto" and x.is_cuda and self._semi_structured(x.numel() // max(x.shape[-1], 1))
        ):
            self.resolved_backend()  # raises for a layer that cannot
            return fmt.semi_structured_matmul(self, x, self.bias, self._cache)
        return fmt.matmul(self, x, self.bias, _KERNEL_BACKEND[backend])

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
