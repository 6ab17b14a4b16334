import json

import pytest

from sparsekit.bench.demo import QUICK, run_demo

pytest.importorskip(
    "lm_eval", reason="the demo's zero-shot columns need sparsekit[eval]; make setup installs it"
)


@pytest.mark.real
def test_demo_quick_writes_the_report(smollm2, tmp_path):
    model, tokenizer = smollm2
    before = next(model.parameters()).detach().clone()
    report = run_demo(tmp_path / "demo", quick=True, model=model, tokenizer=tokenizer, show_progress=False)
    assert next(model.parameters()).equal(before)  # the session model stays dense
    text = report.read_text()
    for heading in ("## Every method family", "## End to end", "## Per-layer speed", "## Wall time"):
        assert heading in text
    for name in (
        "pareto.png",
        "layers.png",
        "compare.json",
        "compare.md",
        "layers.json",
        "e2e.json",
        "e2e.md",
    ):
        assert (report.parent / name).is_file(), name
    summary = json.loads((report.parent / "demo.json").read_text())
    assert summary["env"]["commit"] and summary["total_s"] > 0 and summary["quick"] is True
    rows = json.loads((report.parent / "compare.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == [v.name for v in QUICK.variants]
    assert {r["family"] for r in rows} == {"dense", "N:M", "depth", "width", "N:M+quantized"}
    by_name = {r["variant"]: r for r in rows}
    dense = by_name["dense"]
    assert dense["decode_speedup"] == 1.0
    # the de-quantized Q4_1 GGUF holds a few exact zeros of its own (0.24% of SmolLM2's weights)
    assert 0.99 * dense["params"] < dense["nonzero_params"] <= dense["params"]
    for row in rows:
        assert set(row["zero_shot"]) == {"wiki_lambada", "wiki_continuation"}
        assert row["zero_shot"]["wiki_lambada"]["items"] == QUICK.task_limits["wiki_lambada"]
        assert row["timing"]["tpot_ms"] > 0 and row["ppl"] > 1
    sparse = by_name["magnitude 2:4"]
    assert sparse["nonzero_params"] < 0.75 * dense["nonzero_params"]  # 2:4 on the block linears
    assert sparse["bytes"] < dense["bytes"]  # stored compressed
    assert by_name["angular -2 blocks +repair"]["params"] < dense["params"]  # blocks removed
    # 2:4-int8: int8 values + 2:4 metadata, smaller than 2:4 alone; the zeros stay zeros
    quant = by_name["magnitude 2:4 + int8"]
    assert quant["bytes"] < sparse["bytes"] and quant["nonzero_params"] == sparse["nonzero_params"]
    e2e = json.loads((report.parent / "e2e.json").read_text())["rows"]
    assert [r["variant"] for r in e2e] == ["dense", "sparse (2:4, magnitude)"]
    assert e2e[0]["decode_speedup"] == 1.0 and e2e[1]["floor_ms"] < e2e[0]["floor_ms"]


def test_the_demo_options_name_what_they_run(capsys):
    """`sparsekit demo --help` counts the --full variants as FULL holds them; the default demo puts
    quantization (the head too) beside every pruning family it runs."""
    from sparsekit.bench.compare import DEMO_VARIANTS
    from sparsekit.bench.demo import FULL
    from sparsekit.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert f"{len(FULL.variants)} variants" in " ".join(capsys.readouterr().out.split())
    families = {v.family for v in DEMO_VARIANTS}
    quantized = [v for v in DEMO_VARIANTS if v.quantize]
    assert {"quantized", "N:M+quantized", "width+quantized"} <= families
    assert quantized and all(v.quantize_head and v.name.endswith("(head too)") for v in quantized)
