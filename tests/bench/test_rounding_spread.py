"""bench/rounding_spread.py: variants, the per-seed spread, and a whole run on a tiny model."""

import json
import os

import pytest
import torch

from tests.bench.conftest import bench_script
from tests.conftest import tiny_model


def test_variants_parse_and_bad_ones_name_the_form():
    rs = bench_script("rounding_spread")
    assert rs.parse_variant("float32@16") == ("float32", 16, None)
    assert rs.parse_variant("auto@8") == ("auto", 8, None)
    assert rs.parse_variant("float32@8~3") == ("float32", 8, 3)
    assert rs.parse_variant("bf16-mixed@8") == ("bf16-mixed", 8, None)
    bads = ("float32", "fp16@8", "float32@0", "float32@x", "float32@8~", "float32@8~0", "float32@8~a")
    for bad in bads:
        with pytest.raises(ValueError, match="FORWARD_DTYPE@BATCH"):
            rs.parse_variant(bad)


def test_an_attention_suffix_is_split_off_and_a_bad_one_names_the_modes():
    rs = bench_script("rounding_spread")
    assert rs.split_attention("auto@8/sdpa") == ("auto@8", "sdpa")
    assert rs.split_attention("float32@8~2/auto") == ("float32@8~2", "auto")
    assert rs.split_attention("auto@8") == ("auto@8", None)
    with pytest.raises(ValueError, match="one of"):
        rs.split_attention("auto@8/flash")


def test_a_passes_suffix_is_split_off_and_a_bad_one_names_the_choices():
    rs = bench_script("rounding_spread")
    assert rs.split_passes("float32@8+one") == ("float32@8", True)
    assert rs.split_passes("float32@8~2+two") == ("float32@8~2", False)
    assert rs.split_passes("auto@8") == ("auto@8", None)
    with pytest.raises(ValueError, match="the passes"):
        rs.split_passes("auto@8+three")


def test_jitter_is_relative_seeded_and_keeps_a_gram_matrix_symmetric():
    rs = bench_script("rounding_spread")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    gram = x.T @ x
    a = rs.jitter_(gram.clone(), 1e-3, torch.Generator().manual_seed(1))
    b = rs.jitter_(gram.clone(), 1e-3, torch.Generator().manual_seed(1))
    c = rs.jitter_(gram.clone(), 1e-3, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, a.T)
    rel = (a - gram) / gram
    assert 1e-4 < rel.abs().max() < 1e-2  # a few standard deviations of 1e-3
    norms = x.pow(2).sum(0)
    jittered = rs.jitter_(norms.clone(), 1e-6, torch.Generator().manual_seed(3))
    assert not torch.equal(jittered, norms) and torch.allclose(jittered, norms, rtol=1e-5, atol=0)


def test_a_jittered_method_reads_a_different_statistic_of_the_same_method():
    rs = bench_script("rounding_spread")
    from sparsekit.pruning.method import InputStat

    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    norms = torch.rand(16, generator=torch.Generator().manual_seed(1)) + 0.5
    stat = InputStat(norms.clone(), tokens=10)
    plain = rs.pruning_method("wanda").prune(weight, stat, _Config("2:4"))
    big = rs.jittered("wanda", 0.5, draw=1)  # large enough to flip some 2:4 choices
    assert big.name == "wanda" and big.statistic is not None
    noisy = big.prune(weight, stat, _Config("2:4"))
    assert torch.equal(stat.value, norms)  # the engine's statistic is not changed in place
    assert not torch.equal(noisy.mask, plain.mask)
    assert (noisy.mask.reshape(8, 4, 4).sum(-1) == 2).all()  # still 2:4


class _Config:
    def __init__(self, sparsity):
        self.sparsity = sparsity


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
        (["--method", "wanda+nope"], "unknown recipe piece"),
        (["--sparsity", "5:4"], "5:4"),
        (["--seeds", "1", "1"], "repeats a value"),
        (["--variants", "float32@8~0"], "DRAW >= 1"),
        (["--variants", "auto@8/flash"], "the attention"),
        (["--variants", "float32@8+1"], "the passes"),
        (["--jitter", "0"], "--jitter"),
        (["--jitter", "1e-5", "--variants", "float32@8", "auto@8"], "none is given"),
        (["--method", "magnitude", "--variants", "float32@8", "float32@8~1"], "nothing to jitter"),
    ],
)
def test_bad_options_are_refused_before_the_model_loads(argv, match, capsys, monkeypatch):
    rs = bench_script("rounding_spread")
    monkeypatch.setattr(rs, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit):
        rs.main(argv)
    assert match in capsys.readouterr().err


def _on_a_tiny_model(monkeypatch, seen: list, keys) -> object:
    """The script with a tiny Llama, seeded random ids, and sparsekit.prune recording ``keys(kw)``."""
    rs = bench_script("rounding_spread")
    dense = tiny_model("llama")
    monkeypatch.setattr(rs, "load_model", lambda *a, **k: (dense, None))
    draw = lambda n, L, seed: torch.randint(0, 100, (n, L), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    monkeypatch.setattr(rs, "calibration_ids", lambda tok, src, n, L, seed: draw(n, L, seed))
    monkeypatch.setattr(rs, "evaluation_ids", lambda *a, **k: draw(1, 512, 99))
    prune = rs.sparsekit.prune

    def spy(model, **kw):
        seen.append(keys(kw))
        return prune(model, **kw)

    monkeypatch.setattr(rs.sparsekit, "prune", spy)
    return rs


def test_a_run_prunes_each_variant_per_seed_with_its_batch_and_dtype(tmp_path, monkeypatch):
    seen = []
    rs = _on_a_tiny_model(
        monkeypatch, seen, lambda kw: (kw["forward_dtype"], kw["batch_size"], type(kw["method"]).__name__)
    )
    out = tmp_path / "spread"
    argv = ["--out", str(out), "--seeds", "0", "1", "--jitter", "0.05",
            "--variants", "float32@2", "float32@4", "auto@4", "float32@4~1",
            "--nsamples", "4", "--seqlen", "8", "--eval-tokens", "512"]  # fmt: skip
    assert rs.main(argv) == 0
    plain = [("float32", 2, "str"), ("float32", 4, "str"), ("auto", 4, "str")]
    assert seen == (plain + [("float32", 4, "Jittered")]) * 2
    report = json.loads(out.with_suffix(".json").read_text())
    assert [(r["seed"], r["variant"]) for r in report["rows"]] == [
        (s, v) for s in (0, 1) for v in ("float32@2", "float32@4", "auto@4", "float32@4~1")
    ]
    rows = {(r["seed"], r["variant"]): r for r in report["rows"]}
    assert rows[(0, "float32@4~1")]["jitter"] == 0.05 and rows[(0, "float32@4")]["jitter"] == 0.0
    assert rows[(0, "float32@4~1")]["ppl"] != rows[(0, "float32@4")]["ppl"]  # a 5% jitter moves the solve
    assert all(r["forward_dtype"] == "float32" for r in report["rows"] if r["variant"].startswith("float32"))
    assert [s["variant"] for s in report["spread"]] == ["float32@2", "float32@4", "auto@4", "float32@4~1"]
    assert all(r["ppl"] > 1 for r in report["rows"])
    assert "| 1 |" in out.with_suffix(".md").read_text()


def test_a_recipe_method_prunes_with_its_pieces(tmp_path, monkeypatch):
    seen = []
    rs = _on_a_tiny_model(
        monkeypatch, seen, lambda kw: (kw["method"], kw.get("allocation"), kw["forward_dtype"])
    )
    argv = ["--out", str(tmp_path / "owl"), "--method", "wanda+owl", "--sparsity", "0.7", "--variants",
            "bf16-mixed@4", "--nsamples", "4", "--seqlen", "8", "--eval-tokens", "512"]  # fmt: skip
    assert rs.main(argv) == 0
    assert seen == [("wanda", "owl", "bf16-mixed")]
    report = json.loads((tmp_path / "owl.json").read_text())
    assert report["rows"][0]["forward_dtype"] == "bf16-mixed"


def test_a_variant_with_sdpa_prunes_under_that_switch_and_records_it(tmp_path, monkeypatch):
    seen = []
    monkeypatch.delenv("SPARSEKIT_CPU_ATTENTION", raising=False)
    rs = _on_a_tiny_model(monkeypatch, seen, lambda kw: (kw["forward_dtype"], rs.active_attention_mode()))
    out = tmp_path / "attn"
    argv = ["--out", str(out), "--variants", "auto@4", "auto@4/sdpa",
            "--nsamples", "4", "--seqlen", "8", "--eval-tokens", "512"]  # fmt: skip
    assert rs.main(argv) == 0
    assert seen == [("auto", "auto"), ("auto", "sdpa")]
    report = json.loads(out.with_suffix(".json").read_text())
    pairs = [(r["variant"], r["attention"]) for r in report["rows"]]
    assert pairs == [("auto@4", "auto"), ("auto@4/sdpa", "sdpa")]
    assert rs.active_attention_mode() == "auto" and "SPARSEKIT_CPU_ATTENTION" not in os.environ


def test_a_variant_with_passes_prunes_with_that_order_and_records_it(tmp_path, monkeypatch):
    seen = []
    rs = _on_a_tiny_model(monkeypatch, seen, lambda kw: (kw["method"], kw["sequential"]))
    out = tmp_path / "passes"
    argv = ["--out", str(out), "--method", "wanda", "--variants", "float32@4+one", "float32@4+two/sdpa",
            "float32@4", "--nsamples", "4", "--seqlen", "8", "--eval-tokens", "512"]  # fmt: skip
    assert rs.main(argv) == 0
    assert seen == [("wanda", True), ("wanda", False), ("wanda", None)]
    report = json.loads(out.with_suffix(".json").read_text())
    assert [(r["variant"], r["sequential"]) for r in report["rows"]] == [
        ("float32@4+one", True),
        ("float32@4+two/sdpa", False),
        ("float32@4", None),
    ]
