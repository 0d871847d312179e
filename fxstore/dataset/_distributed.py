"""Ranks under ``torchrun``: who I am, barriers, and rank 0's decisions shared with all.

fxstore uses an existing process group when the caller made one; otherwise, when
``torchrun`` set ``WORLD_SIZE > 1`` in the environment, it creates a ``gloo`` group (only
small Python objects travel between ranks) and destroys it at the end.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Ranks", "join"]


@dataclasses.dataclass
class Ranks:
    """This process's place among the processes of one extraction."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Whether this is rank 0, which prepares the folder and writes the manifest."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            dist.barrier()

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: ``cuda`` without an index becomes ``cuda:LOCAL_RANK``."""
        if device.type == "cuda" and device.index is None and self.world > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def close(self) -> None:
        """Destroy the process group if fxstore created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def join() -> Ranks:
    """Join the caller's process group, or the one ``torchrun`` describes, or run alone."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return Ranks()
    dist.init_process_group("gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)
