"""bench/kernel_ab.py: options checked before any build; a run times both builds and dense per cell."""

import pytest

from sparsekit.bench.layers import LinearShape
from tests.bench.conftest import bench_script
from tests.conftest import require_cpu_extension


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--formats", "2:4,csr"], "unknown format or dtype ['csr']"),
        (["--dtypes", "fp8"], "unknown format or dtype ['fp8']"),
        (["--base", "no-such-revision"], "is not a git revision"),
        (["--isa", "sse9"], "--isa:"),
    ],
)
def test_bad_options_are_refused_before_any_build(argv, match, capsys, monkeypatch):
    require_cpu_extension()
    bench = bench_script("kernel_ab")
    monkeypatch.setattr(bench, "build_at", lambda rev: pytest.fail("built the base"))
    argv = ["--base", "HEAD", "--out", "unused", *argv]
    monkeypatch.setattr("sys.argv", ["kernel_ab.py", *argv])
    with pytest.raises(SystemExit):
        bench.main()
    assert match in capsys.readouterr().err


def test_a_run_times_base_new_and_dense_in_every_cell(monkeypatch):
    """Both sides the same build here: every format gets a base and a new row beside dense, the
    ratio is filled in for new rows, and the report tabulates each (dtype, format, M)."""
    ext = require_cpu_extension()
    bench = bench_script("kernel_ab")
    monkeypatch.setattr(bench, "linear_shapes", lambda name: [LinearShape("tiny", "proj", 24, 64)])
    args = bench.argparse.Namespace(
        isa=None, path="direct", ms=(1, 3), formats=bench.FORMATS, dtypes=("fp32",), shapes="tiny",
        min_time=0.0, pool_mib=1,
    )  # fmt: skip
    rows = bench.run(args, ext, ext)
    assert len(rows) == 2 * (1 + 2 * len(bench.FORMATS))
    for m in (1, 3):
        cell = [r for r in rows if r["m"] == m]
        n = len(bench.FORMATS)
        assert sorted(r["side"] for r in cell) == ["base"] * n + ["dense"] + ["new"] * n
        assert all(r["new_vs_base"] > 0 for r in cell if r["side"] == "new")
        assert all(r["new_vs_base"] is None for r in cell if r["side"] != "new")
    meta = dict(base="a", new="b", isa="avx2", path="direct", threads=1, command="x", env={})
    text = bench.markdown(rows, meta)
    for fmt in bench.FORMATS:
        assert f"| fp32 | {fmt} | 1 |" in text and f"| fp32 | {fmt} | 3 |" in text
