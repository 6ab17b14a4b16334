"""sparsekit._memory.retained_heap: glibc's heap kept while pruning, and handed back after."""

from __future__ import annotations

import torch

import sparsekit
import sparsekit._memory as memory
import sparsekit.api as api
from tests.conftest import tiny_model


class _FakeLibc:
    """Records mallopt / malloc_trim calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def _fake(monkeypatch) -> _FakeLibc:
    libc = _FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    monkeypatch.delenv("SPARSEKIT_RETAIN_HEAP", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    return libc


def test_the_heap_is_kept_inside_once_for_nested_uses_and_trimmed_after(monkeypatch):
    libc = _fake(monkeypatch)
    with memory.retained_heap():
        entered = list(libc.calls)
        with memory.retained_heap():
            assert libc.calls == entered  # nested: tuned once
        assert libc.calls == entered
    assert entered == [
        ("mallopt", memory._M_MMAP_THRESHOLD, 32 * 2**20),
        ("mallopt", memory._M_TRIM_THRESHOLD, 2**31 - 1),
    ]
    assert libc.calls[2:] == [("mallopt", memory._M_TRIM_THRESHOLD, 64 * 2**20), ("malloc_trim", 0)]


def test_an_error_inside_still_hands_the_heap_back(monkeypatch):
    libc = _fake(monkeypatch)
    try:
        with memory.retained_heap():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert libc.calls[-1] == ("malloc_trim", 0) and memory._heap["depth"] == 0


def test_the_opt_out_and_the_users_own_malloc_settings_leave_malloc_alone(monkeypatch):
    libc = _fake(monkeypatch)
    monkeypatch.setenv("SPARSEKIT_RETAIN_HEAP", "0")
    with memory.retained_heap():
        pass
    monkeypatch.delenv("SPARSEKIT_RETAIN_HEAP")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    with memory.retained_heap():
        pass
    assert libc.calls == []
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")  # not malloc's: tuned
    with memory.retained_heap():
        pass
    assert len(libc.calls) == 4


def test_without_glibc_nothing_is_called(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    monkeypatch.delenv("SPARSEKIT_RETAIN_HEAP", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert memory._heap_tuning_off() == "the C library is not glibc"
    with memory.retained_heap():
        pass


def test_prune_runs_inside_the_retained_heap(monkeypatch):
    libc = _fake(monkeypatch)
    depths = []
    prune_model = api.prune_model

    def spy(*args, **kwargs):
        depths.append(memory._heap["depth"])
        return prune_model(*args, **kwargs)

    monkeypatch.setattr(api, "prune_model", spy)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    sparsekit.prune(tiny_model("llama"), method="wanda", sparsity=0.5, calib=ids, show_progress=False)
    assert depths == [1] and memory._heap["depth"] == 0
    assert libc.calls[-1] == ("malloc_trim", 0)


def test_the_real_glibc_takes_the_settings():
    """On a glibc system (this project's Linux CI) the real calls succeed; elsewhere there is none."""
    libc = memory._glibc()
    if libc is None:
        assert memory._heap_tuning_off() is not None
        return
    assert libc.mallopt(memory._M_MMAP_THRESHOLD, memory.HEAP_MMAP_THRESHOLD) == 1
    with memory.retained_heap():
        x = torch.empty(4 * 2**20)  # 16 MiB from the kept heap
        del x
