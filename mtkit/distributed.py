"""Where the work runs: devices, precisions and processes.

Several processes with PyTorch's own engine: `torchrun` starts one process per device
(`torchrun --nproc_per_node 2 -m mtkit train CONFIG`), each holds a copy of the model, and
DistributedDataParallel averages their gradients after every backward pass, so the copies stay
equal. Each process trains on its own share of every step's batches; only the first process
(rank 0) validates, logs and saves. Without torchrun (no RANK in the environment) this is a world
of one process and the process functions do nothing.

Which device each process takes, and in what precision, is devices.py's.
"""

import contextlib
import datetime
import inspect
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mtkit.devices import open_device, pin_batches
from mtkit.errors import MtkitError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def place(self, x):
        """The one place tensors and models move to the device: every model that is trained,
        validated or averaged and every batch goes through here, so a CPU run exercises the very
        placement a GPU run does (a model built elsewhere and left on the CPU would crash on a GPU).
        To a CUDA GPU a batch is copied from pinned memory without waiting (devices.pin_batches)."""
        return x.to(self.device, non_blocking=pin_batches(str(self.device)))

    def parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` as the processes train it: itself in a world of one, else in DistributedDataParallel,
        which averages their copies' gradients in every backward pass. Its one buffer, the position
        table, never changes: not sent to every process before every step (the keyword that says
        so was renamed in a recent PyTorch; the old one now warns)."""
        if self.size == 1:
            return model
        ddp = torch.nn.parallel.DistributedDataParallel
        keyword = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
            else "broadcast_buffers"
        return ddp(model, **{keyword: False})

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

    def main_first(self, build: Callable):
        """Rank 0 runs build() (what every process reads: the corpus, tokenizer and prepared data)
        while the others wait, however long it takes; returns its result on rank 0 (None on the
        others). A mistake there ends every process with rank 0's message, not only rank 0."""
        if self.size == 1:
            return build()
        result = failure = None
        try:
            if self.main:
                result = build()
        except MtkitError as e:
            failure = (e.message, e.hint, e.setting)
            raise
        except BaseException as e:
            failure = (f"process 0 failed ({type(e).__name__}: {e})", "its traceback is above", None)
            raise
        finally:
            if self.main:
                box = [failure]
                dist.broadcast_object_list(box, src=0, group=_patient)
        if not self.main:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=_patient)  # waits for rank 0, past the usual timeout
            if box[0] is not None:
                raise MtkitError(*box[0])
        return result

    def from_main(self, value):
        """Rank 0's value, on every process: one decision (stop, precision) for all."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


_joined = False  # this process joined a group of several (see exit_process)
_patient = None  # a group whose collectives wait for days: for rank 0's preparing (main_first)


def start(device_setting: str) -> World:
    """Join the process group torchrun prepared (gloo on CPU, nccl on GPU), or a world of one."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World(0, 1, open_device(device_setting))
    rank, size, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = open_device(device_setting, local)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # Rank 0 validates and saves while the others wait at the next step: allow it an hour.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
        global _joined, _patient
        _joined = True
        # Preparing millions of pairs can take longer than an hour.
        _patient = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30))
    return World(rank, size, device)


def finish() -> None:
    """Leave the group after work that ended well (a failure leaves through exit_process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int | str | None) -> None:
    """End `python -m mtkit` (how torchrun starts each process) with this exit code. A process
    that joined a group of several ends without Python's shutdown: once DistributedDataParallel
    has used the gloo group, PyTorch keeps it alive past destroy_process_group, and its threads
    may still hold the last collective's tensors; one freed while the interpreter shuts down takes
    the GIL from a dying interpreter and aborts the process (SIGABRT, "terminate called without
    an active exception"), after training ended well: 1 in 150 tiny two-process runs beside two
    busy loops. Every file of ours is written and closed by then, so only the streams need flushing."""
    if not _joined:
        sys.exit(code)
    if isinstance(code, str):  # what sys.exit does with a message
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        _fail_together()
    os._exit(1 if isinstance(code, str) else code or 0)


def _fail_together() -> None:
    """A failing process waits a few seconds at most for the others of its group, which fail with
    it (main_first), to have said why too: torchrun stops every process once one has ended in
    failure, and a process stopped so never prints its message."""
    def wait() -> None:
        with contextlib.suppress(Exception):  # the group torn down: nobody left to wait for
            dist.barrier(group=_patient)

    if not dist.is_initialized():
        return
    waiting = threading.Thread(target=wait, daemon=True)
    waiting.start()
    waiting.join(timeout=5)  # another process gone, or waiting elsewhere: end all the same
