"""Ahead-of-time compile of every registered kernel for sm_80 / sm_90, no GPU needed.

    python -m sparsekit.kernels.aot --arch 80 90 --out build/aot

For each ``AotCase`` and arch: ``triton.compile`` on an ``ASTSource`` for
``GPUTarget("cuda", arch, 32)``, writes ``<out>/sm_<arch>/<case>.{ptx,cubin,json}``, re-runs
``ptxas-blackwell -v`` (Triton's own flags) on the PTX for registers / spills, and counts
tensor-core instructions (``mma.sync``; ``wgmma.mma_async`` on sm_90). ``<out>/report.json``
and ``<out>/report.md`` gather every case. Exit status 1 on a compile error, on spills, or on a
GEMM without tensor-core instructions.

Registry: each module in ``MODULES`` defines ``AOT_CASES: list[AotCase]``; registering a new
kernel file is one line in ``MODULES``. Must run without ``TRITON_INTERPRET=1`` (the
interpreter replaces ``@triton.jit`` functions with Python ones that cannot be compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

MODULES = [
    "sparsekit.kernels.sparse24",
    "sparsekit.kernels.masked_mm",
    "sparsekit.kernels.bitmap",
    "sparsekit.kernels.wanda_mask",
    "sparsekit.kernels.obs_solve",
    "sparsekit.kernels.calib_stats",
]

# how a launch on typical LLM shapes specializes its arguments: 16-byte aligned pointers, sizes and
# row strides divisible by 16 (K = 4096, N = 11008, ...), unit inner strides folded to constants
ALIGNED = "aligned"


@dataclasses.dataclass(frozen=True)
class AotCase:
    """One kernel at one representative config.

    signature: runtime argument name -> Triton type ("*fp16", "*u8", "i32", "fp32", ...).
    constexprs: constexpr argument name -> value (block sizes, flags, unit strides).
    aligned: argument names that get ``tt.divisibility = 16`` as the JIT would give them.
    is_gemm: the PTX must contain tensor-core instructions.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    is_gemm: bool
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple[str, ...] = ()

    @classmethod
    def gemm(cls, name, kernel, signature, blocks, num_warps, num_stages, **constexprs):
        """A GEMM case: ``signature = gemm_signature(...)``, ``blocks = (BLOCK_M, BLOCK_N, BLOCK_K)``."""
        sig, aligned = signature
        block_m, block_n, block_k = blocks
        consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, **constexprs}
        return cls(name, kernel, sig, consts, True, num_warps, num_stages, tuple(aligned))


def gemm_signature(pointers, ints, dtype, pointer_types=None, unaligned=("M", "M_BUCKET")):
    """(signature, aligned) for a GEMM-like kernel: pointers of ``dtype`` unless overridden."""
    pointer_types = pointer_types or {}
    sig = {p: pointer_types.get(p, f"*{dtype}") for p in pointers}
    sig.update({i: "i32" for i in ints})
    aligned = tuple(p for p in pointers) + tuple(i for i in ints if i not in unaligned)
    return sig, aligned


def collect_cases(modules=None) -> list[AotCase]:
    cases = []
    for name in modules or MODULES:
        cases.extend(importlib.import_module(name).AOT_CASES)
    return cases


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            raise RuntimeError(
                f"{kernel!r} is not a Triton JIT function; unset TRITON_INTERPRET before AOT compiling"
            )
        fn = fn.fn
    return fn


def _ptxas() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"


def _gpu_name(arch: int) -> str:
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # Triton targets sm_90a for wgmma


def ptxas_usage(ptx_path: Path, arch: int) -> dict:
    """Registers / spills / stack from ``ptxas-blackwell -v`` with the flags Triton itself uses."""
    cmd = [
        str(_ptxas()),
        "-lineinfo",
        "-v",
        "--regAllocOptLevel=2",
        f"--gpu-name={_gpu_name(arch)}",
        str(ptx_path),
        "-o",
        str(ptx_path.with_suffix(".ptxas.cubin")),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"ptxas failed ({res.returncode}): {res.stderr.strip()}\n{' '.join(cmd)}")
    log = res.stderr
    ptx_path.with_suffix(".ptxas.cubin").unlink(missing_ok=True)

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores_bytes": grab(r"(\d+) bytes spill stores"),
        "spill_loads_bytes": grab(r"(\d+) bytes spill loads"),
        "stack_frame_bytes": grab(r"(\d+) bytes stack frame"),
        "ptxas_log": log.strip(),
    }


def compile_case(case: AotCase, arch: int, out: Path) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _jit_function(case.kernel)
    signature, constexprs = {}, {}
    for i, name in enumerate(fn.arg_names):
        param = fn.params[i]
        if name in case.constexprs:
            signature[name], constexprs[name] = "constexpr", case.constexprs[name]
        elif name in case.signature:
            signature[name] = case.signature[name]
        elif param.is_constexpr and param.has_default:
            signature[name], constexprs[name] = "constexpr", param.default
        else:
            raise ValueError(f"AOT case {case.name}: no type or value for argument {name!r} of {fn.__name__}")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in case.aligned if a in case.signature}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": case.num_warps, "num_stages": case.num_stages},
    )
    seconds = time.perf_counter() - t0
    arch_dir = out / f"sm_{arch}"
    arch_dir.mkdir(parents=True, exist_ok=True)
    ptx = compiled.asm["ptx"]
    ptx_path = arch_dir / f"{case.name}.ptx"
    ptx_path.write_text(ptx)
    (arch_dir / f"{case.name}.cubin").write_bytes(compiled.asm["cubin"])
    usage = ptxas_usage(ptx_path, arch)
    mma = len(re.findall(r"\bmma\.sync\.aligned", ptx))
    wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
    report = {
        "case": case.name,
        "kernel": fn.__name__,
        "arch": f"sm_{arch}",
        "num_warps": case.num_warps,
        "num_stages": case.num_stages,
        "constexprs": {k: v for k, v in case.constexprs.items()},
        "shared_bytes": int(compiled.metadata.shared),
        "mma_sync": mma,
        "wgmma": wgmma,
        "tensor_cores": mma + wgmma > 0,
        "is_gemm": case.is_gemm,
        "compile_s": round(seconds, 3),
        **usage,
    }
    report["problems"] = problems(report)
    (arch_dir / f"{case.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def problems(report: dict) -> list[str]:
    out = []
    if report.get("error"):
        out.append(f"compile error: {report['error'].splitlines()[0]}")
        return out
    if report["spill_stores_bytes"] or report["spill_loads_bytes"]:
        out.append(f"spills {report['spill_stores_bytes']} B stores / {report['spill_loads_bytes']} B loads")
    if report["is_gemm"] and not report["tensor_cores"]:
        out.append("GEMM without tensor-core instructions (no mma / wgmma in the PTX)")
    return out


def markdown(reports: list[dict]) -> str:
    lines = [
        "| case | arch | warps/stages | registers | spills (st/ld B) | shared B | mma.sync | wgmma | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        if r.get("error"):
            lines.append(f"| {r['case']} | {r['arch']} | | | | | | | compile error |")
            continue
        ok = "yes" if not r["problems"] else "; ".join(r["problems"])
        lines.append(
            f"| {r['case']} | {r['arch']} | {r['num_warps']}/{r['num_stages']} | {r['registers']} | "
            f"{r['spill_stores_bytes']}/{r['spill_loads_bytes']} | {r['shared_bytes']} | {r['mma_sync']} | "
            f"{r['wgmma']} | {ok} |"
        )
    return "\n".join(lines) + "\n"


def run(archs, out: Path, only: str | None = None, modules=None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for case in collect_cases(modules):
        if only and only not in case.name:
            continue
        for arch in archs:
            try:
                reports.append(compile_case(case, arch, out))
            except Exception as e:  # noqa: BLE001 - every failure becomes a report row
                err = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
                rep = {"case": case.name, "arch": f"sm_{arch}", "error": err, "is_gemm": case.is_gemm}
                rep["problems"] = problems(rep)
                reports.append(rep)
    (out / "report.json").write_text(json.dumps(reports, indent=2) + "\n")
    (out / "report.md").write_text(markdown(reports))
    return reports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparsekit.kernels.aot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions, e.g. 80 90")
    parser.add_argument("--out", type=Path, default=Path("build/aot"), help="output folder")
    parser.add_argument("--only", default=None, help="compile only cases whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    t0 = time.perf_counter()
    reports = run(args.arch, args.out, args.only)
    sys.stdout.write(markdown(reports))
    bad = [r for r in reports if r["problems"]]
    for r in bad:
        sys.stdout.write(f"FAIL {r['case']} {r['arch']}: {'; '.join(r['problems'])}\n")
    sys.stdout.write(f"{len(reports)} compiles in {time.perf_counter() - t0:.1f} s -> {args.out}\n")
    return 1 if bad or not reports else 0


if __name__ == "__main__":
    raise SystemExit(main())
