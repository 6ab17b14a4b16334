"""``bench layers`` per CPU ISA: backend specs (NAME=SPARSITY@ISA), one variant per ISA, the path
each row ran."""

import pytest

from sparsekit.bench.layers import LinearShape, expand_isas, parse_backend, run_layers
from sparsekit.kernels import cpu_ext

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
    if cpu_ext.extension() is None:
        pytest.skip(f"the C++ CPU extension did not build: {cpu_ext.build_error()}")
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
