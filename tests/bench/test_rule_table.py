"""``sparsekit bench rule-table``: the CPU rule decided by timing each layer in the model's forward."""

import json
import time

import pytest
import torch

import sparsekit.nn.sparse_linear as sl_mod
from sparsekit.bench.e2e import run_e2e, sparsified_copy
from sparsekit.bench.rule_table import measure_rule_table, table_markdown
from sparsekit.nn import SparseLinear, cpu_rule, cpu_rule_table
from tests.conftest import require_cpu_extension, tiny_model


@pytest.fixture(autouse=True)
def _fresh_decisions():
    cpu_rule.forget()
    yield
    cpu_rule.forget()


def _sparse(arch="llama", pattern="2:4"):
    require_cpu_extension()
    return sparsified_copy(tiny_model(arch), pattern)[0]


def _layers(model):
    return [m for m in model.modules() if isinstance(m, SparseLinear)]


@pytest.mark.parametrize(("arch", "pattern"), [("llama", "2:4"), ("gpt2", "0.7")])
def test_the_table_covers_every_layer_and_pins_what_its_medians_say(arch, pattern):
    model = _sparse(arch, pattern)
    layers = _layers(model)
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        before = model(ids).logits
    table = measure_rule_table(model, (2, 16), rounds=2, show_progress=False)
    for m in (2, 16):
        keys = [layer.rule_key(m) for layer in layers]
        at_m = [e for e in table.entries if e["m_class"] == m]
        assert {cpu_rule_table.entry_key(e) for e in at_m} == set(keys)
        assert sum(e["layers"] for e in at_m) == len(layers)
    for e in table.entries:
        assert e["dense_won"] == (e["dense_ms"] < e["sparse_ms"])  # the table's margin: 0
        assert e["sparse_p20_ms"] <= e["sparse_ms"] <= e["sparse_p80_ms"]
        assert cpu_rule.decided(cpu_rule_table.entry_key(e)) is e["dense_won"]
        assert cpu_rule.measured(cpu_rule_table.entry_key(e)) == (e["sparse_ms"], e["dense_ms"])
    assert all(layer.cpu_rule == "sparse" for layer in layers)  # restored
    assert cpu_rule.dense_copy_bytes(model) == 0  # the measurement's copies dropped
    cpu_rule.apply(model, "fastest")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
        model(ids[:, :2])
    assert cpu_rule.dense_copy_bytes(model) == table.copy_bytes  # what the table said it would cost
    assert table.copy_bytes_up_to[16] == table.copy_bytes
    cpu_rule.apply(model, "sparse")
    cpu_rule.apply(model, "fastest")
    with torch.no_grad():
        model(ids[:, :2])
    assert cpu_rule.dense_copy_bytes(model) == table.copy_bytes_up_to[2]
    assert "| format | isa |" in table_markdown(table, arch)


def _slow(seconds):
    def wrap(fn):
        def slow(*args, **kw):
            time.sleep(seconds)
            return fn(*args, **kw)

        return slow

    return wrap


@pytest.mark.parametrize("slow_side", ["sparse", "dense"])
def test_the_slower_side_loses_in_the_models_forward(monkeypatch, slow_side):
    """The decision follows what the forward measured: with 3 ms added to every call of one side,
    every key goes to the other."""
    model = _sparse()
    if slow_side == "dense":
        monkeypatch.setattr(torch.nn.functional, "linear", _slow(3e-3)(torch.nn.functional.linear))
    else:
        bound = sl_mod.SparseLinear._bound_cpu
        monkeypatch.setattr(
            sl_mod.SparseLinear,
            "_bound_cpu",
            lambda self, isa=None: (_slow(3e-3)(bound(self, isa)[0]), bound(self, isa)[1]),
        )
    table = measure_rule_table(model, (4,), rounds=1, show_progress=False)
    assert {e["dense_won"] for e in table.entries} == {slow_side == "sparse"}


def test_refusals_come_before_any_timing():
    with pytest.raises(ValueError, match="no SparseLinear layers.*sparsekit prune MODEL"):
        measure_rule_table(tiny_model("llama"), (16,))
    model = _sparse()
    with pytest.raises(ValueError, match=r"M \[1, 24\] are not classes"):
        measure_rule_table(model, (1, 16, 24))
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        measure_rule_table(model, (16,), rounds=0)
    with pytest.raises(ValueError, match=r"margin must be in \[-0.5, 1\)"):
        measure_rule_table(model, (16,), margin=1.0)


def test_an_interrupted_measurement_leaves_earlier_decisions_as_they_were(monkeypatch):
    model = _sparse()
    key = _layers(model)[0].rule_key(16)
    cpu_rule.pin(key, True, (2.0, 1.0))
    forward = type(model).forward

    def failing(self, input_ids=None, **kw):
        if input_ids.shape[1] == 16:
            raise KeyboardInterrupt
        return forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(type(model), "forward", failing)
    with pytest.raises(KeyboardInterrupt):
        measure_rule_table(model, (2, 16), rounds=1, show_progress=False)
    assert cpu_rule.decided(key) is True and cpu_rule.measured(key) == (2.0, 1.0)
    assert cpu_rule.decided(_layers(model)[0].rule_key(2)) is None
    assert all(layer.cpu_rule == "sparse" for layer in _layers(model))


def test_cli_writes_a_table_that_loads(tmp_path):
    from sparsekit.cli import main
    from sparsekit.hf.checkpoint import save

    save(_sparse(), tmp_path / "ck")
    out = tmp_path / "t" / "table.json"
    assert (
        main(["bench", "rule-table", str(tmp_path / "ck"), "--m", "2,8", "--rounds", "1", "--out", str(out)])
        == 0
    )
    table = json.loads(out.read_text())
    assert {e["m_class"] for e in table["entries"]} == {2, 8} and table["model"] == str(tmp_path / "ck")
    assert (tmp_path / "t" / "table.md").read_text().startswith("# CPU rule table")
    cpu_rule.forget()
    assert cpu_rule_table.load_table(out) == len(table["entries"])
    assert main(["bench", "rule-table", str(tmp_path / "ck"), "--m", "3", "--out", str(out)]) != 0
    assert main(["bench", "rule-table", str(tmp_path / "ck"), "--out", str(tmp_path / "t.md")]) != 0
    (tmp_path / "plain").mkdir()
    assert main(["bench", "rule-table", str(tmp_path / "plain"), "--out", str(out)]) != 0


def test_e2e_twins_decided_by_a_table_measured_in_their_forward(tmp_path):
    model = tiny_model("llama")
    prompt = torch.randint(0, 128, (1, 20))
    result = run_e2e(
        model, input_ids=prompt, new_tokens=2, eval_ids=None, eval_tokens=0, repeats=1,
        method="magnitude", cpu_rule_twins=True, cpu_rule_table="measure",
    )  # fmt: skip
    name = "sparse (2:4, magnitude), rule table"
    assert name in {r.variant for r in result.rows}
    entries = result.config["cpu_rule_tables"][name]
    assert {e["m_class"] for e in entries} == {32}  # the 20-token prefill; decode (1 row) is always sparse
    with pytest.raises(ValueError, match="add --cpu-rule-twins"):
        run_e2e(model, input_ids=prompt, eval_tokens=0, cpu_rule_table="measure")
    other = cpu_rule_table.write_table(tmp_path / "other.json", [], 0.0, 1, "m")
    other.write_text(other.read_text().replace(f'"threads": {torch.get_num_threads()}', '"threads": 999'))
    with pytest.raises(ValueError, match="measured with threads 999"):  # before any variant is built
        run_e2e(model, input_ids=prompt, eval_tokens=0, cpu_rule_twins=True, cpu_rule_table=str(other))
    with pytest.raises(FileNotFoundError, match="no CPU rule table"):
        run_e2e(
            model, input_ids=prompt, eval_tokens=0, cpu_rule_twins=True, cpu_rule_table="/nonexistent.json"
        )
