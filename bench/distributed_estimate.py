"""On paper: time and memory per rank to prune Llama-2-70B with SparseGPT on 1 and 8 H100 80GB.

    python bench/distributed_estimate.py [--shape llama-2-70b] [--nsamples 128] [--seqlen 2048]

A cost model, not a measurement: FLOPs and bytes per decoder block of the shipped shape config,
divided by published H100 SXM rates times an efficiency. The engine's work per block is two
block forwards over the calibration tokens (dense with the statistic hooks, then pruned), one
Gram per distinct linear input (q/k/v share one, gate/up share one), and one SparseGPT solve per
linear (about 2 x rows x cols^2 for the blocked OBS updates, plus the cols^3/3 Cholesky of the
Hessian inverse). With N ranks the forwards and Grams split N ways, the Grams are all-reduced
(float64), the solves are bin-packed over ranks (largest first) and each weight is broadcast.
Offload streams each block's bf16 weights in (and the pruned ones out) over PCIe or NVMe.
Every assumption is a flag; the efficiencies are the ones measured on the CPU here (the blocked
solver ran at 27-39% of matmul throughput, docs/results.md) and typical large-GEMM MFU.
"""

from __future__ import annotations

import argparse
import json


def block_linears(cfg: dict) -> list[tuple[str, int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    return [
        ("q", q, h),
        ("k", kv, h),
        ("v", kv, h),
        ("o", h, q),
        ("gate", i, h),
        ("up", i, h),
        ("down", h, i),
    ]


def estimate(cfg: dict, ranks: int, a: argparse.Namespace, offload: str | None) -> dict:
    tokens = a.nsamples * a.seqlen
    linears = block_linears(cfg)
    params = sum(n * k for _, n, k in linears)
    gram_inputs = [cfg["hidden_size"], linears[3][2], cfg["hidden_size"], cfg["intermediate_size"]]
    forward_flops = 2 * 2 * params * tokens  # dense pass with hooks + pruned pass
    gram_flops = sum(2 * k * k * tokens for k in gram_inputs)
    solve = {name: 2 * n * k * k + k**3 / 3 for name, n, k in linears}
    t_forward = forward_flops / ranks / (a.bf16_tflops * 1e12 * a.gemm_eff)
    t_gram = gram_flops / ranks / (a.tf32_tflops * 1e12 * a.gemm_eff)
    load = [0.0] * ranks
    for cost in sorted(solve.values(), reverse=True):
        load[load.index(min(load))] += cost
    t_solve = max(load) / (a.fp32_tflops * 1e12 * a.solve_eff)
    gram_bytes = sum(8 * k * k for k in gram_inputs)  # float64 totals: q/k/v share one, gate/up share one
    weight_bytes_fp32 = 4 * params
    t_comm = 0.0
    if ranks > 1:  # ring all-reduce moves 2(N-1)/N of the data; broadcasts the pruned weights once
        t_comm = (2 * (ranks - 1) / ranks * gram_bytes + weight_bytes_fp32) / (a.nvlink_gbps * 1e9)
    t_offload = 0.0
    if offload:
        bw = a.pcie_gbps if offload == "cpu" else a.nvme_gbps
        t_offload = 2 * 2 * params / (bw * 1e9)  # bf16 in, pruned bf16 out
    per_block = t_forward + t_gram + t_solve + t_comm + t_offload
    blocks = cfg["num_hidden_layers"]
    act = tokens // ranks * cfg["hidden_size"] * 2 * 3  # block inputs, dense outputs, pruned outputs (bf16)
    chunk_act = a.batch_size * a.seqlen * cfg["intermediate_size"] * 2 * 3  # MLP intermediates of one chunk
    stats_mem = sum(4 * k * k for k in gram_inputs) + gram_bytes
    weights_mem = 2 * params + 4 * params  # the bf16 block and its fp32 pruning copy
    resident = 0 if offload else 2 * params * blocks  # the whole model on the device
    mem = act + chunk_act + stats_mem + weights_mem + resident
    return {
        "ranks": ranks,
        "offload": offload or "none",
        "per_block_s": {
            "forward": t_forward,
            "gram": t_gram,
            "solve": t_solve,
            "comm": t_comm,
            "offload": t_offload,
        },
        "total_min": per_block * blocks / 60,
        "dominant": max(
            ("forward", t_forward),
            ("gram", t_gram),
            ("solve", t_solve),
            ("comm", t_comm),
            ("offload", t_offload),
            key=lambda x: x[1],
        )[0],
        "memory_per_rank_gb": mem / 1e9,
        # every rank loads the model into host RAM unless it is offloaded to disk
        "host_ram_per_node_gb": 0 if offload == "nvme" else ranks * 2 * params * blocks / 1e9,
        "fits_80gb": mem < 80e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="llama-2-70b")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bf16-tflops", type=float, default=989.0, help="H100 SXM dense bf16 peak")
    parser.add_argument("--tf32-tflops", type=float, default=494.0, help="H100 SXM dense tf32 peak")
    parser.add_argument("--fp32-tflops", type=float, default=67.0, help="H100 SXM fp32 (non-tensor) peak")
    parser.add_argument("--gemm-eff", type=float, default=0.6, help="fraction of peak a large GEMM reaches")
    parser.add_argument(
        "--solve-eff", type=float, default=0.3, help="solver / matmul (measured 0.27-0.39 on CPU)"
    )
    parser.add_argument("--nvlink-gbps", type=float, default=450.0, help="NVLink 4 all-reduce bus bandwidth")
    parser.add_argument("--pcie-gbps", type=float, default=50.0, help="PCIe 5 x16, host to device")
    parser.add_argument("--nvme-gbps", type=float, default=6.0, help="one NVMe drive, sequential")
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args()
    from sparsekit.bench.layers import load_shape_config

    cfg = load_shape_config(a.shape)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    rows = [estimate(cfg, n, a, off) for n in (1, 8) for off in (None, "cpu", "nvme")]
    names = {
        "none": "whole model on the GPU",
        "cpu": "model in host RAM, one block on the GPU (default)",
        "nvme": "--offload-folder on NVMe",
    }
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(
        f"{cfg.get('name', a.shape)}, SparseGPT, {a.nsamples} x {a.seqlen} calibration tokens; "
        "on paper (see --help)"
    )
    print(
        "| GPUs | where the weights live | forward s | gram s | solve s | comm s | offload s | per block s | "
        "total min | dominant | GPU GB per rank | host RAM GB per node |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        b = r["per_block_s"]
        gpu = f"{r['memory_per_rank_gb']:.0f}" + ("" if r["fits_80gb"] else " (> 80)")
        cells = [
            str(r["ranks"]),
            names[r["offload"]],
            *(f"{b[k]:.2f}" for k in ("forward", "gram", "solve")),
            f"{b['comm']:.3f}",
            f"{b['offload']:.2f}",
            f"{sum(b.values()):.2f}",
            f"{r['total_min']:.1f}",
            r["dominant"],
            gpu,
            f"{r['host_ram_per_node_gb']:.0f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
