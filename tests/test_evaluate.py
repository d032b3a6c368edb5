"""`mtkit eval`: the same numbers as the sacrebleu command line; honest errors."""

import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml


SACREBLEU = Path(sys.executable).with_name("sacrebleu")
HYP = ["The cat sat on the mat.", "A dog runs in the park.", "", "Two men are talking near a red car."]
REF = ["The cat is on the mat.", "A dog is running in a park.", "Nothing here.", "Two men talk next to a red car."]
REF2 = ["A cat sits on the mat.", "The dog runs through the park.", "Empty.", "Two men are talking by a red car."]


def test_eval_files_agree_with_the_sacrebleu_command_line(tmp_path, cli):
    for name, lines in (("hyp", HYP), ("ref", REF), ("ref2", REF2)):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    code, out, err = cli("eval", "--hyp", tmp_path / "hyp", "--ref", tmp_path / "ref", "--ref", tmp_path / "ref2",
                         "--json")
    assert code == 0, err
    ours = json.loads(out)
    theirs = json.loads(subprocess.run(
        [str(SACREBLEU), str(tmp_path / "ref"), str(tmp_path / "ref2"), "-i", str(tmp_path / "hyp"),
         "-m", "bleu", "chrf", "ter", "-f", "json"], capture_output=True, text=True, check=True).stdout)
    assert [m["name"] for m in theirs] == ["BLEU", "chrF2", "TER"]
    for key, metric in zip(("bleu", "chrf", "ter"), theirs):
        assert round(ours[key]["score"], 1) == metric["score"]  # the CLI prints one decimal
        assert ours[key]["signature"] == metric["signature"]
    assert ours["bleu"]["signature"].startswith("nrefs:2|")
    code, _, err = cli("eval", "--hyp", tmp_path / "hyp", "--ref", tmp_path / "ref")
    assert code == 0 and "BLEU" in err and "chrF" in err and "TER" in err and "nrefs:1" in err


def test_mismatched_line_counts_name_both(tmp_path, cli):
    (tmp_path / "hyp").write_text("a\nb\nc\n")
    (tmp_path / "ref").write_text("a\nb\n")
    code, _, err = cli("eval", "--hyp", tmp_path / "hyp", "--ref", tmp_path / "ref")
    assert code == 2 and "has 3 lines" in err and "has 2" in err
    code, _, err = cli("eval", "--hyp", tmp_path / "hyp")
    assert code == 2 and "--ref" in err
    code, _, err = cli("eval")
    assert code == 2 and "CONFIG" in err


def test_invalid_utf8_in_scored_files_gets_the_hint_that_applies_to_them(tmp_path, cli, corpus_with_bad_byte):
    """data.encoding_errors can mend a corpus, not a file of translations given to --hyp."""
    (tmp_path / "hyp").write_bytes(b"caf\xe9\n")
    (tmp_path / "ref").write_text("cafe\n")
    code, _, err = cli("eval", "--hyp", tmp_path / "hyp", "--ref", tmp_path / "ref")
    assert code == 2 and "hyp:1: invalid UTF-8" in err and "iconv" in err and "encoding_errors" not in err, err
    code, _, err = cli("prepare", corpus_with_bad_byte)
    assert code == 2 and "invalid UTF-8" in err and "data.encoding_errors=replace" in err, err


@pytest.fixture
def corpus_with_bad_byte(tmp_path) -> Path:
    from tests.conftest import write_config

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.de").write_bytes(b"ein satz\ncaf\xe9\n")
        (corpus / f"{split}.en").write_text("a sentence\ncafe\n")
    return write_config(tmp_path, data={"dir": str(corpus), "src": "de", "tgt": "en"}, tokenizer={"vocab_size": 20})


def test_eval_config_translates_the_split_against_raw_references(trained, cli):
    config = trained.parent / "config.yaml"
    code, out, err = cli("eval", config, "--split", "valid", "--beam", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"bleu", "chrf", "ter", "sentences", "language"} and result["sentences"] == 1000
    # the language check, learned from the train split's English and Veshi: the model writes Veshi
    language = result["language"]
    assert language["expected"] == "vs" and language["lines"] == 1000 and language["share"] > 0.99, language
    assert language["from"] == "2,000 train lines each of en, vs" and sum(language["counts"].values()) == 1000
    saved = json.loads((trained / "eval" / "valid.json").read_text())
    assert saved["beam_size"] == 2 and saved["bleu"] == result["bleu"]
    assert len((trained / "eval" / "valid.hyp").read_text().splitlines()) == 1000
    code, _, err = cli("eval", config, "--split", "valid", "--beam", "2")
    assert code == 0 and "eval: up to date" in err


@pytest.mark.slow
def test_eval_config_scores_the_checkpoint_named_by_eval_checkpoint(trained, cli, tmp_path):
    """eval.checkpoint picks best.pt or averaged.pt in the workdir; a missing one is named."""
    import shutil

    settings = yaml.safe_load((trained.parent / "config.yaml").read_text())
    settings["experiment"]["workdir"] = str(tmp_path / "run")
    settings["train"].update(keep_last=2, average_last=2)
    settings["eval"] = {"checkpoint": "averaged", "split": "valid"}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(trained / "checkpoints" / "best.pt", tmp_path / "run" / "checkpoints" / "best.pt")

    code, _, err = cli("eval", config, "--beam", "1")
    assert code == 2 and "averaged.pt" in err and "eval.checkpoint: averaged" in err
    shutil.copy(trained / "checkpoints" / "best.pt", tmp_path / "run" / "checkpoints" / "averaged.pt")
    code, _, err = cli("eval", config, "--beam", "1")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "eval" / "valid.json").read_text())["checkpoint"].endswith("averaged.pt")
    code, _, err = cli("eval", config, "--beam", "1", "--set", "eval.checkpoint=best")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "eval" / "valid.json").read_text())["checkpoint"].endswith("best.pt")


def _systems(tmp_path: Path) -> list[Path]:
    """A reference and two systems of 150 lines, the second closer to it than the first."""
    import random

    rng = random.Random(0)
    words = "a the dog cat runs sees big small red house river man woman".split()
    ref = [" ".join(rng.choices(words, k=rng.randint(4, 12))) for _ in range(150)]

    def noisy(line: str, p: float) -> str:
        return " ".join(w if rng.random() > p else rng.choice(words) for w in line.split())

    paths = []
    for name, lines in (("ref", ref), ("a", [noisy(r, 0.4) for r in ref]), ("b", [noisy(r, 0.3) for r in ref])):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        paths.append(tmp_path / name)
    return paths


def test_bootstrap_agrees_with_the_sacrebleu_command_line(tmp_path, cli):
    import re

    ref, a, b = _systems(tmp_path)
    code, out, err = cli("eval", "--hyp", a, "--hyp", b, "--ref", ref, "--bootstrap", "300", "--json")
    assert code == 0, err
    ours = json.loads(out)
    theirs = subprocess.run([str(SACREBLEU), str(ref), "-i", str(a), str(b), "-m", "bleu", "chrf", "ter",
                             "--paired-bs", "--paired-bs-n", "300", "-f", "text"], capture_output=True, text=True,
                            check=True).stdout
    # The CLI's table: "score (mean ± ci)" per system and metric, one decimal; then p-values.
    cells = [tuple(map(float, c)) for c in re.findall(r"(\d+\.\d) \((\d+\.\d) ± (\d+\.\d)\)", theirs)]
    p_values = [float(p) for p in re.findall(r"p = (\d\.\d{4})", theirs)]
    assert len(cells) == 6 and len(p_values) == 3
    mine = [(s[m]["score"], s[m]["mean"], s[m]["ci"]) for s in ours["systems"] for m in ("bleu", "chrf", "ter")]
    assert [tuple(round(x, 1) for x in c) for c in mine] == cells
    assert [round(ours["systems"][1][m]["p_value"], 4) for m in ("bleu", "chrf", "ter")] == p_values
    assert ours["systems"][0]["bleu"]["p_value"] is None
    assert ours["systems"][1]["bleu"]["score"] > ours["systems"][0]["bleu"]["score"] + 5  # b is the better one
    signatures = re.findall(r"^ - (?:BLEU|chrF2|TER) +(\S+)$", theirs, re.MULTILINE)
    assert signatures == [ours["signatures"][m] for m in ("bleu", "chrf", "ter")] and "bs:300" in signatures[0]
    code, _, err = cli("eval", "--hyp", a, "--hyp", b, "--ref", ref, "--bootstrap", "100")
    assert code == 0 and "baseline:" in err and "p = " in err


def test_bootstrap_mistakes_are_one_clear_message(tmp_path, cli, trained):
    ref, a, b = _systems(tmp_path)
    code, _, err = cli("eval", "--hyp", a, "--hyp", b, "--ref", ref)
    assert code == 2 and "--bootstrap" in err
    (tmp_path / "short").write_text("one line\n")
    code, _, err = cli("eval", "--hyp", a, "--hyp", tmp_path / "short", "--ref", ref, "--bootstrap", "10")
    assert code == 2 and "short has 1 lines" in err
    code, _, err = cli("eval", trained.parent / "config.yaml", "--bootstrap", "10")
    assert code == 2 and "--hyp" in err and "Traceback" not in err


# BLEU's tokenizer follows the target language, as sacreBLEU's own command line chooses it.

ZH_REF = ["一只黑猫坐在红色的垫子上。", "两个男人在公园里跑步。", "女孩在河边读书。"]
ZH_HYP = ["一只黑猫坐在红色垫子上。", "两个男人在公园跑步。", "女孩在河边看书。"]  # close, not equal


def test_bleu_tokenizer_follows_the_target_language_unless_set():
    from mtkit.metrics import bleu_tokenizer

    assert [bleu_tokenizer("auto", lang) for lang in ("zh", "zh-Hans", "ZH_tw", "cmn", "ja", "jpn", "ko", "en",
                                                      "de", "vs")] == \
        ["zh", "zh", "zh", "zh", "ja-mecab", "ja-mecab", "ko-mecab", "13a", "13a", "13a"]
    assert bleu_tokenizer("char", "zh") == "char" and bleu_tokenizer("13a", "zh") == "13a"


def test_chinese_is_scored_by_character_not_as_one_word_a_line():
    from sacrebleu.metrics import BLEU

    from mtkit.metrics import score

    zh = score(ZH_HYP, [ZH_REF], ("bleu", "ter"), tokenize="zh")
    plain = score(ZH_HYP, [ZH_REF], ("bleu", "ter"))
    assert zh["bleu"]["score"] == BLEU(tokenize="zh").corpus_score(ZH_HYP, [ZH_REF]).score > 50
    assert plain["bleu"]["score"] == 0.0  # 13a: each sentence one word, and none equal
    assert "tok:zh" in zh["bleu"]["signature"] and "asian:yes" in zh["ter"]["signature"]


def zh_corpus(demo_dir: Path, folder: Path) -> Path:
    """English -> a written-without-spaces target: each Veshi word of the demo corpus becomes one
    of 200 CJK characters, "." the ideographic full stop."""
    for split, n in (("train", 2000), ("valid", 60), ("test", 60)):
        english = (demo_dir / f"{split}.en").read_text(encoding="utf-8").splitlines()[:n]
        veshi = (demo_dir / f"{split}.vs").read_text(encoding="utf-8").splitlines()[:n]
        zh = ["".join(chr(0x4E00 + zlib.crc32(w.encode()) % 200) for w in line.rstrip(".").split()) + "。"
              for line in veshi]
        (folder / f"{split}.en").write_text("\n".join(english) + "\n", encoding="utf-8")
        (folder / f"{split}.zh").write_text("\n".join(zh) + "\n", encoding="utf-8")
    return folder


@pytest.mark.slow
def test_an_experiment_into_chinese_validates_and_evaluates_with_the_zh_tokenizer(tmp_path, demo_dir, cli):
    from sacrebleu.metrics import BLEU

    from tests.conftest import TINY_MODEL, write_config

    corpus = zh_corpus(demo_dir, (tmp_path / "corpus").mkdir() or tmp_path / "corpus")
    config = write_config(tmp_path, data={"dir": str(corpus), "src": "en", "tgt": "zh"},
                          tokenizer={"vocab_size": 400}, model=TINY_MODEL, decode={"beam_size": 2},
                          train={"precision": "fp32", "threads": 1, "max_tokens": 1500, "lr": 5e-3, "warmup": 10,
                                 "max_steps": 150, "eval_every": 75, "save_every": 75, "log_every": 25})
    code, _, err = cli("run", config)
    assert code == 0, err
    valid = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
             if '"valid"' in line]
    assert valid and all("tok:zh" in v["signature"] for v in valid)
    result = json.loads((tmp_path / "run/eval/test.json").read_text())
    assert "tok:zh" in result["bleu"]["signature"] and "asian:yes" in result["ter"]["signature"]
    hyps = (tmp_path / "run/eval/test.hyp").read_text(encoding="utf-8").splitlines()
    refs = (corpus / "test.zh").read_text(encoding="utf-8").splitlines()
    assert result["bleu"]["score"] == BLEU(tokenize="zh").corpus_score(hyps, [refs]).score > 0
    assert BLEU().corpus_score(hyps, [refs]).score < result["bleu"]["score"]  # what 13a would have said
    # eval.tokenize overrides the choice, and is a new result, not the cached one.
    code, out, err = cli("eval", config, "--tokenize", "char", "--json")
    assert code == 0, err
    assert "tok:char" in json.loads(out)["bleu"]["signature"] and "eval: up to date" not in err


def test_a_japanese_target_without_mecab_is_refused_before_training(tmp_path, demo_dir, cli):
    pytest.importorskip("sacrebleu")
    try:
        import MeCab  # noqa: F401
        pytest.skip("MeCab is installed here")
    except ImportError:
        pass
    from tests.conftest import TINY_MODEL, write_config

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.en").write_text("a dog\nthe cat\n" * 20)
        (corpus / f"{split}.ja").write_text("犬\n猫\n" * 20)
    config = write_config(tmp_path, data={"dir": str(corpus), "src": "en", "tgt": "ja"}, tokenizer={"vocab_size": 30},
                          model=TINY_MODEL, train={"max_steps": 5})
    code, _, err = cli("train", config)
    assert code == 2 and "needs MeCab" in err and "sacrebleu[ja]" in err and "eval.tokenize" in err, err
    assert "Traceback" not in err and not (tmp_path / "run/tokenizer").exists()  # before any work
    code, _, err = cli("train", config, "--set", "eval.tokenize=char")  # the way out the message names
    assert code == 0, err


def test_a_signature_too_long_for_the_terminal_is_folded_not_cut():
    """On 80 columns the TER signature ended in 'vers…': a results table folds a long value instead."""
    from rich.console import Console

    from mtkit.console import table

    signature = "nrefs:1|case:lc|tok:tercom|norm:no|punct:yes|asian:no|version:2.6.0"
    t = table("test: 1,000 sentences", ["metric", "score", "sacreBLEU signature"])
    t.add_row("TER", "4.93", signature)
    screen = Console(width=80, record=True, color_system=None)
    screen.print(t)
    shown = screen.export_text()
    assert "…" not in shown
    assert signature in "".join(line.split("│")[3].strip() for line in shown.splitlines() if line.count("│") == 4)
