"""The environment every benchmark and evaluation record carries: device, versions, commit, time."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

from sparsekit.kernels.cpu_ext import cpu_model


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_line(script: str, argv: list[str] | None, env: dict) -> str:
    """How a report was made, for its header: "`python SCRIPT ARGS` on CPU (N threads), torch T,
    transformers V, commit C, TIME" (``argv`` None: this process's own arguments)."""
    import shlex
    import sys

    args = shlex.join(sys.argv[1:] if argv is None else argv)
    return (
        f"`python {script} {args}` on {env['cpu']} ({env['cpu_threads']} threads), torch {env['torch']}, "
        f"transformers {env['transformers']}, commit {env['commit']}, {env['time_utc']}"
    )


def environment() -> dict:
    """Device name and capability, driver/CUDA, torch/triton/transformers versions, CPU, commit, time."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name,
            capability=f"sm_{props.major}{props.minor}",
            cuda=torch.version.cuda,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
        )
    return env
