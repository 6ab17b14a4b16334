"""bench/vs_references.py: the one-table summary of the two reference benchmarks' reports."""

import json

import pytest

from tests.bench.conftest import bench_script


def _unstructured_report():
    row = lambda seed, tool, ppl, s, **kw: {"config": "wanda/2:4", "seed": seed, "tool": tool, "ppl": ppl,  # noqa: E731
                                             "prune_s": s, **kw}  # fmt: skip
    return {
        "rows": [
            {"config": "dense", "tool": "-", "ppl": 15.0},
            row(0, "original wanda@abc", 150.0, 100.0),
            row(0, "llm-compressor 0.14", 140.0, 120.0),
            row(0, "sparsekit 0.1", 145.0, 30.0, forward_dtype="bfloat16", timings_s={"forward": 28.0}),
            row(0, "sparsekit 0.1", 130.0, 90.0, forward_dtype="float32", timings_s={"forward": 88.0}),
            row(1, "original wanda@abc", 160.0, 100.0),
            row(1, "llm-compressor 0.14", 150.0, 110.0),
            row(1, "sparsekit 0.1", 150.0, 40.0, forward_dtype="bfloat16", timings_s={"forward": 38.0}),
            {"config": "wanda+owl/0.7", "seed": 0, "tool": "llm-compressor", "ppl": float("nan"),
             "error": "Cannot invoke event"},
            {"config": "wanda+owl/0.7", "seed": 1, "tool": "llm-compressor", "ppl": float("nan"),
             "error": "Cannot invoke event"},
            {"config": "wanda+owl/0.7", "seed": 0, "tool": "sparsekit 0.1", "ppl": 700.0, "prune_s": 50.0,
             "forward_dtype": "bfloat16"},
        ]
    }  # fmt: skip


def test_unstructured_rows_judge_the_default_forwards_by_per_seed_medians():
    vs = bench_script("vs_references")
    wanda, owl = vs.unstructured_rows(_unstructured_report())
    assert wanda["config"] == "wanda/2:4"
    assert wanda["sparsekit"]["ppl"] == 147.5 and wanda["sparsekit"]["seeds"] == [0, 1]  # fp32 row left out
    assert wanda["vs original"]["ppl"] == pytest.approx((145 / 150 + 150 / 160) / 2)
    assert wanda["vs llm-compressor"]["time"] == pytest.approx((30 / 120 + 40 / 110) / 2)
    assert wanda["phases_s"] == {"forward": 28.0}
    assert (
        owl["llm-compressor"]["failed"] == ["Cannot invoke event"] * 2
        and owl["vs llm-compressor"]["seeds"] == 0
    )
    text = vs.markdown("head", [wanda, owl])
    assert "| wanda/2:4 | 2 | 155.00 (100) | 145.00 (115) | 147.50 (35) |" in text
    assert "| 0.952 / 0.35 (yes) |" in text  # against the original: both targets met
    assert "1.018 / 0.31 (no) |" in text  # against llm-compressor: ppl above it
    assert "| wanda+owl/0.7 | 1 | - | failed | 700.00 (50) | - | - | - |" in text
    assert text.count("- wanda+owl/0.7, llm-compressor failed: Cannot invoke event") == 1  # once per error


def test_structured_rows_read_each_methods_headline_row():
    vs = bench_script("vs_references")
    report = {
        "rows": [
            {"row": "dense", "tool": "-", "ppl": 15.0, "removed": 0.0},
            {"row": "flap/0.2", "seed": 0, "tool": "original flap@abc", "ppl": 34.8, "prune_s": 60.0},
            {"row": "flap/0.2", "seed": 0, "tool": "sparsekit flap adaptive, fp32 forwards", "ppl": 30.0,
             "prune_s": 55.0},
            {"row": "flap/0.2", "seed": 0, "tool": "sparsekit flap adaptive", "ppl": 34.9, "prune_s": 15.0,
             "phases_s": {"statistics": 14.0}},
            {"row": "shortgpt/0.2", "seed": 0, "tool": "original shortgpt@abc", "ppl": 50.0, "prune_s": 50.0},
            {"row": "shortgpt/0.2", "seed": 0, "tool": "sparsekit shortgpt", "ppl": 50.0, "prune_s": 9.0},
        ]
    }  # fmt: skip
    flap, short = vs.structured_rows(report)
    assert flap["sparsekit"]["ppl"] == 34.9 and flap["phases_s"] == {"statistics": 14.0}
    assert (
        flap["vs original"]["ppl"] == pytest.approx(34.9 / 34.8) and flap["vs llm-compressor"]["seeds"] == 0
    )
    assert short["vs original"]["time"] == pytest.approx(0.18)
    assert set(vs.HEADLINE) == set(bench_script("vs_original_structured").SPARSEKIT)
    for method, tool in vs.HEADLINE.items():  # each headline names a row the structured half writes
        labels = [f"sparsekit {label}" + (", at the original's size" if size == "original" else "")
                  for label, _, size in bench_script("vs_original_structured").SPARSEKIT[method]]  # fmt: skip
        assert tool in labels


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--seeds", "1", "1"], "repeats a seed"),
        (["--structured-seeds", "0", "0"], "repeats a seed"),
        (["--forward-dtypes", "float32"], "needs auto"),
        ([], "has no python: pass --setup"),
    ],
)
def test_vs_references_refuses_bad_options_before_any_work(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit):
        bench_script("vs_references").main(
            ["--original", str(tmp_path), "--venv", str(tmp_path / "no-venv"), *argv]
        )
    assert match in capsys.readouterr().err


def test_fp32_forwards_are_a_context_column_judged_like_the_default():
    vs = bench_script("vs_references")
    wanda, owl = vs.unstructured_rows(_unstructured_report())
    fp32 = wanda["sparsekit fp32"]
    assert fp32["ppl"] == 130.0 and fp32["seeds"] == [0]
    assert fp32["vs original"]["ppl"] == pytest.approx(130 / 150)
    assert fp32["vs llm-compressor"]["time"] == pytest.approx(90 / 120)
    assert "sparsekit fp32" not in owl  # no fp32 row ran
    text = vs.markdown("head", [wanda, owl])
    assert "| 130.00 (90): 0.867 / 0.90; 0.929 / 0.75 |" in text
    assert "| wanda+owl/0.7 | 1 | - | failed | 700.00 (50) | - | - | - | - |" in text  # no fp32 cell


def _report(rows, seeds, cpu="Xeon", nsamples=64, commit="abc"):
    return {
        "environment": {"cpu": cpu, "commit": commit, "cpu_threads": 2, "torch": "2.13.0+cpu"},
        "args": {"nsamples": nsamples, "seqlen": 512, "eval_tokens": 32768, "seeds": seeds},
        "rows": [{"config": "dense", "tool": "-", "ppl": 15.0}] + [r for r in rows if r.get("seed") in seeds],
    }


def test_reports_of_separate_runs_merge_into_one_summary_over_their_seeds(tmp_path, capsys):
    vs = bench_script("vs_references")
    rows = _unstructured_report()["rows"]
    first, second = tmp_path / "s0.json", tmp_path / "s1.json"
    first.write_text(json.dumps(_report(rows, [0])))
    second.write_text(json.dumps(_report(rows, [1], commit="def")))
    structured = tmp_path / "st.json"
    short_row = lambda tool, s: {"row": "shortgpt/0.2", "seed": 0, "tool": tool, "ppl": 50.0, "prune_s": s}  # noqa: E731
    structured.write_text(json.dumps({
        "environment": {"cpu": "Xeon", "commit": "abc", "cpu_threads": 2, "torch": "2.13.0+cpu"},
        "args": {"nsamples": 64, "seqlen": 512, "eval_tokens": 32768},
        "rows": [short_row("original shortgpt@abc", 50.0), short_row("sparsekit shortgpt", 9.0)],
    }))  # fmt: skip
    out = tmp_path / "merged"
    assert vs.main(["--from-reports", str(first), str(second), str(structured), "--out", str(out)]) == 0
    merged = json.loads(out.with_suffix(".json").read_text())["rows"]
    wanda, _owl, short = merged
    # the same medians as one run over both seeds gives
    assert wanda["sparsekit"]["seeds"] == [0, 1] and wanda["sparsekit"]["ppl"] == 147.5
    assert wanda == json.loads(json.dumps(vs.unstructured_rows(_unstructured_report())[0]))
    assert short["config"] == "shortgpt/0.2" and short["vs original"]["time"] == pytest.approx(0.18)
    text = out.with_suffix(".md").read_text()
    assert "commits abc, def" in text and "| wanda/2:4 | 2 |" in text
    assert text.count("wanda+owl/0.7, llm-compressor failed") == 1  # one line per distinct failure


@pytest.mark.parametrize(
    "change,match",
    [
        ({"nsamples": 32}, "differ in nsamples"),
        ({"cpu": "EPYC"}, "differ in cpu"),
        ({"seeds": [0]}, "repeat wanda/2:4 seed 0"),
    ],
)
def test_merging_refuses_reports_that_do_not_belong_together(change, match, tmp_path, capsys):
    vs = bench_script("vs_references")
    rows = _unstructured_report()["rows"]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(_report(rows, [0])))
    second.write_text(json.dumps(_report(rows, change.pop("seeds", [1]), **change)))
    with pytest.raises(SystemExit):
        vs.main(["--from-reports", str(first), str(second), "--out", str(tmp_path / "m")])
    assert match in capsys.readouterr().err and not (tmp_path / "m.md").exists()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--original", "x"], "runs nothing"),
        (["--seeds", "1"], "runs nothing"),
        (["--forward-dtypes", "auto"], "runs nothing"),
        ([], "no such report"),
    ],
)
def test_from_reports_refuses_run_options_and_missing_files(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_script("vs_references").main(["--from-reports", str(tmp_path / "none.json"), *argv])
    assert match in capsys.readouterr().err


def test_composed_recipes_are_timed_against_the_original_sparsegpt_at_their_sparsity():
    vs = bench_script("vs_references")
    row = lambda config, seed, tool, ppl, s, **kw: {"config": config, "seed": seed, "tool": tool, "ppl": ppl,  # noqa: E731
                                                     "prune_s": s, **kw}  # fmt: skip
    report = {
        "rows": [
            row("sparsegpt/2:4", 0, "original wanda@abc", 58.0, 200.0),
            row("sparsegpt/2:4", 1, "original wanda@abc", 60.0, 100.0),
            row("sparsegpt/2:4", 0, "sparsekit 0.1", 59.0, 90.0, forward_dtype="bf16-mixed"),
            row("sparsegpt/0.5", 0, "original wanda@abc", 30.0, 190.0),
            row("ria+permute+admm/2:4", 0, "sparsekit 0.1", 50.0, 130.0, forward_dtype="bf16-mixed"),
            row("ria+permute+admm/2:4", 1, "sparsekit 0.1", 48.0, 120.0, forward_dtype="bf16-mixed"),
            row("ria+permute+admm/2:4", 0, "sparsekit 0.1", 47.0, 300.0, forward_dtype="float32"),
        ]
    }  # fmt: skip
    assert [r["config"] for r in vs.unstructured_rows(report)] == ["sparsegpt/2:4", "sparsegpt/0.5"]
    (ria,) = vs.composed_rows(report)
    assert ria["reference"] == "original sparsegpt/2:4" and ria["sparsekit"]["seeds"] == [0, 1]
    assert ria["sparsekit"]["ppl"] == 49.0 and ria["original"]["prune_s"] == 150.0
    assert ria["time"] == pytest.approx((130 / 200 + 120 / 100) / 2)  # per seed, then the median
    text = vs.markdown("head", vs.unstructured_rows(report), [ria])
    assert "| ria+permute+admm/2:4 | 2 | 49.00 (125) | 59.00 (150) | 0.93 (yes) |" in text
    assert "Composed recipes" not in vs.markdown("head", vs.unstructured_rows(report), [])


def test_composed_adds_the_recipes_to_the_unstructured_half(tmp_path, monkeypatch):
    vs = bench_script("vs_references")
    calls = {}

    def half(name):
        def run(argv):
            calls[name] = argv
            raise SystemExit(0)  # stop before any work: only the arguments matter here

        return run

    monkeypatch.setattr(vs.vs_llmcompressor, "main", half("unstructured"))
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("")
    for extra, composed in (([], []), (["--composed"], vs.vs_llmcompressor.COMPOSED)):
        with pytest.raises(SystemExit):
            vs.main(["--original", str(tmp_path), "--venv", str(tmp_path / "venv"), *extra])
        argv = calls["unstructured"]
        rows = argv[argv.index("--rows") + 1 :]
        assert rows == vs.vs_llmcompressor.CONFIGS + composed
