"""``SparseLinear(cpu_rule='fastest')``: dense on a kept copy where it measured faster, per M class."""

import pytest
import torch
import torch.nn.functional as F

import sparsekit.nn.sparse_linear as sl_mod
from sparsekit.kernels import cpu_ext
from sparsekit.kernels.topk_select import nm_keep_mask
from sparsekit.nn import SparseLinear, cpu_rule
from tests.conftest import require_cpu_extension
from tests.kernels.conftest import _assert_close


@pytest.fixture(autouse=True)
def _fresh_decisions():
    cpu_rule.forget()
    yield
    cpu_rule.forget()


def _layer(fmt="2:4", n=48, k=64, rule="fastest"):
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.mul_(nm_keep_mask(lin.weight.abs(), 2, 4))
    layer = SparseLinear.from_linear(lin, format=fmt)
    layer.cpu_rule = rule
    return lin, layer


def _spy(monkeypatch, verdict: bool):
    calls = []

    def dense_wins(key, sparse, dense_weight, rows, replicate=None, sparse_bytes=None):
        calls.append(key)
        cpu_rule._DECISIONS[key] = verdict
        return verdict

    monkeypatch.setattr(sl_mod, "dense_wins", dense_wins)
    return calls


def test_m_classes():
    got = [cpu_rule.m_class(m) for m in (1, 2, 3, 5, 16, 17, 64, 65, 300, 512, 513, 5000)]
    assert got == [1, 2, 4, 8, 16, 32, 64, 128, 512, 512, 1024, 1024]


def test_dense_copy_where_dense_wins_and_sparse_below_min_m(monkeypatch):
    require_cpu_extension()
    calls = _spy(monkeypatch, verdict=True)
    lin, layer = _layer()
    with torch.no_grad():
        y1 = layer(torch.ones(1, 1, 64))  # M = 1 (decode): below MIN_M, never measured
        assert calls == [] and layer.dense_copy_bytes() == 0
        x = torch.randn(2, 10, 64)  # M = 20: class 32
        y = layer(x)
    assert len(calls) == 1 and calls[0][-1] == 32
    assert layer.dense_copy_bytes() == 48 * 64 * 4
    _assert_close(y, F.linear(x, lin.weight, lin.bias).detach())
    _assert_close(y1, F.linear(torch.ones(1, 1, 64), lin.weight, lin.bias).detach())
    layer.cpu_rule = "sparse"  # memory first: the copy goes
    assert layer.dense_copy_bytes() == 0


def test_sparse_kept_where_it_wins_and_decision_shared(monkeypatch):
    require_cpu_extension()
    calls = _spy(monkeypatch, verdict=False)
    _, a = _layer()
    _, b = _layer()
    with torch.no_grad():
        a(torch.randn(40, 64))
        b(torch.randn(33, 64))
        a(torch.randn(50, 64))
    assert len(calls) == 1  # one measurement per (format, isa, dtype, shape, class), shared
    assert a.dense_copy_bytes() == 0 and b.dense_copy_bytes() == 0


def test_real_measurement_is_recorded_and_exact():
    require_cpu_extension()
    lin, layer = _layer("bitmap", n=40, k=72)
    x = torch.randn(70, 72)
    with torch.no_grad():
        y = layer(x)
    (key,) = cpu_rule.decisions()
    assert key[:2] == ("bitmap@0.50", cpu_ext.resolve_isa().value) and key[-3:] == (40, 72, 128)
    assert layer.dense_copy_bytes() == (40 * 72 * 4 if cpu_rule.decisions()[key] else 0)
    _assert_close(y, F.linear(x, lin.weight, lin.bias).detach())
    assert layer.rule_key(70) == key and layer.rule_key(200)[-1] == 256
    sparse_ms, dense_ms = cpu_rule.measured(key)  # the medians the decision rests on
    assert sparse_ms > 0 and dense_ms > 0
    assert cpu_rule.decisions()[key] == (dense_ms < (1 - cpu_rule.MARGIN) * sparse_ms)
    cpu_rule.pin(key, dense_won=True)  # a pinned decision was not measured
    assert cpu_rule.measured(key) is None


def test_unknown_rule_names_the_choices():
    with pytest.raises(ValueError, match="sparse, fastest"):
        SparseLinear(8, 4, cpu_rule="quick")


def test_decisions_are_memoised_per_layer_until_forgotten(monkeypatch):
    """A forward under the rule pays one memo lookup: no copy of the decision table, no second
    measurement; ``forget`` makes the next forward measure again; going memory first drops the
    memo's reference to the dense copy too."""
    require_cpu_extension()
    calls = _spy(monkeypatch, verdict=True)
    looked_up = []
    real = sl_mod.decided
    monkeypatch.setattr(sl_mod, "decided", lambda key: looked_up.append(key) or real(key))
    lin, layer = _layer()
    x = torch.randn(20, 64)
    with torch.no_grad():
        for _ in range(3):
            layer(x)
    assert len(calls) == 1 and len(looked_up) == 1
    cpu_rule.forget()
    with torch.no_grad():
        y = layer(x)
    assert len(calls) == 2
    _assert_close(y, F.linear(x, lin.weight, lin.bias).detach())
    layer.cpu_rule = "sparse"
    assert not any(isinstance(k, int) for k in layer._cache) and layer.dense_copy_bytes() == 0


@pytest.mark.parametrize("fmt", ["2:4", "int8"])
def test_measurement_rotates_each_side_past_the_last_level_cache(monkeypatch, fmt):
    """Each side of the rule's timing rotates over copies of its own weight adding up to twice the
    LLC, counted in its own bytes (a 4x smaller int8 weight gets 4x the copies, so it is not timed
    from the cache), on a batch-1 [1, rows, K] input; the copies are faithful: the output stays exact."""
    require_cpu_extension()
    lin, layer = _layer(fmt, n=48, k=64)
    dense_bytes = 48 * 64 * 4
    monkeypatch.setattr(cpu_rule, "llc_bytes", lambda: 4 * dense_bytes)
    twins, dense_made, inputs = [], [], []
    real = sl_mod.SparseLinear._rule_twin

    def counted(self):
        sparse_call, make_dense = real(self)
        twins.append(1)
        return (lambda x: inputs.append(x.shape) or sparse_call(x)), (
            lambda: dense_made.append(1) or make_dense()
        )

    monkeypatch.setattr(sl_mod.SparseLinear, "_rule_twin", counted)
    x = torch.randn(20, 64)
    with torch.no_grad():
        y = layer(x)
    n_sparse = -(-8 * dense_bytes // layer.weight_bytes())  # 2 x LLC in the sparse side's bytes
    assert layer.weight_bytes() < dense_bytes and n_sparse > 8
    assert len(twins) == n_sparse - 1 and len(dense_made) == 8 - 1  # the layer's own copy first
    assert set(inputs) == {torch.Size([1, 32, 64])}  # the 32 class, timed at its largest rows
    _assert_close(y, F.linear(x, layer.dense_weight(), lin.bias).detach())
    sparse_twin, make_dense = real(layer)
    with torch.no_grad():
        _assert_close(sparse_twin(x), F.linear(x, layer.dense_weight()).detach())
    dense_twin = make_dense()
    assert (
        torch.equal(dense_twin, layer.dense_weight())
        and dense_twin.data_ptr() != layer.dense_weight().data_ptr()
    )


def test_process_default_comes_from_the_environment_once(monkeypatch):
    """SPARSEKIT_CPU_RULE sets what a layer built without ``cpu_rule=`` gets (read once); a bad
    value names the variable and the choices."""
    monkeypatch.setattr(cpu_rule, "_DEFAULT", [])
    monkeypatch.setenv("SPARSEKIT_CPU_RULE", "fastest")
    assert SparseLinear(8, 4).cpu_rule == "fastest"
    monkeypatch.setenv("SPARSEKIT_CPU_RULE", "sparse")  # read once: no effect now
    assert (
        SparseLinear(8, 4).cpu_rule == "fastest"
        and SparseLinear(8, 4, cpu_rule="sparse").cpu_rule == "sparse"
    )
    monkeypatch.setattr(cpu_rule, "_DEFAULT", [])
    monkeypatch.setenv("SPARSEKIT_CPU_RULE", "fast")
    with pytest.raises(
        ValueError, match="SPARSEKIT_CPU_RULE: unknown cpu_rule 'fast'; choose one of sparse, fastest"
    ):
        SparseLinear(8, 4)


def test_apply_sets_every_layer_and_counts_the_dense_copies(monkeypatch):
    require_cpu_extension()
    _spy(monkeypatch, verdict=True)
    model = torch.nn.Sequential(
        _layer(rule="sparse")[1], torch.nn.ReLU(), _layer(n=64, k=48, rule="sparse")[1]
    )
    assert cpu_rule.apply(model, "fastest") == 2
    assert all(m.cpu_rule == "fastest" for m in (model[0], model[2]))
    with torch.no_grad():
        model(torch.randn(20, 64))
    assert cpu_rule.dense_copy_bytes(model) == (48 * 64 + 64 * 48) * 4
    assert cpu_rule.apply(model, "sparse") == 2 and cpu_rule.dense_copy_bytes(model) == 0
    with pytest.raises(ValueError, match="unknown cpu_rule"):
        cpu_rule.apply(model, "dense")


def test_each_class_is_timed_at_its_largest_rows(monkeypatch):
    """20 rows fall in the 32 class and are timed at 32; 300 in the 512 class, timed at 512."""
    require_cpu_extension()
    timed_rows = []

    def dense_wins(key, sparse, dense_weight, rows, replicate=None, sparse_bytes=None):
        timed_rows.append((key[-1], rows))
        cpu_rule._DECISIONS[key] = False
        return False

    monkeypatch.setattr(sl_mod, "dense_wins", dense_wins)
    _, layer = _layer()
    with torch.no_grad():
        layer(torch.randn(20, 64))
        layer(torch.randn(300, 64))
    assert timed_rows == [(32, 32), (512, 512)]


def test_bitmap_layers_of_one_shape_at_two_densities_are_decided_apart(monkeypatch):
    """Two bitmap layers of one shape, 50% and 75% sparse, get their own decisions (a bitmap's
    speed follows its density); two 2:4 layers of one shape share one."""
    require_cpu_extension()
    calls = _spy(monkeypatch, verdict=False)
    layers = []
    for keep in (2, 1):  # 2 of 4 kept, then 1 of 4
        lin = torch.nn.Linear(64, 48)
        with torch.no_grad():
            lin.weight.mul_(nm_keep_mask(lin.weight.abs(), keep, 4))
        layer = SparseLinear.from_linear(lin, format="bitmap")
        layer.cpu_rule = "fastest"
        layers.append(layer)
    _, twin_a = _layer("2:4")
    _, twin_b = _layer("2:4")
    with torch.no_grad():
        for layer in (*layers, twin_a, twin_b):
            layer(torch.randn(20, 64))
    assert [k[0] for k in calls] == ["bitmap@0.50", "bitmap@0.25", "2:4"]
