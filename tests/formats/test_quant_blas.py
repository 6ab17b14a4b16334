"""The quantized formats' CPU blas path (``mm_q8_blas``, ``mm_q4_blas``, ``mm24_q8_blas``): each
tile dequantized in C++ then handed to ATen's GEMM. x = I reads the dequantized weight back, so
the tiles must equal the plain-torch dequantization bit for bit, on every ISA and dtype, with tiles
that split N unevenly; a random x checks the product against fp32 references."""

import pytest
import torch

from sparsekit.kernels import compress_24, cpu_ext, nm_keep_mask
from sparsekit.kernels.quant import (
    cpu_route,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)
from sparsekit.kernels.sparse24_cpu import decompress_24_torch
from sparsekit.nn import SparseLinear
from tests.conftest import TOL, require_cpu_extension

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ISAS = [i.value for i, lvl in cpu_ext.ISA_LEVEL.items() if lvl <= cpu_ext.ISA_LEVEL[cpu_ext.supported_isa()]]
N = 37  # no multiple of 16: the last tile is short
TILES = [1, cpu_ext.BLAS_TILE_BYTES]  # 1 byte: tiles of 16 rows (the floor); the shipped size: one tile


def _level(isa: str) -> int:
    return cpu_ext.ISA_LEVEL[cpu_ext.CpuIsa(isa)]


def _weights(fmt: str, k: int, group: int = 64):
    """(the C++ call's weight arguments, the dequantized weight [N, K] fp32) for ``fmt``."""
    torch.manual_seed(0)
    w = torch.randn(N, k)
    if fmt == "int8":
        q, s = quantize_int8(w)
        return (q, s.float()), dequantize_int8(q, s.float())
    if fmt == "int4":
        packed, sz = quantize_int4(w, group)
        return (packed, sz.float().contiguous()), dequantize_int4(packed, sz.float())
    w = w * nm_keep_mask(w.abs(), 2, 4)
    values, meta = compress_24(w)
    q, s = quantize_int8(values)
    return (q, meta, s.float()), decompress_24_torch(dequantize_int8(q, s.float()), meta)


def _call(fmt: str, x, args, bias, isa: str, tile: int, group: int = 64):
    ext = cpu_ext.extension()
    if fmt == "int8":
        return ext.mm_q8_blas(x, *args, bias, _level(isa), tile)
    if fmt == "int4":
        return ext.mm_q4_blas(x, *args, bias, group, _level(isa), tile)
    return ext.mm24_q8_blas(x, *args, bias, _level(isa), tile)


CASES = [("int8", 300), ("int4", 384), ("2:4-int8", 260)]  # K past each vector loop's tail


@pytest.mark.parametrize("tile", TILES, ids=["16-row-tiles", "one-tile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,k", CASES)
def test_tiles_dequantize_exactly_as_torch(fmt, k, isa, dtype, tile):
    require_cpu_extension()
    args, w = _weights(fmt, k)
    eye = torch.eye(k, dtype=dtype)
    got = _call(fmt, eye, args, None, isa, tile)  # [K, N] = W^T, one product per output
    assert torch.equal(got.t(), w.to(dtype)), f"{fmt} {isa} {dtype}: dequantized tiles differ from torch"


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("isa", ISAS)
def test_int4_tiles_at_every_group(group, isa):
    require_cpu_extension()
    args, w = _weights("int4", 256, group)
    got = _call("int4", torch.eye(256, dtype=torch.bfloat16), args, None, isa, 1, group)
    assert torch.equal(got.t(), w.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("fmt,k", CASES)
def test_product_with_bias_against_fp32(fmt, k, dtype):
    require_cpu_extension()
    args, w = _weights(fmt, k)
    x, bias = torch.randn(40, k).to(dtype), torch.randn(N).to(dtype)
    got = _call(fmt, x, args, bias, cpu_ext.supported_isa().value, 1)
    ref = (x.float() @ w.to(dtype).float().t() + bias.float()).to(dtype)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("fmt", ["int8", "int4", "2:4-int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_layers_take_the_blas_path_above_their_direct_m(fmt, dtype):
    """A layer at 96 rows runs the tiles (the route says so), and matches its dequantized weight."""
    require_cpu_extension()
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 48).to(dtype).requires_grad_(False)
    if fmt == "2:4-int8":
        lin.weight.mul_(nm_keep_mask(lin.weight.abs().float(), 2, 4).to(dtype))
    layer = SparseLinear.from_linear(lin, format=fmt)
    assert "blas" in cpu_route(fmt, dtype, 96)
    x = torch.randn(2, 48, 128).to(dtype)
    with torch.no_grad():
        y = layer(x)
    ref = torch.nn.functional.linear(x.float(), layer.dense_weight().float(), lin.bias.float()).to(dtype)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, ref, rtol=rtol, atol=atol)


def test_blas_paths_refuse_inputs_they_would_misread():
    require_cpu_extension()
    ext = cpu_ext.extension()
    (q, s), _ = _weights("int8", 64)
    with pytest.raises(RuntimeError, match="x must be"):
        ext.mm_q8_blas(torch.randn(4, 63), q, s, None, 0, 0)
    with pytest.raises(RuntimeError, match="scale must be fp32"):
        ext.mm_q8_blas(torch.randn(4, 64), q, s.double(), None, 0, 0)
    with pytest.raises(RuntimeError, match="bias must be"):
        ext.mm_q8_blas(torch.randn(4, 64), q, s, torch.randn(N).bfloat16(), 0, 0)
    (packed, sz), _ = _weights("int4", 64, 32)
    with pytest.raises(RuntimeError, match="sz must be"):
        ext.mm_q4_blas(torch.randn(4, 64), packed, sz, None, 64, 0, 0)  # sz holds groups of 32
    (v, meta, s24), _ = _weights("2:4-int8", 64)
    with pytest.raises(RuntimeError, match="meta must be"):
        ext.mm24_q8_blas(torch.randn(4, 64), v, meta[:, :-1].contiguous(), s24, None, 0, 0)
