"""The Explorer's data (mtkit/explain.py) on a model trained on the demo corpus: the tree is the
search's own record, so its finished hypotheses, their scores and the winner are exactly what the
search returns, and what the textbook reference decoder finds; recording it changes no translation;
the what-if score of the model's own translation is the search's score of it."""

import math
import re

import pytest
import torch

from mtkit.corpus import read_lines
from mtkit.explain import MAX_BEAM, BadInput, explain, explorer_page
from mtkit.search import max_lengths
from tests.helpers import reference_beam


@pytest.fixture(scope="module")
def demo(trained, demo_dir):
    from mtkit.translate import Translator

    translator = Translator.load(trained)
    assert translator.precision == "fp32"
    return translator, list(read_lines(demo_dir / "test.en"))[:12]


def path_of(tree: list[dict], node: dict) -> list[str]:
    pieces = []
    while node["parent"] is not None:
        pieces.append(node["piece"])
        node = tree[node["parent"]]
    return pieces[::-1]


@pytest.mark.slow
@pytest.mark.parametrize("beam", [1, 5])
def test_the_tree_is_the_search_and_the_reference_decoders(demo, beam):
    translator, lines = demo
    opts = translator.options(beam_size=beam)
    batched = translator.translate(lines, beam_size=beam)
    for line, translation in zip(lines, batched):
        found = explain(translator, line, opts)
        run, tree = found["beam"], found["beam"]["tree"]
        # recording the search changed nothing: exactly the plain search of the sentence, n-best too
        nbest = translator.translate_nbest([line], beam_size=beam, n_best=beam)[0]
        assert [(h["score"], h["text"]) for h in run["hypotheses"]] == nbest
        assert found["greedy"]["translation"] == translator.translate([line], beam_size=1)[0]
        assert run["translation"] == translation  # and what `mtkit translate` writes for it, batched
        # ... which are the textbook decoder's
        ids = translator.encode([line])[0]
        limit = int(max_lengths(torch.tensor([len(ids) + 1]), opts.max_len_a, opts.max_len_b,
                                translator.max_source_tokens)[0])
        want = reference_beam(translator.model, ids, beam, limit, opts.alpha)
        assert [h["ids"] for h in run["hypotheses"]] == [tokens for _, _, tokens in want]
        assert [h["score"] for h in run["hypotheses"]] == pytest.approx([s for s, _, _ in want], abs=1e-4)
        # the tree: its best finished nodes are the n-best, and the winner's path spells the translation
        finished = sorted((n for n in tree if n["fate"] == "finished"), key=lambda n: -n["score"])
        assert [n["score"] for n in finished[:len(nbest)]] == pytest.approx([s for s, _ in nbest], abs=1e-6)
        assert not any("path" in n for n in tree + found["greedy"]["tree"])
        winner = [n for n in tree if n["best"]]
        assert winner[0]["fate"] == "root" and winner[-1] is finished[0]
        assert path_of(tree, winner[-1]) == run["hypotheses"][0]["pieces"]
        assert all(tree[n["parent"]]["fate"] in ("root", "kept") for n in tree if n["parent"] is not None)
        for h in run["hypotheses"]:  # the score shown is the log-probability over the length penalty shown
            assert h["score"] == pytest.approx(h["log_prob"] / h["penalty"], abs=1e-6)
        if beam > 1:  # at every step a beam search weighs 2K candidates: K live on, the rest finish or go
            steps = {n["step"] for n in tree} - {0}
            assert all(sum(n["fate"] == "kept" for n in tree if n["step"] == s) <= beam for s in steps)
            assert any(n["fate"] == "pruned" for n in tree)


def test_attention_shapes_and_the_causal_mask(demo):
    translator, lines = demo
    found = explain(translator, lines[3], translator.options())
    src, out = len(found["source"]["pieces"]), len(found["beam"]["hypotheses"][0]["pieces"])
    cfg = translator.model.cfg
    for name, rows, cols in (("cross", out, src), ("encoder", src, src), ("decoder", out, out)):
        weights = torch.tensor(found["attention"][name])
        assert weights.shape == (cfg.dec_layers if name != "encoder" else cfg.enc_layers, cfg.heads, rows, cols)
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-3)  # each row: a distribution
    decoder = torch.tensor(found["attention"]["decoder"])
    assert decoder[..., torch.ones(out, out).triu(1).bool()].eq(0).all()  # no position saw a later one


@pytest.mark.parametrize("limit", [None, 3])
def test_what_if_scores_the_models_own_translation_as_the_search_did(demo, limit):
    """limit 3: most translations are cut by the length limit, where the search forces an EOS that
    costs nothing; the what-if score once counted that EOS's log-probability."""
    translator, lines = demo
    opts = translator.options() if limit is None else translator.options(max_len_a=0.0, max_len_b=limit)
    matched = cut = 0
    for line in lines:
        found = explain(translator, line, opts)
        best = found["beam"]["hypotheses"][0]
        if translator.tokenizer.encode_tgt([best["text"]])[0] != best["ids"]:
            continue  # its text reads back as other subwords: another translation, to the model
        matched += 1
        whatif = explain(translator, line, opts, whatif=best["text"])["whatif"]
        assert whatif["at_limit"] is (len(best["ids"]) == found["settings"]["max_len"])  # a bool: the answer is JSON
        if whatif["at_limit"]:
            cut += 1
            assert whatif["tokens"][-1]["log_prob"] == whatif["tokens"][-1]["choice_log_prob"] == 0
        assert whatif["score"] == pytest.approx(best["score"], abs=1e-4)
        assert whatif["log_prob"] == pytest.approx(best["log_prob"], abs=1e-4)
        assert [t["piece"] for t in whatif["tokens"]] == best["pieces"]
        # the search chose each subword, but not always the likeliest one at its step (beam search)
        assert sum(t["log_prob"] for t in whatif["tokens"]) == pytest.approx(whatif["log_prob"], abs=1e-4)
    assert matched >= len(lines) // 2 and (cut >= matched // 2 if limit else True)


def test_what_if_says_where_a_translation_leaves_the_models_choice(demo):
    translator, lines = demo
    whatif = explain(translator, lines[0], translator.options(), whatif="Zorblax quib.")["whatif"]
    parts = whatif["parts_at"]
    assert parts is not None and whatif["tokens"][parts]["id"] != whatif["tokens"][parts]["choice"]
    assert all(t["id"] == t["choice"] for t in whatif["tokens"][:parts])
    assert all(t["choice_log_prob"] >= t["log_prob"] - 1e-6 for t in whatif["tokens"])
    assert whatif["score"] < explain(translator, lines[0], translator.options())["beam"]["hypotheses"][0]["score"]


@pytest.mark.parametrize("case", ["empty", "blank", "beam", "whatif empty", "whatif long"])
def test_bad_input_names_the_field(demo, case):
    translator, lines = demo
    text, opts, whatif, field, said = {
        "empty": ("", {}, None, "text", "the sentence is empty"),
        "blank": (" \t ", {}, None, "text", "the sentence is empty"),
        "beam": (lines[0], {"beam_size": MAX_BEAM + 1}, None, "beam_size", f"at most {MAX_BEAM} beams"),
        "whatif empty": (lines[0], {}, "  ", "translation", "the what-if translation is empty"),
        "whatif long": (lines[0], {}, "la " * 200, "translation", "the search lets this sentence's translation"),
    }[case]
    with pytest.raises(BadInput, match=said) as e:
        explain(translator, text, translator.options(**opts), whatif)
    assert e.value.field == field


def test_a_sentence_longer_than_the_model_is_cut_and_said(demo):
    translator, lines = demo
    long = " ".join(lines * 6)
    found = explain(translator, long, translator.options(beam_size=2))
    assert len(found["source"]["pieces"]) == translator.max_source_tokens + 1
    assert "only its first" in found["warnings"][0]
    assert found["beam"]["translation"] == translator.translate([long], beam_size=2)[0]


def test_the_saved_page_embeds_its_data_safely(demo):
    translator, _ = demo
    found = explain(translator, "A dog </script><!-- sees --> a cat.", translator.options(beam_size=2))
    page = explorer_page(live=False, data=found)
    assert page.count("</script>") == 3 and "<!--" not in page  # mode, data and script: none broken out of
    # nothing fetched from elsewhere (the one address is SVG's namespace, a name, not a download)
    assert re.findall(r"https?://[^\s\"'<>)]*", page) == ["http://www.w3.org/2000/svg"]
    assert math.isfinite(found["beam"]["hypotheses"][0]["score"])
