"""Where the work runs: devices, precisions, processes, the CPU kernel caches and freed memory.

Several processes with PyTorch's own engine: `torchrun` starts one process per device
(`torchrun --nproc_per_node 2 -m mtkit train CONFIG`), each holds a copy of the model, and
DistributedDataParallel averages their gradients after every backward pass, so the copies stay
equal. Each process trains on its own share of every step's batches; only the first process
(rank 0) validates, logs and saves. Without torchrun (no RANK in the environment) this is a world
of one process and the process functions do nothing.

The device and precision choices are small pure functions of what the machine reports, so that
every combination a GPU could report is tested on a machine without one.
"""

import ctypes
import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path

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

    def place(self, x):
        """The one place tensors and models move to the device: every model that is trained,
        validated or averaged and every batch goes through here, so a CPU run exercises the very
        placement a GPU run does (a model built elsewhere and left on the CPU would crash on a GPU)."""
        return x.to(self.device)

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


# -- device decisions: small pure functions of what the machine has, tested with every input ---
# (no GPU has ever run this code: the tests feed them the facts a GPU would report).

def device_for(setting: str, gpus: int, local_rank: int = 0, option: str = "train.device") -> str:
    """auto (a GPU when there is one), cpu or cuda -> "cpu" or "cuda:N" (process local_rank of
    a machine takes GPU local_rank, round robin)."""
    if setting == "cuda" or (setting == "auto" and gpus > 0):
        if gpus == 0:
            raise MtkitError(f"{option} is cuda but PyTorch sees no GPU", hint=f"set {option} to cpu (or auto)",
                             setting=option)
        return f"cuda:{local_rank % gpus}"
    return "cpu"


def train_precision(wanted: str, device: str, gpu_capability: tuple[int, int] | None, cpu_bf16: bool) -> str | None:
    """train.precision -> fp32, bf16 or fp16; None: auto on a CPU with bf16, where only timing
    both tells (bf16 wins on big matrices, loses on small ones). On a GPU, auto takes what its
    tensor cores do natively: bf16 from Ampere (compute capability 8.0), fp16 (with loss scaling)
    on Volta and Turing (7.x: V100, T4, where bf16 is emulated and slow), fp32 before."""
    if wanted != "auto":
        return wanted
    if device.startswith("cuda"):
        major = gpu_capability[0] if gpu_capability else 0
        return "bf16" if major >= 8 else "fp16" if major == 7 else "fp32"
    return None if cpu_bf16 else "fp32"


def decode_precision(wanted: str, device: str, trained: str, gpu_capability: tuple[int, int] | None,
                     cpu_bf16: bool) -> str:
    """translate/eval --precision -> fp32, bf16 or fp16. auto: the precision the model was
    trained in where this device computes it natively, else fp32 (a bf16 model on a CPU without
    bf16 would be emulated: slower than fp32, and no more exact)."""
    if wanted == "fp16" and device == "cpu":
        raise MtkitError("the precision fp16 needs a GPU (CPUs compute float16 slowly, by conversion)",
                         hint="use bf16 or fp32 on a CPU", setting="precision")
    if wanted != "auto":
        return wanted
    if trained not in ("bf16", "fp16"):
        return "fp32"
    if device.startswith("cuda"):
        major = gpu_capability[0] if gpu_capability else 0
        native = {"bf16": major >= 8, "fp16": major >= 7}
        return trained if native[trained] else "fp32"
    return "bf16" if trained == "bf16" and cpu_bf16 else "fp32"


def autocast(device: torch.device, precision: str):
    """The context that runs a model's products in `precision` (fp32, bf16 or fp16) on `device`,
    as training and translating both do."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision in ("bf16", "fp16"))


def machine_facts(device: str) -> tuple[tuple[int, int] | None, bool]:
    """What the decisions above need from this machine: the GPU's compute capability (None on a
    CPU) and whether the CPU does bf16 natively (AVX-512 BF16, AMX: oneDNN's own check)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_capability(torch.device(device)), False
    return None, bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_description(cpuinfo: str | None = None) -> str:
    """What the benchmarks print with every figure, from /proc/cpuinfo's text (read when not given;
    a machine without it gives "unknown CPU"): the CPU's model name and which of the flags that
    decide its bf16 speed it has (the machine's CPU changes between sessions: AVX2 only, AVX-512
    BF16, or AMX matrix units)."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    fast = [f for f in ("avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{model} ({', '.join(fast) if fast else 'no bf16 or AMX flags'})"


def choose_device(setting: str, local_rank: int = 0, option: str = "train.device") -> torch.device:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return torch.device(device_for(setting, gpus, local_rank, option))


_joined = False  # this process joined a group of several (see exit_process)


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
        global _joined
        _joined = True
    return World(rank, size, device)


def finish() -> None:
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
    os._exit(1 if isinstance(code, str) else code or 0)


def limit_kernel_caches() -> None:
    """oneDNN, which runs the bf16 matrix products on this CPU, compiles a kernel for each matrix
    shape and caches up to 1,024 of them (and PyTorch's ideep layer caches as many again).
    Decoding meets a new shape at nearly every step, as the prefix grows and the batch shrinks, so
    a translate process grew to 1.4 GB. 32 of each keep beam search on test_2016 under 0.6 GB at
    the same speed (measured). Training meets a new shape with nearly every batch: uncapped, a
    45-minute Multi30k `mtkit run` peaked at 4.7 GB; capped, bench_train peaks 22% lower at the
    same speed (docs/results.md).
    Both are read at the first bf16 product, so this only acts if none has run yet in this
    process; the user's own settings win."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
    os.environ.setdefault("LRU_CACHE_CAPACITY", "32")


def keep_freed_memory() -> bool:
    """Let the memory a training or decoding step frees serve the next step. glibc's malloc maps
    large blocks fresh from the kernel and hands the top of its heap back as soon as a few tens of
    MB are free there, so a step's large tensors (the feed-forward activations, a loss chunk's 16 MB
    of log-probabilities) fault their pages in, zeroed, again at every step. Here blocks up to 32 MB
    come from the heap, and up to 1 GB of it is kept: on an Intel Xeon with AMX, 1,024-token steps
    +4-7%, beam search +7-13%, peak RSS +10-20 MB (docs/performance.md). Only glibc on Linux; the
    user's own MALLOC_ settings win. Returns whether it acted."""
    if sys.platform != "linux" or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library this process runs on
    m_trim_threshold, m_mmap_threshold = -1, -3
    # Both: setting either one stops glibc moving its mmap threshold up from 128 KB.
    return bool(mallopt and mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30))
