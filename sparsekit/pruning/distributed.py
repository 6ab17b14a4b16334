"""Pruning on several processes with ``torch.distributed`` (launched by ``torchrun``).

Each rank takes whole calibration chunks of its own (``shard``), runs every block forward on
them and accumulates the method's statistic; the statistics are summed across ranks in float64
before anyone prunes (``all_reduce_stats``), so every rank prunes with the statistic of the
whole calibration set. The layers of a block are spread over the ranks by their solve cost
(``assign``: largest first onto the least loaded rank) and each pruned weight is broadcast from
the rank that solved it, so every rank continues with the same pruned block.

Why the result does not depend on the number of ranks: chunks are cut from the global sample
order before sharding, so each chunk's block forward and its fp32 partial statistic are the
same computation whatever the world size; the partials are summed in float64 (in the
single-process engine too), where summing fp32 partials is exact or within 1e-16 relative,
whatever the order. Identical masks then follow for magnitude and Wanda when every process uses
the same number of threads (BLAS results depend on it).

Failure: a rank that raises or dies leaves the others blocked in a collective; the process
group's ``timeout`` (``init(timeout_s=...)``, ``--dist-timeout``) ends their wait with an
error, and ``torchrun`` stops the rest.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` (``size == 1``: no process group, the plain engine)."""

    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init(backend: str | None = None, timeout_s: float = 600.0) -> World:
    """Join the process group torchrun describes (env://): NCCL when CUDA is there, else Gloo.
    A collective that waits longer than ``timeout_s`` (a rank failed or died) raises."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = current_world()
    log.info("rank %d of %d (%s)", world.rank, world.size, dist.get_backend())
    return world


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n_chunks: int, world: World) -> range:
    """The chunk indices this rank calibrates on: a contiguous share of ``range(n_chunks)``."""
    if n_chunks < world.size:
        raise ValueError(
            f"{n_chunks} calibration chunks for {world.size} ranks: every rank needs at least one; use "
            f"--nsamples >= {world.size} x --batch-size or fewer processes"
        )
    return range(world.rank * n_chunks // world.size, (world.rank + 1) * n_chunks // world.size)


def calibration_share(input_ids: torch.Tensor, batch_size: int, world: World) -> torch.Tensor:
    """This rank's calibration sequences [n_r, L] of ``input_ids`` [n, L]: whole chunks of
    ``batch_size`` in the global order (``shard``), so no chunk depends on the world size; all of
    them outside a group."""
    if not world.active:
        return input_ids
    part = shard(-(-input_ids.shape[0] // batch_size), world)
    return input_ids[part.start * batch_size : part.stop * batch_size]


def assign(costs: Sequence[tuple[str, float]], size: int) -> dict[str, int]:
    """Layer name -> rank: largest cost first onto the least loaded rank (ties: the lower rank),
    the same answer on every rank."""
    load = [0.0] * size
    owner = {}
    for name, cost in sorted(costs, key=lambda item: (-item[1], item[0])):
        rank = min(range(size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += cost
    return owner


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor across ranks in place, in the given order (every rank passes the same list)."""
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def sum_over_ranks_(
    tensors: Sequence[torch.Tensor], counts: Sequence[float], device: torch.device | None = None
) -> list[float]:
    """Sum ``tensors`` in place and the scalar ``counts`` (token counts, loss sums) across ranks, in
    the given order; returns the summed counts. The counts travel in one float64 tensor on
    ``device`` (default: the first tensor's), the compute device, so Gloo and NCCL both take it."""
    device = device if device is not None else tensors[0].device
    summed = torch.tensor(list(counts), dtype=torch.float64, device=device)
    all_reduce_sum_([*tensors, summed])
    return summed.tolist()


def broadcast_(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """``tensor`` from rank ``src`` on every rank (in place where it can be; returns the result)."""
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    dist.broadcast(work, src=src)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
