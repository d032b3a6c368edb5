"""Device decisions and placement. No GPU runs here: each decision is a pure function of what the
machine reports, tested with every input a CPU or GPU could give it; the placement of models and
batches goes through one method, which a CPU run exercises exactly as a GPU run would."""

import itertools
import os
import resource
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from mtkit import checkpoint, devices, fast
from mtkit.devices import (Machine, cpu_description, decode_precision, device_for, pin_batches, tf32,
                           train_precision)
from mtkit.distributed import World
from mtkit.errors import MtkitError
from tests.conftest import tiny_config

T4, V100, A100, P100 = (7, 5), (7, 0), (8, 0), (6, 0)
CAPABILITIES = [None, P100, V100, T4, A100, (9, 0)]
# Every kind of machine: a CPU-only PyTorch, a CUDA PyTorch without a GPU, 1 or 2 GPUs, a Mac.
MACHINES = {"cpu-only torch": Machine(cuda_built=False), "cuda torch, no gpu": Machine(),
            "1 gpu": Machine(gpus=1, capability=T4), "2 gpus": Machine(gpus=2, capability=A100),
            "mac": Machine(cuda_built=False, mps=True, mps_bf16=True)}


@pytest.mark.parametrize("setting,machine,rank", itertools.product(["auto", "cpu", "cuda", "mps"], MACHINES, [0, 1, 3]))
def test_device_for_every_setting_machine_and_process(setting, machine, rank):
    m = MACHINES[machine]

    def answer():
        return device_for(setting, m, rank)

    if setting == "cuda" and not m.cuda_built:
        with pytest.raises(MtkitError, match=r"train.device is cuda but this PyTorch \(.*\) is built for CPUs only"):
            answer()
    elif setting == "cuda" and m.gpus == 0:
        with pytest.raises(MtkitError, match="train.device is cuda but PyTorch sees no GPU"):
            answer()
    elif setting in ("cuda", "auto") and m.gpus:  # one GPU per process of the machine, never shared
        if rank < m.gpus:
            assert answer() == f"cuda:{rank}"
        else:
            with pytest.raises(MtkitError, match=f"train.device is {setting} but process {rank} of this machine has "
                                                 f"no GPU of its own: it has {m.gpus}") as e:
                answer()
            assert e.value.hint == f"start torchrun with --nproc_per_node {m.gpus} (one process per GPU)"
    elif setting == "mps" and not m.mps:
        with pytest.raises(MtkitError, match="train.device is mps but PyTorch sees no Apple GPU"):
            answer()
    elif setting in ("mps", "auto") and m.mps:
        if rank == 0:
            assert answer() == "mps"
        else:
            with pytest.raises(MtkitError, match=f"train.device is {setting} but process {rank} of this machine: "
                                                 "the Apple GPU serves one process"):
                answer()
    else:
        assert answer() == "cpu"


def test_an_unknown_device_is_named_with_the_option():
    with pytest.raises(MtkitError, match="the device 'tpu': auto, cpu, cuda or mps") as e:
        device_for("tpu", Machine(), option="device")
    assert e.value.setting == "device"


def test_train_precision_on_gpus_takes_what_the_tensor_cores_do():
    def gpu(capability):
        return Machine(gpus=1, capability=capability)

    assert train_precision("auto", "cuda:0", gpu(A100)) == "bf16"
    assert train_precision("auto", "cuda:0", gpu((9, 0))) == "bf16"
    assert train_precision("auto", "cuda:0", gpu(T4)) == "fp16"  # bf16 is emulated there: slow
    assert train_precision("auto", "cuda:0", gpu(V100)) == "fp16"
    assert train_precision("auto", "cuda:1", gpu(P100)) == "fp32"
    assert train_precision("auto", "cpu", Machine(cpu_bf16=True)) is None  # measured on the CPU
    assert train_precision("auto", "cpu", Machine()) == "fp32"
    assert train_precision("auto", "mps", Machine(mps=True, mps_bf16=True)) == "fp32"  # never run in half precision
    for wanted, device, capability, cpu_bf16 in itertools.product(["fp32", "bf16", "fp16"], ["cpu", "cuda:0", "mps"],
                                                                  CAPABILITIES, [False, True]):
        m = Machine(gpus=1, capability=capability, cpu_bf16=cpu_bf16, mps=True, mps_bf16=True)
        assert train_precision(wanted, device, m) == wanted  # the config's choice stands
    with pytest.raises(MtkitError, match="bf16 on Apple's GPU needs macOS 14") as e:
        train_precision("bf16", "mps", Machine(mps=True, mps_bf16=False))
    assert e.value.setting == "train.precision"


@pytest.mark.parametrize("device,m", [("cpu", Machine()), ("cpu", Machine(cpu_bf16=True)),
                                      *(("cuda:0", Machine(gpus=1, capability=c)) for c in CAPABILITIES[1:]),
                                      ("mps", Machine(mps=True)), ("mps", Machine(mps=True, mps_bf16=True))])
def test_decode_precision_for_every_model_and_device(device, m):
    native = {"fp32": True, "bf16": {"cpu": m.cpu_bf16, "mps": m.mps_bf16}.get(device, (m.capability or (0,)) >= (8, 0)),
              "fp16": device == "mps" or device.startswith("cuda") and m.capability >= (7, 0)}
    for trained in ("fp32", "bf16", "fp16"):
        auto = decode_precision("auto", device, trained, m)
        # auto: the training precision where the device computes it natively, else fp32.
        assert auto == (trained if native[trained] else "fp32"), (trained, auto)
        for wanted in ("fp32", "bf16", "fp16"):
            if wanted == "fp16" and device == "cpu":
                with pytest.raises(MtkitError, match="the precision fp16 needs a GPU"):
                    decode_precision(wanted, device, trained, m)
            elif wanted == "bf16" and device == "mps" and not m.mps_bf16:
                with pytest.raises(MtkitError, match="bf16 on Apple's GPU needs macOS 14"):
                    decode_precision(wanted, device, trained, m)
            else:
                assert decode_precision(wanted, device, trained, m) == wanted


@pytest.mark.parametrize("device,capability", [("cpu", None), ("mps", None),
                                               *(("cuda:0", c) for c in CAPABILITIES[1:])])
def test_tf32_and_pinned_batches_only_where_a_gpu_has_them(device, capability):
    m = Machine(gpus=1, capability=capability, mps=True)
    assert tf32(device, m) == (capability is not None and capability >= (8, 0))  # Ampere on
    assert pin_batches(device) == device.startswith("cuda")


def test_this_machine_is_what_pytorch_reports_here():
    m = devices.this_machine()
    assert m.cuda_built == (torch.version.cuda is not None) and m.gpus == torch.cuda.device_count()
    assert m.mps == torch.backends.mps.is_available() and m.capability is None
    assert devices.open_device("auto") == torch.device("cpu")  # this machine: no GPU
    assert devices.describe(torch.device("cpu")).startswith(f"cpu ({cpu_description()}")
    if torch.version.cuda is None:  # a user with a GPU and this PyTorch learns why it is not used
        assert devices.describe(torch.device("cpu")).endswith("; this PyTorch is built for CPUs only)")


@pytest.mark.slow
def test_every_model_trained_validated_and_averaged_is_placed_on_the_training_device(tmp_path, demo_dir, cli,
                                                                                   monkeypatch):
    """On a GPU, a model left on the CPU crashes at its first batch; on a CPU nothing shows it.
    So every model that validate() sees must have gone through World.place (the averaged one of
    train.average_last did not)."""
    from mtkit.train import Trainer

    placed, validated = [], []
    real_place, real_validate = World.place, Trainer.validate
    monkeypatch.setattr(World, "place", lambda self, x: placed.append(id(x)) or real_place(self, x))
    monkeypatch.setattr(Trainer, "validate", lambda self, model=None: validated.append(id(model or self.model))
                        or real_validate(self, model))
    config = tiny_config(tmp_path, demo_dir, average_last=2, keep_last=2, save_every=4, eval_every=4)
    code, _, err = cli("train", config)
    assert code == 0, err
    assert len(validated) == 4 and "averaged the last 2 checkpoints" in err  # 3 validations, then the average
    assert all(v in placed for v in validated)


def test_a_process_on_another_machine_without_a_shared_workdir_is_told_so(tmp_path, demo_dir):
    from mtkit.config import load_config
    from mtkit.pipeline import check_shared_workdir

    cfg = load_config(tiny_config(tmp_path, demo_dir))
    cpu = torch.device("cpu")
    check_shared_workdir(cfg, World(0, 2, cpu))  # rank 0 wrote it: nothing to check
    with pytest.raises(MtkitError, match="process 1 sees no prepared data .* filesystem they all share"):
        check_shared_workdir(cfg, World(1, 2, cpu))
    cfg.data_cache_dir.mkdir(parents=True)
    (cfg.data_cache_dir / "manifest.json").write_text("{}")
    check_shared_workdir(cfg, World(1, 2, cpu))


def test_decoding_precision_is_a_choice_and_fp32_agrees_with_the_ctranslate2_export(trained, demo_dir, tmp_path, cli):
    """A bf16-trained model decodes in bf16 where the CPU has it (auto), in fp32 when asked; fp32
    is what its CTranslate2 export computes (CTranslate2 has no bf16 on CPUs), line for line."""
    state = checkpoint.load(trained / "checkpoints/best.pt")
    bf16 = tmp_path / "bf16.pt"
    checkpoint.save(replace(state, precision="bf16"), bf16)
    from mtkit.translate import Translator

    assert Translator.load(bf16, precision="fp32").precision == "fp32"
    cpu_bf16 = devices.this_machine().cpu_bf16
    assert Translator.load(bf16).precision == ("bf16" if cpu_bf16 else "fp32")
    source = demo_dir / "test.en"
    assert cli("export", bf16, "-o", tmp_path / "ct2")[0] == 0
    code, ours, err = cli("translate", bf16, "-i", source, "--greedy", "--precision", "fp32")
    assert code == 0, err
    code, theirs, err = cli("translate", tmp_path / "ct2", "--engine", "ctranslate2", "-i", source, "--greedy")
    assert code == 0, err
    assert ours == theirs and ours.count("\n") == 1000


def test_cpu_description_names_the_model_and_its_bf16_flags():
    def info(model: str, flags: str) -> str:
        return f"processor\t: 0\nmodel name\t: {model}\nflags\t\t: {flags}\n\nprocessor\t: 1\nmodel name\t: {model}\n"

    assert cpu_description(info("AMD EPYC", "fpu avx2 avx512f avx512_bf16")) == "AMD EPYC (avx512_bf16)"
    assert (cpu_description(info("Intel(R) Xeon(R) Platinum", "avx512_bf16 amx_bf16 amx_tile amx_int8"))
            == "Intel(R) Xeon(R) Platinum (avx512_bf16, amx_bf16, amx_int8)")
    assert cpu_description(info("AMD EPYC", "fpu avx2")) == "AMD EPYC (no bf16 or AMX flags)"
    assert cpu_description("") == "unknown CPU (no bf16 or AMX flags)"


FAULTS_OF_A_STEP = """
import resource, sys, torch
from mtkit.fast import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():  # as a training step's big tensors do: 20 blocks of 16 MB written, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(4 << 20) for _ in range(20)]
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
step(); step()
print(kept, step())
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_serves_the_next_step_without_page_faults(monkeypatch):
    for name in [n for n in os.environ if n.startswith("MALLOC_")]:
        monkeypatch.delenv(name)

    def third_step(how: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_STEP, how], capture_output=True, text=True, check=True)
        kept, faults = out.stdout.split()
        return kept, int(faults)

    pages = 20 * (16 << 20) // resource.getpagesize()
    kept, faults = third_step("keep")
    if kept == "False":
        pytest.skip("this C library is not glibc")
    assert kept == "True" and faults < pages / 4  # (the heap may still grow by a block or two)
    # Left alone, glibc faulted about all 81,920 pages in again here, but not in every process: it
    # trims only a free top of its heap, and where a small object lands decides that.
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert fast.keep_freed_memory() is False  # the user's own malloc settings win


KINDS = {  # what /proc/cpuinfo says on each kind of CPU (the flags that matter, among others)
    "amx": ("Intel(R) Xeon(R) Platinum 8480+", "flags", "avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"),
    "avx512_bf16": ("AMD EPYC 9R14", "flags", "avx2 avx512f avx512_bf16"),
    "no_bf16": ("AMD EPYC 7R13", "flags", "fpu avx2 fma"),
    "arm_bf16": ("", "Features", "fp asimd sve i8mm bf16"),  # AWS Graviton 3: no model name line
}


@pytest.mark.parametrize("kind", devices.CPU_KINDS)
def test_each_kind_of_cpu_is_told_by_its_flags_and_decides_whether_bf16_is_measured(kind):
    model, key, flags = KINDS[kind]
    cpuinfo = f"processor\t: 0\nmodel name\t: {model}\n{key}\t\t: {flags}\n"
    assert devices.cpu_kind(cpuinfo) == kind
    chosen = train_precision("auto", "cpu", Machine(cpu_bf16=devices.cpu_kind(cpuinfo) != "no_bf16"))
    assert chosen == ("fp32" if kind == "no_bf16" else None)  # None: bf16 against fp32, measured
    assert devices.cpu_kind("") == devices.cpu_kind("processor\t: 0\n") == "no_bf16"


def test_this_machines_kind_agrees_with_onednn():
    """The kind read from the flags says bf16 exactly where oneDNN (which runs the products) does."""
    kind = devices.cpu_kind(devices._cpuinfo())
    assert kind in devices.CPU_KINDS and devices.this_machine().cpu_bf16 == (kind != "no_bf16")
    assert (kind != "no_bf16") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) or not devices._cpuinfo()
