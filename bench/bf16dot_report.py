"""What the ``avx512-bf16`` benchmark scripts share: the CPU check before anything is built, and
the report written as <stem>.json + <stem>.md beside the command that made it."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from sparsekit._env import environment, run_line
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.kernels import cpu_ext
from sparsekit.kernels._backend import CpuIsa


def require_avx512_bf16(what: str) -> None:
    """Exit naming the reason unless this CPU runs ``avx512-bf16`` (AVX-512 + AVX512_BF16 + VBMI2),
    read through the C++ extension: a build that failed is named, not taken for a scalar-only CPU."""
    if cpu_ext.extension() is None:
        why = cpu_ext.build_error()
        sys.exit(f"sparsekit's C++ CPU extension did not build here ({why}): it reads the CPU's ISA")
    best = cpu_ext.supported_isa()
    if best is not CpuIsa.AVX512_BF16:
        sys.exit(
            f"this CPU runs at most {best.value!r}; {what} need avx512-bf16 "
            "(AVX-512 + AVX512_BF16 + VBMI2: Zen 4, Sapphire Rapids and later)"
        )


def write_report(
    out: str, stem: str, script: str, argv: list[str] | None, rows: list[dict], markdown: Callable[..., str]
) -> str:
    """out/<stem>.json ({command, env, rows}) and out/<stem>.md (``markdown(rows, header)``, the
    header ``_env.run_line``'s: command, CPU, threads, torch, commit, time), each written
    atomically; returns the markdown."""
    env = environment()
    args = sys.argv[1:] if argv is None else argv
    command = f"python bench/{script} {shlex.join(args)}"
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / f"{stem}.json", {"command": command, "env": env, "rows": rows})
    text = markdown(rows, run_line(f"bench/{script}", args, env))
    write_text_atomic(folder / f"{stem}.md", text)
    return text
