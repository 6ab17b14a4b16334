import json

import pytest

from sparsekit.bench.demo import run_demo


@pytest.mark.real
def test_demo_quick_writes_the_report(smollm2, tmp_path):
    model, tokenizer = smollm2
    before = next(model.parameters()).detach().clone()
    report = run_demo(tmp_path / "demo", quick=True, model=model, tokenizer=tokenizer, show_progress=False)
    assert next(model.parameters()).equal(before)  # the session model stays dense
    text = report.read_text()
    for heading in ("## Quality", "## Per-layer speed", "## End to end", "## Wall time"):
        assert heading in text
    for name in ("quality.png", "layers.png", "e2e.png", "layers.json", "e2e.json", "quality.json"):
        assert (report.parent / name).is_file(), name
    summary = json.loads((report.parent / "demo.json").read_text())
    assert summary["env"]["commit"] and summary["total_s"] > 0 and summary["quick"] is True
    quality = json.loads((report.parent / "quality.json").read_text())
    cells = {(r["method"], r["sparsity"]) for r in quality["rows"]}
    assert cells == {("dense", "0")} | {
        (m, p) for m in ("magnitude", "wanda", "sparsegpt") for p in ("0.5", "2:4")
    }
    e2e = json.loads((report.parent / "e2e.json").read_text())
    assert [r["variant"] for r in e2e["rows"]] == ["dense", "sparse (2:4)"]
