"""Shared fixtures of the benchmark-harness tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Structure checks, not speed: one torch thread keeps them fast on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
