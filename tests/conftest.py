"""Test-session setup.

Triton kernels run on CPU tensors through the interpreter, which must be switched on before
triton is first imported, so it is set here, ahead of any sparsekit import.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tolerances per dtype (rtol, atol): one table for every kernel test.
TOL = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
