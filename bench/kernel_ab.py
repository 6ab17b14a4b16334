"""A C++ kernel change against the code it replaces, interleaved in one process.

    python bench/kernel_ab.py --base REV --out docs/data/kernel-ab [--isa avx2] [--ms 1,4]
        [--formats 2:4,2:4-int8,int8,bitmap=0.7] [--dtypes fp32,bf16] [--shapes smollm2] [--threads 2]

Builds the extension from the C++ sources as they were at git revision ``--base`` (same flags,
its own module name) beside the working tree's build, then times each format's direct kernel
from both builds and dense ``F.linear`` in the same rounds (``time_cpu_interleaved``), each
rotated over copies of its weight adding up to ``--pool-mib`` (weights from DRAM, as in a decode
step). Both builds get the same x, weights, forced ISA and path, so the ratio new / base is the
kernel change alone. Writes <out>.json and <out>.md: medians (p20..p80), new vs base and both vs
dense, the machine and both revisions.
"""

from __future__ import annotations

import argparse
import math
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsekit._env import environment
from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.bench.layers import linear_shapes
from sparsekit.bench.timing import Rotation, copies_for, time_cpu_interleaved
from sparsekit.kernels import compress_24, compress_bitmap, cpu_ext
from sparsekit.kernels.quant import quantize_int8
from sparsekit.kernels.topk_select import nm_keep_mask

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = ("2:4", "2:4-int8", "int8", "bitmap=0.5", "bitmap=0.7")
PATHS = {"direct": 0, "blas": 1}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def build_at(rev: str):
    """The extension built from the C++ sources at git revision ``rev`` (a module of its own)."""
    sources = []
    for path in cpu_ext.CPP_SOURCES:
        try:  # a source file added after rev is not part of its build
            sources.append(_git("show", f"{rev}:{path.relative_to(ROOT).as_posix()}"))
        except subprocess.CalledProcessError:
            continue
    text = "\n".join(sources)
    functions = [f for f in cpu_ext.FUNCTIONS if f"{f}(" in text]  # a newer function the base lacks
    return cpu_ext.compile_sources(sources, prefix="sparsekit_cpu_kernels_base", functions=functions)


def _weight(fmt: str, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) / k**0.5
    if fmt.startswith("2:4"):
        w = w * nm_keep_mask(w.abs(), 2, 4)
    elif fmt.startswith("bitmap="):
        w = w * (torch.rand(n, k, generator=gen) >= float(fmt.split("=")[1]))
    return w.to(dtype)


def _parts(fmt: str, w: torch.Tensor) -> list[torch.Tensor]:
    """The stored tensors of ``w`` in ``fmt`` (2:4-int8: int8 values, meta, fp32 row scales; int8:
    the dense int8 weight and its fp32 row scales)."""
    if fmt == "int8":
        q, scale = quantize_int8(w.float())
        return [q, scale.float()]
    if fmt == "2:4":
        return list(compress_24(w))
    if fmt == "2:4-int8":
        q, scale = quantize_int8(w.float())
        values, meta = compress_24(q.to(torch.float32))
        return [values.to(torch.int8), meta, scale.float()]
    return list(compress_bitmap(w))


def _dense_call(x: torch.Tensor, w: torch.Tensor):
    return lambda: F.linear(x, w)


def _call(module, fmt: str, x: torch.Tensor, parts: list[torch.Tensor], level: int, path: int):
    if fmt == "2:4":
        return lambda: module.mm24(x, parts[0], parts[1], None, level, path, 0)
    if fmt == "2:4-int8":
        return lambda: module.mm24_q8(x, parts[0], parts[1], parts[2], None, level)
    if fmt == "int8":
        return lambda: module.mm_q8(x, parts[0], parts[1], None, level)
    return lambda: module.mm_bitmap(x, parts[0], parts[1], parts[2], None, level, path, 0)


def run(args, base, new) -> list[dict]:
    level = cpu_ext.isa_level(cpu_ext.resolve_isa(args.isa))
    rows = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for shape in linear_shapes(args.shapes):
            for m in args.ms:
                x = torch.randn(m, shape.k).to(dtype)
                fns = {}
                dense = _weight("dense", shape.n, shape.k, dtype)
                count = copies_for(dense.numel() * dense.element_size(), args.pool_mib << 20)
                fns["dense"] = Rotation([_dense_call(x, dense.clone()) for _ in range(count)])
                for fmt in args.formats:
                    parts = _parts(fmt, _weight(fmt, shape.n, shape.k, dtype))
                    count = copies_for(sum(t.numel() * t.element_size() for t in parts), args.pool_mib << 20)
                    for side, module in (("base", base), ("new", new)):
                        # each side streams copies of its own: on shared copies, whichever side ran
                        # second in a round would find part of the weight still in the last-level cache
                        copies = [[t.clone() for t in parts] for _ in range(count)]
                        calls = [_call(module, fmt, x, c, level, PATHS[args.path]) for c in copies]
                        # both builds compute the same product (summation order may differ)
                        ref = _call(new, fmt, x, copies[0], level, 0)().float()
                        torch.testing.assert_close(calls[0]().float(), ref, rtol=1e-2, atol=1e-2)
                        fns[f"{fmt} {side}"] = Rotation(calls)
                for rot in fns.values():
                    rot.warm()
                t = time_cpu_interleaved(fns, min_time_s=args.min_time)
                dense_ms = t["dense"].median_ms
                for name, timing in t.items():
                    fmt, _, side = name.partition(" ")
                    base_ms = t[f"{fmt} base"].median_ms if side else None
                    rows.append(
                        dict(
                            dtype=dname,
                            n=shape.n,
                            k=shape.k,
                            m=m,
                            format=fmt,
                            side=side or "dense",
                            median_ms=timing.median_ms,
                            p20_ms=timing.p20_ms,
                            p80_ms=timing.p80_ms,
                            vs_dense=dense_ms / timing.median_ms,
                            new_vs_base=(base_ms / timing.median_ms) if side == "new" else None,
                        )
                    )
                print(
                    f"{dname} {shape.n}x{shape.k} M={m}: dense {dense_ms:.3f} ms; "
                    + ", ".join(f"{k} {v.median_ms:.3f}" for k, v in t.items() if k != "dense"),
                    flush=True,
                )
    return rows


def _gmean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# {meta['base']} (base) against {meta['new']} (new): C++ kernels, {meta['isa']}, "
        f"path {meta['path']}",
        "",
        f"`{meta['command']}`",
        "",
        f"Machine: {meta['env'].get('cpu', '?')}, {meta['threads']} threads, "
        f"torch {meta['env'].get('torch', '?')}.",
        "",
        "Geometric mean over the shapes (min..max): new / base speed, and each against dense `F.linear`.",
        "",
        "| dtype | format | M | new vs base | base vs dense | new vs dense |",
        "|---|---|---:|---|---:|---:|",
    ]
    keys = dict.fromkeys((r["dtype"], r["format"], r["m"]) for r in rows if r["side"] == "new")
    for dtype, fmt, m in keys:
        sel = [r for r in rows if (r["dtype"], r["format"], r["m"]) == (dtype, fmt, m)]
        new = [r for r in sel if r["side"] == "new"]
        base = [r for r in sel if r["side"] == "base"]
        ratio = [r["new_vs_base"] for r in new]
        lines.append(
            f"| {dtype} | {fmt} | {m} | {_gmean(ratio):.2f}x ({min(ratio):.2f}..{max(ratio):.2f}) | "
            f"{_gmean([r['vs_dense'] for r in base]):.2f}x | {_gmean([r['vs_dense'] for r in new]):.2f}x |"
        )
    lines += [
        "",
        "Per shape, medians in ms (p20..p80):",
        "",
        "| dtype | N x K | M | row | ms |",
        "|---|---|---:|---|---|",
    ]
    for r in rows:
        name = "dense" if r["side"] == "dense" else f"{r['format']} {r['side']}"
        lines.append(
            f"| {r['dtype']} | {r['n']} x {r['k']} | {r['m']} | {name} | "
            f"{r['median_ms']:.4f} ({r['p20_ms']:.4f}..{r['p80_ms']:.4f}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision whose C++ sources are the base")
    p.add_argument("--out", type=Path, required=True, help="path stem of the .json / .md report")
    p.add_argument(
        "--isa", default=None, help="forced ISA (avx2, avx512, avx512-bf16, scalar); default: this CPU's"
    )
    p.add_argument("--path", choices=tuple(PATHS), default="direct")
    p.add_argument("--ms", type=lambda s: tuple(int(v) for v in s.split(",")), default=(1, 4))
    p.add_argument("--formats", type=lambda s: tuple(s.split(",")), default=FORMATS)
    p.add_argument("--dtypes", type=lambda s: tuple(s.split(",")), default=tuple(DTYPES))
    p.add_argument("--shapes", default="smollm2", help="shipped config whose linear shapes to time")
    p.add_argument("--min-time", type=float, default=0.2)
    p.add_argument("--pool-mib", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    bad = [f for f in args.formats if f not in FORMATS] + [d for d in args.dtypes if d not in DTYPES]
    if bad:
        p.error(
            f"unknown format or dtype {bad}; choose formats from {FORMATS} and dtypes from {tuple(DTYPES)}"
        )
    if args.path == "blas" and ({"2:4-int8", "int8"} & set(args.formats)):
        p.error("2:4-int8 and int8 have no blas entry in mm24_q8 / mm_q8: leave them out with --path blas")
    try:
        _git("rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError:
        p.error(f"--base {args.base!r} is not a git revision of this checkout (try a commit hash or HEAD~1)")
    try:
        cpu_ext.resolve_isa(args.isa)
    except ValueError as exc:
        p.error(f"--isa: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    new = cpu_ext.extension()
    if new is None:
        raise SystemExit(f"the C++ extension did not build here: {cpu_ext.build_error()}")
    base = build_at(args.base)
    meta = dict(
        base=_git("rev-parse", "--short", args.base).strip(),
        new=_git("rev-parse", "--short", "HEAD").strip()
        + ("+dirty" if _git("status", "--porcelain", "sparsekit") else ""),
        isa=args.isa or cpu_ext.supported_isa().value,
        path=args.path,
        threads=torch.get_num_threads(),
        command="python bench/kernel_ab.py " + " ".join(__import__("sys").argv[1:]),
        env=environment(),
    )
    rows = run(args, base, new)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out.with_suffix(".json"), dict(meta=meta, rows=rows))
    text = markdown(rows, meta)
    write_text_atomic(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
