import json

import pytest
import torch

from sparsekit.bench import layers
from sparsekit.bench.layers import LinearShape, linear_shapes, run_layers, write_layers_report
from sparsekit.bench.timing import Rotation, copies_for, quantiles, time_cpu_interleaved
from sparsekit.kernels import current_backend

TINY = [LinearShape("tiny", "q_proj", 64, 128), LinearShape("tiny", "down_proj", 32, 256)]


def test_shipped_shapes_give_llama_linears():
    shapes = {s.layers: (s.n, s.k) for s in linear_shapes("llama-2-7b")}
    assert shapes == {
        "q_proj,k_proj,v_proj,o_proj": (4096, 4096),
        "gate_proj,up_proj": (11008, 4096),
        "down_proj": (4096, 11008),
    }
    gqa = {s.layers: (s.n, s.k) for s in linear_shapes("llama-3-8b", dedupe=False)}
    assert gqa["k_proj"] == (1024, 4096) and gqa["down_proj"] == (4096, 14336)
    assert {s.layers: (s.n, s.k) for s in linear_shapes("smollm2")}["k_proj,v_proj"] == (192, 576)
    for name in layers.shipped_shapes():
        assert linear_shapes(name)


def test_unknown_shape_names_the_choices():
    with pytest.raises(ValueError, match="llama-2-7b"):
        linear_shapes("gpt-5")


def test_quantiles_order():
    med, p20, p80 = quantiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (p20, med, p80) == (pytest.approx(1.8), 3.0, pytest.approx(4.2))
    timings = time_cpu_interleaved({"a": lambda: None, "b": lambda: sum(range(100))}, min_time_s=0.0)
    assert timings["a"].repeats == timings["b"].repeats >= 5


def test_interleaved_rounds_change_the_order():
    """No function holds the first slot of every round (it runs a few percent slower there)."""
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    time_cpu_interleaved(fns, warmup=0, min_repeats=40, max_repeats=40, min_time_s=0.0)
    firsts = [calls[i] for i in range(0, len(calls), 4)]
    assert len(calls) == 160 and all(calls.count(n) == 40 for n in "abcd")
    assert set(firsts) == set("abcd")


@pytest.mark.parametrize("pattern", ["2:4", "0.5"])
def test_run_layers_tiny(tmp_path, pattern):
    result = run_layers(TINY, (1, 4), pattern, min_time_s=0.0, cold=False, show_progress=False)
    backends = {r.backend for r in result.rows}
    expected = {"dense", "bitmap", "masked"} | ({"2:4"} if pattern == "2:4" else set())
    assert backends == expected
    assert len(result.rows) == len(TINY) * 2 * len(expected)
    for r in result.rows:
        assert r.median_ms > 0 and r.p20_ms <= r.median_ms <= r.p80_ms
        assert r.gbps > 0 and r.tflops > 0 and r.roofline_pct > 0
        assert r.env["device"] == "cpu" and "commit" in r.env and "torch" in r.env
        if r.backend == "dense":
            assert r.speedup == pytest.approx(1.0)
            assert r.weight_bytes == r.n * r.k * 4
        if r.backend == "2:4":  # values [N, K/2] fp32 + 4 bits of metadata per group
            assert r.weight_bytes == r.n * r.k // 2 * 4 + r.n * r.k // 8
    paths = write_layers_report(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["env"]["torch"] == torch.__version__ and data["roofline"]["copy_gbps"] > 0
    assert data["config"]["pattern"] == pattern and len(data["rows"]) == len(result.rows)
    md = paths["md"].read_text()
    assert "| M | backend |" in md and "% roofline" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_cpu_run_never_leaves_the_backend_forced():
    before = current_backend()
    run_layers(TINY[:1], (1,), "2:4", ("dense", "2:4"), min_time_s=0.0, show_progress=False)
    assert current_backend() is before


def test_gpu_only_backend_is_skipped_with_a_reason():
    result = run_layers(TINY[:1], (1,), "2:4", ("dense", "cusparselt"), min_time_s=0.0, show_progress=False)
    assert {r.backend for r in result.rows} == {"dense"}
    assert any("cusparselt" in s and "CUDA" in s for s in result.skipped)


def test_cli_bench_layers(tmp_path, capsys):
    from sparsekit.cli import main

    out = tmp_path / "layers"
    rc = main(
        ["bench", "layers", "--model", "smollm2", "--m", "1", "--backends", "dense,2:4", "--out", str(out)]
    )
    assert rc == 0
    data = json.loads((out / "layers.json").read_text())
    assert {r["backend"] for r in data["rows"]} == {"dense", "2:4"} and "env" in data
    assert "speedup" in capsys.readouterr().out


def test_rotation_calls_each_copy_in_turn():
    calls = []
    rot = Rotation([lambda i=i: calls.append(i) for i in range(3)])
    for _ in range(7):
        rot()
    assert calls == [0, 1, 2, 0, 1, 2, 0]
    rot.warm()
    assert calls[-3:] == [0, 1, 2]
    assert copies_for(1 << 20, 8 << 20) == 8 and copies_for(64 << 20, 8 << 20) == 2
    assert copies_for(1, 1 << 40) == 4096
    with pytest.raises(ValueError):
        Rotation([])


def test_cold_layers_rotate_over_distinct_copies_of_the_weight(monkeypatch):
    """Each backend's calls go to copies of its layer with their own storage, adding up to the pool
    (twice the last-level cache), and every copy computes the same result."""
    monkeypatch.setattr(layers, "llc_bytes", lambda: 256 * 1024)  # pool 512 KiB
    made = []
    real = layers._rotated

    def spy(prepared, pool):
        rot = real(prepared, pool)
        made.append((prepared, rot))
        return rot

    monkeypatch.setattr(layers, "_rotated", spy)
    result = run_layers(TINY[:1], (1,), "2:4", ("dense", "2:4"), min_time_s=0.0, show_progress=False)
    assert result.config["cold"] and "rotated" in result.config["timer"]
    assert all("copies" in r.timer for r in result.rows)
    for prepared, rot in made:
        assert isinstance(rot, Rotation)
        assert len(rot.fns) == copies_for(prepared.weight_bytes, 512 * 1024)
        outs = [fn() for fn in rot.fns[:3]]
        assert all(torch.equal(o, outs[0]) for o in outs)
    dense_copies = made[0][1].fns
    held = [
        next(c.cell_contents for c in f.__closure__ if isinstance(c.cell_contents, torch.nn.Module))
        for f in dense_copies[:5]
    ]
    ptrs = {m.weight.data_ptr() for m in held}
    assert len(ptrs) == 5  # distinct weights, not one weight called five times
