"""2:4 format and sparse24_mm: Triton kernel (interpreter), torch path, reference, errors, compile.

bf16 and the interpreter: the interpreter's tl.dot on bfloat16 multiplies raw bit patterns
(triton-lang/triton#11584), so the Triton kernel is checked here in fp16 and fp32 only; the
bf16 instantiation of the same kernel is checked by the sm_80/sm_90 compile in test_aot.py.
The bf16 tests below run the CPU torch path, which is not affected.
"""

import pytest
import torch
import torch.nn.functional as F

from sparsekit.kernels import compress_24, decompress_24, sparse24_mm, sparse24_mm_ref
from sparsekit.kernels.sparse24 import _sparse24_mm_triton, decompress_24_ref
from sparsekit.kernels.topk_select import nm_keep_mask

NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SHAPES = [(1, 40, 64), (7, 123, 260), (33, 50, 136)]  # M=1; nothing a block multiple; K = 4 * 65


def _params(shapes, dtypes):
    return [pytest.param(m, n, k, d, id=f"M{m}-N{n}-K{k}-{NAMES[d]}") for (m, n, k) in shapes for d in dtypes]


def _weight_24(n, k, dtype):
    w = torch.randn(n, k)
    return (w * nm_keep_mask(w.abs(), 2, 4)).to(dtype)


def test_golden_1x8():
    w = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0]])
    values, meta = compress_24(w)
    # group 0 keeps slots 1, 3 -> nibble 1 | 3 << 2 = 13; group 1 keeps slot 0 and fills the
    # lowest zero slot 1 -> nibble 0 | 1 << 2 = 4; byte = 13 | 4 << 4 = 77
    assert values.tolist() == [[1.5, -2.0, 3.0, 0.0]]
    assert meta.dtype == torch.uint8 and meta.tolist() == [[77]]
    assert torch.equal(decompress_24(values, meta), w)


@pytest.mark.parametrize(("n", "k"), [(5, 8), (3, 260), (16, 4)], ids=["N5-K8", "N3-K260", "N16-K4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=NAMES.get)
def test_roundtrip(n, k, dtype):
    w = _weight_24(n, k, dtype)
    w[0, :4] = 0  # an all-zero group
    values, meta = compress_24(w)
    assert values.shape == (n, k // 2) and meta.shape == (n, (k + 7) // 8)
    assert torch.equal(decompress_24(values, meta), w)
    assert torch.equal(decompress_24_ref(values, meta), w)


def test_not_24_refused():
    w = _weight_24(4, 16, torch.float32)
    w[2, 9:12] = 1.0  # row 2, group 2 now has 3 or 4 nonzeros
    with pytest.raises(ValueError, match=r"row 2, group 2 \(columns 8\.\.11\)"):
        compress_24(w)


def test_bad_k_refused():
    with pytest.raises(ValueError, match="in_features % 4 == 0, got 10"):
        compress_24(torch.zeros(2, 10))


def test_bad_inputs():
    w = _weight_24(8, 16, torch.float16)
    values, meta = compress_24(w)
    x = torch.randn(2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="share a dtype"):
        sparse24_mm(x.float(), values, meta)
    with pytest.raises(ValueError, match="meta must be one of uint8"):
        sparse24_mm(x, values, meta.to(torch.int32))
    with pytest.raises(ValueError, match="x must be one of"):
        sparse24_mm(x.to(torch.int8), values, meta)
    with pytest.raises(ValueError, match=r"K = 2 \* values.shape\[1\] = 16"):
        sparse24_mm(torch.randn(2, 12, dtype=torch.float16), values, meta)
    with pytest.raises(ValueError, match="one device.*meta on meta"):
        sparse24_mm(x, values, meta.to("meta"))
    with pytest.raises(ValueError, match="meta shape"):
        sparse24_mm(x, values, meta[:, :1])
    with pytest.raises(ValueError, match="bias must be"):
        sparse24_mm(x, values, meta, torch.zeros(3, dtype=torch.float16))


@pytest.mark.parametrize(("m", "n", "k", "dtype"), _params(SHAPES, [torch.float16, torch.float32]))
def test_triton_matches_ref(m, n, k, dtype, triton_backend, assert_close):
    w = _weight_24(n, k, dtype)
    values, meta = compress_24(w)
    x, bias = torch.randn(m, k, dtype=dtype), torch.randn(n, dtype=dtype)
    assert_close(sparse24_mm(x, values, meta, bias), sparse24_mm_ref(x, values, meta, bias))
    assert_close(sparse24_mm(x, values, meta), F.linear(x.float(), w.float()).to(dtype))


def test_triton_other_config(assert_close):
    """A wide BLOCK_K past K and several M tiles: tail masks of every load."""
    dtype = torch.float16
    values, meta = compress_24(_weight_24(40, 72, dtype))
    x = torch.randn(37, 72, dtype=dtype)  # 3 tiles of BLOCK_M=16
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128}
    assert_close(_sparse24_mm_triton(x, values, meta, None, cfg), sparse24_mm_ref(x, values, meta))
    xt = torch.randn(72, 5, dtype=dtype).T  # non-contiguous x
    assert_close(_sparse24_mm_triton(xt, values, meta, None, cfg), sparse24_mm_ref(xt, values, meta))


@pytest.mark.parametrize(
    ("m", "n", "k", "dtype"), _params(SHAPES, [torch.float16, torch.bfloat16, torch.float32])
)
def test_torch_path_matches_ref(m, n, k, dtype, torch_backend, assert_close):
    values, meta = compress_24(_weight_24(n, k, dtype))
    x, bias = torch.randn(2, m, k, dtype=dtype), torch.randn(n, dtype=dtype)
    y = sparse24_mm(x, values, meta, bias)
    assert y.shape == (2, m, n)
    assert_close(y, sparse24_mm_ref(x, values, meta, bias))


def test_compile_fullgraph(assert_close):
    values, meta = compress_24(_weight_24(16, 32, torch.float32))
    x = torch.randn(3, 32)
    fn = torch.compile(lambda x: sparse24_mm(x, values, meta).relu(), fullgraph=True, backend="eager")
    assert_close(fn(x), sparse24_mm_ref(x, values, meta).relu())


def test_opcheck():
    values, meta = compress_24(_weight_24(8, 16, torch.float32))
    torch.library.opcheck(torch.ops.sparsekit.sparse24_mm, (torch.randn(2, 16), values, meta, None, False))
