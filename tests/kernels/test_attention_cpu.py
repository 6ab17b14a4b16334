"""The causal CPU attention kernels (bf16 and fp32) against float64 SDPA, over shapes, heads and lengths."""

import pytest
import torch

from sparsekit.kernels._backend import use_cpu_isa
from sparsekit.kernels.attention_cpu import (
    causal_attention_cpu,
    causal_attention_reference,
    unsupported_reason,
)
from tests.conftest import require_avx2, require_avx512_bf16

DTYPES = [torch.bfloat16, torch.float32]
# the kernel's max |error| against float64 may exceed SDPA's by this factor plus this constant:
# bf16 by its bf16 probabilities (as ATen's bf16 kernel has), fp32 by summation order and exp2's
# polynomial; a wrong mask or scale is off by 1e-1 and more
TOLERANCE = {torch.bfloat16: (1.25, 2e-3), torch.float32: (2.0, 1e-6)}


@pytest.fixture(params=DTYPES, ids=["bf16", "fp32"])
def dtype(request):
    if request.param == torch.bfloat16:
        require_avx512_bf16("the bf16 attention kernel")
    else:
        require_avx2("the fp32 attention kernel")
    return request.param


def _inputs(b, h, kv, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, s, d, generator=g).to(dtype) for n in (h, kv, kv))
    return q, k, v


def _check(q, k, v, scale=None):
    """The kernel's max |error| against float64 SDPA on the same inputs is within ``TOLERANCE`` of
    SDPA's in the inputs' dtype."""
    exact = causal_attention_reference(q.double(), k.double(), v.double(), scale)
    ours = causal_attention_cpu(q, k, v, scale)
    sdpa = causal_attention_reference(q, k, v, scale)
    assert ours.shape == exact.shape and ours.dtype == q.dtype
    err, err_sdpa = (ours.double() - exact).abs().max().item(), (sdpa.double() - exact).abs().max().item()
    factor, floor = TOLERANCE[q.dtype]
    assert err <= factor * err_sdpa + floor, (err, err_sdpa)


SHAPES = [  # (B, H, KV, S, D): tails of both blocks (32 queries, 64 keys), grouped heads, every head dim
    (1, 1, 1, 2, 64),
    (2, 4, 2, 37, 64),
    (1, 9, 3, 512, 64),
    (3, 2, 1, 65, 64),
    (1, 4, 4, 200, 128),
    (2, 8, 2, 129, 128),
    (1, 4, 1, 130, 96),
    (1, 2, 2, 70, 256),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_sdpa_as_closely_as_sdpa(dtype, shape):
    _check(*_inputs(*shape, dtype))


def test_scale_and_strided_inputs(dtype):
    """A given scale, and q / k / v as the transposed views a model's projections give."""
    b, s, h, kv, d = 2, 96, 6, 2, 64
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(b, s, kv, d, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(b, s, kv, d, generator=g).to(dtype).transpose(1, 2)
    assert not q.is_contiguous()
    _check(q, k, v, scale=0.3)


def test_row_attends_to_its_prefix_only(dtype):
    """A value set on the last key changes only the last query's output: nothing sees the future."""
    q, k, v = _inputs(1, 2, 1, 100, 64, dtype, seed=2)
    before = causal_attention_cpu(q, k, v)
    v2 = v.clone()
    v2[:, :, -1] += 10
    after = causal_attention_cpu(q, k, v2)
    assert torch.equal(before[:, :-1], after[:, :-1])
    assert not torch.equal(before[:, -1], after[:, -1])


def test_large_scores_stay_finite(dtype):
    """Scores far past exp's range (the online softmax subtracts the running max)."""
    q, k, v = _inputs(1, 2, 2, 150, 64, dtype, seed=3)
    _check(q * 40, k * 40, v)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda q, k, v: (q.double(), k.double(), v.double()), "bf16 or fp32 only"),
        (lambda q, k, v: (q.float(), k, v), "all three alike"),
        (lambda q, k, v: (q[..., :32], k[..., :32], v[..., :32]), "head dim 32"),
        (lambda q, k, v: (q, k[:, :, :-1], v[:, :, :-1]), "must be [B, KV, S, D]"),
        (lambda q, k, v: (q[:, :3], k, v), "not a multiple"),
        (lambda q, k, v: (q[..., ::2].repeat(1, 1, 1, 2), k, v), None),  # contiguous again: fine
    ],
)
def test_refuses_what_it_cannot_run(change, needle):
    q, k, v = change(*_inputs(1, 4, 2, 16, 64, torch.bfloat16))
    reason = unsupported_reason(q, k, v)
    if needle is None:
        assert reason is None or "CPU" in reason or "extension" in reason
        return
    assert reason is not None and needle in reason
    with pytest.raises(ValueError, match="causal_attention_reference"):
        causal_attention_cpu(q, k, v)


@pytest.mark.parametrize(
    "dtype, lower", [(torch.bfloat16, "avx512"), (torch.float32, "scalar")], ids=["bf16", "fp32"]
)
def test_a_lower_isa_keeps_sdpa(dtype, lower):
    """SPARSEKIT_CPU_ISA below the dtype's level (here use_cpu_isa) turns the kernel off, by name."""
    (require_avx512_bf16 if dtype == torch.bfloat16 else require_avx2)("the attention kernel")
    q, k, v = _inputs(1, 2, 1, 8, 64, dtype)
    with use_cpu_isa(lower):
        reason = unsupported_reason(q, k, v)
        assert reason is not None and lower in reason
    assert unsupported_reason(q, k, v) is None


def test_compiles_fullgraph(dtype):
    q, k, v = _inputs(1, 2, 1, 40, 64, dtype)
    compiled = torch.compile(lambda a, b, c: causal_attention_cpu(a, b, c), fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, k, v), causal_attention_cpu(q, k, v))
