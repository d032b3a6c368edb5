"""Online back-translation (data.backtranslate, mtkit/backtranslation.py): a direction without pairs
learned from the model's own translations while it trains. The synthetic pairs are checked against
what `mtkit translate` writes with the same model, and a run that uses them resumes exactly."""

import numpy as np
import pytest
import torch

from mtkit import checkpoint
from mtkit.backtranslation import BackTranslation
from mtkit.data import TokenArray
from mtkit.files import read_json
from mtkit.translate import Translator
from tests.conftest import TINY_MODEL, write_config
from tests.helpers import losses

pytestmark = pytest.mark.slow  # the full suite's (CI's); `pytest -m "not slow"` is the fast tier


def test_a_real_target_gets_the_model_s_own_translation_as_its_source(multi_run):
    """The model of multi_run translates en-vs and en-sv. Asked for vs-sv, each Ihsev target of a
    batch is translated into Veshi by the model (as `mtkit translate --tgt-lang vs --beam 1` would),
    and that Veshi, tagged <2sv>, becomes the source of the very same Ihsev target; the Veshi
    targets of the batch get none (no direction into vs was asked for)."""
    _, workdir = multi_run
    translator = Translator.load(workdir, precision="fp32")
    tok, model = translator.tokenizer, translator.model
    manifest = read_json(workdir / "data" / "manifest.json")
    ranges = manifest["splits"]["train"]["directions"]
    tgt = TokenArray(workdir / "data", "train", "tgt", manifest["dtype"])
    bt = BackTranslation([("vs", "sv")], ranges, tok, tgt, lambda b: b, start=2, max_len_a=1.5, max_len_b=10)
    (a, b), (c, d) = ranges["en-vs"], ranges["en-sv"]
    indices = np.concatenate([np.arange(a, a + 5), np.arange(c, c + 7)])

    targets = tok.decode_tgt([tgt[i].tolist() for i in range(c, c + 7)])
    asked = translator.translate(targets, "vs", beam_size=1, max_len_a=1.5, max_len_b=10)
    model.train()  # as the trainer holds it
    batches = bt(model, [indices, np.arange(a, a + 5)], step=3, precision="fp32")
    assert len(batches) == 1  # the second batch is all Veshi targets: nothing to back-translate
    batch = batches[0]
    assert model.training  # it translated in eval mode (no dropout) and was put back
    assert batch.src.size(0) == 7 and batch.n_tgt_tokens == sum(len(tgt[i]) + 1 for i in range(c, c + 7))
    prefix = tok.encode_src(["<2sv>"])[0]
    for row, out, reference, i in zip(batch.src.tolist(), batch.tgt_out.tolist(), asked, range(c, c + 7)):
        row = row[:row.index(tok.eos_id)]
        assert row[:len(prefix)] == prefix
        assert tok.decode_tgt([row[len(prefix):]])[0] == reference
        assert out[:out.index(tok.eos_id)] == tgt[i].tolist()  # the target stays the real sentence
    again = bt(model, [indices], step=3, precision="fp32")[0]
    assert torch.equal(again.src, batch.src)
    assert bt(model, [np.arange(a, a + 5)], step=4, precision="fp32") == []
    assert bt(model, [indices], step=2, precision="fp32") == []  # not before its start (the warmup's end)
    # data.denoise's sv-sv holds the Ihsev lines of en-sv once more: only the translation directions count.
    denoising = BackTranslation([("vs", "sv")], {"en-sv": [0, 5], "sv-sv": [5, 10]}, tok, tgt, lambda b: b,
                                max_len_a=1.5, max_len_b=10)
    assert denoising.target_languages(np.array([0, 4, 5, 9, 12])) == ["sv", "sv", None, None, "sv"]


def test_a_run_that_back_translates_resumes_exactly(three_way, tmp_path, cli):
    """12 steps in one go, and 6 + 6 resumed, with vs-sv and sv-vs back-translated at every step:
    the same losses, the same weights (the translations use no random numbers and leave the
    dropout masks' seeds alone)."""
    def config(name):
        (tmp_path / name).mkdir()
        return write_config(tmp_path / name, data={"dir": str(three_way), "directions": ["en-vs", "en-sv"],
                                                   "backtranslate": ["vs-sv", "sv-vs"]},
                            tokenizer={"vocab_size": 300}, model=TINY_MODEL,
                            train={"precision": "fp32", "threads": 1, "max_tokens": 600, "warmup": 5, "max_steps": 12,
                                   "log_every": 2, "eval_every": 6, "save_every": 6, "eval_sample": 20},
                            decode={"max_len_a": 1.0, "max_len_b": 3})

    whole, halves = config("a"), config("b")
    for args in ([whole], [halves, "--set", "train.max_steps=6"], [halves, "--resume"]):
        code, _, err = cli("train", *args)
        assert code == 0, err
        assert "vs-sv, sv-vs also back-translated after step 5" in err  # said when training starts
    a = checkpoint.load(tmp_path / "a/run/checkpoints/last.pt")
    b = checkpoint.load(tmp_path / "b/run/checkpoints/last.pt")
    assert a.step == b.step == 12
    for name, tensor in a.model.items():
        assert torch.equal(tensor, b.model[name]), name
    assert losses(tmp_path / "a/run") == losses(tmp_path / "b/run") and len(losses(tmp_path / "a/run")) == 6
