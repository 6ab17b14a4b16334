"""Weight-only quantization: int8 per output row, int4 per group of inputs, and 2:4 with int8 values.

What runs on the CPU, and why those: torch's own packed weight-only matmul ops, the ones
gpt-fast and torchao's CPU int8/int4 weight-only paths dispatch to (a well-kept implementation,
no hand-written quantized GEMM where one exists):
  int8  ``aten._weight_int8pack_mm(x [M, K], q int8 [N, K], scale [N]) -> [M, N]``: fast for
        bf16 / fp16 x (vectorized); for fp32 x it is a generic loop (0.41x dense at M = 1, 0.02x
        at M = 512: bench/quant_paths.py, docs/data/quant-paths.md), so fp32 layers run sparsekit's
        C++ direct int8 kernel (``mm_q8``, decode and small batches) or dequantize + GEMM instead.
  int4  ``aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zero [K/group, N, 2])``, the
        weight packed once by ``aten._convert_weight_to_int4pack_for_cpu``; value = (q - 8) * scale
        + zero, q in 0..15 (asymmetric: a pruned zero does not stay exactly zero). bf16 / fp16
        only, as int8: fp32 layers run sparsekit's C++ direct int4 kernel (``mm_q4``: nibbles
        widened in registers, one scale FMA per group) or dequantize per call.
  2:4 + int8  no library has it (vLLM, SGLang and torchao dropped their sparse + quantized
        kernels in 2026): ``mm24_q8`` in the C++ extension reads int8 values and the 2:4 nibbles
        (0.5 + 0.125 bytes per weight, against 1.0 for dense int8) and scales each row's dot
        products once.
Elsewhere (CUDA, no extension) the weight is dequantized per call and ``F.linear`` runs: correct,
not fast. Every function here has its plain-torch reference beside it.

Conventions: W [N, K] (out_features x in_features); int8 is symmetric per row, scale = max|w| / 127,
so zeros (pruned weights) stay exactly zero; int4 packs two 4-bit codes per byte, column 2j in
the low nibble and 2j + 1 in the high one (a portable layout; the CPU op's own packing is built at
bind time and never saved).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import cpu_ext
from ._backend import CpuIsa
from ._cpu_ops import cpu_inference_op, cpu_op_applies
from .cpu_ext import isa_level, resolve_isa
from .sparse24_cpu import decompress_24_torch

INT4_GROUPS = (32, 64, 128, 256)  # group sizes the torch CPU int4 op accepts


# ----------------------------------------------------------------------------- int8 per row
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] float -> (q int8 [N, K], scale [N] in W's dtype): W ~= q * scale[:, None].

    Symmetric, round to nearest, codes in -127..127; scale = max|w| / 127, except for a row that
    already lies on a symmetric grid of at most 127 steps (SparseGPT's joint ``--wbits 8``, or an
    int8 weight dequantized): its own step (``grid_steps``), so storing it is exact, not a second
    rounding. An all-zero row gets scale 1 (its codes are 0).
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    scale = torch.where(amax > 0, grid_steps(w, 127, fallback=scale), scale)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(weight.dtype)


def grid_steps(
    w: torch.Tensor, qmax: int, fallback: torch.Tensor, tol: float = 1e-3, probe: int = 8
) -> torch.Tensor:
    """w [R, G] fp32 -> step [R]: per row the step s of the symmetric grid it lies on (every w / s
    within ``tol`` of an integer, max |w| = c * s for the largest c <= ``qmax`` that fits), else
    ``fallback`` [R]. Each c is tried first on ``probe`` evenly spread columns, which rules a float
    row out at once; only rows that pass are checked whole (a joint-mode row whose largest code
    moved below qmax fits a c a little under it)."""
    amax = w.abs().amax(dim=1)
    cols = torch.linspace(0, w.shape[1] - 1, min(probe, w.shape[1]), device=w.device).long()
    sample = w[:, cols] / amax.clamp_min(1e-30)[:, None]  # [R, P] in [-1, 1]
    step = fallback.clone()
    todo = amax > 0
    for c in range(qmax, 0, -1):
        codes = sample * c
        rows = (todo & ((codes - codes.round()).abs().amax(1) <= tol)).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        s = amax[rows] / c
        codes = w[rows] / s[:, None]
        fits = (codes - codes.round()).abs().amax(1) <= tol
        step[rows[fits]] = s[fits]
        todo[rows[fits]] = False
    return step


def symmetric_steps(weight: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """W [N, K] -> step [N, K] fp32, each weight's grid step on a symmetric ``bits``-bit grid (codes
    -(2^(bits-1) - 1)..2^(bits-1) - 1, zero exact): max|w| / (2^(bits-1) - 1) per row (``group``
    None) or per group of ``group`` inputs; an all-zero row or group gets step 1. bits 8, group
    None is ``quantize_int8``'s scale."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be 2..8, got {bits}")
    n, k = weight.shape
    if group is not None and (group < 1 or k % group):
        raise ValueError(f"a quantization group of {group} inputs must divide in_features={k}")
    w = weight.detach().float().view(n, -1, group or k)
    amax = w.abs().amax(dim=-1, keepdim=True)
    step = torch.where(amax > 0, amax / (2 ** (bits - 1) - 1), torch.ones_like(amax))
    return step.expand(w.shape).reshape(n, k).contiguous()


def round_to_grid(w: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """w on its symmetric grid: round(w / step) clamped to +-(2^(bits-1) - 1), times step (fp32)."""
    qmax = 2 ** (bits - 1) - 1
    return torch.round(w.float() / step).clamp_(-qmax, qmax).mul_(step)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K], scale [N] -> W [N, K] in scale's dtype."""
    return (q.float() * scale.float()[:, None]).to(scale.dtype)


def int8_mm_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """Reference: x [..., K] @ dequantize_int8(q, scale).T + bias, in fp32, cast to x's dtype."""
    y = F.linear(x.float(), q.float() * scale.float()[:, None], None if bias is None else bias.float())
    return y.to(x.dtype)


def int8_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """x [..., K] (fp32/bf16/fp16), q int8 [N, K], scale [N] -> y [..., N].

    On the CPU without autograd and with the C++ extension: what the bound CPU call
    (``bind_int8_cpu``) runs, as one op (sparsekit's kernels: the C++ ``q8_routed``; torch's op: a
    ``cpu_inference_op``), so a compiled model runs the kernels instead of tracing a dequantize of
    the whole weight into every forward. Elsewhere torch's int8 weight-only matmul for bf16 / fp16 x
    on the CPU, dequantize + F.linear for fp32 x (the op's fp32 loop loses to it at every M:
    docs/data/quant-paths.md) and on other devices."""
    n, k = q.shape
    if x.shape[-1] != k:
        raise ValueError(f"int8_mm expects x [..., {k}], got {tuple(x.shape)}")
    if cpu_op_applies(x, scale, bias):
        if _int8_direct(scale.dtype):  # bind_int8_cpu's choice
            route = cpu_ext.route_args("int8", x.dtype, x.shape[-1], lambda _isa: INT8_DIRECT_MAX_M)
            return torch.ops.sparsekit.q8_routed(x, q, scale, bias, *route)
        return torch.ops.sparsekit.int8_mm_cpu(x, q, scale, bias)
    return _int8_mm_torch(x, q, scale, bias)


def _int8_mm_torch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    n, k = q.shape
    x2 = x.reshape(-1, k)
    if x.device.type == "cpu" and x.dtype != torch.float32 and not x.requires_grad:
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), q, scale.to(x.dtype))
        if bias is not None:
            y = y + bias
    else:
        y = F.linear(x2, dequantize_int8(q, scale).to(x.dtype), bias)
    return y.reshape(*x.shape[:-1], n)


# Above these M (rows of x) a CPU layer dequantizes its weight per call (held only for that call)
# and runs the dense GEMM: at prefill the GEMM dominates and the int8/int4 kernels lose to it.
# Measured by bench/quant_paths.py (docs/data/quant-paths.md: every path interleaved on one
# 1536 x 576 weight, EPYC-512): bf16 at M = 64 the int8 op is 0.48x dense against 0.54x for
# dequantize + GEMM, 2:4-int8's kernel 0.46x against 0.73x decompressed; int4's dequantize costs
# 1.8 ms, so its op (0.59x) keeps M <= 64 and loses only at 512 (0.45x against 0.71x).
DEQUANT_ABOVE_M = {"int8": 16, "int8-fp32": 8, "int4": 64, "2:4-int8": 16}
# 2:4-int8 with bf16 x at the avx512-bf16 level (its vdpbf16ps kernel), on Zen 4: bench/quant_paths.py
# --isas avx512 on EPYC-512 (docs/data/quant-paths-bf16dot/quant-paths.md, 2 threads): the kernel
# runs 1.57x dense at M = 16 and 1.05x at 32, ahead of the tiles (0.75x, 0.78x); at 64 the tiles
# lead (0.85x against 0.82x). Elsewhere the level keeps AVX-512's limit (not measured there).
DEQUANT_ABOVE_M_24Q8_BF16DOT_ZEN4 = 32
INT8_DIRECT_MAX_M = DEQUANT_ABOVE_M["int8-fp32"]  # fp32: sparsekit's direct int8 kernel up to here
# fp32: sparsekit's direct int4 kernel (mm_q4) up to here. bench/quant_paths.py on SmolLM2's up_proj
# (docs/data/quant-paths-mm_q4): faster than dequantize + GEMM at every M it measured (1..64),
# faster than dense up to M = 8 (the runtime rule's `cpu_rule="fastest"` covers the rest)
INT4_DIRECT_MAX_M = 64
# bf16 / fp16: sparsekit's int4 kernel (x widened to fp32 inside) up to here, torch's op above. On
# Zen 3 (AVX2, 2 threads, SmolLM2's up_proj, docs/data/quant-paths-zen3-int4-bf16) mm_q4 ran bf16
# 2.03x dense at M = 1 against 1.14x for torch's op, 1.04x its speed at M = 8 and level at 16. Not
# measured on other CPUs: they keep torch's op (0).
INT4_HALF_DIRECT_MAX_M = 8 if cpu_ext.is_zen3() else 0


# Above the direct paths' M a bound CPU layer dequantizes tiles of about ``cpu_ext.BLAS_TILE_BYTES``
# of its weight into a per-thread buffer and hands each to ATen's GEMM (``mm_q8_blas``,
# ``mm_q4_blas``, ``mm24_q8_blas`` in the C++ extension): no dense weight is held or written to
# memory whole. The torch dequantize + F.linear it replaces ran 0.29-0.96x dense at M = 64-512
# in bf16 (docs/data/quant-paths.md; the tiles: docs/data/blas-tiles.md).


def _contiguous(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def sparse24_int8_kernel_max_m(isa: CpuIsa, dtype: torch.dtype) -> int:
    """Rows of x up to which a 2:4-int8 layer at ``isa`` runs ``mm24_q8`` (above: dequantized tiles)."""
    if isa is CpuIsa.AVX512_BF16 and dtype == torch.bfloat16 and cpu_ext.THIS_CPU_IS_ZEN4:
        return DEQUANT_ABOVE_M_24Q8_BF16DOT_ZEN4
    return DEQUANT_ABOVE_M["2:4-int8"]


def cpu_route(fmt: str, dtype: torch.dtype, m: int, isa: CpuIsa | str | None = None) -> str:
    """What a bound CPU layer of quantized format ``fmt`` ('int8', 'int4...', '2:4-int8') runs for
    ``m`` rows of x in ``dtype`` at ``isa`` (None: the default), in words (benchmark labels; the
    binds below decide the same way)."""
    fp32 = dtype == torch.float32
    if fmt.startswith("int4"):
        if fp32:
            if cpu_ext.extension() is None:
                return "dequantize + GEMM"
            return "sparsekit mm_q4" if m <= INT4_DIRECT_MAX_M else "sparsekit mm_q4_blas (tiles + GEMM)"
        if m > DEQUANT_ABOVE_M["int4"]:
            return (
                "dequantize + GEMM" if cpu_ext.extension() is None else "sparsekit mm_q4_blas (tiles + GEMM)"
            )
        if m <= INT4_HALF_DIRECT_MAX_M and cpu_ext.extension() is not None:
            return "sparsekit mm_q4"
        return "aten int4 op"
    if fmt == "int8":
        ext = cpu_ext.extension() is not None
        direct = ext and _int8_direct(dtype)
        if m > (INT8_DIRECT_MAX_M if direct else DEQUANT_ABOVE_M["int8"]):
            return "sparsekit mm_q8_blas (tiles + GEMM)" if ext else "dequantize + GEMM"
        return "sparsekit mm_q8" if direct else "aten int8 op"
    if fmt == "2:4-int8":
        limit = sparse24_int8_kernel_max_m(resolve_isa(isa), dtype)
        return "sparsekit mm24_q8_blas (tiles + GEMM)" if m > limit else "sparsekit mm24_q8"
    raise ValueError(f"{fmt!r} is not a quantized format")


def _int8_direct(dtype: torch.dtype) -> bool:
    """Whether int8 layers in ``dtype`` take sparsekit's direct kernel (``mm_q8``) at small M rather
    than torch's op: fp32 (the op has no fast fp32 path), and bf16 / fp16 where ATen has no native
    GEMM in that dtype. There torch's op ran 0.94x dense at M = 1 and mm_q8 1.84x (bf16, 1536 x 576,
    an AVX2-only Zen 3, 2 threads: docs/data/quant-paths-zen3-2t)."""
    return dtype == torch.float32 or dtype in cpu_ext.BLAS_FP32_DTYPES


def bind_int8_cpu(
    q: torch.Tensor, scale: torch.Tensor, isa: CpuIsa | str | None = None
) -> Callable[..., torch.Tensor]:
    """``fn(x, bias) -> y`` for one stored int8 weight on the CPU: torch's op for bf16 / fp16 up to
    ``DEQUANT_ABOVE_M['int8']`` rows of x; for fp32 (and bf16 / fp16 on a CPU without a native GEMM
    in them) sparsekit's C++ direct kernel (``mm_q8``) up to ``INT8_DIRECT_MAX_M``; above, dequantized
    tiles + GEMM (``mm_q8_blas``). Without the C++ extension: torch's op, or dequantize + F.linear above."""
    n, k = q.shape
    ext = cpu_ext.extension()
    if ext is None:

        def op(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            if x.numel() > DEQUANT_ABOVE_M["int8"] * k:
                return F.linear(x, dequantize_int8(q, scale), bias)
            return _int8_mm_torch(x, q, scale, bias)

        return op
    level = isa_level(resolve_isa(isa))
    scale32 = scale.float().contiguous()
    direct = _int8_direct(scale.dtype)
    most = INT8_DIRECT_MAX_M if direct else DEQUANT_ABOVE_M["int8"]

    def mm(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x [..., K] as it comes: the C++ entries flatten it and give y its leading dims
        if x.numel() > most * k:
            return ext.mm_q8_blas(x, q, scale32, _contiguous(bias, x.dtype), level, cpu_ext.BLAS_TILE_BYTES)
        if direct:
            return ext.mm_q8(x, q, scale32, _contiguous(bias, x.dtype), level)
        return _int8_mm_torch(x, q, scale, bias)

    return mm


def _rows_out(x: torch.Tensor, weight: torch.Tensor, *_) -> torch.Tensor:
    """Fake of the CPU ops below: y [..., N] for x [..., K] and a stored weight [N, ...]."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@cpu_inference_op("int8_mm_cpu(Tensor x, Tensor q, Tensor scale, Tensor? bias) -> Tensor", _rows_out)
def _int8_mm_cpu_op(x, q, scale, bias):
    return bind_int8_cpu(q.contiguous(), scale)(x, bias)


# ----------------------------------------------------------------------------- int4 per group
def check_int4_shape(in_features: int, group: int) -> None:
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, got {group}")
    if in_features % group:
        raise ValueError(
            f"int4 with groups of {group} needs in_features % {group} == 0, got {in_features}; "
            f"choose a group size that divides it ({', '.join(f'int4-g{g}' for g in INT4_GROUPS)})"
        )


def quantize_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (packed uint8 [N, K/2], scale_zero [K/group, N, 2] in W's dtype).

    Per group of ``group`` inputs: scale = (max - min) / 15, zero = min + 8 * scale, q = round((w -
    min) / scale) in 0..15, so W ~= (q - 8) * scale + zero (the torch CPU op's convention). A group
    already on a symmetric grid of codes -7..7 (SparseGPT's joint ``--wbits 4``, ``grid_steps``) is
    stored exactly instead: scale = its step, zero = 0, q = code + 8 (a pruned zero stays zero).
    """
    n, k = weight.shape
    check_int4_shape(k, group)
    w = weight.detach().float().view(n, k // group, group)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_(min=1e-12)
    q = torch.round((w - lo) / scale)
    zero = lo + 8 * scale
    nan = torch.full((n * (k // group),), float("nan"), device=w.device)
    sym = grid_steps(w.view(-1, group), 7, fallback=nan).view(n, -1, 1)
    on_grid = ~sym.isnan()
    if bool(on_grid.any()):
        q = torch.where(on_grid, torch.round(w / sym) + 8, q)
        scale, zero = torch.where(on_grid, sym, scale), torch.where(on_grid, 0.0, zero)
    q = q.clamp_(0, 15).to(torch.uint8).view(n, k)
    scale_zero = torch.stack((scale.view(n, -1), zero.view(n, -1)), dim=-1).transpose(0, 1).contiguous()
    return pack_int4(q), scale_zero.to(weight.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [N, K] in 0..15 -> uint8 [N, K/2], column 2j low nibble, 2j + 1 high."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> codes uint8 [N, K] in 0..15."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
    """packed uint8 [N, K/2], scale_zero [K/group, N, 2] -> W [N, K] in scale_zero's dtype."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    groups = scale_zero.shape[0]
    sz = scale_zero.float().transpose(0, 1)  # [N, K/group, 2]
    w = (q.view(n, groups, -1) - 8) * sz[..., :1] + sz[..., 1:]
    return w.view(n, k).to(scale_zero.dtype)


def int4_mm_ref(x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, bias: torch.Tensor | None):
    """Reference: x [..., K] @ dequantize_int4(packed, scale_zero).T + bias in fp32, cast to x's dtype."""
    w = dequantize_int4(packed, scale_zero.float())
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def int4_direct_input(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] fp32 -> [M, K + K/group]: per group of inputs its even columns, then its odd ones
    (the low and high nibbles of the packed bytes), then the K/group group sums (``mm_q4``'s input)."""
    m, k = x.shape
    per_group = x.reshape(m, k // group, group // 2, 2).transpose(-1, -2).reshape(m, k)
    return torch.cat((per_group, x.reshape(m, k // group, group).sum(-1)), dim=1)


def bind_int4_cpu(
    packed: torch.Tensor, scale_zero: torch.Tensor, isa: CpuIsa | str | None = None
) -> Callable[..., torch.Tensor] | None:
    """``fn(x, bias) -> y`` for one stored int4 weight on the CPU. bf16 / fp16: sparsekit's direct
    kernel (``mm_q4``, x widened inside) up to ``INT4_HALF_DIRECT_MAX_M`` rows of x (0 but on Zen 3),
    then the weight packed once for ``aten._weight_int4pack_mm_for_cpu`` (out_features padded to a
    multiple of 16 with zero rows, as the op requires; ``cpu_int4_pack``) up to
    ``DEQUANT_ABOVE_M["int4"]`` rows, then dequantized tiles + GEMM (``mm_q4_blas``). fp32:
    sparsekit's direct kernel (``mm_q4``) up to ``INT4_DIRECT_MAX_M`` rows (torch's op has no fast
    fp32 path); above the limits, and in fp32 without the C++ extension (None), the caller
    dequantizes per call."""
    n, k = packed.shape[0], 2 * packed.shape[1]
    group = k // scale_zero.shape[0]
    check_int4_shape(k, group)
    if scale_zero.dtype == torch.float32:
        return _bind_int4_fp32(packed, scale_zero, group, isa)
    cpu_packed, sz, sz32 = cpu_int4_pack(packed, scale_zero)
    ext = cpu_ext.extension()
    level = isa_level(resolve_isa(isa))
    direct_rows = INT4_HALF_DIRECT_MAX_M if ext is not None else 0

    def mm(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, k)
        if x2.shape[0] > DEQUANT_ABOVE_M["int4"]:
            if ext is None:
                return F.linear(x, dequantize_int4(packed, scale_zero), bias)
            b, tile = _contiguous(bias, x.dtype), cpu_ext.BLAS_TILE_BYTES
            y = ext.mm_q4_blas(x2.contiguous(), packed.contiguous(), sz32, b, group, level, tile)
            return y.reshape(*x.shape[:-1], n)
        if x2.shape[0] <= direct_rows:  # x widened to fp32 inside, y in x's dtype
            y = ext.mm_q4(
                x2.contiguous(), packed.contiguous(), sz32, _contiguous(bias, x.dtype), group, level
            )
            return y.reshape(*x.shape[:-1], n)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), cpu_packed, group, sz)
        y = y[:, :n] if sz.shape[1] != n else y
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], n)

    return mm


# torch's CPU packing of stored int4 weights, kept while the stored tensor lives and is unchanged:
# a compiled model calls ``int4_mm`` with the same parameter tensors every step, and packing per
# call would cost more than the matmul. id(packed) -> (weakref, versions, (cpu packed, scale_zero))
_INT4_PACKS: dict[int, tuple] = {}


def cpu_int4_pack(
    packed: torch.Tensor, scale_zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the weight packed for ``aten._weight_int4pack_mm_for_cpu``, scale_zero [K/group, N', 2])
    with N' = out_features padded to a multiple of 16 by zero rows (code 8, scale 0, zero 0), as the
    op requires, and scale_zero in fp32 (``mm_q4``'s); built once per stored tensor and version."""
    key, versions = id(packed), (packed._version, id(scale_zero), scale_zero._version)
    hit = _INT4_PACKS.get(key)
    if hit is not None and hit[0]() is packed and hit[1] == versions:
        return hit[2]
    pad = -packed.shape[0] % 16
    codes = F.pad(unpack_int4(packed).to(torch.int32), (0, 0, 0, pad), value=8)
    built = (
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
        F.pad(scale_zero, (0, 0, 0, pad)).contiguous(),
        scale_zero.float().contiguous(),
    )
    # the entry holds no reference to packed: it goes when packed goes
    _INT4_PACKS[key] = (weakref.ref(packed, lambda _ref, k=key: _INT4_PACKS.pop(k, None)), versions, built)
    return built


def _bind_int4_fp32(packed: torch.Tensor, scale_zero: torch.Tensor, group: int, isa) -> Callable | None:
    ext = cpu_ext.extension()
    if ext is None:
        return None
    level = isa_level(resolve_isa(isa))
    n, k = packed.shape[0], 2 * packed.shape[1]
    packed, sz = packed.contiguous(), scale_zero.contiguous()

    def mm(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, k)
        if x2.shape[0] > INT4_DIRECT_MAX_M:
            b = _contiguous(bias, x.dtype)
            y = ext.mm_q4_blas(x2.contiguous(), packed, sz, b, group, level, cpu_ext.BLAS_TILE_BYTES)
        else:
            y = ext.mm_q4(x2.contiguous(), packed, sz, bias, group, level)  # rearranged in C++
        return y.reshape(*x.shape[:-1], n)

    return mm


def int4_mm(
    x: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, bias: torch.Tensor | None = None
):
    """x [..., K] -> y [..., N]. On the CPU without autograd, with x in the weight's dtype and the
    C++ extension: the bound CPU call (``bind_int4_cpu``) as one custom op (a compiled model runs
    the kernels, not a traced dequantize of the whole weight); elsewhere dequantize + F.linear."""
    k = 2 * packed.shape[1]
    if x.shape[-1] != k:
        raise ValueError(f"int4_mm expects x [..., {k}], got {tuple(x.shape)}")
    if cpu_op_applies(x, scale_zero, bias) and x.dtype == scale_zero.dtype:
        return torch.ops.sparsekit.int4_mm_cpu(x, packed, scale_zero, bias)
    return F.linear(x, dequantize_int4(packed, scale_zero).to(x.dtype), bias)


@cpu_inference_op(
    "int4_mm_cpu(Tensor x, Tensor packed, Tensor scale_zero, Tensor? bias) -> Tensor", _rows_out
)
def _int4_mm_cpu_op(x, packed, scale_zero, bias):
    return bind_int4_cpu(packed, scale_zero)(x, bias)


# ----------------------------------------------------------------------------- 2:4 + int8
def sparse24_int8_mm_ref(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Reference: x [..., K] @ (scale[:, None] * decompress_24(values int8 [N, K/2], meta)).T + bias."""
    w = decompress_24_torch(values.float(), meta) * scale.float()[:, None]
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def bind_sparse24_int8_cpu(
    values: torch.Tensor, meta: torch.Tensor, scale: torch.Tensor, isa: CpuIsa | str | None = None
) -> Callable[..., torch.Tensor] | None:
    """``fn(x, bias) -> y``: the C++ 2:4 + int8 kernel at ``isa`` with every check done now; None
    where the extension did not build (the caller dequantizes instead)."""
    ext = cpu_ext.extension()
    if ext is None:
        return None
    if values.dtype != torch.int8 or not values.is_contiguous() or not meta.is_contiguous():
        raise ValueError("bind_sparse24_int8_cpu needs contiguous int8 values and uint8 meta")
    n, k = values.shape[0], 2 * values.shape[1]
    if values.dim() != 2 or k % 4 or tuple(meta.shape) != (n, (k + 7) // 8) or tuple(scale.shape) != (n,):
        raise ValueError(
            f"2:4-int8 needs values [N, K/2] (K % 4 == 0), meta [N, ceil(K/8)] and scale [N]; got "
            f"{tuple(values.shape)}, {tuple(meta.shape)} and {tuple(scale.shape)}"
        )
    chosen = resolve_isa(isa)
    level = isa_level(chosen)
    scale32 = scale.float().contiguous()
    limit = sparse24_int8_kernel_max_m(chosen, torch.float32)
    bf16_limit = sparse24_int8_kernel_max_m(chosen, torch.bfloat16)

    def mm(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x [..., K] as it comes: the C++ entries flatten it and give y its leading dims
        if x.numel() > (bf16_limit if x.dtype == torch.bfloat16 else limit) * k:  # dequantized tiles + GEMM
            b = _contiguous(bias, x.dtype)
            return ext.mm24_q8_blas(x, values, meta, scale32, b, level, cpu_ext.BLAS_TILE_BYTES)
        return ext.mm24_q8(x, values, meta, scale32, bias, level)

    return mm


def sparse24_int8_mm(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] -> y [..., N]. On the CPU without autograd and with the C++ extension: what the
    bound CPU call (``bind_sparse24_int8_cpu``) runs, as one C++ op (``mm24_q8_routed``: a compiled
    model runs the kernel, not a traced decompress); elsewhere values dequantized to x's dtype and
    F.linear."""
    if cpu_op_applies(x, scale, bias):
        route = cpu_ext.route_args(
            "2:4-int8", x.dtype, x.shape[-1], lambda isa: sparse24_int8_kernel_max_m(isa, x.dtype)
        )
        return torch.ops.sparsekit.mm24_q8_routed(x, values, meta, scale, bias, *route)
    w = decompress_24_torch(values.to(x.dtype), meta) * scale.to(x.dtype)[:, None]
    return F.linear(x, w, bias)


__all__ = [
    "INT4_GROUPS",
    "bind_int4_cpu",
    "bind_int8_cpu",
    "bind_sparse24_int8_cpu",
    "check_int4_shape",
    "cpu_route",
    "dequantize_int4",
    "dequantize_int8",
    "int4_mm",
    "int4_mm_ref",
    "int8_mm",
    "int8_mm_ref",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "sparse24_int8_mm",
    "sparse24_int8_mm_ref",
    "unpack_int4",
]
