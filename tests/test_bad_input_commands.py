"""The bad-input table, part 2: every command and every option of the CLI, and the Python API.

tests/test_bad_input.py holds the rows for configs, corpora, text to translate, checkpoints and
workdirs; this file holds a row for each option they do not reach, and the test that makes the
table complete by construction: it walks the Typer app and fails for any command or option that no
row gives on its command line (a command added later cannot skip the table). The same for the
public functions of mtkit.api and the public methods of Translator.
"""

import gzip
import inspect
import json
import os
import socket
import threading
from pathlib import Path
from typing import Callable

import pytest
import typer

from tests.bad_input_rows import (CHECKPOINTS, CONFIGS, CORPUS_HANDLED, CORPUS_REFUSED, GOOD, TRANSLATE, WORKDIRS,
                                   write_split)
from tests.helpers import Handled, Refused, assert_refused
from tests.conftest import write_config

TEXT = "The dog sees a cat.\n\nA boy runs.\n"


def lines_written(n: int, where: str = "out") -> Callable:
    def check(code, out, err, tmp) -> None:
        text = out if where == "out" else (tmp / where).read_text()
        assert code == 0 and "Traceback" not in err, err
        assert len(text.split("\n")) - 1 == n and text.split("\n")[1] == "", text
    return check


def exit_ok(*needles: str, files: tuple[str, ...] = ()) -> Callable:
    def check(code, out, err, tmp) -> None:
        assert code == 0 and "Traceback" not in err, err
        for needle in needles:
            assert needle in out + err, out + err
        for name in files:
            assert (tmp / name).is_file() and (tmp / name).stat().st_size > 0, name
    return check


def json_scores(code, out, err, tmp) -> None:
    assert code == 0, err
    assert set(json.loads(out)) >= {"bleu", "chrf", "ter"}


def fifo(tmp: Path) -> None:
    """A named pipe that a thread fills, as `-i <(zcat f.gz)` hands mtkit one."""
    os.mkfifo(tmp / "fifo")
    threading.Thread(target=lambda: (tmp / "fifo").write_text(TEXT), daemon=True).start()


def hf_folder(**config) -> Callable:
    """A folder {tmp}/m with a config.json (a Marian one, changed by `config`), and nothing else."""
    def setup(tmp: Path) -> None:
        (tmp / "m").mkdir()
        (tmp / "m" / "config.json").write_text(json.dumps({"model_type": "marian", "scale_embedding": True,
                                                           "d_model": 16, **config}))
    return setup


# name: (argv, with {run} the trained workdir, {config} its config, {ckpt} its best.pt, {ct2} its
#        CTranslate2 export, {fresh} a config of a small clean corpus, {tmp} a folder of the row's
#        own holding text.txt, text.gz, hyp.txt and ref.txt; how to set up {tmp} further; outcome)
COMMANDS = {
    # tokenizer train / prepare / train
    "tokenizer train --force retrains an up-to-date tokenizer": (
        ["tokenizer", "train", "{fresh}", "--force"], "fresh", Handled(exit_ok("tokenizer: training"))),
    "prepare --force prepares up-to-date data again": (
        ["prepare", "{fresh}", "--force"], "fresh", Handled(exit_ok("prepare: done"))),
    "train --resume with nothing to resume": (
        ["train", "{fresh}", "--resume"], None, Refused("nothing to resume:")),
    "train --init a file that is not there": (
        ["train", "{fresh}", "--init", "{tmp}/nowhere.pt"], None, Refused("checkpoint not found: {tmp}/nowhere.pt")),
    "run --init a folder without a model": (
        ["run", "{fresh}", "--init", "{tmp}"], None, Refused("no best checkpoint in {tmp}")),
    "train --init a model whose vocabulary the config changes": (
        ["train", "{fresh}", "--init", "{run}"], None,
        Refused("this config asks for another model: tokenizer.vocab_size is 60 (the model's: 300)")),
    "train --init a model whose shape the config changes": (
        ["train", "{fresh}", "--init", "{ckpt}", "--set", "tokenizer.vocab_size=300", "--set", "model.heads=4"], None,
        Refused("this config asks for another model: model.heads is 4 (the model's: 2)")),
    "train --init a text file": (
        ["train", "{fresh}", "--init", "{tmp}/text.txt"], None, Refused("is not a readable checkpoint (not a PyTorch file)")),
    # translate
    "translate --alpha below 0": (["translate", "{run}", "--alpha", "-1"], None,
                                  Refused("Invalid value for '--alpha': Input should be greater than or equal to 0")),
    "translate --max-tokens 0": (["translate", "{run}", "--max-tokens", "0"], None,
                                 Refused("Invalid value for '--max-tokens'")),
    "translate --beam not a number": (["translate", "{run}", "--beam", "five"], None,
                                      Refused("Invalid value for '--beam'")),
    "translate an unknown option": (["translate", "{run}", "--bogus"], None, Refused("No such option: --bogus")),
    "translate without a model": (["translate"], None, Refused("Missing argument 'checkpoint'")),
    "translate --input a gzip file": (["translate", "{run}", "-i", "{tmp}/text.gz", "--greedy"], None,
                                      Handled(lines_written(3))),
    "translate --input a named pipe": (["translate", "{run}", "-i", "{tmp}/fifo", "--greedy"], fifo,
                                       Handled(lines_written(3))),
    "translate --input a damaged gzip file": (["translate", "{run}", "-i", "{tmp}/bad.gz"],
                                              lambda tmp: (tmp / "bad.gz").write_bytes(gzip.compress(b"a\n" * 99)[:15]),
                                              Refused("damaged gzip data")),
    "translate --attention into a file": (["translate", "{run}", "-i", "{tmp}/text.txt", "--attention", "{tmp}/text.txt"],
                                          None, Refused("is a file, not a folder")),
    "translate --attention into a new folder": (
        ["translate", "{run}", "-i", "{tmp}/text.txt", "-o", "{tmp}/out.txt", "--attention", "{tmp}/maps"], None,
        Handled(exit_ok(files=("out.txt", "maps/000001.png", "maps/000003.png")))),
    "translate --engine unknown": (["translate", "{run}", "--engine", "onnx"], None,
                                   Refused("--engine 'onnx': mtkit or ctranslate2")),
    "translate --engine ctranslate2 on a checkpoint": (["translate", "{run}", "--engine", "ctranslate2"], None,
                                                       Refused("is not a CTranslate2 export of mtkit")),
    "translate --engine ctranslate2 --attention": (
        ["translate", "{ct2}", "--engine", "ctranslate2", "--attention", "{tmp}/maps"], None,
        Refused("attention maps need mtkit's own engine")),
    "translate --engine ctranslate2 --compute-type int8": (
        ["translate", "{ct2}", "--engine", "ctranslate2", "--compute-type", "int8", "-i", "{tmp}/text.txt"], None,
        Handled(lines_written(3))),
    "translate --compute-type unknown": (
        ["translate", "{ct2}", "--engine", "ctranslate2", "--compute-type", "int3", "-i", "{tmp}/text.txt"], None,
        Refused("--compute-type: the compute type int3: Invalid compute type")),
    "translate --compute-type without ctranslate2": (["translate", "{run}", "--compute-type", "int8"], None,
                                                     Refused("--compute-type int8 is CTranslate2's setting")),
    "translate --device cuda on a CPU-only PyTorch": (["translate", "{run}", "--device", "cuda"], None,
                                                      Refused("--device: device is cuda but this PyTorch")),
    "translate --device mps without an Apple GPU": (["translate", "{run}", "--device", "mps"], None,
                                                    Refused("--device: device is mps but PyTorch sees no Apple GPU")),
    "translate --engine ctranslate2 --device mps": (["translate", "{ct2}", "--engine", "ctranslate2", "--device", "mps"],
                                                    None, Refused("CTranslate2 computes on CPUs and CUDA GPUs")),
    "translate --engine ctranslate2 --device cuda without a GPU": (
        ["translate", "{ct2}", "--engine", "ctranslate2", "--device", "cuda"], None,
        Refused("--device: device is cuda but PyTorch sees no GPU")),
    "translate --engine ctranslate2 --device cpu": (
        ["translate", "{ct2}", "--engine", "ctranslate2", "--device", "cpu", "-i", "{tmp}/text.txt"], None,
        Handled(lines_written(3))),
    "translate --device unknown": (["translate", "{run}", "--device", "tpu"], None,
                                   Refused("--device: the device 'tpu': auto, cpu, cuda or mps")),
    "translate --precision fp16 on a CPU": (["translate", "{run}", "--device", "cpu", "--precision", "fp16"], None,
                                            Refused("--precision: the precision fp16 needs a GPU")),
    "translate --precision unknown": (["translate", "{run}", "--precision", "int4"], None,
                                      Refused("--precision: the precision 'int4': auto, fp32, bf16 or fp16")),
    "translate --precision bf16": (["translate", "{run}", "-i", "{tmp}/text.txt", "--precision", "bf16"], None,
                                   Handled(lines_written(3))),
    "translate --precision with ctranslate2": (["translate", "{ct2}", "--engine", "ctranslate2", "--precision", "fp32"],
                                               None, Refused("--precision is mtkit's engine's setting")),
    # export
    "export a missing checkpoint": (["export", "{tmp}/nope.pt", "-o", "{tmp}/ct2"], None,
                                    Refused("checkpoint not found")),
    "export --output onto a file": (["export", "{run}", "-o", "{tmp}/text.txt"], None,
                                    Refused("--output: the output {tmp}/text.txt is a file")),
    "export --output into a folder of other files": (["export", "{run}", "-o", "{tmp}"], None,
                                                     Refused("is a folder that holds other files")),
    "export --output a new nested folder": (["export", "{run}", "-o", "{tmp}/a/b", "--quantization", "int8"], None,
                                            Handled(exit_ok("exported", files=("a/b/model.bin", "a/b/mtkit.json")))),
    "export --format unknown": (["export", "{run}", "-o", "{tmp}/x", "--format", "onnx"], None,
                                Refused("--format 'onnx': only ctranslate2")),
    "export --quantization unknown": (["export", "{run}", "-o", "{tmp}/x", "--quantization", "int3"], None,
                                      Refused("--quantization: the quantization int3: int3 is not a valid quantization type")),
    # import marian
    "import marian a folder that is not there": (["import", "marian", "{tmp}/nowhere", "-o", "{tmp}/out"], None,
                                                 Refused("{tmp}/nowhere: no such folder")),
    "import marian a folder that is no model": (["import", "marian", "{tmp}", "-o", "{tmp}/out"], None,
                                                Refused("is not a Hugging Face model folder (no readable config.json)")),
    "import marian a model of another kind": (["import", "marian", "{tmp}/m", "-o", "{tmp}/out"],
                                              hf_folder(model_type="bert"), Refused("holds a bert model, not a Marian one")),
    "import marian a Marian model mtkit cannot represent": (
        ["import", "marian", "{tmp}/m", "-o", "{tmp}/out"], hf_folder(scale_embedding=False, normalize_before=True),
        Refused("mtkit's model cannot represent this Marian model: scale_embedding: false (mtkit scales embeddings "
                "by sqrt(d_model)); normalize_before: true (pre-norm Marian models)")),
    "import marian without its tokenizer files": (
        ["import", "marian", "{tmp}/m", "-o", "{tmp}/out"], hf_folder(),
        Refused("has no source.spm and no target.spm and no vocab.json")),
    "import marian --output into a folder of files": (["import", "marian", "{tmp}", "--output", "{tmp}"], None,
                                                      Refused("-o {tmp} is a folder that holds files already")),
    "import marian a hub name with no network": (
        ["import", "marian", "Helsinki-NLP/opus-mt-xx-yy", "-o", "{tmp}/out"], None,
        Refused("Helsinki-NLP/opus-mt-xx-yy: not a folder, and it could not be fetched from the Hugging Face hub")),
    # attention
    "attention with a missing checkpoint": (["attention", "{tmp}/nope.pt", "A dog."], None,
                                            Refused("checkpoint not found")),
    "attention of an empty sentence": (["attention", "{run}", " ", "-o", "{tmp}/a.png"], None,
                                       Refused("nothing to translate: the sentence is empty")),
    "attention --output a folder": (["attention", "{run}", "A dog.", "-o", "{tmp}"], None, Refused("is a folder")),
    "attention --output of an unknown format": (["attention", "{run}", "A dog.", "-o", "{tmp}/a.txt"], None,
                                                Refused("its format comes from its ending")),
    "attention --output in a missing folder": (["attention", "{run}", "A dog.", "-o", "{tmp}/no/a.png"], None,
                                               Refused("does not exist")),
    "attention --output as SVG": (["attention", "{run}", "A dog.", "-o", "{tmp}/a.svg", "--beam", "2"], None,
                                  Handled(exit_ok("looks most at", files=("a.svg",)))),
    "attention --beam 0": (["attention", "{run}", "A dog.", "--beam", "0"], None, Refused("Invalid value for '--beam'")),
    "attention --layer beyond the model": (["attention", "{run}", "A dog.", "--layer", "5", "-o", "{tmp}/a.png"], None,
                                           Refused("--layer: layer 5: the model has 1")),
    "attention --head beyond the model": (["attention", "{run}", "A dog.", "--head", "9", "-o", "{tmp}/a.png"], None,
                                          Refused("--head: head 9: the model has 2")),
    # plot
    "plot a checkpoint file": (["plot", "{ckpt}", "-o", "{tmp}/c.png"], None, Refused("is not a metrics log")),
    "plot a folder without metrics": (["plot", "{tmp}", "-o", "{tmp}/c.png"], None, Refused("cannot read")),
    "plot --output of an unknown format": (["plot", "{run}", "-o", "{tmp}/c.txt"], None,
                                           Refused("its format comes from its ending")),
    "plot --output a folder": (["plot", "{run}", "-o", "{tmp}"], None, Refused("is a folder")),
    # eval
    "eval --hyp a missing file": (["eval", "--hyp", "{tmp}/nope.txt", "--ref", "{tmp}/ref.txt"], None,
                                  Refused("cannot read")),
    "eval --hyp a binary file": (["eval", "--hyp", "{ckpt}", "--ref", "{tmp}/ref.txt"], None,
                                 Refused("invalid UTF-8")),
    "eval --ref with a CONFIG": (["eval", "{config}", "--ref", "{tmp}/ref.txt"], None,
                                 Refused("--ref goes with --hyp")),
    "eval of empty files": (["eval", "--hyp", "{tmp}/empty.txt", "--ref", "{tmp}/empty.txt"],
                            lambda tmp: (tmp / "empty.txt").write_text(""), Refused("empty.txt has no lines: nothing to score")),
    "eval --split train": (["eval", "{config}", "--split", "train"], None, Refused("--split must be valid or test")),
    "eval --split with --hyp": (["eval", "--hyp", "{tmp}/hyp.txt", "--ref", "{tmp}/ref.txt", "--split", "valid"], None,
                                Refused("--split apply to an experiment CONFIG")),
    "eval --beam 0": (["eval", "{config}", "--beam", "0"], None, Refused("Invalid value for '--beam'")),
    "eval --beam and --checkpoint with --hyp": (
        ["eval", "--hyp", "{tmp}/hyp.txt", "--ref", "{tmp}/ref.txt", "--beam", "2", "--checkpoint", "{ckpt}"], None,
        Refused("--beam, --checkpoint apply to an experiment CONFIG")),
    "eval --set with --hyp": (["eval", "--hyp", "{tmp}/hyp.txt", "--ref", "{tmp}/ref.txt", "--set", "eval.split=valid"],
                              None, Refused("--set apply to an experiment CONFIG")),
    "eval --bootstrap 0": (["eval", "--hyp", "{tmp}/hyp.txt", "--ref", "{tmp}/ref.txt", "--bootstrap", "0"], None,
                           Refused("Invalid value for '--bootstrap'")),
    "eval --bootstrap with a CONFIG": (["eval", "{config}", "--bootstrap", "100"], None,
                                       Refused("--bootstrap compares files")),
    "eval --device cpu --precision fp32": (["eval", "{config}", "--split", "valid", "--beam", "1", "--device", "cpu",
                                            "--precision", "fp32", "--json"], None, Handled(json_scores)),
    "eval --device and --precision with --hyp": (
        ["eval", "--hyp", "{tmp}/hyp.txt", "--ref", "{tmp}/ref.txt", "--device", "cpu", "--precision", "bf16"], None,
        Refused("--device, --precision apply to an experiment CONFIG")),
    "eval --json": (["eval", "--hyp", "{tmp}/hyp.txt", "--ref", "{tmp}/ref.txt", "--json"], None, Handled(json_scores)),
    "eval --tokenize unknown": (["eval", "--hyp", "{tmp}/hyp.txt", "--ref", "{tmp}/ref.txt", "--tokenize", "moses"],
                                None, Refused("--tokenize 'moses': one of auto, 13a")),
    "eval --tokenize auto with --hyp": (["eval", "--hyp", "{tmp}/hyp.txt", "--ref", "{tmp}/ref.txt", "--tokenize",
                                         "auto"], None, Refused("--tokenize auto takes the target language")),
    "eval --tokenize char": (["eval", "--hyp", "{tmp}/hyp.txt", "--ref", "{tmp}/ref.txt", "--tokenize", "char"], None,
                             Handled(exit_ok("tok:char"))),
    # average, config show
    "average --output a folder": (["average", "{ckpt}", "-o", "{tmp}"], None, Refused("--output: the output {tmp} is a folder")),
    "average --output in a missing folder": (["average", "{ckpt}", "-o", "{tmp}/no/avg.pt"], None,
                                             Refused("does not exist")),
    "average of one checkpoint": (["average", "{ckpt}", "-o", "{tmp}/avg.pt"], None,
                                  Handled(exit_ok("averaged 1 checkpoint ->", files=("avg.pt",)))),
    "average without checkpoints": (["average", "-o", "{tmp}/avg.pt"], None, Refused("Missing argument")),
    "average of a workdir": (["average", "{run}", "-o", "{tmp}/avg.pt"], None,
                             Handled(exit_ok("averaged 1 checkpoint ->", files=("avg.pt",)))),
    "average of a folder without step checkpoints": (["average", "{tmp}", "-o", "{tmp}/avg.pt"], None,
                                                     Refused("{tmp} holds no step checkpoints")),
    "config show a missing file": (["config", "show", "{tmp}/nope.yaml"], None, Refused("config file not found")),
    "config show --set a bad value": (["config", "show", "{config}", "--set", "train.lr=fast"], None,
                                      Refused("(from --set train.lr=fast) `train.lr`: Input should be a valid number")),
    "an unknown command": (["translat", "{run}"], None, Refused("No such command 'translat'")),
    # --tgt-lang and --direction on a model of one direction (several: tests/test_multilingual.py)
    "translate --tgt-lang another than the model's": (["translate", "{run}", "-i", "{tmp}/text.txt", "--tgt-lang", "fr"],
                                                      None, Refused("--tgt-lang: the target language 'fr': this model translates into vs only")),
    "translate --tgt-lang the model's": (["translate", "{run}", "-i", "{tmp}/text.txt", "--tgt-lang", "vs"], None,
                                         Handled(lines_written(3))),
    "attention --tgt-lang another than the model's": (["attention", "{run}", "A dog.", "--tgt-lang", "fr",
                                                       "-o", "{tmp}/a.png"], None,
                                                      Refused("--tgt-lang: the target language 'fr': this model translates into vs only")),
    "explore --tgt-lang another than the model's": (["explore", "{run}", "A dog.", "--tgt-lang", "fr",
                                                     "-o", "{tmp}/e.html"], None,
                                                    Refused("--tgt-lang: the target language 'fr': this model translates into vs only")),
    "eval --direction without a dash": (["eval", "{config}", "--direction", "envs"], None,
                                        Refused("--direction: the direction 'envs': a source and a target language, e.g. de-en")),
    "eval --direction into another language": (["eval", "{config}", "--direction", "en-fr"], None,
                                               Refused("no test file")),
    "eval --direction with --hyp": (["eval", "--hyp", "{tmp}/hyp.txt", "--ref", "{tmp}/ref.txt", "--direction", "en-vs"],
                                    None, Refused("--direction apply to an experiment CONFIG")),
    # explore (the page itself: tests/test_explorer.py)
    "explore with a missing checkpoint": (["explore", "{tmp}/nope.pt", "A dog."], None,
                                          Refused("checkpoint not found: {tmp}/nope.pt")),
    "explore an empty sentence": (["explore", "{run}", " ", "-o", "{tmp}/e.html"], None,
                                  Refused("nothing to explain: the sentence is empty")),
    "explore --output a folder": (["explore", "{run}", "A dog.", "-o", "{tmp}"], None, Refused("is a folder")),
    "explore --output in a missing folder": (["explore", "{run}", "A dog.", "-o", "{tmp}/no/e.html"], None,
                                             Refused("--output: the output {tmp}/no/e.html: the folder {tmp}/no does not exist")),
    "explore --beam 17": (["explore", "{run}", "A dog.", "--beam", "17"], None, Refused("Invalid value for '--beam'")),
    "explore --alpha -1": (["explore", "{run}", "A dog.", "--alpha", "-1"], None, Refused("Invalid value for '--alpha'")),
    "explore --whatif empty": (["explore", "{run}", "A dog.", "--whatif", " ", "-o", "{tmp}/e.html"], None,
                               Refused("the what-if translation is empty")),
    "explore --whatif longer than the output limit": (
        ["explore", "{run}", "A dog.", "--whatif", "la " * 60, "-o", "{tmp}/e.html"], None,
        Refused("the what-if translation has")),
    "explore --beam 2 --alpha 0.3 --whatif": (
        ["explore", "{run}", "The dog sees a cat.", "--beam", "2", "--alpha", "0.3", "--whatif", "La pwele.", "-o",
         "{tmp}/e.html"], None, Handled(exit_ok("explorer -> ", files=("e.html",)))),
    # serve: every refusal comes before the server starts (tests/test_serve.py: bad requests)
    "serve a missing checkpoint": (["serve", "{tmp}/none.pt", "--port", "0"], None,
                                   Refused("checkpoint not found: {tmp}/none.pt")),
    "serve on a port another server holds": (["serve", "{run}", "--port", "{busy}"], None,
                                             Refused("cannot listen on 127.0.0.1:{busy}: Address already in use")),
    "serve --port above 65535": (["serve", "{run}", "--port", "70000"], None, Refused("Invalid value for '--port'")),
    "serve --host not of this machine": (["serve", "{run}", "--host", "192.0.2.1", "--port", "0"], None,
                                         Refused("cannot listen on 192.0.2.1:0")),
    "serve --device cuda on a CPU-only PyTorch": (["serve", "{run}", "--port", "0", "--device", "cuda"], None,
                                                  Refused("--device: device is cuda but this PyTorch")),
    "serve --precision fp16 on a CPU": (["serve", "{run}", "--port", "0", "--precision", "fp16"], None,
                                        Refused("--precision: the precision fp16 needs a GPU")),
    "serve --set a training key": (["serve", "{run}", "--set", "train.lr=1"], None,
                                   Refused("serve takes only decode.* and serve.* overrides, not 'train.lr'")),
    "serve --set serve.max_lines=0": (["serve", "{run}", "--port", "0", "--set", "serve.max_lines=0"], None,
                                      Refused("bad serve settings: serve.max_lines: Input should be greater than 0")),
    "serve --set decode.beam_size=0": (["serve", "{run}", "--port", "0", "--set", "decode.beam_size=0"], None,
                                       Refused("bad decoding settings: decode.beam_size")),
}


@pytest.fixture(scope="module")
def ct2_export(trained, tmp_path_factory) -> Path:
    from mtkit.export import export_ctranslate2

    return export_ctranslate2(trained, tmp_path_factory.mktemp("export") / "ct2")


@pytest.mark.parametrize("row", sorted(COMMANDS))
def test_command(cli, trained, ct2_export, tmp_path, row):
    argv, setup, outcome = COMMANDS[row]
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "text.gz").write_bytes(gzip.compress(TEXT.encode()))
    (tmp_path / "hyp.txt").write_text("Draka ko vet.\nLa pwele.\n")
    (tmp_path / "ref.txt").write_text("Draka ko vet.\nLa pwele ko vet.\n")
    places = {"run": trained, "config": trained.parent / "config.yaml", "ckpt": trained / "checkpoints/best.pt",
              "ct2": ct2_export, "tmp": tmp_path, "fresh": ""}
    if any("{fresh}" in a for a in argv):
        corpus = tmp_path / "corpus"
        corpus.mkdir()
        for split in ("train", "valid", "test"):
            write_split(corpus, split, *GOOD)
        places["fresh"] = write_config(tmp_path / "corpus", data={"dir": str(corpus), "src": "de", "tgt": "en"},
                                       tokenizer={"vocab_size": 60})
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    places["busy"] = busy.getsockname()[1]
    if setup == "fresh":  # the stage's output exists already: --force must redo it
        assert cli("prepare", places["fresh"])[0] == 0
    elif setup is not None:
        setup(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with busy:
        code, out, err = cli(*(a.format(**places) for a in argv))
    if isinstance(outcome, Refused):
        assert_refused(code, err, outcome.message.format(**places))
        made = [p for p in tmp_path.rglob("*") if p not in before]
        assert not made, made  # nothing half-written left behind, not even an empty workdir
    else:
        outcome.check(code, out, err, tmp_path)


# ---------------------------------------------------------------------------------------------
# Complete by construction: every command and option is given by some row.

def all_rows() -> list[list[str]]:
    """The command line of every row of the table (both files), placeholders left in."""
    rows = [["run", "CONFIG", *sum((["--set", o] for o in sets), [])] for _, sets, _ in CONFIGS.values()]
    rows += [["run", "CONFIG", *sum((["--set", o] for o in sets), [])] for _, sets, _ in CORPUS_REFUSED.values()]
    for _, sets, _ in CORPUS_HANDLED.values():
        rows += [[*stage, "CONFIG", *sum((["--set", o] for o in sets), [])] for stage in (["tokenizer", "train"],
                                                                                         ["prepare"])]
    rows += [["translate", "MODEL", *args] for args, _, _, _ in TRANSLATE.values()]
    rows += [["translate", "CHECKPOINT"] for _ in CHECKPOINTS]
    rows += [["average", "A", "B", "-o", "OUT"], ["eval", "CONFIG", "--checkpoint", "X"],  # test_checkpoint_misuse
             ["train", "CONFIG", "--resume", "--set", "x=1"]]  # test_resume_with_another_tokenizer
    rows += [[*command.split(), "CONFIG", "--set", "x=1"] for command in ("tokenizer train", "prepare", "train", "run",
                                                                          "eval") for _ in WORKDIRS]
    rows += [argv for argv, _, _ in COMMANDS.values()]
    return rows


def given_on_the_command_line(group, argv: list[str]) -> tuple[str, set[str]]:
    """(the command, the names of the parameters `argv` gives it), as click parses it."""
    command, path, args = group, [], list(argv)
    while hasattr(command, "commands"):
        if not args or args[0] not in command.commands:
            return " ".join(path + args[:1]), set()  # an unknown command: a row of its own
        path.append(args[0])
        command, args = command.commands[args[0]], args[1:]
    ctx = command.make_context(" ".join(path), args, resilient_parsing=True)
    return " ".join(path), {p.name for p in command.params
                            if getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"}


def test_every_command_and_option_has_a_row():
    from mtkit.cli import app

    group = typer.main.get_command(app)
    covered: dict[str, set[str]] = {}
    for argv in all_rows():
        command, given = given_on_the_command_line(group, argv)
        covered.setdefault(command, set()).update(given)

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])
        else:
            yield " ".join(path), cmd

    missing = [f"mtkit {path} {p.opts[0] if p.param_type_name == 'option' else p.name.upper()}"
               for path, cmd in walk(group, []) for p in cmd.params
               if p.name != "help" and p.name not in covered.get(path, set())]
    assert not missing, "no row of the bad-input table gives: " + "; ".join(missing)


# ---------------------------------------------------------------------------------------------
# The Python API: a bad argument raises MtkitError, TypeError or ValueError with a clear message,
# never an internal error from torch, pydantic, matplotlib or ctranslate2.

def api_rows(trained: Path) -> dict[str, tuple[Callable, type, str]]:
    from mtkit import api
    from mtkit.translate import Translator

    t = Translator.load(trained)
    config = trained.parent / "config.yaml"
    return {
        "load_config: overrides as one string": (lambda: api.load_config(config, "train.lr=1"), TypeError,
                                                 "a list of 'key=value' strings"),
        "load_config: a missing file": (lambda: api.load_config("nope.yaml"), api_error(), "config file not found"),
        "train_tokenizer: a config that does not validate": (
            lambda: api.train_tokenizer(api.load_config(config, ["model.heads=3"])), api_error(), "divisible"),
        "prepare: a missing config": (lambda: api.prepare("nope.yaml"), api_error(), "config file not found"),
        "train: resume with nothing to resume": (
            lambda: api.train(api.load_config(config, [f"experiment.workdir={trained.parent / 'none'}"]), resume=True),
            api_error(), "nothing to resume"),
        "evaluate: split train": (lambda: api.evaluate(config, split="train"), api_error(), "valid or test, not 'train'"),
        "evaluate: a direction without a dash": (lambda: api.evaluate(config, direction="envs"), api_error(),
                                                 "a source and a target language"),
        "evaluate: beam 0": (lambda: api.evaluate(config, beam=0), api_error(), "beam_size: Input should be greater"),
        "evaluate: a missing checkpoint": (lambda: api.evaluate(config, checkpoint="nope.pt"), api_error(),
                                           "no checkpoint nope.pt"),
        "run: a config of the wrong type": (lambda: api.run(42), TypeError, "not int"),
        "Translator.load: a missing checkpoint": (lambda: Translator.load("nope.pt"), api_error(),
                                                  "checkpoint not found"),
        "Translator.options: an unknown setting": (lambda: t.options(beam=4), api_error(),
                                                   "beam: Extra inputs are not permitted"),
        "Translator.translate: one string": (lambda: t.translate("A dog."), TypeError, "write translate([line])"),
        "Translator.translate: bytes lines": (lambda: t.translate([b"A dog."]), TypeError, "line 0 is bytes"),
        "Translator.translate: beam_size 0": (lambda: t.translate(["A dog."], beam_size=0), api_error(),
                                              "beam_size: Input should be greater than 0"),
        "Translator.translate: on_sentences not a function": (lambda: t.translate(["A dog."], on_sentences=5),
                                                              TypeError, "on_sentences: a function called with"),
        "Translator.translate_nbest: n_best above beam_size": (
            lambda: t.translate_nbest(["A dog."], beam_size=2, n_best=3), api_error(), "cannot exceed"),
        "Translator.attention: a list": (lambda: t.attention(["A dog."]), TypeError, "one sentence (str)"),
        "Translator.attention: an empty sentence": (lambda: t.attention(""), api_error(), "nothing to translate"),
        "Translator.read: text, not ids": (lambda: t.read([5, 6], "A dog."), TypeError, "lists of token ids"),
        "Translator.read: an id beyond the vocabulary": (lambda: t.read([5, 6], [10 ** 6]), ValueError,
                                                        "target id 1000000 is not in the vocabulary"),
        "Translator.tag_for: a language the model does not write": (lambda: t.tag_for("fr"), api_error(),
                                                                   "this model translates into vs only"),
        "Translator.encode: a number": (lambda: t.encode([5]), TypeError, "line 0 is int"),
        "Translator.search: settings not from options()": (lambda: t.search([[5, 6]], {"beam_size": 2}), TypeError,
                                                           "decoding settings from Translator.options"),
        "Translator.translate_ids: settings not from options()": (
            lambda: t.translate_ids([[5, 6]], None), TypeError, "decoding settings from Translator.options"),
        "Translator.texts: a sentence, not its hypotheses": (lambda: t.texts("A dog."), TypeError,
                                                            "one sentence's hypotheses (from search), not str"),
        "Translator.attention_map: a hypothesis of another kind": (lambda: t.attention_map("A dog.", [5], "x"),
                                                                   TypeError, "a Hypothesis"),
    }


def api_error():
    from mtkit.errors import MtkitError

    return MtkitError


def test_api_refuses_bad_arguments_clearly(trained):
    for name, (call, kind, message) in api_rows(trained).items():
        with pytest.raises(kind) as info:
            call()
        assert message in str(info.value), f"{name}: {info.value}"


def test_every_public_api_function_has_a_row(trained):
    from mtkit import api
    from mtkit.translate import Translator

    public = [f for f in api.__all__ if f not in ("Config",)]
    public += [f"Translator.{name}" for name, member in inspect.getmembers(Translator)
               if not name.startswith("_") and callable(member)]
    named = {row.split(":")[0] for row in api_rows(trained)}
    assert not [f for f in public if f not in named], sorted(set(public) - named)


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun) and machines this one is not: each row starts mtkit in processes of
# its own, as a user's machine would, after `setup` made the process see what that machine shows
# it, and reads what each process said (torchrun writes each one's stderr to a file of its own).

ONE_GPU = """import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.get_device_capability = lambda device=None: (7, 5)
torch.version.cuda = "12.4"
"""
NO_LOCKS = """import errno, fcntl
def flock(f, how):
    raise OSError(errno.ENOLCK, "No locks available")  # an NFS mount without its lock service
fcntl.flock = flock
"""
OWN_FOLDER = """import os
os.chdir(os.environ["RANK"])  # a workdir (relative: run) that no other process sees
"""
SPOILED = "spoiled"  # the train split's line counts differ: the first process refuses the corpus
MACHINES = {  # name: (setup, processes: 1 or 2 under torchrun, train overrides, per process: (exit code, message))
    "torchrun --nproc_per_node 2 on a machine with 1 GPU": (
        ONE_GPU, "rank 1", ["train.device=cuda"],
        {1: (2, "train.device is cuda but process 1 of this machine has no GPU of its own: it has 1")}),
    "torchrun with a workdir the processes do not share": (
        OWN_FOLDER, 2, ["experiment.workdir=run"],
        {1: (2, "process 1 sees no prepared data in run/data, which process 0 has just written")}),
    "torchrun: a mistake found by the first process": (
        SPOILED, 2, [], {0: (2, "train.de has 60 lines but"), 1: (2, "train.de has 60 lines but")}),
    "a workdir on a file system that cannot lock": (
        NO_LOCKS, 1, [], {0: (0, "train.lock cannot be locked: this file system takes no locks (No locks available)")}),
}


@pytest.mark.slow
@pytest.mark.parametrize("row", sorted(MACHINES))
def test_machine(tmp_path, row):
    import subprocess
    import sys

    setup, processes, overrides, expected = MACHINES[row]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "valid", "test"):
        write_split(corpus, split, *GOOD)
    if setup == SPOILED:
        write_split(corpus, "train", GOOD[0], GOOD[1][:-1])
    config = write_config(tmp_path, data={"dir": str(corpus), "src": "de", "tgt": "en"}, tokenizer={"vocab_size": 60},
                          model={"d_model": 16, "heads": 2, "enc_layers": 1, "dec_layers": 1, "ff_dim": 32},
                          train={"max_steps": 2, "eval_every": 2, "save_every": 2, "max_tokens": 200, "precision": "fp32"})
    (script := tmp_path / "launch.py").write_text(("" if setup == SPOILED else setup)
                                                  + 'import runpy\nrunpy.run_module("mtkit", run_name="__main__")\n')
    argv = ["train", str(config), *sum((["--set", o] for o in overrides), [])]
    for rank in ("0", "1"):
        (tmp_path / rank).mkdir()
    env = {**os.environ, "MTKIT_QUIET": "1", "OMP_NUM_THREADS": "1"}
    if processes == 2:
        torchrun = Path(sys.executable).with_name("torchrun")
        subprocess.run([torchrun, "--nproc_per_node", "2", "--log-dir", tmp_path / "logs", "--redirects", "3",
                        "--tee", "0", script, *argv], env=env, cwd=tmp_path, capture_output=True, timeout=300)
        [attempt] = (tmp_path / "logs").glob("*/attempt_0")
        said = {int(rank.name): (None, (rank / "stderr.log").read_text()) for rank in attempt.iterdir()}
    else:  # one process: alone, or torchrun's second on this machine
        world = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"} if processes == "rank 1" else {}
        done = subprocess.run([sys.executable, script, *argv], env={**env, **world}, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        said = {int(world.get("RANK", 0)): (done.returncode, done.stderr)}
    for rank, (code, message) in expected.items():
        returncode, err = said[rank]
        assert "Traceback" not in err and message in err, err
        assert sum(line.startswith("error: ") for line in err.splitlines()) == (code == 2), err
        assert returncode in (None, code), err


def test_a_disk_that_fills_during_prepare(cli, tmp_path, demo_dir, monkeypatch):
    """The disk fills as the third chunk of train pairs is written: one error line that says how
    much was written and about how much the whole needs; no prepared data is left behind to be
    taken for a finished one."""
    import errno

    from mtkit import prepare as stage
    from mtkit.data import ArrayWriter
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path, demo_dir)
    assert cli("tokenizer", "train", config)[0] == 0
    real, calls = ArrayWriter.add_flat, []

    def add_flat(self, flat, lengths):
        calls.append(1)
        if len(calls) == 5:  # source and target of chunk 1 and 2, then chunk 3's source
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, flat, lengths)

    monkeypatch.setattr(stage, "CHUNK", 2000)
    monkeypatch.setattr(ArrayWriter, "add_flat", add_flat)
    code, _, err = cli("prepare", config)
    assert_refused(code, err, f"the disk filled while prepare wrote {tmp_path / 'run/data'}: ")
    assert "MB written for 4,000 train pairs of 30,000; it needs about" in err and "free that much space" in err
    assert not (tmp_path / "run/data").exists() and not list((tmp_path / "run").glob(".data*"))
