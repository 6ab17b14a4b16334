"""``bench layers`` per CPU ISA: backend specs (NAME=SPARSITY@ISA), one variant per ISA, the path
each row ran."""

import re

import pytest

from sparsekit.bench.layers import LinearShape, expand_isas, parse_backend, run_layers
from tests.conftest import require_cpu_extension

TINY = [LinearShape("tiny", "q_proj", 32, 128)]


def test_backend_specs_parse():
    assert parse_backend("bitmap-fastest=0.7@avx2") == ("bitmap-fastest", "0.7", "avx2")
    assert parse_backend("2:4") == ("2:4", None, None)
    assert parse_backend("dense") == ("dense", None, None)
    with pytest.raises(ValueError, match="unknown backend 'sparse9@avx2'; choose from dense"):
        parse_backend("sparse9@avx2")


def test_every_sparse_backend_once_per_isa():
    got = expand_isas(("dense", "2:4", "bitmap=0.5", "csr", "2:4@scalar"), ("avx512", "avx2"))
    assert got == (
        "dense",
        "2:4@avx512",
        "2:4@avx2",
        "bitmap=0.5@avx512",
        "bitmap=0.5@avx2",
        "csr",
        "2:4@scalar",
    )
    assert expand_isas(("dense", "2:4"), None) == ("dense", "2:4")


def test_run_layers_per_isa_records_the_path():
    require_cpu_extension()
    result = run_layers(
        TINY,
        (1, 40),
        "2:4",
        ("dense", "2:4", "bitmap=0.7"),
        device="cpu",
        min_time_s=0.0,
        cold=False,
        show_progress=False,
        isas=("avx2", "scalar"),
    )
    rows = {(r.m, r.backend): r for r in result.rows}
    assert set(rows) == {
        (m, b)
        for m in (1, 40)
        for b in ("dense", "2:4@avx2", "2:4@scalar", "bitmap=0.7@avx2", "bitmap=0.7@scalar")
    }
    assert rows[(1, "2:4@avx2")].impl.endswith("2:4, avx2 direct")
    assert rows[(40, "bitmap=0.7@scalar")].impl.endswith("0.7, scalar blas")
    assert rows[(1, "bitmap=0.7@avx2")].weight_bytes < rows[(1, "2:4@avx2")].weight_bytes  # 30% kept < 50%
    assert result.config["isas"] == ["avx2", "scalar"] and result.config["cpu_extension"] == "built"


@pytest.mark.parametrize("dense_won", [True, False])
def test_rule_rows_say_which_path_the_rule_took(dense_won):
    """A rule row (``2:4-fastest``) names the path its layer runs at that M, holds its dense copy
    in ``weight MB`` and counts (and rotates over) the bytes a call reads."""
    require_cpu_extension()
    import torch

    from sparsekit.nn import cpu_rule

    shape = TINY[0]
    cpu_rule.pin(("2:4", "avx2", "torch.float32", shape.n, shape.k, 64), dense_won=dense_won)
    try:
        result = run_layers(
            TINY, (40,), "2:4", ("2:4", "2:4-fastest"), device="cpu", min_time_s=0.0,
            cold=False, show_progress=False, isas=("avx2",), dtype=torch.float32,
        )  # fmt: skip
    finally:
        cpu_rule.forget()
    rows = {r.backend: r for r in result.rows}
    sparse, ruled = rows["2:4@avx2"], rows["2:4-fastest@avx2"]
    dense_bytes = shape.n * shape.k * 4
    if dense_won:
        assert ruled.impl.endswith(f"rule: fastest -> dense copy (+{dense_bytes / 1e6:.2f} MB held)")
        assert ruled.weight_bytes == sparse.weight_bytes + dense_bytes
        assert ruled.moved_bytes - sparse.moved_bytes == dense_bytes - sparse.weight_bytes
    else:
        assert ruled.impl.endswith("rule: fastest -> sparse kernel")
        assert (ruled.weight_bytes, ruled.moved_bytes) == (sparse.weight_bytes, sparse.moved_bytes)


def test_quantized_rule_rows_and_the_a_a_control():
    """int8 / int4 / 2:4-int8 under the rule name the path they took; ``dense-control`` is a second
    nn.Linear whose speedup over dense is the run's noise, never a baseline itself."""
    require_cpu_extension()
    result = run_layers(
        TINY, (1, 40), "2:4", ("dense", "dense-control", "int8-fastest", "int4-fastest", "2:4-int8-fastest"),
        device="cpu", min_time_s=0.0, cold=False, show_progress=False,
    )  # fmt: skip
    rows = {(r.m, r.backend): r for r in result.rows}
    assert rows[(1, "dense-control")].impl == "nn.Linear (CPU BLAS)"
    assert rows[(1, "dense")].speedup == 1.0  # dense-control never became the "best dense"
    for fmt in ("int8", "int4", "2:4-int8"):
        assert rows[(1, f"{fmt}-fastest")].impl.endswith("rule: fastest -> sparse kernel")  # M = 1
        assert "rule: fastest -> " in rows[(40, f"{fmt}-fastest")].impl
        # a measured decision shows what the rule saw (both medians), beside the table's own timing
        seen = r"\(rule measured sparse [0-9.e-]+ ms, dense [0-9.e-]+ ms\)$"
        assert re.search(seen, rows[(40, f"{fmt}-fastest")].impl)


def test_every_row_of_a_cell_reads_the_same_input_tensor(monkeypatch):
    """Backends re-pruned to their own sparsity (bitmap=0.7) or unpruned (int8) still call the
    cell's own x: one tensor, as a model's layers read one activation, so no row pays for a second
    input in the cache. Their weights are their own."""
    from sparsekit.bench import layers

    seen = {}
    real = layers._as_module

    def spy(case, fmt, cpu_rule="sparse"):
        seen[fmt] = case
        return real(case, fmt, cpu_rule)

    monkeypatch.setattr(layers, "_as_module", spy)
    run_layers(
        TINY, (4,), "2:4", ("dense", "2:4", "bitmap=0.7", "int8"),
        device="cpu", min_time_s=0.0, cold=False, show_progress=False,
    )  # fmt: skip
    assert {id(c.x) for c in seen.values()} == {id(seen[None].x)}
    assert float((seen["bitmap"].weight == 0).float().mean()) == pytest.approx(0.7, abs=0.01)
    assert float((seen["int8"].weight == 0).float().mean()) == 0.0
    assert float((seen["2:4"].weight == 0).float().mean()) == pytest.approx(0.5)
