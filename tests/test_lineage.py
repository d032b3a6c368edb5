"""Starting from a trained model (train.init, `mtkit train CONFIG --init MODEL`): a new run on other
data takes over the model's tokenizer, shape and weights, starts its optimizer, schedule and
progress fresh, can keep parts frozen, records where it started, and resumes exactly."""

import json
import shutil

import pytest
import torch

from mtkit import checkpoint
from mtkit.corpus import read_lines
from mtkit.files import sha256_file
from mtkit.tokenizer import Tokenizer
from tests.conftest import write_config

TRAIN = {"precision": "fp32", "threads": 1, "max_tokens": 600, "warmup": 5, "lr": 1e-3, "max_steps": 4,
         "log_every": 1, "eval_every": 2, "save_every": 2, "eval_sample": 20, "keep_last": 5}


@pytest.fixture
def child(demo_dir, tmp_path):
    """A config over other data (the first 2,000 demo pairs, as text files) that names no model
    shape and no tokenizer: both come from the model it starts from."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, n in (("train", 2000), ("valid", 40), ("test", 40)):
        for lang in ("en", "vs"):
            lines = list(read_lines(demo_dir / f"{split}.{lang}"))[-n:]
            (corpus / f"{split}.{lang}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return lambda **train: write_config(tmp_path, data={"dir": str(corpus), "src": "en", "tgt": "vs"},
                                        train=TRAIN | train)


def weights(path) -> dict:
    return checkpoint.load(path).model


def test_a_run_starts_from_the_model_with_its_tokenizer_and_shape(cli, trained, child):
    config = child(freeze=["embeddings", "encoder"])
    code, _, err = cli("train", config, "--init", trained)
    assert code == 0, err
    assert "taken over from" in err
    workdir = config.parent / "run"
    parent = trained / "checkpoints" / "best.pt"
    parent_state = checkpoint.load(parent)
    # the tokenizer is the parent's, and prepare encoded the new data with it
    assert Tokenizer.load(workdir / "tokenizer").fingerprint == parent_state.tokenizer_fingerprint
    info = json.loads((workdir / "tokenizer" / "tokenizer.json").read_text())
    assert info["inherited_from"] == {"path": str(parent), "fingerprint": parent_state.tokenizer_fingerprint}
    manifest = json.loads((workdir / "data" / "manifest.json").read_text())
    assert manifest["tokenizer_fingerprint"] == parent_state.tokenizer_fingerprint
    assert manifest["splits"]["train"]["pairs_in"] == 2000
    # a fresh run: its own steps, the warm-up from the start, the parent's shape
    state = checkpoint.load(workdir / "checkpoints" / "last.pt")
    assert state.step == 4 and state.progress["step"] == 4
    assert state.model_config == parent_state.model_config
    lrs = [json.loads(line)["lr"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["event"] == "train"]
    assert lrs[0] == pytest.approx(1e-3 * 1 / 5)  # step 1 of a 5-step warm-up
    assert state.init_from == {"path": str(parent), "sha256": sha256_file(parent),
                                  "step": parent_state.step, "init_from": None}
    # started from the parent's weights: the frozen parts are still exactly them, the rest moved
    before, after = weights(parent), state.model
    frozen = [k for k in after if k.startswith(("tgt_embed.", "src_embed.", "encoder.", "enc_norm."))]
    trained_parts = [k for k in after if k.startswith(("decoder.", "dec_norm."))]
    assert frozen and trained_parts
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not all(torch.equal(before[k], after[k]) for k in trained_parts)
    assert all(k in frozen + trained_parts for k in after)  # (the generator is tied to the embeddings here)


def test_the_lineage_is_shown_and_chains(cli, trained, child):
    from mtkit.serve import model_facts
    from mtkit.translate import Translator

    config = child()
    assert cli("train", config, "--init", trained)[0] == 0
    first = config.parent / "run"
    code, _, err = cli("translate", first, "-i", config.parent / "corpus" / "test.en", "-o", config.parent / "out.txt")
    assert code == 0, err
    assert f"fine-tuned from {trained / 'checkpoints' / 'best.pt'}" in err
    second = config.parent / "second.yaml"
    second.write_text(config.read_text().replace(str(first), str(config.parent / "run2")))
    assert cli("train", second, "--init", first / "checkpoints" / "last.pt")[0] == 0
    translator = Translator.load(config.parent / "run2")
    facts = model_facts(translator, translator.options())
    assert facts["init_from"]["path"] == str(first / "checkpoints" / "last.pt")
    assert facts["init_from"]["init_from"]["path"] == str(trained / "checkpoints" / "best.pt")
    assert facts["lineage"] == (f"{first / 'checkpoints' / 'last.pt'} (step 4) <- "
                                f"{trained / 'checkpoints' / 'best.pt'} (step 800)")
    # averaging a fine-tuned run's checkpoints keeps what they started from
    steps = sorted((config.parent / "run2" / "checkpoints").glob("step_*.pt"))
    assert cli("average", *steps, "-o", config.parent / "averaged.pt")[0] == 0
    assert checkpoint.load(config.parent / "averaged.pt").init_from == checkpoint.load(steps[-1]).init_from
    # the model's positions bound the new data's lengths as the config's own would
    code, _, err = cli("train", config, "--init", trained, "--set", "data.max_len=200",
                       "--set", "experiment.workdir=" + str(config.parent / "run3"))
    assert code == 2 and "data.max_len is 200 (the model holds 126 tokens and BOS and EOS)" in err


def test_a_run_from_a_model_resumes_exactly(cli, trained, child, tmp_path):
    config = child(max_steps=6)
    assert cli("train", config, "--init", trained)[0] == 0
    straight = weights(config.parent / "run" / "checkpoints" / "last.pt")
    shutil.rmtree(config.parent / "run")
    assert cli("train", config, "--init", trained, "--set", "train.max_steps=4")[0] == 0
    code, _, err = cli("train", config, "--resume")
    assert code == 2 and f"--resume --init {trained / 'checkpoints' / 'best.pt'}" in err
    from mtkit.config import load_config
    from mtkit.errors import MtkitError
    from mtkit.train import train

    with pytest.raises(MtkitError, match=r"run started from .*best.pt \(train.init\)") as caught:  # the stage says it too
        train(load_config(config), resume=True)
    assert caught.value.hint.startswith("resume it as it started: --resume --init")
    code, _, err = cli("train", config, "--resume", "--init", trained)
    assert code == 0, err
    resumed = weights(config.parent / "run" / "checkpoints" / "last.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_config_that_asks_for_another_model_is_refused(cli, trained, child, multi_run):
    config = child()
    code, _, err = cli("train", config, "--init", trained, "--set", "model.d_model=64", "--set", "tokenizer.joint=false")
    assert code == 2
    assert "this config asks for another model: model.d_model is 64 (the model's: 32); tokenizer.joint is False " \
           "(the model's: True)" in err and "remove those keys" in err
    # repeating the model's own values is fine; dropout is the new run's to choose
    code, _, err = cli("train", config, "--init", trained, "--set", "model.d_model=32", "--set", "model.dropout=0.3",
                       "--set", "train.max_steps=2")
    assert code == 0, err
    assert checkpoint.load(config.parent / "run" / "checkpoints" / "last.pt").model_config["dropout"] == 0.3
    # a model of several target languages has tags that one-target data would not get
    code, _, err = cli("train", config, "--init", multi_run[1], "--set", "experiment.workdir=" + str(config.parent / "r2"))
    assert code == 2 and "translates into sv, vs (told which by a tag); this config's data go into vs" in err
