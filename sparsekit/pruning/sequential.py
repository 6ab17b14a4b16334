"""One calibration forward per block: every chunk pauses at each group of linears until all chunks
have reached it, the group is solved, and the chunks go on through the pruned layers.

The two-pass loop (what the original code and llm-compressor run) collects every layer's
statistic on a dense forward of the block and then runs the block again, pruned, for the next
block's inputs. Here each group of linears that reads one input (q/k/v, gate/up) is solved on
inputs that already went through the pruned layers before it (GPTQ's "true sequential" order), and
the same forward produces the pruned outputs: about half the forward FLOPs.

A forward cannot be suspended half-way in Python, so each chunk runs in its own thread; the threads
take turns in chunk order (one runs at a time, so the statistics add up in the same order on every
run and torch's intra-op threads are never oversubscribed). Live memory is every chunk's activations
at the pause point at once (``paused_bytes``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch
from torch import nn

from sparsekit.models import linear_weight

from .capture import Chunk, outside_autocast


class _Aborted(Exception):
    """Raised in a waiting chunk's thread when another chunk's thread failed."""


class _Turns:
    """Round-robin turns for ``n`` threads: exactly one runs at a time, chunk 0 first; handing the
    turn on wakes only the thread whose turn it is."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.turn = 0
        self.failed = False
        self._go = [threading.Event() for _ in range(n)]
        self._go[0].set()

    def wait(self, j: int) -> None:
        self._go[j].wait()
        self._go[j].clear()
        if self.failed:
            raise _Aborted

    def give(self) -> None:
        self.turn = (self.turn + 1) % self.n
        self._go[self.turn].set()

    def fail(self) -> None:
        self.failed = True
        for go in self._go:
            go.set()


class ChunkThreads:
    """Long-lived threads, one per chunk, reused for every block: a thread's malloc arena keeps the
    memory its chunk's activations used, so later blocks reuse it (threads made anew for each block
    fault in fresh pages: about a second of system time per SmolLM2 block on two cores). Use as a
    context manager; ``run`` runs ``tasks[j]`` on thread ``j`` and returns when all are done."""

    def __init__(self) -> None:
        self._inboxes: list[queue.SimpleQueue] = []
        self._threads: list[threading.Thread] = []
        self._done: queue.SimpleQueue = queue.SimpleQueue()

    def _loop(self, inbox: queue.SimpleQueue) -> None:
        while (task := inbox.get()) is not None:
            try:
                task()
            finally:
                self._done.put(None)

    def run(self, tasks: list[Callable[[], None]]) -> None:
        while len(self._threads) < len(tasks):
            inbox: queue.SimpleQueue = queue.SimpleQueue()
            thread = threading.Thread(
                target=self._loop, args=(inbox,), daemon=True, name=f"chunk-{len(self._threads)}"
            )
            thread.start()
            self._inboxes.append(inbox)
            self._threads.append(thread)
        for inbox, task in zip(self._inboxes, tasks, strict=False):
            inbox.put(task)
        for _ in tasks:
            self._done.get()

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        for thread in self._threads:
            thread.join()
        self._inboxes.clear()
        self._threads.clear()

    def __enter__(self) -> ChunkThreads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def input_groups(
    block: nn.Module, chunk: Chunk, index: int, linears: dict[str, nn.Module]
) -> tuple[list[list[str]] | None, torch.Tensor]:
    """(the linears of ``block`` grouped by the input tensor they read, in call order; the block's
    output) from one forward on ``chunk``. The groups are None where some linear is not called
    exactly once (a Mixture of Experts, a layer used twice): such a block has no fixed order."""
    calls: list[tuple[str, torch.Tensor]] = []

    def recorder(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            calls.append((name, args[0]))

        return hook

    handles = [m.register_forward_pre_hook(outside_autocast(recorder(n))) for n, m in linears.items()]
    try:
        with torch.no_grad(), chunk.precision():
            output = chunk.run(block, index)
    finally:
        for handle in handles:
            handle.remove()
    names = [n for n, _ in calls]
    if len(names) != len(linears) or set(names) != set(linears):
        return None, output
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in calls:
        for seen, members in groups:
            if seen is x:
                members.append(name)
                break
        else:
            groups.append((x, [name]))
    return [members for _, members in groups], output


def paused_bytes(chunks: list[Chunk], linears: dict[str, nn.Module]) -> int:
    """An estimate of the activations the paused chunks hold at once: per token two hidden-size
    tensors (the residual and the normed input) and the widest linear input, in the states' dtype."""
    hidden = chunks[0].hidden
    widest = max(linear_weight(m).shape[1] for m in linears.values())
    tokens = sum(c.hidden.numel() // c.hidden.shape[-1] for c in chunks)
    return tokens * (2 * hidden.shape[-1] + widest) * hidden.element_size()


def run_block_sequential(
    block: nn.Module,
    chunks: list[Chunk],
    index: int,
    gates: dict[str, int],
    linears: dict[str, nn.Module],
    collect: Callable[[int, int, torch.Tensor], None],
    solve: Callable[[int], None],
    threads: ChunkThreads,
) -> list[torch.Tensor]:
    """Run decoder block ``index`` once over every chunk, pausing at each gate and returning the
    outputs.

    gates: the first-called linear of each input group -> the group's index (``input_groups``).
    collect(group, chunk, x): add chunk ``chunk``'s input ``x`` of the group to its statistic
    (called in chunk order). solve(group): prune the group, once every chunk has been collected;
    the chunks then run the group's layers with the weights ``solve`` left in ``linears``.
    threads: the threads the chunks run on (kept across blocks).
    """
    n = len(chunks)
    turns = _Turns(n)
    local = threading.local()
    outputs: list[torch.Tensor | None] = [None] * n
    errors: list[BaseException] = []

    def gate_hook(group: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            j = local.chunk
            collect(group, j, args[0])
            if j == n - 1:
                solve(group)
            turns.give()
            turns.wait(j)

        return hook

    def worker(j: int) -> None:
        local.chunk = j
        try:
            turns.wait(j)
            with torch.no_grad(), chunks[j].precision():
                outputs[j] = chunks[j].run(block, index)
            turns.give()
        except _Aborted:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            errors.append(exc)
            turns.fail()

    handles = [
        linears[name].register_forward_pre_hook(outside_autocast(gate_hook(group)))
        for name, group in gates.items()
    ]
    try:
        threads.run([lambda j=j: worker(j) for j in range(n)])
    except BaseException:
        turns.fail()  # an interrupt in this thread: release every chunk
        raise
    finally:
        for handle in handles:
            handle.remove()
    if errors:
        raise errors[0]
    return outputs  # type: ignore[return-value]
