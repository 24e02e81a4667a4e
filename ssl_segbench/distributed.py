"""Data-parallel runs under torchrun (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR): every rank extracts
a contiguous shard of the images into the same cache entries, rank 0 runs the protocols and writes the records. The
process group is torch.distributed's (NCCL on GPUs, gloo on the CPU); when one rank dies, torchrun stops the others
and the job fails, and a rerun resumes every shard from its checkpoint."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous share of n items (the shares of all ranks cover 0..n-1 once, in order)."""
        return range(n * self.rank // self.size, n * (self.rank + 1) // self.size)


SINGLE = World()  # the world of one process


def world() -> World:
    """The launcher's ranks, or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: str) -> tuple[World, str]:
    """Join the process group (once) and give each rank its device: cuda → cuda:LOCAL_RANK."""
    w = world()
    if w.size > 1 and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    if w.size > 1 and str(device).startswith("cuda"):
        device = f"cuda:{w.local_rank}"
    return w, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_lists(items: list) -> list:
    """Every rank's list concatenated in rank order, on every rank."""
    if not dist.is_initialized():
        return list(items)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]
