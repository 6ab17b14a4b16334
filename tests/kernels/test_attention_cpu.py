"""The causal bf16 CPU attention kernel against float64 SDPA, over shapes, heads and lengths."""

import pytest
import torch

from sparsekit.kernels._backend import use_cpu_isa
from sparsekit.kernels.attention_cpu import (
    causal_attention_cpu,
    causal_attention_reference,
    unsupported_reason,
)
from tests.conftest import require_avx512_bf16


@pytest.fixture(scope="module")
def kernel():
    require_avx512_bf16("the attention kernel")


def _inputs(b, h, kv, s, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, s, d, generator=g).bfloat16() for n in (h, kv, kv))
    return q, k, v


def _errors(q, k, v, scale=None):
    """max |error| of the kernel and of bf16 SDPA against float64 SDPA on the same bf16 inputs."""
    exact = causal_attention_reference(q.double(), k.double(), v.double(), scale)
    ours = causal_attention_cpu(q, k, v, scale)
    sdpa = causal_attention_reference(q, k, v, scale)
    assert ours.shape == exact.shape and ours.dtype == torch.bfloat16
    return (ours.double() - exact).abs().max().item(), (sdpa.double() - exact).abs().max().item()


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
def test_matches_float64_sdpa_as_closely_as_bf16_sdpa(kernel, shape):
    """Both outputs are rounded to bf16, which bounds bf16 SDPA's error; the kernel's may exceed it
    by its bf16 probabilities (as ATen's bf16 kernel has), never by a wrong mask or scale."""
    ours, sdpa = _errors(*_inputs(*shape))
    assert ours <= 1.25 * sdpa + 2e-3, (ours, sdpa)


def test_scale_and_strided_inputs(kernel):
    """A given scale, and q / k / v as the transposed views a model's projections give."""
    b, s, h, kv, d = 2, 96, 6, 2, 64
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, s, h, d, generator=g).bfloat16().transpose(1, 2)
    k = torch.randn(b, s, kv, d, generator=g).bfloat16().transpose(1, 2)
    v = torch.randn(b, s, kv, d, generator=g).bfloat16().transpose(1, 2)
    assert not q.is_contiguous()
    ours, sdpa = _errors(q, k, v, scale=0.3)
    assert ours <= 1.25 * sdpa + 2e-3, (ours, sdpa)


def test_row_attends_to_its_prefix_only(kernel):
    """A value set on the last key changes only the last query's output: nothing sees the future."""
    q, k, v = _inputs(1, 2, 1, 100, 64, seed=2)
    before = causal_attention_cpu(q, k, v)
    v2 = v.clone()
    v2[:, :, -1] += 10
    after = causal_attention_cpu(q, k, v2)
    assert torch.equal(before[:, :-1], after[:, :-1])
    assert not torch.equal(before[:, -1], after[:, -1])


def test_large_scores_stay_finite(kernel):
    """Scores far past exp's range (the online softmax subtracts the running max)."""
    q, k, v = _inputs(1, 2, 2, 150, 64, seed=3)
    ours, sdpa = _errors(q * 40, k * 40, v)
    assert ours <= 1.25 * sdpa + 2e-3, (ours, sdpa)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda q, k, v: (q.float(), k.float(), v.float()), "bf16 only"),
        (lambda q, k, v: (q[..., :32], k[..., :32], v[..., :32]), "head dim 32"),
        (lambda q, k, v: (q, k[:, :, :-1], v[:, :, :-1]), "must be [B, KV, S, D]"),
        (lambda q, k, v: (q[:, :3], k, v), "not a multiple"),
        (lambda q, k, v: (q[..., ::2].repeat(1, 1, 1, 2), k, v), None),  # contiguous again: fine
    ],
)
def test_refuses_what_it_cannot_run(change, needle):
    q, k, v = change(*_inputs(1, 4, 2, 16, 64))
    reason = unsupported_reason(q, k, v)
    if needle is None:
        assert reason is None or "CPU" in reason or "extension" in reason
        return
    assert reason is not None and needle in reason
    with pytest.raises(ValueError, match="causal_attention_reference"):
        causal_attention_cpu(q, k, v)


def test_a_lower_isa_keeps_sdpa(kernel):
    """SPARSEKIT_CPU_ISA below avx512-bf16 (here use_cpu_isa) turns the kernel off, by name."""
    q, k, v = _inputs(1, 2, 1, 8, 64)
    with use_cpu_isa("avx512"):
        assert "avx512" in unsupported_reason(q, k, v)
    assert unsupported_reason(q, k, v) is None


def test_compiles_fullgraph(kernel):
    q, k, v = _inputs(1, 2, 1, 40, 64)
    compiled = torch.compile(lambda a, b, c: causal_attention_cpu(a, b, c), fullgraph=True, backend="eager")
    assert torch.equal(compiled(q, k, v), causal_attention_cpu(q, k, v))
