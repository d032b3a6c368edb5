"""One model, several translation directions (data.directions): a made-up three-way corpus from
the demo one (English, Veshi, and Ihsev: Veshi written backwards), trained as one
model for en-vs and en-sv. The tag <2xx> before each source tells it which target to write, the
tokenizer keeps the tags whole, validation and eval score each direction, and translate needs
--tgt-lang."""

import json
import re
import shutil

import numpy as np
import pytest

from mtkit import checkpoint, demo, evaluate
from mtkit.config import load_config
from mtkit.corpus import read_lines
from mtkit.language import LanguageCheck
from tests.conftest import MULTI_SIZES as SIZES

pytestmark = pytest.mark.slow  # the full suite's (CI's); `pytest -m "not slow"` is the fast tier


@pytest.fixture(scope="module")
def run(multi_run):
    return multi_run


def test_the_tags_are_whole_pieces_and_each_direction_is_prepared(run):
    from mtkit.tokenizer import Tokenizer

    _, workdir = run
    tok = Tokenizer.load(workdir / "tokenizer")
    for tag in ("<2vs>", "<2sv>"):  # one piece, after SentencePiece's word-start mark
        assert tok.src.encode(f"{tag} The dog sees a cat.", out_type=str)[:2] == ["▁", tag]
    manifest = json.loads((workdir / "data" / "manifest.json").read_text())
    assert manifest["settings"]["directions"] == ["en-vs", "en-sv"]
    for split in ("valid", "test"):
        assert manifest["splits"][split]["directions"] == {"en-vs": [0, 60], "en-sv": [60, 120]}
    train = manifest["splits"]["train"]
    assert train["pairs_in"] == 2 * SIZES["train"]
    (a, b), (c, d) = train["directions"].values()  # each direction's kept pairs, one after the other
    assert a == 0 and b == c and d == train["kept"] and 0 < b < d


def test_prepare_counts_each_direction_and_finds_a_leak_where_it_is(three_way, tmp_path, capsys):
    from mtkit.config import load_config
    from mtkit.prepare import prepare
    from mtkit.train_tokenizer import train_tokenizer
    from tests.conftest import write_config

    folder = tmp_path / "corpus"
    shutil.copytree(three_way, folder)
    leak = [read_lines(folder / f"valid.{lang}") for lang in ("en", "sv")]
    leak = [list(lines)[:3] for lines in leak]  # three en-sv valid pairs put into train
    for lang, lines in zip(("en", "sv"), leak):
        with open(folder / f"train.{lang}", "a", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
    (folder / "train.vs").write_text((folder / "train.vs").read_text() + "x\n" * 3)  # keeps en-vs aligned
    cfg = load_config(write_config(tmp_path, data={"dir": str(folder), "directions": ["en-vs", "en-sv"]},
                                   tokenizer={"vocab_size": 300}))
    train_tokenizer(cfg)
    splits = prepare(cfg).manifest["splits"]
    for split, s in splits.items():
        parts = s["by_direction"]
        assert list(parts) == ["en-vs", "en-sv"]
        for key in ("pairs_in", "kept"):  # the directions add up to the split
            assert sum(p[key] for p in parts.values()) == s[key]
        for side in ("src", "tgt"):
            assert sum(p[side]["tokens"] for p in parts.values()) == s[side]["tokens"]
            assert sum(p[side]["sentences"] for p in parts.values()) == s[side]["sentences"]
    assert splits["train"]["by_direction"]["en-sv"]["pairs_in"] == SIZES["train"] + 3
    assert splits["valid"]["by_direction"]["en-sv"]["overlap_with_train"] == {"src": 3, "pair": 3}
    # train.en is both directions' source: en-vs has the three sources too, as the pairs (x) that
    # keep it aligned, and its own tag
    assert splits["valid"]["by_direction"]["en-vs"]["overlap_with_train"] == {"src": 3, "pair": 0}
    assert splits["valid"]["overlap_with_train"] == {"src": 6, "pair": 3}
    assert splits["test"]["overlap_with_train"] == {"src": 0, "pair": 0}
    table = capsys.readouterr().err
    assert re.search(r"│ +en-sv +│ +60 +│ +60 +│ +- +│.*│ +3 +│", table), table  # the leak's row


def test_corpora_each_in_its_own_folder_with_a_weight(three_way, tmp_path):
    """data.corpora: en-vs from one folder, en-sv from another whose splits are named tr/dev/tst,
    drawn three times as often as its size says."""
    from mtkit import corpus
    from mtkit.config import load_config
    from mtkit.data import TokenArray
    from mtkit.errors import MtkitError
    from mtkit.prepare import prepare
    from mtkit.serve import model_facts
    from mtkit.tokenizer import Tokenizer
    from mtkit.train import set_up
    from mtkit.translate import Translator
    from mtkit.train_tokenizer import train_tokenizer
    from tests.conftest import TINY_MODEL, write_config

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for split, name in (("train", "tr"), ("valid", "dev"), ("test", "tst")):
        for lang in ("en", "vs"):
            shutil.copy(three_way / f"{split}.{lang}", a / f"{split}.{lang}")
        shutil.copy(three_way / f"{split}.sv", a / f"{split}.sv")  # a has Ihsev too, not trained from it
        for lang in ("en", "sv"):  # b's en-sv pairs: the last 1,000 of train only
            lines = list(read_lines(three_way / f"{split}.{lang}"))[-1000:]
            (b / f"{name}.{lang}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    cfg = load_config(write_config(
        tmp_path, data={"dir": str(a), "corpora": [{"dir": str(a), "src": "en", "tgt": "vs"},
                                                   {"dir": str(b), "src": "en", "tgt": "sv", "train": "tr",
                                                    "valid": "dev", "test": "tst", "weight": 3}]},
        tokenizer={"vocab_size": 300}, model=TINY_MODEL,
        train={"precision": "fp32", "max_steps": 2, "eval_every": 2, "save_every": 2, "eval_sample": 4}))
    assert cfg.data.names == ["en-vs", "en-sv"] and cfg.data.tagged
    train_tokenizer(cfg)
    splits = prepare(cfg).manifest["splits"]
    assert splits["train"]["by_direction"]["en-sv"]["pairs_in"] == 1000
    assert splits["valid"]["by_direction"]["en-sv"]["pairs_in"] == SIZES["valid"]
    start, _ = splits["train"]["directions"]["en-sv"]
    first = Tokenizer.load(cfg.tokenizer_dir).src.decode(TokenArray(cfg.data_cache_dir, "train", "src", "uint16")[start].tolist())
    assert first == "<2sv> " + list(read_lines(b / "tr.en"))[0]
    # a direction is scored on its own corpus's files; one not trained (zero-shot) on data.dir's
    assert corpus.source_for(**cfg.data.source_args("test", "en-sv")).paths == (b / "tst.en", b / "tst.sv")
    assert corpus.source_for(**cfg.data.source_args("test", "vs-sv")).paths == (a / "test.vs", a / "test.sv")
    trainer = set_up(cfg, resume=False)
    drawn = np.concatenate(trainer.sampler.epoch_batches(0))
    sizes = {name: end - begin for name, (begin, end) in splits["train"]["directions"].items()}
    share = 3 * sizes["en-sv"] / (3 * sizes["en-sv"] + sizes["en-vs"])
    assert (drawn >= start).mean() == pytest.approx(share, abs=0.01)
    # the model it saves knows its directions and target languages, so it asks which to write
    trainer.run()
    translator = Translator.load(cfg.workdir)
    assert translator.targets == ["sv", "vs"] and translator.directions == ["en-vs", "en-sv"]
    with pytest.raises(MtkitError, match="say which target language"):
        translator.translate(["The dog sees a cat."])
    assert model_facts(translator, translator.options())["directions"] == ["en-vs", "en-sv"]


def test_validation_scores_each_direction_and_their_mean_decides(run):
    _, workdir = run
    valid = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "valid"]
    assert valid and all(set(v["bleu_by_direction"]) == set(v["examples"]) == {"en-vs", "en-sv"} for v in valid)
    assert valid[0]["examples"]["en-sv"]["source"].startswith("<2sv> ")  # as the model reads it
    for v in valid:
        assert v["bleu"] == pytest.approx(sum(v["bleu_by_direction"].values()) / 2, abs=0.01)
    assert checkpoint.load(workdir / "checkpoints" / "best.pt").progress["best_bleu"] == max(v["bleu"] for v in valid)
    for direction in ("en-vs", "en-sv"):  # mtkit run scored each on test
        assert json.loads((workdir / "eval" / f"test.{direction}.json").read_text())["sentences"] == 60


def test_the_curves_show_each_direction_s_bleu_beside_their_mean(run, cli, tmp_path):
    from mtkit.figures import bleu_lines, read_metrics

    _, workdir = run
    _, valid = read_metrics(workdir)
    lines = {label: [(e["step"], e[key]) for e in events] for label, events, key in bleu_lines(valid)}
    assert list(lines) == ["mean of directions", "en-sv", "en-vs"]
    assert lines["mean of directions"] == [(v["step"], v["bleu"]) for v in valid]
    for direction in ("en-sv", "en-vs"):
        assert lines[direction] == [(v["step"], v["bleu_by_direction"][direction]) for v in valid]
    code, _, err = cli("plot", workdir, "-o", tmp_path / "curves.png")
    assert code == 0, err
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(workdir / "tensorboard"))
    board.Reload()
    for direction in ("en-sv", "en-vs"):
        shown = [(s.step, round(s.value, 2)) for s in board.Scalars(f"valid/bleu/{direction}")]
        assert shown == lines[direction]


def test_translate_needs_a_target_language_and_follows_it(run, three_way, cli, tmp_path):
    from mtkit.translate import Translator

    _, workdir = run
    code, _, err = cli("translate", workdir, "-i", three_way / "test.en")
    assert code == 2 and "--tgt-lang: this model translates into sv, vs: say which target language" in err
    code, _, err = cli("translate", workdir, "-i", three_way / "test.en", "--tgt-lang", "fr")
    assert code == 2 and "--tgt-lang: the target language 'fr' is not one this model translates into (sv, vs)" in err
    outputs = {}
    for lang in ("vs", "sv"):
        code, out, err = cli("translate", workdir, "-i", three_way / "test.en", "--tgt-lang", lang)
        assert code == 0, err
        outputs[lang] = out.splitlines()
        assert outputs[lang] == Translator.load(workdir).translate(list(read_lines(three_way / "test.en")), lang)
    # the tag decides: each output is in its own language (the language check, learned from train)
    assert sum(a != b for a, b in zip(outputs["vs"], outputs["sv"])) > 50
    check = LanguageCheck({lang: read_lines(three_way / f"train.{lang}") for lang in ("en", "vs", "sv")})
    shares = {lang: check.report(outputs[lang], lang)["share"] for lang in outputs}
    assert min(shares.values()) > 0.9, shares


def test_eval_scores_one_direction_or_each(run, cli):
    config, workdir = run
    code, out, err = cli("eval", config, "--direction", "en-sv", "--json")
    assert code == 0, err
    assert json.loads(out)["sentences"] == 60
    code, out, err = cli("eval", config, "--json")
    assert code == 0, err
    assert set(json.loads(out)) == {"test.en-vs", "test.en-sv"}
    code, out, err = cli("eval", config, "--direction", "en-fr")
    assert code == 2 and "no test file" in err
    # zero-shot: a direction never trained (Veshi into Ihsev), into a target the model knows
    code, out, err = cli("eval", config, "--direction", "vs-sv", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["sentences"] == 60 and (run[1] / "eval" / "test.vs-sv.hyp").is_file()
    # the language check says which languages the zero-shot outputs are in, from the three's train text
    language = result["language"]
    assert language["expected"] == "sv" and language["from"] == "2,000 train lines each of en, sv, vs"
    hyps = (run[1] / "eval" / "test.vs-sv.hyp").read_text().splitlines()
    assert language["counts"] == LanguageCheck(evaluate.training_text(load_config(config), 2000)).report(hyps, "sv")["counts"]


def test_the_server_takes_target_lang_and_asks_for_it(run, three_way):
    pytest.importorskip("fastapi")
    from mtkit.translate import Translator
    from tests.helpers import Server

    _, workdir = run
    lines = list(read_lines(three_way / "test.en"))[:5]
    s = Server(workdir)
    try:
        assert s.request("/v1/model")[1]["target_languages"] == ["sv", "vs"]
        code, answer = s.translate(lines, target_lang="sv")
        assert code == 200 and answer["translations"] == Translator.load(workdir).translate(lines, "sv")
        code, answer = s.translate(lines)
        assert code == 422 and answer["detail"][0]["loc"] == ["body", "target_lang"]
        assert "say which" in answer["detail"][0]["msg"]
        code, answer = s.request("/v1/explain", {"text": lines[0], "target_lang": "vs", "beam_size": 2})
        assert code == 200 and answer["source"]["pieces"][:2] == ["▁", "<2vs>"]
        assert answer["beam"]["translation"] == Translator.load(workdir).translate(lines[:1], "vs", beam_size=2)[0]
        code, answer = s.request("/v1/explain", {"text": lines[0], "target_lang": "fr"})
        assert code == 422 and answer["detail"][0]["loc"] == ["body", "target_lang"]
    finally:
        assert s.stop() == 0


def test_the_multilingual_demo_config_runs_its_zero_shot_recipe_end_to_end(demo_dir, tmp_path, cli):
    """configs/demo_multi.yaml as shipped, cut to a few steps and 40 sentences a split: en<->vs and
    en<->sv trained beside vs-vs and sv-sv from noisy copies (data.denoise; train only, never
    validated or scored), and from step 5 on (the warmup cut to 4) beside vs-sv and sv-vs pairs the
    model makes itself (data.backtranslate), then zero-shot vs->sv scored with the language check."""
    from pathlib import Path

    from mtkit.translate import Translator

    config = Path(__file__).resolve().parents[1] / "configs" / "demo_multi.yaml"
    settings = ["--set", f"data.dir={demo_dir}", "--set", f"experiment.workdir={tmp_path / 'run'}",
                *(x for s in ("data.valid=valid[0:40]", "data.test=test[0:40]", "tokenizer.vocab_size=500",
                              "train.max_steps=8", "train.warmup=4", "train.eval_every=8", "train.save_every=8", "train.eval_sample=40",
                              "decode.beam_size=2", "decode.max_len_a=0.5") for x in ("--set", s))]
    code, _, err = cli("run", config, *settings)
    assert code == 0, err
    workdir = tmp_path / "run"
    assert sorted(p.name for p in (workdir / "eval").glob("test.*.json")) == [
        f"test.{d}.json" for d in sorted(["en-vs", "vs-en", "en-sv", "sv-en"])]
    manifest = json.loads((workdir / "data" / "manifest.json").read_text())
    train = manifest["splits"]["train"]["by_direction"]
    assert list(train) == ["en-vs", "vs-en", "en-sv", "sv-en", "vs-vs", "sv-sv"]
    assert list(manifest["splits"]["valid"]["by_direction"]) == ["en-vs", "vs-en", "en-sv", "sv-en"]
    assert train["vs-vs"]["kept"] > 0.9 * demo.SIZES["train"]  # (the rest: duplicates, as in vs-en)
    assert Translator.load(workdir).targets == ["en", "sv", "vs"]
    code, out, err = cli("eval", config, *settings, "--direction", "vs-sv", "--json")
    assert code == 0, err
    language = json.loads(out)["language"]
    assert language["expected"] == "sv" and language["lines"] == 40 and sum(language["counts"].values()) == 40
    assert language["from"] == "2,000 train lines each of en, sv, vs"
