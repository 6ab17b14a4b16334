"""Per-layer CPU speed of every C++ kernel ISA path: dense vs 2:4 vs bitmap 50% / 70%, fp32 and bf16.

    python bench/cpu_isa_layers.py --out docs/data [--ms 1,4,16,64,512] [--isas avx512,avx2,scalar]

A thin case of ``sparsekit.bench.layers.run_layers`` (what ``sparsekit bench layers --isa ...``
runs), once per dtype: SmolLM2-135M's linear shapes (``--shapes smollm2,llama-2-7b`` adds other
shipped configs), every SparseLinear backend once per forced ISA (``2:4@avx2``,
``bitmap=0.7@scalar``, ...), all interleaved with dense ``nn.Linear`` in the
same rounds, weights rotated over copies adding up to ``--pool-mib`` (read from DRAM, as in a
decode step). Writes <out>/<stem>.json and .md (default stem cpu-isa-layers): rows with medians
(p20..p80), speedup against dense, the kernel path each row ran, and the machine.
``--rule-margin`` sets the runtime rule's ``MARGIN`` (``sparsekit.nn.cpu_rule``) for the ``-fastest``
rows of this run, so two runs compare margins; the report records the margin it ran with.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from sparsekit._io import write_json_atomic, write_text_atomic
from sparsekit.bench.layers import layers_markdown, linear_shapes, run_layers
from sparsekit.kernels import cpu_ext
from sparsekit.nn import cpu_rule

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BACKENDS = ("dense", "2:4", "bitmap=0.5", "bitmap=0.7")
# the runtime rule's report: each format alone and under cpu_rule='fastest' (dense on a kept copy
# where that measured faster, from M = 16 up), e.g. --isas avx512 --ms 16,64,512 --stem cpu-rule-layers
RULE_BACKENDS = (
    "dense",
    "2:4",
    "2:4-fastest",
    "bitmap=0.5",
    "bitmap-fastest=0.5",
    "bitmap=0.7",
    "bitmap-fastest=0.7",
)


def _summary(rows: list[dict]) -> str:
    """Speedup over dense per backend (rows) and M (columns): geometric mean over the shapes."""
    import math

    ms = sorted({r["m"] for r in rows})
    lines = []
    for dtype in DTYPES:
        sel = [r for r in rows if r["dtype"] == str(DTYPES[dtype]).replace("torch.", "")]
        if not sel:  # a dtype this run left out (--dtypes)
            continue
        backends = [b for b in dict.fromkeys(r["backend"] for r in sel) if b != "dense"]
        lines += [
            f"**{dtype}**: speedup over dense, geometric mean over the shapes (min..max)",
            "",
            "| backend | " + " | ".join(f"M={m}" for m in ms) + " |",
            "|---|" + "---:|" * len(ms),
        ]
        for b in backends:
            cells = []
            for m in ms:
                s = [r["speedup"] for r in sel if r["backend"] == b and r["m"] == m]
                geo = math.exp(sum(map(math.log, s)) / len(s)) if s else float("nan")
                cells.append(f"{geo:.2f}x ({min(s):.2f}..{max(s):.2f})" if s else "-")
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _fp32_gemm_dtypes() -> str:
    names = sorted(str(d).replace("torch.", "") for d in cpu_ext.BLAS_FP32_DTYPES)
    return ", ".join(names) or "none"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="reports", help="directory for <stem>.json / .md")
    parser.add_argument("--ms", default="1,4,16,64,512")
    parser.add_argument("--isas", default="avx512,avx2,scalar")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated, of fp32,bf16")
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"run_layers specs (the rule's: {','.join(RULE_BACKENDS)})",
    )
    parser.add_argument("--stem", default="cpu-isa-layers", help="report file name without suffix")
    parser.add_argument(
        "--shapes",
        default="smollm2",
        help="comma-separated shipped shape configs whose linear shapes are timed, e.g. smollm2,llama-2-7b",
    )
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds of calls per backend and cell")
    parser.add_argument("--pool-mib", type=int, default=256, help="weight copies per backend, MiB")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--rule-margin",
        type=float,
        default=None,
        help=f"the -fastest rows' MARGIN for this run (sparsekit.nn.cpu_rule; default {cpu_rule.MARGIN}): "
        "dense must beat the sparse kernel by this share to be chosen; negative: the sparse kernel "
        "must beat dense by -MARGIN / (1 - MARGIN) to be kept",
    )
    args = parser.parse_args(argv)
    try:  # an unknown name fails here, before any timing
        shapes = [s for name in args.shapes.split(",") for s in linear_shapes(name.strip())]
    except ValueError as exc:
        parser.error(f"--shapes: {exc}")
    if args.rule_margin is not None:
        if not -0.5 <= args.rule_margin < 1:
            parser.error(f"--rule-margin {args.rule_margin}: give a share in [-0.5, 1), e.g. -0.1, 0 or 0.05")
        if not any("-fastest" in b for b in args.backends.split(",")):
            parser.error(
                "--rule-margin sets the rule's margin, but no --backends entry is a -fastest rule row"
            )
        cpu_rule.MARGIN = args.rule_margin
    if args.threads:
        torch.set_num_threads(args.threads)
    ms = tuple(int(m) for m in args.ms.split(","))
    isas = tuple(args.isas.split(","))
    dtypes = args.dtypes.split(",")
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        parser.error(f"--dtypes: unknown {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    results = {}
    for name in dtypes:
        dtype = DTYPES[name]
        results[name] = run_layers(
            shapes,
            ms,
            "2:4",
            tuple(args.backends.split(",")),
            dtype,
            "cpu",
            min_time_s=args.min_time,
            pool_bytes=args.pool_mib << 20,
            isas=isas,
        )
    command = (
        f"python bench/cpu_isa_layers.py --out {args.out} --ms {args.ms} --isas {args.isas} "
        f"--min-time {args.min_time} --pool-mib {args.pool_mib}"
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --backends {args.backends}" if args.backends != ",".join(BACKENDS) else "")
        + (f" --stem {args.stem}" if args.stem != "cpu-isa-layers" else "")
        + (f" --rule-margin {args.rule_margin:g}" if args.rule_margin is not None else "")
        + (f" --shapes {args.shapes}" if args.shapes != "smollm2" else "")
        + (f" --dtypes {args.dtypes}" if args.dtypes != ",".join(DTYPES) else "")
    )
    rows = [dict(asdict(r), env={}) for res in results.values() for r in res.rows]
    first = next(iter(results.values()))
    data = {
        "command": command,
        "env": first.env,
        "config": {k: r.config for k, r in results.items()},
        "rule_margin": cpu_rule.MARGIN,
        "blas_fp32_dtypes": _fp32_gemm_dtypes(),
        "rows": rows,
    }
    md = [
        f"# CPU kernels per ISA on {', '.join(dict.fromkeys(s.model for s in shapes))} shapes: "
        f"{', '.join(args.backends.split(','))}",
        "",
        f"`{command}`",
        "",
        f"ISA levels this CPU runs: up to {first.config.get('cpu_isa_supported')}; every path forced in turn "
        "(`@isa`). The BLAS that dense and the blas path call is torch's own (MKL / oneDNN, which pick "
        "their ISA from the CPU), so a forced row below the CPU's best level is those kernels beside "
        "this CPU's GEMM, not a measurement of a CPU whose best level it is. "
        f"Blas paths run their GEMM in fp32 for: {_fp32_gemm_dtypes()} (ATen has no native GEMM in "
        "those dtypes here). Backends without `@isa` (int8, int4: torch's own ops) run once.",
        "",
        _summary(rows),
    ]
    for name, res in results.items():
        md += [f"## {name}", "", layers_markdown(res)]
    out = Path(args.out)
    write_json_atomic(out / f"{args.stem}.json", data)
    write_text_atomic(out / f"{args.stem}.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
