"""Bitmap format and bitmap_mm: Triton kernel (interpreter), torch path, reference, errors, compile.

bf16 and the interpreter: the interpreter's tl.dot on bfloat16 multiplies raw bit patterns
(triton-lang/triton#11584), so the Triton kernel is checked here in fp16 and fp32 only; the
bf16 instantiation of the same kernel is checked by the sm_80/sm_90 compile in test_aot.py.
The bf16 tests below run the CPU torch path, which is not affected.
"""

import pytest
import torch
import torch.nn.functional as F

from sparsekit.kernels import bitmap_mm, bitmap_mm_ref, compress_bitmap, decompress_bitmap, unpack_mask
from sparsekit.kernels.bitmap import TILE_K, _bitmap_mm_triton, decompress_bitmap_ref

NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SHAPES = [(1, 40, 64), (7, 123, 260), (33, 50, 136)]  # M=1; nothing a block multiple; K = 4 * 65
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


def _params(shapes, dtypes, sparsities):
    return [
        pytest.param(m, n, k, d, s, id=f"M{m}-N{n}-K{k}-{NAMES[d]}-s{int(s * 100)}")
        for (m, n, k) in shapes
        for d in dtypes
        for s in sparsities
    ]


def _weight(n, k, dtype, sparsity):
    return (torch.randn(n, k) * (torch.rand(n, k) >= sparsity)).to(dtype)


def test_golden_layout():
    w = torch.zeros(2, 130)
    w[0, [1, 63, 64, 129]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w[1, [0, 127]] = torch.tensor([5.0, 6.0])
    values, bits, offsets = compress_bitmap(w)
    assert values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # tiles of 64 columns: row 0 holds 2, 1, 1 nonzeros; row 1 holds 1, 1, 0
    assert offsets.dtype == torch.int32 and offsets.tolist() == [[0, 2, 3], [4, 5, 6]]
    assert bits.shape == (2, 17) and torch.equal(unpack_mask(bits, (2, 130)), w != 0)


@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"s{int(s * 100)}")
@pytest.mark.parametrize("dtype", list(NAMES), ids=NAMES.get)
def test_roundtrip(dtype, sparsity):
    w = _weight(9, 200, dtype, sparsity)
    values, bits, offsets = compress_bitmap(w)
    assert values.numel() == int((w != 0).sum()) and offsets.shape == (9, -(-200 // TILE_K))
    assert torch.equal(decompress_bitmap(values, bits, offsets, 200), w)
    assert torch.equal(decompress_bitmap_ref(values, bits, offsets, 200), w)


@pytest.mark.parametrize(
    ("m", "n", "k", "dtype", "sparsity"),
    _params(SHAPES[1:], [torch.float16, torch.float32], SPARSITIES)
    + _params(SHAPES[:1], [torch.float16], SPARSITIES[1:2]),
)
def test_triton_matches_ref(m, n, k, dtype, sparsity, triton_backend, assert_close):
    w = _weight(n, k, dtype, sparsity)
    packed = compress_bitmap(w)
    x, bias = torch.randn(m, k, dtype=dtype), torch.randn(n, dtype=dtype)
    assert_close(bitmap_mm(x, *packed, bias), bitmap_mm_ref(x, *packed, bias))
    # the contract between layers: equal to F.linear on the weight with zeros
    assert_close(bitmap_mm(x, *packed), F.linear(x.float(), w.float()).to(dtype))


def test_triton_other_config(assert_close):
    w = _weight(70, 136, torch.float16, 0.5)
    x = torch.randn(136, 37, dtype=torch.float16).T  # non-contiguous x, 3 tiles of BLOCK_M=16
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": TILE_K}
    packed = compress_bitmap(w)
    assert_close(_bitmap_mm_triton(x, *packed, None, cfg), bitmap_mm_ref(x, *packed))
    with pytest.raises(ValueError, match="BLOCK_K == TILE_K"):
        _bitmap_mm_triton(x, *packed, None, {**cfg, "BLOCK_K": 128})


@pytest.mark.parametrize(("m", "n", "k", "dtype", "sparsity"), _params(SHAPES, list(NAMES), [0.0, 0.5, 1.0]))
def test_torch_path_matches_ref(m, n, k, dtype, sparsity, torch_backend, assert_close):
    packed = compress_bitmap(_weight(n, k, dtype, sparsity))
    x, bias = torch.randn(2, m, k, dtype=dtype), torch.randn(n, dtype=dtype)
    y = bitmap_mm(x, *packed, bias)
    assert y.shape == (2, m, n)
    assert_close(y, bitmap_mm_ref(x, *packed, bias))


def test_bad_inputs():
    w = _weight(8, 16, torch.float16, 0.5)
    values, bits, offsets = compress_bitmap(w)
    x = torch.randn(2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="share a dtype"):
        bitmap_mm(x.float(), values, bits, offsets)
    with pytest.raises(ValueError, match="offsets must be one of int32"):
        bitmap_mm(x, values, bits, offsets.long())
    with pytest.raises(ValueError, match=r"mask_bits must be \[N, ceil\(K/8\)\] = \(8, 3\) for K = 24"):
        bitmap_mm(torch.randn(2, 24, dtype=torch.float16), values, bits, offsets)
    with pytest.raises(ValueError, match="values must be 1-D"):
        bitmap_mm(x, values.view(1, -1), bits, offsets)
    with pytest.raises(ValueError, match="one device.*offsets on meta"):
        bitmap_mm(x, values, bits, offsets.to("meta"))


def test_compile_fullgraph(assert_close):
    packed = compress_bitmap(_weight(16, 32, torch.float32, 0.5))
    x = torch.randn(3, 32)
    fn = torch.compile(lambda x: bitmap_mm(x, *packed).relu(), fullgraph=True, backend="eager")
    assert_close(fn(x), bitmap_mm_ref(x, *packed).relu())


def test_opcheck():
    packed = compress_bitmap(_weight(8, 16, torch.float32, 0.5))
    torch.library.opcheck(torch.ops.sparsekit.bitmap_mm, (torch.randn(2, 16), *packed, None, False))
