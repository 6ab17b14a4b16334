"""Shared checks for the kernel tests: dtype tolerances plus a scale-aware error."""

import pytest
import torch

from sparsekit.kernels import use_backend
from tests.conftest import TOL


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """allclose at the dtype's tolerance, plus relative RMS error; prints the first mismatches."""
    rtol, atol = TOL[dtype or expected.dtype]
    a, e = actual.float(), expected.float()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol)
    rel_rms = ((a - e).norm() / e.norm().clamp_min(1e-12)).item()
    if bad.any() or rel_rms > rtol:
        idx = bad.nonzero()[:5].tolist()
        listing = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.5g} vs {e[tuple(i)].item():.5g}" for i in idx)
        raise AssertionError(
            f"{int(bad.sum())}/{bad.numel()} mismatches (rtol={rtol}, atol={atol}), "
            f"relative RMS {rel_rms:.3g}; first: {listing}"
        )


@pytest.fixture
def assert_close():
    return _assert_close


@pytest.fixture
def triton_backend():
    """Force the Triton kernels (under TRITON_INTERPRET=1 on CPU tensors)."""
    with use_backend("triton"):
        yield


@pytest.fixture
def torch_backend():
    with use_backend("torch"):
        yield
