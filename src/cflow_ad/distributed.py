"""Data-parallel training with torch.distributed, as `torchrun` starts it.

`torchrun --nproc-per-node N -m cflow_ad train ...` (or `cflow-ad train --nproc N`) starts N
copies of the training command; each finds RANK / WORLD_SIZE in its environment and joins one
process group (gloo on CPUs, nccl on GPUs). Each rank owns a fixed, disjoint shard of the training
images (DistributedSampler without shuffling, padded to equal sizes, so every rank takes the same
number of steps), encodes only its shard, and the decoders' gradients are averaged by
DistributedDataParallel. Everything else that needs the whole training set (the whitening moments,
the stateless scoring constants, the epoch loss) is summed or maxed across ranks here. On GPU nodes
each rank computes on cuda:LOCAL_RANK (`device.resolve_device`) and the collectives run on that
device, as nccl requires; the values handed back stay where the caller's tensors were.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from .device import distributed_backend, make_current

_DEVICE = torch.device("cpu")  # where this rank's collectives run: its own device under nccl


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device = torch.device("cpu")) -> tuple[int, int]:
    """Join the process group that torchrun's environment describes, with nccl when this rank computes
    on a GPU and gloo otherwise; (0, 1) when not under torchrun."""
    global _DEVICE
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0, 1
    make_current(device)  # else every rank would also open a context on GPU 0
    if not dist.is_initialized():
        backend = distributed_backend(device)
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    _DEVICE = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return rank_world()


@contextlib.contextmanager
def process_group(device: torch.device = torch.device("cpu")):
    """`init_from_env` for the body of a command, yielding (rank, world), and the group left on the way
    out: a rank that exits with gloo's threads still running can abort ("terminate called without an
    active exception"), which torchrun reports as a failed job although the work was done."""
    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized()
    try:
        yield init_from_env(device)
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def shard(n: int) -> tuple[list[int], list[bool]]:
    """This rank's image indices and, for each, whether it is real (False: padding repeated so that
    all ranks have the same count). One process: all images, all real."""
    rank, world = rank_world()
    if world == 1:
        return list(range(n)), [True] * n
    indices = list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False))
    return indices, [rank + j * world < n for j in range(len(indices))]


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place across ranks (sum, max or min); the tensor itself in one process. Views (a column of a
    buffer) are reduced through a contiguous copy, as the backends need."""
    if rank_world()[1] > 1:
        op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        moved = t.to(_DEVICE).contiguous()
        dist.all_reduce(moved, op=op)
        if moved is not t:
            t.copy_(moved)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: collective decisions (skip, stop) must agree."""
    return bool(all_reduce(torch.tensor(float(flag)), "max").item()) if rank_world()[1] > 1 else flag


class LogProb(nn.Module):
    """A decoder's log_prob as `forward`, the call DistributedDataParallel hooks for gradient averaging."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return self.decoder.log_prob(x, c)


def decoder_steps(decoders: nn.ModuleList) -> list:
    """Per decoder, the callable that computes log p with gradients: wrapped in DDP when distributed."""
    if rank_world()[1] == 1:
        return [d.log_prob for d in decoders]
    ids = [_DEVICE] if _DEVICE.type == "cuda" else None
    # A decoder's only buffers are its blocks' fixed permutations / rotations (`w_perm`), drawn from the
    # config's seed and never changed, so every rank holds the same: broadcasting them from rank 0 before
    # every forward would be a collective per optimiser step for nothing.
    return [nn.parallel.DistributedDataParallel(LogProb(d), device_ids=ids, broadcast_buffers=False) for d in decoders]
