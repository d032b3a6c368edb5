"""`mtkit eval`: the same numbers as the sacrebleu command line; honest errors."""

import json
import subprocess
import sys
from pathlib import Path


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


def test_eval_config_translates_the_split_against_raw_references(trained, cli):
    config = trained.parent / "config.yaml"
    code, out, err = cli("eval", config, "--split", "valid", "--beam", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"bleu", "chrf", "ter", "sentences"} and result["sentences"] == 1000
    saved = json.loads((trained / "eval" / "valid.json").read_text())
    assert saved["beam_size"] == 2 and saved["bleu"] == result["bleu"]
    assert len((trained / "eval" / "valid.hyp").read_text().splitlines()) == 1000
    code, _, err = cli("eval", config, "--split", "valid", "--beam", "2")
    assert code == 0 and "eval: up to date" in err
