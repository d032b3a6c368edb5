"""The Checkpoint type: what is saved is what is loaded, and a file from an older mtkit is brought
up to date in one place (checkpoint.load), so that no reader has to know its history."""

from dataclasses import asdict, fields, replace

import torch

from mtkit import checkpoint
from mtkit.model import ModelConfig, Transformer
from mtkit.translate import Translator
from tests.helpers import assert_refused

TINY = ModelConfig(src_vocab=11, tgt_vocab=11, d_model=8, heads=2, enc_layers=1, dec_layers=1, ff_dim=16,
                   dropout=0.0, attention_dropout=0.0, activation="relu", norm="pre", positions="sinusoidal",
                   max_positions=16, tie_embeddings=True)


def same(a, b) -> bool:
    """Equal, tensors bit for bit, inside dicts, lists and tuples too."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_what_is_saved_is_what_is_loaded(trained, tmp_path):
    """Every field of a training checkpoint survives a save and a load, tensors bit for bit."""
    last = checkpoint.load(trained / "checkpoints/last.pt")
    assert all(getattr(last, f.name) is not None for f in fields(last) if f.name not in ("ema", "scaler", "init_from",
                                                                                        "imported_from", "averaged_from"))
    checkpoint.save(last, tmp_path / "copy.pt")
    again = checkpoint.load(tmp_path / "copy.pt")
    assert again.path == tmp_path / "copy.pt" and last.path == trained / "checkpoints/last.pt"
    for f in fields(last):
        if f.name != "path":
            assert same(getattr(last, f.name), getattr(again, f.name)), f.name
    assert isinstance(again.tokenizer, tuple) and again.make_tokenizer().fingerprint == last.tokenizer_fingerprint


def test_a_checkpoint_from_an_older_mtkit_is_brought_up_to_date_on_loading(tmp_path):
    """Written before models had a logits bias, before the precision and the tokenizer were kept,
    and with a key this mtkit no longer knows: it loads, builds its model, and says what it lacks."""
    old = {key: value for key, value in asdict(TINY).items() if key != "logits_bias"}
    torch.save({"format": checkpoint.FORMAT, "version": 1, "model_config": old,
                "model": Transformer(TINY).state_dict(), "step": 3, "retired_key": 1}, tmp_path / "old.pt")
    state = checkpoint.load(tmp_path / "old.pt")
    assert state.model_config == asdict(TINY)  # logits_bias: False, as every model then had
    assert state.precision == "fp32" and state.config == {} and state.step == 3 and state.tokenizer is None
    assert state.build_model().cfg == TINY
    try:
        Translator(state)
        raise AssertionError("translated without a tokenizer")
    except Exception as e:
        assert f"{tmp_path / 'old.pt'} holds no tokenizer" in str(e) and "older mtkit" in str(e)


def test_resuming_from_a_checkpoint_that_holds_no_run_is_refused(cli, trained, tmp_path):
    """last.pt replaced by a model alone (an averaged or imported one): resuming says so, by name."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    last = workdir / "checkpoints/last.pt"
    averaged = checkpoint.average([trained / "checkpoints/last.pt"])
    assert averaged.optimizer is None and averaged.averaged_from == [str(trained / "checkpoints/last.pt")]
    last.unlink()
    checkpoint.save(replace(averaged, data_fingerprint=checkpoint.load(trained / "checkpoints/last.pt").data_fingerprint),
                    last)
    code, _, err = cli("train", trained.parent / "config.yaml", "--resume", "--set", f"experiment.workdir={workdir}")
    assert_refused(code, err, f"{last} holds a model but not the state of a run")
