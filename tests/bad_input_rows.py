"""The rows of the bad-input table (tests/test_bad_input.py runs them through the command line;
tests/test_bad_input_commands.py runs some again through other commands): configs, corpora, text
to translate, checkpoints and workdirs, each with its verdict (tests/helpers.py: Refused, Handled).
"""

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch

from mtkit import checkpoint
from mtkit.corpus import normalize
from mtkit.data import TokenArray
from mtkit.files import read_json
from mtkit.tokenizer import Tokenizer, train_model
from tests.conftest import write_config
from tests.helpers import Handled, Refused, unwritable_dir

MTKIT = Path(sys.executable).with_name("mtkit")


# ---------------------------------------------------------------------------------------------
# Configs: `mtkit run CONFIG` must stop at the config, before any work.

DATA = "data:\n  src: de\n  tgt: en\n"
CONFIGS = {  # name: (config text, --set overrides, outcome)
    "train.device mps without an Apple GPU": (DATA, ["train.device=mps"],
                                              Refused("train.device is mps but PyTorch sees no Apple GPU")),
    "train.device cuda without one": (DATA, ["train.device=cuda"], Refused("train.device is cuda but")),
    "train.device unknown": (DATA, ["train.device=tpu"], Refused("`train.device`: Input should be 'auto', 'cpu'")),
    "unknown key": (DATA + "train:\n  warmpu: 10\n", [],
                    Refused("line 5: unknown key `train.warmpu`: did you mean `train.warmup`?")),
    "unknown key in --set": (DATA, ["train.warmpu=10"],
                             Refused("(from --set train.warmpu=10) unknown key `train.warmpu`")),
    "unknown section": (DATA + "modle:\n  d_model: 8\n", [], Refused("line 4: unknown key `modle`: did you mean `model`?")),
    "a key in the wrong section": (DATA + "train:\n  dropout: 0.1\n", [], Refused("did you mean `model.dropout`?")),
    "wrong type": (DATA + "train:\n  lr: fast\n", [], Refused("line 5: `train.lr`: Input should be a valid number")),
    "wrong type in --set": (DATA, ["train.max_steps=many"], Refused("`train.max_steps`: Input should be a valid integer")),
    "a list for a number": (DATA + "train:\n  lr: [1, 2]\n", [], Refused("`train.lr`: Input should be a valid number")),
    "a value for a section": (DATA + "train: 5\n", [], Refused("line 4: `train` must be a section")),
    "negative size": (DATA + "train:\n  max_tokens: -5\n", [], Refused("`train.max_tokens`: Input should be greater than 0")),
    "zero d_model": (DATA + "model:\n  d_model: 0\n", [], Refused("`model.d_model`: Input should be greater than 0")),
    "zero heads": (DATA + "model:\n  heads: 0\n", [], Refused("`model.heads`: Input should be greater than 0")),
    "zero layers": (DATA + "model:\n  enc_layers: 0\n", [], Refused("`model.enc_layers`: Input should be greater than 0")),
    "zero beam": (DATA + "decode:\n  beam_size: 0\n", [], Refused("`decode.beam_size`: Input should be greater than 0")),
    "train.fast neither true nor false": (DATA, ["train.fast=maybe"], Refused("`train.fast`: Input should be a valid boolean")),
    "negative R-Drop weight": (DATA + "train:\n  rdrop: -1\n", [], Refused("`train.rdrop`: Input should be greater than or equal to 0")),
    "no residual in a layer the encoder lacks": (DATA, ["model.no_residual_layer=4"],
                                                 Refused("model.no_residual_layer 4 of 3 encoder layers: one of 1-3 (the middle: 2)")),
    "no residual in layer 0": (DATA, ["model.no_residual_layer=0"],
                               Refused("`model.no_residual_layer`: Input should be greater than 0")),
    "the demo corpus in a language it lacks": ("data:\n  format: demo\n  directions: [en-vs, en-de]\n", [],
                                               Refused("the demo corpus has languages en, vs and sv")),
    "corpora of the demo": ("data:\n  format: demo\n  corpora: [{dir: a, src: en, tgt: vs}]\n", [],
                            Refused("data.corpora reads {split}.{lang} files: it needs data.format: text (or demo, directions)")),
    "heads do not divide d_model": (DATA + "model:\n  heads: 3\n", [],
                                    Refused("model.d_model (256) must be divisible by model.heads (3); e.g. heads 2 or 4")),
    "n_best > beam": (DATA + "decode:\n  beam_size: 2\n  n_best: 3\n", [],
                      Refused("decode.n_best (3) cannot exceed decode.beam_size (2)")),
    "dropout of 1.5": (DATA + "model:\n  dropout: 1.5\n", [], Refused("`model.dropout`: Input should be less than 1")),
    "max_len beyond the positions": (DATA + "  max_len: 300\n", [],
                                     Refused("model.max_positions (256) must hold data.max_len (300)")),
    "Marian's name for SiLU": (DATA + "model:\n  activation: swish\n", [],
                               Refused("`model.activation`: Input should be 'relu', 'gelu' or 'silu'")),
    "sinusoidal halves of an odd width": (DATA + "model:\n  positions: sinusoidal-halves\n  d_model: 9\n  heads: 3\n",
                                          [], Refused("sinusoidal positions need an even model.d_model (got 9)")),
    "unknown choice": (DATA + "tokenizer:\n  type: wordpiece\n", [],
                       Refused("`tokenizer.type`: Input should be 'bpe' or 'unigram'")),
    "averaged without averaging": (DATA + "eval:\n  checkpoint: averaged\n", [],
                                   Refused("eval.checkpoint averaged needs train.average_last of 2 or more")),
    "same source and target": ("data:\n  src: de\n  tgt: de\n", [], Refused("data.src and data.tgt are both 'de'")),
    "no languages": ("data:\n  dir: corpus\n", [], Refused("data.src and data.tgt name the languages")),
    "directions and src/tgt": (DATA + "  directions: [de-en]\n", [], Refused("not both")),
    "directions of tsv files": ("data:\n  format: tsv\n  directions: [de-en, fr-en]\n", [],
                                Refused("data.directions reads {split}.{lang} files: it needs data.format: text")),
    "a direction twice": ("data:\n  directions: [de-en, de-en]\n", [], Refused("names a direction twice")),
    "a direction into itself": ("data:\n  directions: [de-de]\n", [], Refused("de-de translates a language into itself (see data.denoise)")),
    "a temperature without directions": (DATA + "  temperature: 5\n", [], Refused("data.temperature is for several directions")),
    "a temperature below 1": ("data:\n  directions: [de-en, fr-en]\n  temperature: 0.5\n", [],
                              Refused("`data.temperature`: Input should be greater than or equal to 1")),
    "subword sampling above 1": (DATA + "  subword_sampling: 1.5\n", [],
                                 Refused("`data.subword_sampling`: Input should be less than or equal to 1")),
    "negative subword sampling": (DATA, ["data.subword_sampling=-0.1"],
                                  Refused("`data.subword_sampling`: Input should be greater than or equal to 0")),
    "no sampled copies": (DATA + "  subword_sampling: 0.1\n  sampled_copies: 0\n", [],
                          Refused("`data.sampled_copies`: Input should be greater than 0")),
    "sampled sides without sampling": (DATA, ["data.sampled_sides=src"],
                                       Refused("data.sampled_sides: src samples nothing while data.subword_sampling is 0")),
    "sampled sides unknown": (DATA + "  subword_sampling: 0.1\n", ["data.sampled_sides=source"],
                              Refused("`data.sampled_sides`: Input should be 'both', 'src' or 'tgt'")),
    "denoise with one pair": (DATA + "  denoise: [de]\n", [],
                              Refused("data.denoise is for several directions: it needs data.directions or data.corpora")),
    "denoise a language of no direction": ("data:\n  directions: [de-en]\n  denoise: [fr]\n", [],
                                           Refused("data.denoise: fr is in none of the directions, whose files give its text")),
    "denoise a language with a dash": ("data:\n  directions: [de-en]\n  denoise: [pt-br]\n", [],
                                       Refused("`data.denoise`: String should match pattern")),
    "denoise one language, not a list": ("data:\n  directions: [de-en]\n  denoise: de\n", [],
                                         Refused("`data.denoise`: Input should be a valid tuple")),
    "denoise weight zero": ("data:\n  directions: [de-en]\n  denoise: [de]\n", ["data.denoise_weight=0"],
                            Refused("`data.denoise_weight`: Input should be greater than 0")),
    "denoise weight without denoise": ("data:\n  directions: [de-en]\n", ["data.denoise_weight=0.5"],
                                       Refused("data.denoise_weight weighs data.denoise's copies in the draw: set data.denoise too")),
    "denoise weight with one pair": (DATA, ["data.denoise_weight=0.5"],
                                     Refused("data.denoise_weight is for several directions: it needs data.directions")),
    "backtranslate with one pair": (DATA + "  backtranslate: [de-fr]\n", [],
                                    Refused("data.backtranslate is for several directions: it needs data.directions or data.corpora")),
    "backtranslate from a language no direction targets": ("data:\n  directions: [de-en, en-de]\n  backtranslate: [fr-de]\n", [],
                                                            Refused("data.backtranslate: fr-de needs two of the model's target languages (de, en)")),
    "backtranslate a language into itself": ("data:\n  directions: [de-en, en-de]\n  backtranslate: [de-de]\n", [],
                                             Refused("data.backtranslate: de-de needs two of the model's target languages")),
    "backtranslate without a dash": ("data:\n  directions: [de-en, en-de]\n  backtranslate: [deen]\n", [],
                                     Refused("`data.backtranslate`: String should match pattern")),
    "backtranslate with two vocabularies": ("data:\n  directions: [de-en, en-de]\n  backtranslate: [en-de]\ntokenizer:\n  joint: false\n", [],
                                            Refused("data.backtranslate feeds the model's outputs back in as sources: it needs tokenizer.joint: true")),
    "a direction without its dash": ("data:\n  directions: [deen]\n", [], Refused("'deen' is not a direction: write source-target")),
    "corpora and directions": ("data:\n  directions: [de-en]\n  corpora: [{dir: a, src: fr, tgt: en}]\n", [],
                               Refused("give data.directions (one folder) or data.corpora (a folder each), not both")),
    "corpora and src/tgt": (DATA + "  corpora: [{dir: a, src: fr, tgt: en}]\n", [],
                            Refused("give data.src and data.tgt (one direction) or data.corpora (several), not both")),
    "a hub dataset that cannot be reached (no network here)": (
        "data:\n  format: hf\n  hf_dataset: someone/no-such-dataset\n  streaming: true\n  src: de\n  tgt: en\n", [],
        Refused("cannot load HF dataset someone/no-such-dataset [train]")),
    "corpora of an HF dataset": ("data:\n  format: hf\n  corpora: [{dir: a, src: fr, tgt: en}]\n", [],
                                 Refused("data.corpora reads {split}.{lang} files: it needs data.format: text")),
    "two corpora of one direction": ("data:\n  corpora: [{dir: a, src: fr, tgt: en}, {dir: b, src: fr, tgt: en}]\n", [],
                                     Refused("data.corpora names a direction twice: fr-en, fr-en")),
    "a corpus into itself": ("data:\n  corpora: [{dir: a, src: fr, tgt: fr}]\n", [],
                             Refused("data.corpora: fr-fr translates a language into itself")),
    "a corpus without its folder": ("data:\n  corpora: [{src: fr, tgt: en}]\n", [], Refused("`data.corpora.dir` is required")),
    "a corpus's language with a dash": ("data:\n  corpora: [{dir: a, src: pt-br, tgt: en}]\n", [],
                                        Refused("`data.corpora.src`: String should match pattern")),
    "a corpus weight of 0": ("data:\n  corpora: [{dir: a, src: fr, tgt: en, weight: 0}]\n", [],
                             Refused("`data.corpora.weight`: Input should be greater than 0")),
    "an unknown key in a corpus": ("data:\n  corpora: [{dir: a, src: fr, tgt: en, wieght: 2}]\n", [],
                                   Refused("unknown key `data.corpora.wieght`: did you mean `data.corpora.weight`?")),
    "a corpus folder missing": ("experiment:\n  workdir: run\ndata:\n  corpora: [{dir: no/such/folder, src: fr, tgt: en}]\n", [],
                                Refused("no train file: looked for no/such/folder/train.fr")),
    "train.freeze without train.init": (DATA + "train:\n  freeze: [encoder]\n", [],
                                        Refused("train.freeze keeps parts of a trained model as they are: it needs train.init")),
    "train.freeze of every part": (DATA + "train:\n  init: model.pt\n  freeze: [encoder, decoder, embeddings]\n", [],
                                   Refused("train.freeze names every part of the model: nothing would be trained")),
    "train.freeze of an unknown part": (DATA + "train:\n  init: model.pt\n  freeze: [attention]\n", [],
                                        Refused("`train.freeze`: Input should be 'embeddings', 'encoder' or 'decoder'")),
    "an impossible part of a split": (DATA + "  train: train[7:3]\n", [],
                                      Refused("data.train: 'train[7:3]' is an empty or impossible part of a split")),
    "required key missing": ("data:\n  src: de\n", [], Refused("`data.tgt` is required (with data.src)")),
    "a key given twice": (DATA + "  src: fr\n", [], Refused("line 4: `data.src` is given twice (first on line 2)")),
    "YAML syntax error": ("data:\n  src: de\n   tgt: en\n", [], Refused("config.yaml:3: YAML syntax error")),
    "a tab in the indentation": ("data:\n\tsrc: de\n", [], Refused("config.yaml:2: YAML syntax error")),
    "top level not a mapping": ("- data\n- train\n", [], Refused("the top level must be a mapping of sections")),
    "an empty file": ("", [], Refused("`data` is required")),
    "invalid UTF-8": (b"data:\n  src: d\xe9\n  tgt: en\n", [], Refused("config.yaml:2: invalid UTF-8 (byte 0xe9)")),
    "binary garbage": (bytes(range(128, 256)) * 3, [], Refused("config.yaml:1: invalid UTF-8")),
    "malformed --set": (DATA, ["train.lr"], Refused("bad override 'train.lr'")),
    "--set below a value": (DATA, ["data.src.x=1"], Refused("is not a section")),
    "missing config file": (None, [], Refused("config file not found")),
    "a folder for a config": ("folder", [], Refused("cannot read config file")),
    "corpus folder missing": (DATA + "  dir: no/such/folder\n", [], Refused("no train file: looked for")),
    "an empty section means its defaults": (DATA + "train:\nmodel:\n", [], Handled(
        lambda cli, path: "  max_steps: 100000\n" in cli("config", "show", path)[1] or pytest.fail("no defaults"))),
}


# ---------------------------------------------------------------------------------------------
# Corpora. GOOD is a clean corpus; each row spoils a copy of it.

GOOD = [f"satz nummer {i}" for i in range(60)], [f"sentence number {i}" for i in range(60)]


def write_split(folder: Path, split: str, src_lines, tgt_lines) -> None:
    for lang, lines in (("de", src_lines), ("en", tgt_lines)):
        (folder / f"{split}.{lang}").write_bytes("".join(f"{x}\n" for x in lines).encode())


def replace_line(path: Path, number: int, raw: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = raw
    path.write_bytes(b"\n".join(lines))


def with_line(number: int, src: str, tgt: str, split: str = "train") -> Callable:
    def spoil(d: Path) -> None:
        replace_line(d / f"{split}.de", number, src.encode())
        replace_line(d / f"{split}.en", number, tgt.encode())
    return spoil


CORPUS_REFUSED = {  # name: (how to spoil GOOD, --set overrides, message)
    "mismatched line counts": (lambda d: write_split(d, "train", GOOD[0], GOOD[1][:-1]), [],
                               "train.de has 60 lines but"),
    "a missing file": (lambda d: (d / "train.en").unlink(), [], "no train file: looked for"),
    "an empty train split": (lambda d: write_split(d, "train", [], []), [], "the train split is empty"),
    "an empty valid split": (lambda d: write_split(d, "valid", [], []), [], "the valid split is empty"),
    "invalid UTF-8": (lambda d: replace_line(d / "train.de", 2, b"ok \xc3\x28"), [],
                      "train.de:2: invalid UTF-8 (byte 4 of the line is 0xc3)"),
    "binary garbage": (lambda d: (d / "train.de").write_bytes(bytes(range(256)) * 40), [],
                       "train.de:2: invalid UTF-8 (byte 118 of the line is 0x80)"),
    "a damaged gzip": (lambda d: ((d / "train.de").unlink(),
                                  (d / "train.de.gz").write_bytes(gzip.compress(b"x\n" * 60)[:20])), [],
                       "damaged gzip data"),
    "plain and .gz both present": (lambda d: (d / "train.de.gz").write_bytes(gzip.compress(b"x\n")), [],
                                   "mtkit will not guess which one to read"),
    "a streamed corpus whose row lacks one side": (lambda d: [(d / f"{split}.jsonl").write_text("".join(
        json.dumps({"translation": {"de": src} | ({} if split == "train" and i == 30 else {"en": tgt})}) + "\n"
        for i, (src, tgt) in enumerate(zip(*GOOD)))) for split in ("train", "valid", "test")],
        ["data.format=hf", "data.streaming=true", "data.train=train.jsonl", "data.valid=valid.jsonl",
         "data.test=test.jsonl"],
        "train.jsonl, row 31: column 'translation' has no field 'en', which the rows before it have"),
    "a TSV line without one tab": (lambda d: (d / "train.tsv").write_text("a\tb\nno tab\n"), ["data.format=tsv"],
                                   "train.tsv:2: expected exactly one tab"),
    "a vocabulary the corpus cannot fill": (lambda d: None, ["tokenizer.vocab_size=5000"],
                                            "cannot be reached on the train split: this corpus supports at most"),
    "every train pair filtered out": (lambda d: None, ["data.min_len=50"],
                                      "every one of the 60 train pairs was dropped (60 too_short)"),
}


def spoiled(tmp_path: Path, corpus_dir: Path, spoil: Callable) -> Path:
    """The config of GOOD spoiled by `spoil`."""
    spoil(corpus_dir)
    return write_config(tmp_path, data={"dir": str(corpus_dir), "src": "de", "tgt": "en"}, tokenizer={"vocab_size": 60})


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


CLEAN = {split: list(zip(*GOOD)) for split in ("train", "valid", "test")}
LONG = "satz " * 20_000  # 100,000 characters
MIXED = "satz 🐶 שָׁלוֹם مرحبا 你好 Ünïcödé 5", "sentence 🐱 עִבְרִית عربي 中文 5"


def crlf(d: Path) -> None:
    for f in d.iterdir():
        f.write_bytes(f.read_bytes().replace(b"\n", b"\r\n"))


def same_as_clean(manifest, decoded) -> None:
    assert decoded == CLEAN


def changed_only(split: str, number: int, pair: tuple[str, str]) -> Callable:
    def check(manifest, decoded) -> None:
        expected = {s: list(pairs) for s, pairs in CLEAN.items()}
        expected[split][number - 1] = pair
        assert decoded == expected
    return check


def dropped(reason: str, number: int) -> Callable:
    def check(manifest, decoded) -> None:
        train = manifest["splits"]["train"]
        assert train["kept"] == 59 and train["dropped"][reason] == 1  # counted, never silent
        assert decoded["train"] == CLEAN["train"][:number - 1] + CLEAN["train"][number:]
    return check


def long_valid_line_kept(manifest, decoded) -> None:
    valid = manifest["splits"]["valid"]
    assert valid["kept"] == 60 and valid["longer_than_max_len"] == 1  # kept whole, and reported
    assert decoded["valid"][4] == (LONG.strip(), LONG.strip())


def blank_valid_line_kept(manifest, decoded) -> None:
    assert manifest["splits"]["valid"]["empty_lines"] == 1
    changed_only("valid", 5, ("", ""))(manifest, decoded)


def overlap_reported(manifest, decoded) -> None:
    assert manifest["splits"]["test"]["overlap_with_train"] == {"src": 60, "pair": 60}
    assert decoded == CLEAN


CORPUS_HANDLED = {  # name: (how to spoil GOOD, --set overrides, check(manifest, decoded splits))
    "CRLF line ends": (crlf, [], same_as_clean),
    "a byte-order mark": (lambda d: [(d / f).write_bytes(b"\xef\xbb\xbf" + (d / f).read_bytes())
                                     for f in ("train.de", "valid.en")], [], same_as_clean),
    "no newline at the end": (lambda d: [f.write_bytes(f.read_bytes().rstrip(b"\n")) for f in d.iterdir()], [],
                              same_as_clean),
    "a whitespace-only train line": (with_line(5, " \t  ", "sentence number 4"), [], dropped("empty", 5)),
    "a whitespace-only valid line": (with_line(5, "   ", "\t", "valid"), [], blank_valid_line_kept),
    "a 100,000-character train line": (with_line(5, LONG, LONG), [], dropped("too_long", 5)),
    "a 100,000-character valid line": (with_line(5, LONG, LONG, "valid"), [], long_valid_line_kept),
    "a 1 MB train line": (with_line(5, "wort " * 200_000, "word " * 200_000), [], dropped("too_long", 5)),
    "control characters": (with_line(5, "satz\x00nummer\x07\x1b 4\x7f", "sentence\x85number \x01 4"), [],
                           same_as_clean),
    "line separators inside a line": (with_line(5, "satz\u2028nummer\x0b4", "sentence\rnumber\x0c4"), [],
                                      same_as_clean),
    "mixed scripts, emoji, right-to-left": (with_line(5, *MIXED), [],
                                            changed_only("train", 5, tuple(map(normalize, MIXED)))),
    "invalid UTF-8 with data.encoding_errors=replace": (
        lambda d: replace_line(d / "train.de", 5, b"satz \xff 4"), ["data.encoding_errors=replace"],
        changed_only("train", 5, ("satz \ufffd 4", "sentence number 4"))),
    "a duplicate pair": (with_line(5, "satz nummer 3", "sentence number 3"), [], dropped("duplicate", 5)),
    "test sentences also in train": (lambda d: None, [], overlap_reported),
}


def decode_splits(workdir: Path) -> tuple[dict, dict]:
    manifest = read_json(workdir / "data" / "manifest.json")
    tok = Tokenizer.load(workdir / "tokenizer")
    decoded = {}
    for split in ("train", "valid", "test"):
        sides = [TokenArray(workdir / "data", split, side, manifest["dtype"]) for side in ("src", "tgt")]
        src = tok.src.decode([a.tolist() for a in sides[0]])
        tgt = tok.tgt.decode([a.tolist() for a in sides[1]])
        decoded[split] = list(zip(src, tgt))
    return manifest, decoded


# ---------------------------------------------------------------------------------------------
# Text to translate: `mtkit translate` with the tiny demo model. stdin rows run as a process.

def translate(args: list, stdin: bytes | None = None, shell_tail: str = "") -> tuple[int, bytes, str]:
    """`mtkit translate ARGS` as a process; shell_tail: what the shell adds (`| head`, `<&-`)."""
    env = {**os.environ, "MTKIT_QUIET": "1"}
    command = " ".join(f"'{a}'" for a in [MTKIT, "translate", *args]) + shell_tail
    result = subprocess.run(command, shell=True, input=stdin, capture_output=True, timeout=300, env=env)
    return result.returncode, result.stdout, result.stderr.decode()


def lines_out(n: int, blank: tuple[int, ...] | None = ()) -> Callable:
    """n output lines; the `blank` ones (1-based) empty and every other one translated (None: the
    input is too odd for the tiny model to be sure it says something)."""
    def check(out: bytes, err: str) -> None:
        lines = out.decode("utf-8").split("\n")
        assert lines[-1] == "" and len(lines) - 1 == n, out
        if blank is not None:
            assert [i + 1 for i, line in enumerate(lines[:-1]) if not line] == list(blank), out
    return check


def both(*checks: Callable) -> Callable:
    def check(out: bytes, err: str) -> None:
        for c in checks:
            c(out, err)
    return check


def warns(text: str) -> Callable:
    def check(out: bytes, err: str) -> None:
        assert f"warning: {text}" in err, err
    return check


def first_two_equal(out: bytes, err: str) -> None:
    lines = out.split(b"\n")
    assert lines[0] == lines[1] and lines[0]


GARBAGE = bytes(range(256)) * 8 + b"\x00\x00 end"  # 8 newlines, then a last line without one
TRANSLATE = {  # name: (args after the model, stdin, what the shell adds, outcome)
    "empty input": ([], b"", "", Handled(lambda out, err: out == b"" or pytest.fail(out))),
    "only empty lines": ([], b"\n\n\n", "", Handled(lines_out(3, blank=(1, 2, 3)))),
    "blank and whitespace-only lines among text": (
        [], b"The dog sees a cat.\n\n \t \nA boy runs.\n", "", Handled(lines_out(4, blank=(2, 3)))),
    "a 100,000-character line": ([], b"A cat.\n" + b"A boy " * 16_667 + b"\nA dog.\n", "",
                                 Handled(both(lines_out(3), warns("line 2: longer than the model's")))),
    "non-UTF-8 bytes": ([], b"A cat.\ncaf\xe9 au lait\n", "",
                        Handled(both(lines_out(2), warns("line 2: invalid UTF-8 at byte 4")))),
    "binary garbage with NUL bytes": ([], GARBAGE, "", Handled(lines_out(9, blank=None))),
    "a BOM and CRLF line ends": ([], b"\xef\xbb\xbfThe dog sees a cat.\r\nThe dog sees a cat.\n", "",
                                 Handled(first_two_equal)),
    "a last line without newline": ([], b"A cat.\nA dog.", "", Handled(lines_out(2))),
    "--input /dev/stdin": (["-i", "/dev/stdin"], b"A cat.\n\nA dog.\n", "", Handled(lines_out(3, blank=(2,)))),
    "control characters, emoji, right-to-left": (
        [], "A \x00cat\x07.\nThe dog 🐶 sees שָׁלוֹם and مرحبا.\n".encode(), "", Handled(lines_out(2, blank=None))),
    "a closed output pipe (| head -n 2)": (["--greedy"], b"The dog sees a cat.\n" * 3000, " | head -n 2",
                                           Handled(both(lines_out(2), lambda out, err: "Error" not in err
                                                        or pytest.fail(err)))),
    "standard input closed": ([], None, " <&-", Refused("no input: standard input is closed")),
    "standard output on a full disk": ([], b"A cat.\n", " > /dev/full", Refused("No space left on device")),
    "--input missing": (["-i", "{tmp}/nope.txt"], b"", "", Refused("cannot read")),
    "--input a folder": (["-i", "{tmp}"], b"", "", Refused("Is a directory")),
    "--output in a missing folder": (["-o", "{tmp}/no/out.txt"], b"A cat.\n", "",
                                     Refused("/no/out.txt: the folder ")),
    "--output a folder": (["-o", "{tmp}"], b"A cat.\n", "", Refused("is a folder")),
    # Numbers held to one rule (config.Checked), whatever the door: inf cut every translation to its
    # first word; 1e308 and 1e9 were tracebacks; --set without '=' was ignored, broken YAML a traceback.
    "--alpha inf": (["--alpha", "inf"], b"A cat.\n", "", Refused("decode.alpha: Input should be a finite number")),
    "--alpha 1e308": (["--alpha", "1e308"], b"A cat.\n", "", Refused("decode.alpha: Input should be less than or equal to 10")),
    "--beam 1000000000": (["--beam", "1000000000"], b"A cat.\n", "", Refused("decode.beam_size: Input should be less than")),
    "--set decode.max_len_a=inf": (["--set", "decode.max_len_a=inf"], b"A cat.\n", "",
                                   Refused("decode.max_len_a: Input should be a finite number")),
    "--set decode.beam_size=true": (["--set", "decode.beam_size=true"], b"A cat.\n", "",
                                    Refused("decode.beam_size: a number, not true")),
    "--set with broken YAML": (["--set", "decode.beam_size=["], b"A cat.\n", "", Refused("decode.beam_size: Input should be a valid integer")),
    "--set without =": (["--set", "decode.beam_size"], b"A cat.\n", "", Refused("bad override 'decode.beam_size'")),
    "--output where nothing may be written": (["-o", "{unwritable}/out.txt"], b"A cat.\n", "",
                                              Refused("--output: cannot write the output")),
    "--nbest > --beam": (["--nbest", "4", "--beam", "2"], b"A cat.\n", "", Refused("error: bad decoding settings: decode.n_best (4) cannot exceed decode.beam_size (2)")),
    "--greedy with --beam 3": (["--greedy", "--beam", "3"], b"A cat.\n", "", Refused("contradict each other")),
    "--set for another section": (["--set", "train.lr=1"], b"A cat.\n", "", Refused("only decode.* overrides")),
    "--set a bad decoding value": (["--set", "decode.alpha=-1"], b"A cat.\n", "",
                                   Refused("bad decoding settings: decode.alpha: Input should be greater than or equal to 0")),
}


def translate_in_process(cli, monkeypatch, tmp_path: Path, args: list, stdin: bytes) -> tuple[int, bytes, str]:
    """`mtkit translate ARGS` through the same main(), without a process's start-up (torch alone
    takes seconds): standard input is a file holding `stdin`, as a redirection would make it."""
    (tmp_path / "stdin").write_bytes(stdin)
    with open(tmp_path / "stdin", encoding="utf-8") as f:
        monkeypatch.setattr("sys.stdin", f)
        code, out, err = cli("translate", *args)
    return code, out.encode("utf-8"), err


# ---------------------------------------------------------------------------------------------
# Checkpoints: every command that reads one. `make` writes the file to hand over.

def cut_in_half(trained: Path, tmp: Path) -> Path:
    data = (trained / "checkpoints/best.pt").read_bytes()
    (tmp / "cut.pt").write_bytes(data[: len(data) // 2])
    return tmp / "cut.pt"


def altered(change: Callable) -> Callable:
    def make(trained: Path, tmp: Path) -> Path:
        state = torch.load(trained / "checkpoints/best.pt", weights_only=True)
        change(state)
        torch.save(state, tmp / "altered.pt")
        return tmp / "altered.pt"
    return make


def other_tokenizer(state: dict) -> None:
    words = ["the", "dog", "cat", "a", "sees", "boy", "river", "runs", "girl", "house"]
    sentences = [" ".join(words[(i + k) % 10] for k in range(6)) for i in range(200)]
    state["tokenizer"] = [train_model(sentences, model_type="bpe", vocab_size=40, character_coverage=1.0,
                                      byte_fallback=False, threads=1)]


def zip_file(trained: Path, tmp: Path) -> Path:
    with zipfile.ZipFile(tmp / "archive.pt", "w") as z:
        z.writestr("notes/readme.txt", "not a model")
    return tmp / "archive.pt"


def written(name: str, data: bytes) -> Callable:
    def make(trained: Path, tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name
    return make


def saved(obj) -> Callable:
    def make(trained: Path, tmp: Path) -> Path:
        torch.save(obj, tmp / "saved.pt")
        return tmp / "saved.pt"
    return make


CHECKPOINTS = {  # name: (make the file, message)
    "a missing file": (lambda trained, tmp: tmp / "missing.pt", "checkpoint not found"),
    "a folder without best.pt": (lambda trained, tmp: tmp, "no best checkpoint in"),
    "an empty file": (written("empty.pt", b""), "is not a readable checkpoint"),
    "a truncated file": (cut_in_half, "is not a readable checkpoint"),
    "a text file": (written("notes.pt", b"hello\n"), "is not a readable checkpoint"),
    "a zip from another program": (zip_file, "is not a readable checkpoint"),
    "a PyTorch file from another program": (saved({"weights": torch.zeros(2)}), "is not an mtkit checkpoint"),
    "a newer format version": (saved({"format": checkpoint.FORMAT, "version": checkpoint.VERSION + 1}),
                               "has checkpoint format version 2; this mtkit reads up to 1"),
    "no model inside": (saved({"format": checkpoint.FORMAT, "version": 1}), "is an incomplete mtkit checkpoint"),
    "weights that do not fit the model config": (altered(lambda s: s["model_config"].update(d_model=64)),
                                                 "its weights do not fit its model config"),
    "an unknown model setting": (altered(lambda s: s["model_config"].update(bogus=1)),
                                 "its weights do not fit its model config"),
    "a tokenizer that does not match": (altered(other_tokenizer), "its tokenizer does not match"),
}


# ---------------------------------------------------------------------------------------------
# Workdirs: checked before any work, by every stage that writes.

WORKDIRS = {  # name: (the workdir, message)
    "a file": (lambda tmp: (tmp / "file").touch() or tmp / "file", "is a file, not a folder"),
    "inside a file": (lambda tmp: (tmp / "file").touch() or tmp / "file" / "run",
                      "cannot be created: {tmp}/file is a file, not a folder"),
    "a folder nothing may be written in": (unwritable_dir, "is not writable"),
    "inside such a folder": (lambda tmp: unwritable_dir(tmp) / "run", "is not writable"),
}
