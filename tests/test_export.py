"""CTranslate2 export: the exported model translates as mtkit's own does (greedy), through the
same line-keeping reader and writer."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import assert_refused

pytest.importorskip("ctranslate2")  # the optional extra (installed with the dev extras, so in CI)
MTKIT = Path(sys.executable).with_name("mtkit")


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    from mtkit.export import export_ctranslate2

    return export_ctranslate2(trained, tmp_path_factory.mktemp("ct2") / "model")


def test_both_engines_are_the_one_interface_and_take_nothing_they_cannot_honour(trained, exported):
    """engine.Engine is all that translate, eval and serve use of an engine. CTranslate2 keeps no
    attention and no trace of its search, so its search takes neither; mtkit's takes them as
    keywords of its own, which no caller of an Engine passes."""
    import inspect

    from mtkit.engine import Engine
    from mtkit.export import CT2Translator
    from mtkit.translate import Translator

    mtkit, ct2 = Translator.load(trained), CT2Translator.load(exported)
    assert isinstance(mtkit, Engine) and isinstance(ct2, Engine)
    assert list(inspect.signature(ct2.search).parameters) == ["ids", "opts", "on_sentences"]
    own = list(inspect.signature(mtkit.search).parameters.values())
    assert [p.name for p in own[:3]] == ["ids", "opts", "on_sentences"]
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in own[3:]) and len(own) == 5
    assert not hasattr(ct2, "attention") and not hasattr(ct2, "attention_map")
    for engine in (mtkit, ct2):  # every member the interface names
        for name in ("max_source_tokens", "search", "options", "tag_for", "encode", "texts", "translate_ids",
                     "translate", "translate_nbest", "tokenizer", "config", "path", "precision", "device"):
            assert hasattr(engine, name), (type(engine).__name__, name)


def test_greedy_output_of_the_float32_export_equals_mtkit_s(trained, exported, demo_dir):
    from mtkit.export import CT2Translator
    from mtkit.translate import Translator

    lines = (demo_dir / "test.en").read_text().splitlines()[:300]
    ours = Translator.load(trained).translate(lines, beam_size=1)
    done = []  # progress, as mtkit's own engine reports it (CTranslate2: all at once)
    theirs = CT2Translator.load(exported, "float32").translate(lines, beam_size=1, on_sentences=done.append)
    assert theirs == ours and done == [300]
    assert len(set(ours)) > 100  # varied sentences, many of them ending at the length limit (a tiny model)


def test_both_engines_give_a_true_log_prob_and_one_scoring_rule(trained, exported, demo_dir):
    """CTranslate2's engine gave its penalized score as the log_prob, divided by length ** alpha
    where mtkit divides by GNMT's penalty, so --nbest scores of one model differed by engine. Now
    every hypothesis found by both has the same log_prob and score from each, many cut at the limit
    (this tiny model), and each engine's n-best are best first by that score. The tolerance is
    relative: CTranslate2 renormalizes after suppressing padding and BOS, mtkit does not (about
    0.001 nats a token)."""
    from mtkit.export import CT2Translator
    from mtkit.search import length_penalty
    from mtkit.translate import Translator

    lines = (demo_dir / "test.en").read_text().splitlines()[:40]
    engines = [Translator.load(trained), CT2Translator.load(exported, "float32")]
    ids = engines[0].encode(lines)
    for settings in (dict(beam_size=1, alpha=1.0), dict(beam_size=4, n_best=3, alpha=1.0),
                     dict(beam_size=3, n_best=3, alpha=0.6, max_len_a=0.5, max_len_b=2)):
        ours, theirs = (e.search(ids, e.options(**settings)) for e in engines)
        common = 0
        for a, b in zip(ours, theirs):
            for found in (a, b):
                assert [h.score for h in found] == sorted((h.score for h in found), reverse=True)
                for h in found:
                    assert h.score == pytest.approx(h.log_prob / length_penalty(len(h.tokens) + 1,
                                                                                settings["alpha"]))
            for h in b:
                same = [g for g in a if g.tokens == h.tokens]
                if same:
                    common += 1
                    assert h.log_prob == pytest.approx(same[0].log_prob, rel=0.01, abs=0.01)
                    assert h.score == pytest.approx(same[0].score, rel=0.01, abs=0.01)
        assert common >= len(lines)  # at least as many as one per line: most of the n-best agree


@pytest.mark.slow
def test_translate_with_the_ctranslate2_engine(exported, cli):
    text = b"The dog follows the cat.\n\n\xff broken bytes\nA boy sees a river.\n"
    for compute_type in ("float32", "int8"):
        result = subprocess.run([MTKIT, "translate", "--engine", "ctranslate2", exported, "--compute-type",
                                 compute_type, "--beam", "3"], input=text, capture_output=True,
                                env={**os.environ, "MTKIT_QUIET": "1"})
        assert result.returncode == 0, result.stderr
        out = result.stdout.decode().split("\n")
        assert len(out) == 5 and out[1] == "" and out[0] and out[3]  # one line per line, blank for blank
    code, _, err = cli("translate", "--engine", "ctranslate2", exported, "--attention", exported.parent / "maps")
    assert_refused(code, err, "attention maps need mtkit's own engine")
    code, _, err = cli("translate", "--engine", "ctranslate2", exported.parent)
    assert_refused(code, err, "is not a CTranslate2 export of mtkit")


@pytest.mark.parametrize("variant", [{"norm": "post"}, {"activation": "gelu"}, {"positions": "learned"},
                                     {"tie_embeddings": False, "share_src_tgt": False}])
def test_every_model_variant_exports_faithfully(trained, demo_dir, tmp_path, variant):
    """Untrained models of each architecture option: greedy outputs (which run to the length limit
    and so compare many steps) agree."""
    from dataclasses import asdict, replace

    import torch

    from mtkit import checkpoint
    from mtkit.export import CT2Translator, export_ctranslate2
    from mtkit.model import ModelConfig, Transformer
    from mtkit.translate import Translator

    state = checkpoint.load(trained / "checkpoints/best.pt")
    torch.manual_seed(0)
    cfg = replace(ModelConfig(**state.model_config), **variant)
    checkpoint.save(replace(state, model_config=asdict(cfg), model=Transformer(cfg).state_dict(), ema=None,
                            precision="fp32"), tmp_path / "variant.pt")
    lines = (demo_dir / "test.en").read_text().splitlines()[:40]
    ours = Translator.load(tmp_path / "variant.pt").translate(lines, beam_size=1)
    exported = export_ctranslate2(tmp_path / "variant.pt", tmp_path / "ct2")
    assert CT2Translator.load(exported, "float32").translate(lines, beam_size=1) == ours


def test_a_model_without_an_encoder_residual_is_refused_not_exported_wrong(trained, tmp_path, cli):
    """CTranslate2's Transformer always adds the residual: such a model would export and translate
    differently, so export says why it cannot, and writes nothing."""
    from dataclasses import asdict, replace

    from mtkit import checkpoint
    from mtkit.model import ModelConfig, Transformer

    state = checkpoint.load(trained / "checkpoints/best.pt")
    cfg = replace(ModelConfig(**state.model_config), no_residual_layer=1)
    checkpoint.save(replace(state, model_config=asdict(cfg), model=Transformer(cfg).state_dict(), ema=None),
                    tmp_path / "zero_shot.pt")
    code, _, err = cli("export", tmp_path / "zero_shot.pt", "-o", tmp_path / "ct2")
    assert_refused(code, err, "without its attention residual (model.no_residual_layer: 1), which CTranslate2")
    assert "mtkit translate" in err and not (tmp_path / "ct2").exists()
