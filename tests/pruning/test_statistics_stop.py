"""Two passes (sequential=False): the statistics pass ends each chunk's forward after the last
statistic (all but the first chunk): the statistics, masks and weights are those of whole
forwards, and the skipped work is skipped."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsekit.models import block_linears, describe
from sparsekit.pruning import PruneConfig, prune_model
from sparsekit.pruning.capture import ForwardDone, run_block
from sparsekit.pruning.hooks import StatsCollector, Timer
from sparsekit.pruning.method import SquaredNorm
from tests.conftest import TINY_ARCHS, tiny_model


def _calib(n=7, seqlen=16, vocab=128):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(3))


def _no_stop(monkeypatch):
    monkeypatch.setattr(StatsCollector, "stop_after_last", lambda self: None)


def _count_calls(model) -> dict[str, int]:
    """Forward calls per block linear (name 'index.layer'), counted from now on."""
    counts: dict[str, int] = {}
    for part in describe(model):
        for name, module in block_linears(part.module).items():
            key = f"{part.index}.{name}"
            counts[key] = 0

            def hook(_m, _i, _o, key=key):
                counts[key] += 1

            module.register_forward_hook(hook)
    return counts


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_stopping_after_the_last_statistic_changes_no_weight(arch, method, monkeypatch):
    model = tiny_model(arch)
    config = PruneConfig(
        method=method, sparsity=0.5, batch_size=2, blocksize=16, show_progress=False, sequential=False
    )
    whole = copy.deepcopy(model)
    with monkeypatch.context() as patch:
        _no_stop(patch)
        reference = prune_model(whole, _calib(), config)
    report = prune_model(model, _calib(), config)
    for (name, a), (_, b) in zip(model.named_parameters(), whole.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert report.block_rel_errors == pytest.approx(reference.block_rel_errors, rel=1e-6, abs=1e-12)


def test_the_last_layer_of_each_block_runs_once_less_per_stopped_chunk():
    """4 chunks: the stats pass runs the last layer (down_proj) on chunk 0 only, the pruned pass on
    all 4; every other layer runs on 4 + 4 (block 0 once more: the input capture's one real call)."""
    model = tiny_model("llama")
    counts = _count_calls(model)
    config = PruneConfig(method="wanda", sparsity=0.5, batch_size=2, show_progress=False, sequential=False)
    prune_model(model, _calib(8), config)
    counts = {k: v for k, v in counts.items() if not k.startswith("0.")}
    last = {k: v for k, v in counts.items() if k.endswith("down_proj")}
    rest = {k: v for k, v in counts.items() if not k.endswith("down_proj")}
    assert last and rest
    assert set(last.values()) == {1 + 4}, last
    assert set(rest.values()) == {8}, rest


class _Twice(nn.Module):
    """A block that calls one linear twice: no layer is 'last' once and for all."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        return self.a(self.b(self.a(x)))


class _Chunk:
    def __init__(self, x):
        self.hidden = x

    def run(self, block, index):
        return block(self.hidden)

    def precision(self):
        return torch.autocast("cpu", enabled=False)


def test_no_stop_where_a_layer_runs_twice():
    block = _Twice()
    linears = {"a": block.a, "b": block.b}
    collector = StatsCollector(linears, SquaredNorm(), Timer(torch.device("cpu")), share=False)
    chunks = [_Chunk(torch.randn(3, 8)) for _ in range(3)]
    run_block(block, chunks[:1], 0, collector.next_chunk)
    assert collector.first_calls == ["a", "b", "a"]
    assert collector.stop_after_last() is None


def test_a_chunk_stops_only_once_every_other_statistic_is_in():
    """The stop fires at the first chunk's last layer only when the others ran before it."""

    class Swap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.order = "ab"

        def forward(self, x):
            first, second = (self.a, self.b) if self.order == "ab" else (self.b, self.a)
            return second(first(x))

    block = Swap()
    collector = StatsCollector({"a": block.a, "b": block.b}, SquaredNorm(), Timer(torch.device("cpu")))
    xs = [torch.randn(3, 8) for _ in range(3)]
    outs = run_block(block, [_Chunk(xs[0])], 0, collector.next_chunk)
    handle = collector.stop_after_last()
    assert handle is not None
    block.order = "ba"  # b (the 'last' layer) now runs first: the forward must go on
    outs += run_block(block, [_Chunk(xs[1])], 0, collector.next_chunk)
    block.order = "ab"
    outs += run_block(block, [_Chunk(xs[2])], 0, collector.next_chunk)
    handle.remove()
    stats = collector.finish()
    assert outs[1] is not None and outs[2] is None
    inputs_b = [block.a(xs[0]), xs[1], block.a(xs[2])]
    expected = sum(x.detach().square().sum(0) for x in inputs_b)
    torch.testing.assert_close(stats["b"].value, expected, rtol=1e-6, atol=1e-6)
    assert stats["b"].tokens == 9


def test_forward_done_ends_only_that_chunk():
    block = nn.Linear(4, 4)
    calls = []

    def stop(_m, inputs):
        calls.append(1)
        if len(calls) == 2:
            raise ForwardDone

    block.register_forward_pre_hook(stop)
    outs = run_block(block, [_Chunk(torch.randn(2, 4)) for _ in range(3)], 0)
    assert [o is None for o in outs] == [False, True, False]


def test_a_failing_statistics_forward_leaves_no_hook_on_the_model():
    from sparsekit.pruning.engine import PartialPruneError

    model = tiny_model("llama")
    o_proj = model.model.layers[1].self_attn.o_proj
    calls = []

    def fail_on_second_chunk(_m, _inputs):
        calls.append(1)
        if len(calls) == 2:  # block 1's statistics pass, chunk 1: the stop is in place by then
            raise RuntimeError("boom")

    mine = o_proj.register_forward_pre_hook(fail_on_second_chunk)
    config = PruneConfig(method="wanda", sparsity=0.5, batch_size=2, show_progress=False, sequential=False)
    with pytest.raises(PartialPruneError, match="boom"):
        prune_model(model, _calib(6), config)
    mine.remove()
    for part in describe(model):
        for name, module in block_linears(part.module).items():
            assert not module._forward_hooks and not module._forward_pre_hooks, f"{part.index}.{name}"
