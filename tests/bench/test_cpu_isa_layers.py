"""bench/cpu_isa_layers.py: --rule-margin is checked before any timing and set for the run."""

import pytest

from tests.bench.conftest import bench_script


class _Ran(Exception):
    pass


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--rule-margin", "-0.6", "--backends", "dense,2:4-fastest"], "give a share in [-0.5, 1)"),
        (["--rule-margin", "1", "--backends", "dense,2:4-fastest"], "give a share in [-0.5, 1)"),
        (["--rule-margin", "0", "--backends", "dense,2:4"], "no --backends entry is a -fastest rule row"),
    ],
)
def test_a_bad_rule_margin_is_refused_before_timing(argv, match, capsys, monkeypatch):
    bench = bench_script("cpu_isa_layers")
    monkeypatch.setattr(bench.cpu_rule, "MARGIN", bench.cpu_rule.MARGIN)
    monkeypatch.setattr(bench, "run_layers", lambda *a, **k: pytest.fail("timed a layer"))
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert match in capsys.readouterr().err


def test_the_rule_margin_is_the_one_the_timed_rows_see(monkeypatch):
    bench = bench_script("cpu_isa_layers")
    monkeypatch.setattr(bench.cpu_rule, "MARGIN", 0.05)
    seen = []

    def run_layers(*args, **kwargs):
        seen.append(bench.cpu_rule.MARGIN)
        raise _Ran

    monkeypatch.setattr(bench, "run_layers", run_layers)
    with pytest.raises(_Ran):
        bench.main(["--rule-margin", "0", "--backends", "dense,2:4-fastest", "--isas", "avx512"])
    assert seen == [0.0]


def _refused_before_timing(bench, argv, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_layers", lambda *a, **k: pytest.fail("timed a layer"))
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def _what_reaches_the_run(bench, argv, pick, monkeypatch) -> list:
    """pick(run_layers' arguments) for the run that ``argv`` starts (stopped at its first call)."""
    seen = []

    def run_layers(*args, **kwargs):
        seen.append(pick(*args, **kwargs))
        raise _Ran

    monkeypatch.setattr(bench, "run_layers", run_layers)
    with pytest.raises(_Ran):
        bench.main(argv)
    return seen


def test_shapes_are_read_before_timing_and_reach_the_run(capsys, monkeypatch):
    bench = bench_script("cpu_isa_layers")
    _refused_before_timing(
        bench,
        ["--shapes", "smollm2,no-such-model"],
        "--shapes: no shape config 'no-such-model'",
        capsys,
        monkeypatch,
    )
    argv = ["--shapes", "smollm2,llama-2-7b", "--isas", "avx512"]
    seen = _what_reaches_the_run(
        bench, argv, lambda shapes, *a, **k: [(s.model, s.n, s.k) for s in shapes], monkeypatch
    )
    models = {m for m, _, _ in seen[0]}
    assert len(models) == 2 and ("llama-2-7b", 11008, 4096) in {(m.lower(), n, k) for m, n, k in seen[0]}


def test_dtypes_are_checked_before_timing_and_only_those_run(capsys, monkeypatch):
    bench = bench_script("cpu_isa_layers")
    _refused_before_timing(bench, ["--dtypes", "bf16,fp8"], "--dtypes: unknown fp8", capsys, monkeypatch)
    seen = _what_reaches_the_run(
        bench, ["--dtypes", "bf16", "--isas", "avx512"], lambda *a, **k: a[4], monkeypatch
    )
    assert seen == [bench.DTYPES["bf16"]]
