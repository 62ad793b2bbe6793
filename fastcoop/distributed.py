"""Several processes under torchrun (torch.distributed): which one this is, and the few collectives the commands
use. Without torchrun every call here is a one-process no-op, so a command has a single code path."""

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0

    def gather_to_writer(self, item):
        """Every rank's `item`, in rank order, on the writer (None elsewhere)."""
        if self.size == 1:
            return [item]
        items = [None] * self.size if self.is_writer else None
        dist.gather_object(item, items, dst=0)
        return items

    def from_writer(self, item):
        """The writer's `item`, on every rank."""
        if self.size == 1:
            return item
        box = [item]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def join(device: str) -> tuple[World, str]:
    """Join the process group torchrun set up, if any; returns the world and this rank's device (cuda →
    cuda:LOCAL_RANK). The group is gloo also on GPUs: only pickled objects travel, never device tensors."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    if device.startswith("cuda"):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("gloo")
        atexit.register(dist.destroy_process_group)
    return World(dist.get_rank(), dist.get_world_size()), device
