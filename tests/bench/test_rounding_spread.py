"""bench/rounding_spread.py: variants, the per-seed spread, and a whole run on a tiny model."""

import json

import pytest
import torch

from tests.bench.conftest import bench_script
from tests.conftest import tiny_model


def test_variants_parse_and_bad_ones_name_the_form():
    rs = bench_script("rounding_spread")
    assert rs.parse_variant("float32@16") == ("float32", 16)
    assert rs.parse_variant("auto@8") == ("auto", 8)
    for bad in ("float32", "bfloat16@8", "float32@0", "float32@x"):
        with pytest.raises(ValueError, match="FORWARD_DTYPE@BATCH"):
            rs.parse_variant(bad)


def test_spread_divides_by_the_first_variant_on_the_same_seed():
    rs = bench_script("rounding_spread")
    rows = [
        {"seed": 0, "variant": "float32@8", "ppl": 50.0, "prune_s": 90.0},
        {"seed": 0, "variant": "auto@8", "ppl": 55.0, "prune_s": 40.0},
        {"seed": 1, "variant": "float32@8", "ppl": 60.0, "prune_s": 80.0},
        {"seed": 1, "variant": "auto@8", "ppl": 57.0, "prune_s": 50.0},
        {"seed": 2, "variant": "auto@8", "ppl": 1000.0, "prune_s": 45.0},  # no base on seed 2
    ]
    base, bf16 = rs.spread(rows, ["float32@8", "auto@8"])
    assert base["ratio"] == 1.0 and base["seeds"] == [0, 1]
    assert bf16["ratio"] == pytest.approx((1.1 + 0.95) / 2)
    assert (bf16["ratio_min"], bf16["ratio_max"]) == pytest.approx((0.95, 1.1))
    assert bf16["ppl"] == 57.0 and bf16["prune_s"] == 45.0  # medians over its three seeds
    text = rs.markdown("head", rows, ["float32@8", "auto@8"])
    assert "| 2 | - | 1000.00 (45) |" in text
    assert "| auto@8 | 3 | 57.00 | 45.0 | 1.025 | 0.950-1.100 |" in text


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--variants", "float32@8", "fp16@8"], "FORWARD_DTYPE@BATCH"),
        (["--method", "nope"], "unknown pruning method"),
        (["--sparsity", "5:4"], "5:4"),
        (["--seeds", "1", "1"], "repeats a value"),
    ],
)
def test_bad_options_are_refused_before_the_model_loads(argv, match, capsys, monkeypatch):
    rs = bench_script("rounding_spread")
    monkeypatch.setattr(rs, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit):
        rs.main(argv)
    assert match in capsys.readouterr().err


def test_a_run_prunes_each_variant_per_seed_with_its_batch_and_dtype(tmp_path, monkeypatch):
    rs = bench_script("rounding_spread")
    dense = tiny_model("llama")
    seen = []
    monkeypatch.setattr(rs, "load_model", lambda *a, **k: (dense, None))
    draw = lambda n, L, seed: torch.randint(0, 100, (n, L), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    monkeypatch.setattr(rs, "calibration_ids", lambda tok, src, n, L, seed: draw(n, L, seed))
    monkeypatch.setattr(rs, "evaluation_ids", lambda *a, **k: draw(1, 512, 99))
    prune = rs.sparsekit.prune

    def spy(model, **kw):
        seen.append((kw["forward_dtype"], kw["batch_size"]))
        return prune(model, **kw)

    monkeypatch.setattr(rs.sparsekit, "prune", spy)
    out = tmp_path / "spread"
    argv = ["--out", str(out), "--seeds", "0", "1", "--variants", "float32@2", "float32@4", "auto@4",
            "--nsamples", "4", "--seqlen", "8", "--eval-tokens", "512"]  # fmt: skip
    assert rs.main(argv) == 0
    assert seen == [("float32", 2), ("float32", 4), ("auto", 4)] * 2
    report = json.loads(out.with_suffix(".json").read_text())
    assert [(r["seed"], r["variant"]) for r in report["rows"]] == [
        (s, v) for s in (0, 1) for v in ("float32@2", "float32@4", "auto@4")
    ]
    assert all(r["forward_dtype"] == "float32" for r in report["rows"] if r["variant"].startswith("float32"))
    assert [s["variant"] for s in report["spread"]] == ["float32@2", "float32@4", "auto@4"]
    assert all(r["ppl"] > 1 for r in report["rows"])
    assert "| 1 |" in out.with_suffix(".md").read_text()
