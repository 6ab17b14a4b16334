"""Ops for the CPU inference paths that a compiled model calls once per layer and token.

``torch.library.custom_op`` wraps every call in Python layers of its own (an autograd kernel that
redispatches, argument checks): a CPU 2:4 layer called through one cost 47 us more per call than
its eager bound call, and through an op defined on a ``torch.library.Library`` with a Python CPU
kernel and a fake 20 us more (bf16, M = 1, Zen 3: ``bench/op_overhead.py``,
docs/data/op-overhead.md). A compiled SmolLM2 decode step makes 210 such calls. So 2:4, bitmap,
int8 (sparsekit's kernel) and 2:4 + int8 layers call ops whose CPU kernels are C++
(``cpu_ext.ROUTED_OPS``, csrc/ops_cpu.cpp); the paths that run torch's own ops (int4, int8 in bf16
where ATen has a native GEMM) call ops defined here (``cpu_inference_op``). None of them has an
autograd formula: callers take them only where nothing needs a gradient (``cpu_op_applies``), and
keep their ``custom_op`` (with its error on backward) for everything else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.library import Library

from . import cpu_ext

_LIB = Library("sparsekit", "FRAGMENT")


def cpu_inference_op(schema: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator: define ``sparsekit::<schema>`` (e.g. ``"f(Tensor x, Tensor? bias) -> Tensor"``)
    with the decorated function as its CPU kernel and ``fake`` (same arguments, returns an empty
    tensor of the output's shape) for tracing; returns ``torch.ops.sparsekit.<name>``."""
    name = schema.split("(", 1)[0]

    def register(impl: Callable) -> Callable:
        _LIB.define(schema)
        _LIB.impl(name, impl, "CPU")
        torch.library.register_fake(f"sparsekit::{name}", fake, lib=_LIB)
        return getattr(torch.ops.sparsekit, name)

    return register


def no_grad_inputs(*tensors: torch.Tensor | None) -> bool:
    """Whether an op without an autograd formula may take these inputs: grad mode off, or none of
    them requires grad."""
    if not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def cpu_op_applies(x: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether a layer's CPU call may run as one op without autograd (``cpu_ext.ROUTED_OPS`` or
    ``cpu_inference_op``): x on the CPU, no gradient wanted, the C++ extension built."""
    return x.device.type == "cpu" and no_grad_inputs(x, *weights) and cpu_ext.extension_built()
