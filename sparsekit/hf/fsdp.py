"""FSDP2 plumbing for the trainer: a process group for one process too, sharding per decoder block,
masks on sharded parameters, and turning a sharded model back into a plain one.

Every run, torchrun or not, goes through ``fully_shard`` (one process: a one-rank Gloo / NCCL group
on an in-memory store), so the single-process trainer is the distributed code path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


@contextmanager
def process_group(device: torch.device, timeout_s: float = 1800.0):
    """The torchrun process group when there is one; else a one-rank group for this call only."""
    if dist.is_initialized():
        yield
        return
    import datetime

    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def shard_model(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    compute_dtype: torch.dtype | None,
    device: torch.device | None = None,
) -> MixedPrecisionPolicy:
    """``fully_shard`` every decoder block, then the root (embeddings, final norm, lm_head); the
    shards move to ``device`` (default: the CPU), one mesh over every rank.

    compute_dtype: parameters are all-gathered in this dtype for forward and backward (bf16), while
    the sharded fp32 parameters stay the master copy and gradients are reduced in fp32.
    """
    from torch.distributed.device_mesh import init_device_mesh

    device = device or torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return policy


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter or gradient (the tensor itself when not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


class Masks:
    """The zeros of the sparse trainable weights, held as this rank's shards (1 byte per weight).

    ``apply_to_grads`` after backward and ``apply_to_weights`` after the optimizer step keep every
    pruned weight exactly zero: AdamW moves nothing whose gradient is always zero, and the re-mask
    covers any update rule that would.
    """

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        self.params = params
        self.masks = {name: local(p.detach()) != 0 for name, p in params.items()}

    @torch.no_grad()
    def apply_to_grads(self) -> None:
        for name, p in self.params.items():
            if p.grad is not None:
                local(p.grad).mul_(self.masks[name])

    @torch.no_grad()
    def apply_to_weights(self) -> None:
        for name, p in self.params.items():
            local(p.data).mul_(self.masks[name])

    @torch.no_grad()
    def exact(self) -> bool:
        """Whether every pruned weight is zero now and no kept weight is (a global check)."""
        device = next(iter(self.masks.values())).device if self.masks else torch.device("cpu")
        bad = torch.zeros((), dtype=torch.int64, device=device)
        for name, p in self.params.items():
            bad += (local(p.detach()).ne(0) != self.masks[name]).sum()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad)
        return int(bad) == 0


def unshard_in_place(model: nn.Module) -> None:
    """Turn a ``fully_shard``-ed model back into the plain module it was: full tensors as ordinary
    parameters (ties kept), the FSDP hooks removed and each module's own class restored.
    Every rank must call it (the parameters are all-gathered)."""
    import importlib

    contract = importlib.import_module("torch.distributed._composable.contract")
    from torch.distributed._composable_state import _module_state_mapping

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # the root keeps its gathered parameters after a forward: shard them back
    full: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in full:
                    full[id(p)] = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=False)
                module._parameters[name] = full[id(p)]
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        for handle in ("_pre_forward_hook_handle", "_post_forward_hook_handle"):
            if hasattr(state, handle):
                getattr(state, handle).remove()
        _module_state_mapping.pop(module, None)
        module.__dict__.pop(contract.REGISTRY_KEY, None)
        module.__dict__.pop(contract.STATE_KEY, None)
        module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, FSDPModule))
