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

from mtkit import checkpoint, distributed
from mtkit.distributed import World, cpu_description, decode_precision, device_for, train_precision
from mtkit.errors import MtkitError
from tests.conftest import tiny_config

T4, V100, A100, P100 = (7, 5), (7, 0), (8, 0), (6, 0)
CAPABILITIES = [None, P100, V100, T4, A100, (9, 0)]


@pytest.mark.parametrize("setting,gpus,rank", itertools.product(["auto", "cpu", "cuda"], [0, 1, 2], [0, 1, 3]))
def test_device_for_every_setting_and_machine(setting, gpus, rank):
    if setting == "cuda" and gpus == 0:
        with pytest.raises(MtkitError, match="train.device is cuda but PyTorch sees no GPU"):
            device_for(setting, gpus, rank)
    elif setting == "cpu" or gpus == 0:
        assert device_for(setting, gpus, rank) == "cpu"
    else:
        assert device_for(setting, gpus, rank) == f"cuda:{rank % gpus}"  # processes of a machine share its GPUs


def test_train_precision_on_gpus_takes_what_the_tensor_cores_do():
    assert train_precision("auto", "cuda:0", A100, False) == "bf16"
    assert train_precision("auto", "cuda:0", (9, 0), False) == "bf16"
    assert train_precision("auto", "cuda:0", T4, False) == "fp16"  # bf16 is emulated there: slow
    assert train_precision("auto", "cuda:0", V100, False) == "fp16"
    assert train_precision("auto", "cuda:1", P100, False) == "fp32"
    assert train_precision("auto", "cpu", None, True) is None  # measured on the CPU
    assert train_precision("auto", "cpu", None, False) == "fp32"
    for wanted, device, capability, cpu_bf16 in itertools.product(["fp32", "bf16", "fp16"], ["cpu", "cuda:0"],
                                                                  CAPABILITIES, [False, True]):
        assert train_precision(wanted, device, capability, cpu_bf16) == wanted  # the config's choice stands


@pytest.mark.parametrize("device,capability,cpu_bf16",
                         [("cpu", None, False), ("cpu", None, True), *(("cuda:0", c, False) for c in CAPABILITIES[1:])])
def test_decode_precision_for_every_model_and_device(device, capability, cpu_bf16):
    native = {"fp32": True, "bf16": cpu_bf16 if device == "cpu" else capability >= (8, 0),
              "fp16": device != "cpu" and capability >= (7, 0)}
    for trained in ("fp32", "bf16", "fp16"):
        auto = decode_precision("auto", device, trained, capability, cpu_bf16)
        # auto: the training precision where the device computes it natively, else fp32.
        assert auto == (trained if native[trained] else "fp32"), (trained, auto)
        for wanted in ("fp32", "bf16", "fp16"):
            if wanted == "fp16" and device == "cpu":
                with pytest.raises(MtkitError, match="the precision fp16 needs a GPU"):
                    decode_precision(wanted, device, trained, capability, cpu_bf16)
            else:
                assert decode_precision(wanted, device, trained, capability, cpu_bf16) == wanted


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
    cpu_bf16 = distributed.machine_facts("cpu")[1]
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
from mtkit.distributed import keep_freed_memory
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
    assert distributed.keep_freed_memory() is False  # the user's own malloc settings win
