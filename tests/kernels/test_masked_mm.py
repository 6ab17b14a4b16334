"""masked_mm: Triton kernel (interpreter), torch path, gradients, errors, compile.

bf16 and the interpreter: the interpreter's tl.dot on bfloat16 multiplies raw bit patterns
(triton-lang/triton#11584), so the Triton kernel is checked here in fp16 and fp32 only; the
bf16 instantiation (forward and the dX kernel) is checked by the sm_80/sm_90 compile in
test_aot.py. The bf16 tests below run the CPU torch path, which is not affected.
"""

import pytest
import torch
import torch.nn.functional as F

from sparsekit.kernels import masked_mm, masked_mm_ref, pack_mask
from sparsekit.kernels.masked_mm import _launch

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


def _problem(m, n, k, dtype, sparsity):
    w = torch.randn(n, k, dtype=dtype)
    mask = torch.rand(n, k) >= sparsity
    return torch.randn(m, k, dtype=dtype), w, mask, torch.randn(n, dtype=dtype)


@pytest.mark.parametrize(
    ("m", "n", "k", "dtype", "sparsity"),
    _params(SHAPES[1:], [torch.float16, torch.float32], SPARSITIES)
    + _params(SHAPES[:1], [torch.float16], SPARSITIES[1:2]),
)
def test_triton_matches_ref(m, n, k, dtype, sparsity, triton_backend, assert_close):
    x, w, mask, bias = _problem(m, n, k, dtype, sparsity)
    bits = pack_mask(mask)
    assert_close(masked_mm(x, w, bits, bias), masked_mm_ref(x, w, bits, bias))
    # the contract between layers: equal to F.linear on the weight with zeros
    assert_close(masked_mm(x, w, bits), F.linear(x.float(), (w * mask).float()).to(dtype))


def test_triton_skips_pruned_tiles(assert_close):
    """Whole pruned K tiles (and a pruned row block) must give exact zeros, not garbage."""
    x, w, mask, _ = _problem(20, 48, 200, torch.float16, 0.5)
    mask[:, 64:192] = False  # tiles 1 and 2 of BLOCK_K=64 pruned for every row
    mask[:16] = False  # first BLOCK_N rows fully pruned
    w[~mask] = float("nan")  # a skipped tile must not be read at all
    bits = pack_mask(mask)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}
    y = _launch(x, w, bits, None, 48, trans_w=False, interpret_config=cfg)
    assert torch.equal(y[:, :16], torch.zeros_like(y[:, :16]))
    assert_close(y, masked_mm_ref(x, torch.where(mask, w, 0), bits))


@pytest.mark.parametrize(("m", "n", "k", "dtype", "sparsity"), _params(SHAPES, list(NAMES), [0.0, 0.5, 1.0]))
def test_torch_path_matches_ref(m, n, k, dtype, sparsity, torch_backend, assert_close):
    x, w, mask, bias = _problem(m, n, k, dtype, sparsity)
    bits = pack_mask(mask)
    x3 = x.unsqueeze(0).expand(2, -1, -1)
    y = masked_mm(x3, w, bits, bias)
    assert y.shape == (2, m, n)
    assert_close(y, masked_mm_ref(x3, w, bits, bias))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients(backend, assert_close):
    x, w, mask, bias = _problem(5, 24, 36, torch.float32, 0.5)
    bits = pack_mask(mask)
    leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
    y = masked_mm(leaves[0], leaves[1], bits, leaves[2], backend=backend)
    g = torch.randn_like(y)
    y.backward(g)
    ref = [t.clone().requires_grad_() for t in (x, w, bias)]
    F.linear(ref[0], ref[1] * mask, ref[2]).backward(g)
    for got, want in zip(leaves, ref, strict=True):
        assert_close(got.grad, want.grad)
    assert torch.all(leaves[1].grad[~mask] == 0), "pruned weights must get zero gradient"


def test_finetune_keeps_mask():
    x, w, mask, _ = _problem(8, 16, 32, torch.float32, 0.5)
    w = (w * mask).requires_grad_()
    bits = pack_mask(mask)
    opt = torch.optim.SGD([w], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        masked_mm(x, w, bits).square().mean().backward()
        opt.step()
    assert torch.all(w.detach()[~mask] == 0)


def test_bad_inputs():
    x, w, mask, _ = _problem(2, 8, 16, torch.float16, 0.5)
    bits = pack_mask(mask)
    with pytest.raises(ValueError, match="share a dtype"):
        masked_mm(x.float(), w, bits)
    with pytest.raises(ValueError, match="mask_bits must be one of uint8"):
        masked_mm(x, w, bits.bool())
    with pytest.raises(ValueError, match=r"mask_bits must be \[N, ceil\(K/8\)\] = \(8, 2\)"):
        masked_mm(x, w, bits[:, :1])
    with pytest.raises(ValueError, match="K = weight.shape"):
        masked_mm(x[:, :8], w, bits)
    with pytest.raises(ValueError, match="one device.*weight on meta"):
        masked_mm(x, w.to("meta"), bits)


def test_compile_fullgraph(assert_close):
    """aot_eager traces forward and backward with fake tensors: both must be trace-safe."""
    x, w, mask, bias = _problem(3, 16, 32, torch.float32, 0.5)
    bits = pack_mask(mask)
    w = w.requires_grad_()
    fn = torch.compile(lambda x: masked_mm(x, w, bits, bias).relu(), fullgraph=True, backend="aot_eager")
    y = fn(x)
    y.sum().backward()
    assert_close(y, masked_mm_ref(x, w, bits, bias).relu())
    assert torch.all(w.grad[~mask] == 0)


def test_opcheck():
    x, w, mask, bias = _problem(2, 8, 16, torch.float32, 0.5)
    args = (x, w.requires_grad_(), pack_mask(mask), bias, False)
    torch.library.opcheck(torch.ops.sparsekit.masked_mm, args)
