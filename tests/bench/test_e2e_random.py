import json

from tests.bench.conftest import bench_script
from tests.bench.test_e2e import INT8_HEAD_ROWS


def test_e2e_random_runs_a_shipped_shape_with_head_quantized_twins(tmp_path):
    """bench/e2e_random.py: the shape's architecture (untied head, GQA) at the given depth, 2:4 by
    magnitude, int8 and 2:4 + int8 with and without the head quantized, no ppl (random weights)."""
    bench = bench_script("e2e_random")
    out = tmp_path / "e2e"
    argv = ["--shape", "llama-2-7b", "--layers", "1", "--shrink", "64", "--quantize-head"]
    assert (
        bench.main([*argv, "--repeats", "1", "--new-tokens", "2", "--prompt-len", "4", "--out", str(out)])
        == 0
    )
    data = json.loads((out / "e2e.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == INT8_HEAD_ROWS
    assert all(r["ppl"] is None for r in rows.values())
    # untied: the input table is not streamed, so every row's step bytes are less than its model bytes
    table = rows["dense"]["model_bytes"] - rows["dense"]["step_bytes"]
    assert table > 0 and all(r["model_bytes"] - r["step_bytes"] == table for r in rows.values())
    assert rows["dense + int8 (head too)"]["sparsify"]["head"]["untied"] is False
    assert data["config"]["model"].startswith("random Llama-2-7B (1/64 width), 1 layers")
    assert data["config"]["command"].endswith("--out " + str(out))
