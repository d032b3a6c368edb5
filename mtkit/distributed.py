"""Training on several processes with PyTorch's own engine: `torchrun` starts one process per
device (`torchrun --nproc_per_node 2 -m mtkit train CONFIG`), each holds a copy of the model, and
DistributedDataParallel averages their gradients after every backward pass, so the copies stay
equal. Each process trains on its own share of every step's batches; only the first process
(rank 0) validates, logs and saves.

Without torchrun (no RANK in the environment) this is a world of one process and every function
here does nothing.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mtkit.errors import MtkitError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """The sum over all processes of a few numbers (token counts, losses)."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def from_main(self, value):
        """Rank 0's value, on every process: one decision (stop, precision) for all."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def choose_device(setting: str, local_rank: int = 0) -> torch.device:
    """train.device: auto (a GPU when there is one), cpu or cuda."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise MtkitError("train.device is cuda but PyTorch sees no GPU", hint="set train.device=cpu (or auto)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def start(device_setting: str) -> World:
    """Join the process group torchrun prepared (gloo on CPU, nccl on GPU), or a world of one."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World(0, 1, choose_device(device_setting))
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = choose_device(device_setting, local)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Rank 0 validates and saves while the others wait at the next step: allow it an hour.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
    return World(rank, size, device)


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
