"""Where the work runs and in what precision: a CPU, a CUDA GPU or Apple's GPU (mps).

Every decision is a small pure function of a `Machine`, the few facts PyTorch reports, so that each
answer a T4, an A100, a Mac or a CPU-only PyTorch could give is tested on a machine that has none
of them (tests/test_devices.py). Only `this_machine` and `open_device` ask PyTorch.

Read, not run here (docs/distributed.md): on Apple's GPU, PyTorch has autocast in fp16 (2.5) and
bf16 (2.6, macOS 14 and later; emulated, no faster, on M1 and M2), loss scaling (2.8) and a fused
AdamW (2.4); mtkit trains there in fp32 unless told otherwise, and translates a model in the
precision it was trained in where Metal computes it.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from mtkit.errors import MtkitError

DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class Machine:
    """What PyTorch reports about this machine, as far as the decisions below need it."""
    gpus: int = 0                                # CUDA GPUs this process sees
    cuda_built: bool = True                      # False: a CPU-only PyTorch (torch x.y.z+cpu)
    mps: bool = False                            # Apple's GPU, usable by this PyTorch
    capability: tuple[int, int] | None = None    # the compute capability of the GPU in use
    cpu_bf16: bool = False                       # the CPU computes bf16 natively (AVX-512 BF16, AMX)
    mps_bf16: bool = False                       # macOS 14 or later: Metal computes bf16


def device_for(setting: str, m: Machine, local_rank: int = 0, option: str = "train.device") -> str:
    """auto, cpu, cuda or mps -> "cpu", "cuda:N" or "mps". auto takes a CUDA GPU, else Apple's GPU,
    else the CPU. Process local_rank of a machine (torchrun) takes GPU local_rank: a process
    without a GPU of its own is refused, since two processes sharing one would each get half of it."""
    if setting not in DEVICES:
        raise MtkitError(f"the device {setting!r}: auto, cpu, cuda or mps", setting=option)

    def refuse(what: str, hint: str):
        raise MtkitError(f"{option} is {setting} but {what}", hint=hint, setting=option)

    if setting == "cuda" or (setting == "auto" and m.gpus > 0):
        if not m.cuda_built:
            refuse(f"this PyTorch ({torch.__version__}) is built for CPUs only",
                   f"install a CUDA build of PyTorch (pytorch.org/get-started), or set {option} to cpu")
        if m.gpus == 0:
            refuse("PyTorch sees no GPU", f"check nvidia-smi and CUDA_VISIBLE_DEVICES, or set {option} to cpu (or auto)")
        if local_rank >= m.gpus:
            refuse(f"process {local_rank} of this machine has no GPU of its own: it has {m.gpus}",
                   f"start torchrun with --nproc_per_node {m.gpus} (one process per GPU)")
        return f"cuda:{local_rank}"
    if setting == "mps" or (setting == "auto" and m.mps):
        if not m.mps:
            refuse("PyTorch sees no Apple GPU (mps needs a Mac with Apple silicon and macOS 12.3 or later)",
                   f"set {option} to cpu (or auto)")
        if local_rank > 0:
            refuse(f"process {local_rank} of this machine: the Apple GPU serves one process",
                   f"train without torchrun on a Mac, or set {option} to cpu")
        return "mps"
    return "cpu"


def train_precision(wanted: str, device: str, m: Machine) -> str | None:
    """train.precision -> fp32, bf16 or fp16; None: auto on a CPU with bf16, where only timing
    both tells (bf16 wins on big matrices, loses on small ones). On a GPU, auto takes what its
    tensor cores do natively: bf16 from Ampere (compute capability 8.0), fp16 (with loss scaling)
    on Volta and Turing (7.x: V100, T4, where bf16 is emulated and slow), fp32 before. On Apple's
    GPU fp32: its half precisions were never run with mtkit (the module's docstring)."""
    if wanted == "bf16" and device == "mps" and not m.mps_bf16:
        raise MtkitError("the precision bf16 on Apple's GPU needs macOS 14 or later", hint="use fp16 or fp32",
                         setting="train.precision")
    if wanted != "auto":
        return wanted
    if device.startswith("cuda"):
        major = m.capability[0] if m.capability else 0
        return "bf16" if major >= 8 else "fp16" if major == 7 else "fp32"
    if device == "mps":
        return "fp32"
    return None if m.cpu_bf16 else "fp32"


def decode_precision(wanted: str, device: str, trained: str, m: Machine) -> str:
    """translate/eval --precision -> fp32, bf16 or fp16. auto: the precision the model was
    trained in where this device computes it natively, else fp32 (a bf16 model on a CPU without
    bf16 would be emulated: slower than fp32, and no more exact)."""
    if wanted == "fp16" and device == "cpu":
        raise MtkitError("the precision fp16 needs a GPU (CPUs compute float16 slowly, by conversion)",
                         hint="use bf16 or fp32 on a CPU", setting="precision")
    if wanted == "bf16" and device == "mps" and not m.mps_bf16:
        raise MtkitError("the precision bf16 on Apple's GPU needs macOS 14 or later", hint="use fp16 or fp32",
                         setting="precision")
    if wanted != "auto":
        return wanted
    if trained not in ("bf16", "fp16"):
        return "fp32"
    if device.startswith("cuda"):
        major = m.capability[0] if m.capability else 0
        native = {"bf16": major >= 8, "fp16": major >= 7}
    elif device == "mps":
        native = {"bf16": m.mps_bf16, "fp16": True}
    else:
        native = {"bf16": m.cpu_bf16, "fp16": False}
    return trained if native[trained] else "fp32"


def tf32(device: str, m: Machine) -> bool:
    """Whether fp32 matrix products run as TF32 (10-bit mantissa, fp32 range) on the tensor cores:
    on CUDA GPUs from Ampere (8.0), where it makes fp32 products several times faster at a
    precision training does not notice. PyTorch leaves it off by default."""
    return device.startswith("cuda") and m.capability is not None and m.capability >= (8, 0)


def pin_batches(device: str) -> bool:
    """Whether batches are made in pinned (page-locked) memory and copied without waiting: only a
    CUDA GPU reads pinned memory directly, so the copy overlaps the GPU's work."""
    return device.startswith("cuda")


def autocast(device: torch.device, precision: str):
    """The context that runs a model's products in `precision` (fp32, bf16 or fp16) on `device`,
    as training and translating both do."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision in ("bf16", "fp16"))


def this_machine(device: str | None = None) -> Machine:
    """What PyTorch reports here (device: the capability of that GPU; the first one when None)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cuda = device if device and device.startswith("cuda") else "cuda:0" if gpus else None
    mps, cpuinfo = torch.backends.mps.is_available(), _cpuinfo()
    # Without /proc/cpuinfo (macOS, Windows), oneDNN's own probe.
    cpu_bf16 = cpu_kind(cpuinfo) != "no_bf16" if cpuinfo else bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return Machine(gpus=gpus, cuda_built=torch.version.cuda is not None, mps=mps,
                   capability=torch.cuda.get_device_capability(torch.device(cuda)) if cuda else None,
                   cpu_bf16=cpu_bf16,
                   mps_bf16=mps and torch.backends.mps.is_macos_or_newer(14, 0))


def open_device(setting: str, local_rank: int = 0, option: str = "train.device") -> torch.device:
    """The device to run on (device_for), made ready: TF32 for fp32 products where tf32() says."""
    device = device_for(setting, this_machine(), local_rank, option)
    if tf32(device, this_machine(device)):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    return torch.device(device)


def describe(device: torch.device) -> str:
    """The device as the start of a run names it: "cuda:0 (NVIDIA T4, compute capability 7.5)"."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
    if device.type == "mps":
        return "mps (Apple GPU)"
    only = "; this PyTorch is built for CPUs only" if torch.version.cuda is None and not torch.backends.mps.is_built() else ""
    return f"cpu ({cpu_description()}{only})"


CPU_KINDS = ("amx", "avx512_bf16", "arm_bf16", "no_bf16")


def cpu_kind(cpuinfo: str) -> str:
    """The kind of CPU, from /proc/cpuinfo's text, as far as its bf16 speed goes: "amx" (Intel's
    matrix units: bf16 products several times fp32's), "avx512_bf16" (AMD EPYC Zen 4, Intel Cooper
    Lake: twice fp32's), "arm_bf16" (Arm's BF16 instructions: AWS Graviton 3, Neoverse V1) or
    "no_bf16" (AVX2 only, older Arm: bf16 emulated, slower than fp32). Training measures bf16
    against fp32 on every kind but the last, which trains in fp32 (train_precision)."""
    flags = _flags(cpuinfo)
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else "arm_bf16" if "bf16" in flags else "no_bf16"


def cpu_description(cpuinfo: str | None = None) -> str:
    """What the benchmarks print with every figure, from /proc/cpuinfo's text (read when not given;
    a machine without it gives "unknown CPU"): the CPU's model name and which of the flags that
    decide its bf16 speed it has (the machine's CPU changes between sessions: AVX2 only, AVX-512
    BF16, or AMX matrix units)."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 "unknown CPU")
    fast = [f for f in ("avx512_bf16", "amx_bf16", "amx_int8") if f in _flags(cpuinfo)]
    return f"{model} ({', '.join(fast) if fast else 'no bf16 or AMX flags'})"


def _cpuinfo() -> str:
    """/proc/cpuinfo's text; "" where there is none (macOS, Windows)."""
    return Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""


def _flags(cpuinfo: str) -> set[str]:
    """The first processor's flags ("flags" on x86, "Features" on Arm)."""
    line = next((line for line in cpuinfo.splitlines() if line.split(":")[0].strip() in ("flags", "Features")), ":")
    return set(line.split(":", 1)[1].split())
