"""bench/cpu_paths.py: --formats, --dtypes and --isas are checked before any timing."""

import pytest

from tests.bench.conftest import bench_script
from tests.conftest import require_cpu_extension


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--formats", "2:4,csr"], "--formats: unknown csr"),
        (["--dtypes", "fp8"], "--dtypes: unknown fp8"),
        (["--isas", "scalar,sse9"], "--isas: unknown CPU ISA 'sse9'"),  # scalar: every CPU runs it
    ],
)
def test_bad_options_are_refused_before_timing(argv, match, capsys, monkeypatch):
    require_cpu_extension()
    bench = bench_script("cpu_paths")
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("timed a kernel"))
    monkeypatch.setattr("sys.argv", ["cpu_paths.py", *argv])
    with pytest.raises(SystemExit):
        bench.main()
    assert match in capsys.readouterr().err


def test_the_chosen_formats_dtypes_and_isas_reach_the_run(monkeypatch):
    require_cpu_extension()
    bench = bench_script("cpu_paths")
    seen = []

    class Ran(Exception):
        pass

    def run(ms, isas, min_time, pool_mib, formats, dtypes):
        seen.append((ms, isas, formats, dtypes))
        raise Ran

    monkeypatch.setattr(bench, "run", run)
    monkeypatch.setattr(
        "sys.argv",
        ["cpu_paths.py", "--ms", "1,8", "--isas", "scalar", "--formats", "2:4", "--dtypes", "bf16"],
    )
    with pytest.raises(Ran):
        bench.main()
    assert seen == [((1, 8), ("scalar",), ("2:4",), ("bf16",))]
