"""Shared fixtures of the benchmark-harness tests."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.conftest import require_avx512_bf16  # noqa: F401  (the bench tests import it from here)

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_script(name: str) -> ModuleType:
    """bench/<name>.py loaded as a module (the bench folder is not a package). The folder goes at
    the end of ``sys.path``, so a script's imports of its neighbours resolve as when it runs as
    ``python bench/<name>.py``, and no installed package is shadowed."""
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    """Structure checks, not speed: one torch thread keeps them fast on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def original_driver_command(
    code, impl: str, model, calib, method: str, sparsity: str, out, report
) -> list[str]:
    """The command line that runs bench/original_driver.py on one thread (as the benchmarks call it)."""
    return [
        sys.executable, str(BENCH / "original_driver.py"), "--code", str(code), "--impl", impl,
        "--model", str(model), "--calib", str(calib), "--method", method, "--sparsity", sparsity,
        "--out", str(out), "--report", str(report), "--threads", "1",
    ]  # fmt: skip
