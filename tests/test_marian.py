"""mtkit import marian: a Hugging Face MarianMTModel brought into mtkit translates exactly as it did.

No network: the test builds a small MarianMTModel itself (from a MarianConfig, with a random bias
on its logits), with source and target SentencePiece models trained here on the demo corpus and a
vocab.json in Marian's numbering (</s> 0, <unk> 1, the pieces, <pad> last), trains it for a few
hundred steps with transformers (so that it ends its sentences at many lengths, as a real model
does, rather than running to the length limit as a random one does), saves it as save_pretrained
does, imports it, and compares mtkit's model and search with transformers' on the same inputs.
"""

import importlib.util
import json

import pytest
import torch

from mtkit import checkpoint
from mtkit.corpus import read_lines
from mtkit.lineage import describe
from mtkit.tokenizer import train_model
from mtkit.translate import Translator
from tests.conftest import write_config
from tests.helpers import assert_refused

pytestmark = pytest.mark.slow  # the full suite's (CI's); `pytest -m "not slow"` is the fast tier

transformers = pytest.importorskip("transformers")

TRAIN = {"precision": "fp32", "threads": 1, "max_tokens": 600, "warmup": 5, "lr": 1e-4, "max_steps": 4,
         "log_every": 1, "eval_every": 2, "save_every": 2, "eval_sample": 10, "keep_last": 5}


def spm_model(lines: list[str]) -> bytes:
    return train_model(lines, model_type="unigram", vocab_size=300, character_coverage=1.0, byte_fallback=False,
                       threads=1)


@pytest.fixture(scope="module")
def marian_dir(demo_dir, tmp_path_factory):
    """A small random Marian en->vs model as save_pretrained writes it, with its tokenizer."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("marian") / "opus-mt-en-vs"
    folder.mkdir()
    src_lines, tgt_lines = (list(read_lines(demo_dir / f"train.{lang}"))[:3000] for lang in ("en", "vs"))
    protos = {"source.spm": spm_model(src_lines), "target.spm": spm_model(tgt_lines)}
    pieces = []
    for proto in protos.values():
        sp = spm.SentencePieceProcessor(model_proto=proto)
        pieces += [p for p in (sp.id_to_piece(i) for i in range(sp.get_piece_size()))
                   if p not in pieces and p not in ("<pad>", "<unk>", "<s>", "</s>")]
    vocab = {"</s>": 0, "<unk>": 1} | {p: i + 2 for i, p in enumerate(pieces)}
    vocab["<pad>"] = len(vocab)
    for name, proto in protos.items():
        (folder / name).write_bytes(proto)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = transformers.MarianTokenizer(*(str(folder / name) for name in ("source.spm", "target.spm", "vocab.json")),
                                             source_lang="en", target_lang="vs")
    config = transformers.MarianConfig(
        vocab_size=len(vocab), decoder_vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=128, scale_embedding=True, activation_function="swish",
        pad_token_id=len(vocab) - 1, decoder_start_token_id=len(vocab) - 1, eos_token_id=0, forced_eos_token_id=0,
        dropout=0.0)
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config)
    with torch.no_grad():  # a bias to compare (it starts at zero, and transformers does not train it)
        model.final_logits_bias.normal_(0.0, 0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(500):
        ix = torch.randint(0, len(src_lines), (32,), generator=order).tolist()
        batch = tokenizer([src_lines[i] for i in ix], text_target=[tgt_lines[i] for i in ix], padding=True,
                          return_tensors="pt")
        batch["labels"][batch["labels"] == config.pad_token_id] = -100
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imported(marian_dir, tmp_path_factory):
    from mtkit.marian import import_marian

    workdir = tmp_path_factory.mktemp("imported") / "en-vs"
    import_marian(str(marian_dir), workdir)
    return workdir


@pytest.fixture(scope="module")
def both(marian_dir, imported, demo_dir):
    hf_model = transformers.MarianMTModel.from_pretrained(marian_dir).eval()
    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(marian_dir)
    lines = list(read_lines(demo_dir / "test.en"))[:100]
    return hf_model, hf_tokenizer, Translator.load(imported, device="cpu"), lines


def test_the_tokenizer_numbers_pieces_as_marian_does(both):
    hf_model, hf_tokenizer, ours, lines = both
    theirs = hf_tokenizer(lines)["input_ids"]
    assert [ids + [ours.tokenizer.eos_id] for ids in ours.encode(lines)] == theirs
    targets = hf_tokenizer(text_target=lines[:20])["input_ids"]
    assert [ids + [0] for ids in ours.tokenizer.encode_tgt(lines[:20])] == targets


def test_the_logits_equal_transformers(both):
    hf_model, hf_tokenizer, ours, lines = both
    batch = hf_tokenizer(lines[:16], text_target=lines[16:32], padding=True, return_tensors="pt")
    pad = hf_model.config.pad_token_id
    labels = batch["labels"]
    decoder_in = torch.cat([torch.full_like(labels[:, :1], pad), labels[:, :-1]], dim=1)
    with torch.no_grad():
        theirs = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          decoder_input_ids=decoder_in).logits
        mine = ours.model(batch["input_ids"], decoder_in)
    real = labels.ne(pad)  # the positions after a real target token
    assert real.sum() > 100
    assert torch.allclose(mine[real], theirs[real], atol=1e-4), (mine[real] - theirs[real]).abs().max()


def hf_outputs(hf_model, hf_tokenizer, lines, beams: int) -> list[list[int]]:
    """generate() with the settings mtkit's search has: the log-probability alone (length_penalty
    0 there, alpha 0 here), stop at K finished (early_stopping), <pad> never written."""
    batch = hf_tokenizer(lines, padding=True, return_tensors="pt")
    pad = hf_model.config.pad_token_id
    with torch.no_grad():
        found = hf_model.generate(**batch, num_beams=beams, do_sample=False, early_stopping=True, length_penalty=0.0,
                                  max_new_tokens=60, bad_words_ids=[[pad]])
    out = []
    for row in found.tolist():
        row = row[1:]  # the decoder's start
        out.append(row[:row.index(0)] if 0 in row else row)
    return out


@pytest.mark.parametrize("beams", [1, 5])
def test_greedy_and_beam_search_find_what_generate_finds(both, beams):
    hf_model, hf_tokenizer, ours, lines = both
    theirs = hf_outputs(hf_model, hf_tokenizer, lines, beams)
    opts = ours.options(beam_size=beams, alpha=0.0, max_len_a=0.0, max_len_b=59)
    mine = [hyps[0].tokens for hyps in ours.search(ours.encode(lines), opts)]
    assert mine == theirs
    assert len({len(t) for t in mine}) > 20 and sum(len(t) == 59 for t in mine) < 5  # most ended on their own
    texts = ours.translate(lines, beam_size=beams, alpha=0.0, max_len_a=0.0, max_len_b=59)
    assert texts == [text.strip() for text in hf_tokenizer.batch_decode(theirs, skip_special_tokens=True)]


def test_the_imported_model_fine_tunes_with_init_and_resumes_exactly(cli, imported, marian_dir, demo_dir, tmp_path):
    data = {"format": "demo", "dir": str(demo_dir), "src": "en", "tgt": "vs", "max_len": 60, "train": "train[:3000]"}
    runs = {}
    for name, steps in (("straight", 6), ("resumed", 4)):
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(folder, data=data, train=TRAIN | {"max_steps": steps})
        code, _, err = cli("run", config, "--init", imported)
        assert code == 0, err
        runs[name] = (config, folder / "run")
    config, workdir = runs["resumed"]
    code, _, err = cli("train", config, "--resume", "--init", imported, "--set", "train.max_steps=6")
    assert code == 0, err
    straight, resumed = (checkpoint.load(w / "run" / "checkpoints" / "last.pt") for w in (tmp_path / "straight",
                                                                                        tmp_path / "resumed"))
    assert straight.step == resumed.step == 6
    assert all(torch.equal(straight.model[k], resumed.model[k]) for k in straight.model)
    parent = checkpoint.load(imported / "checkpoints" / "best.pt")
    assert straight.init_from["path"] == str(imported / "checkpoints" / "best.pt")
    assert describe(straight.init_from) == f"{imported / 'checkpoints' / 'best.pt'} (imported from {marian_dir})"
    assert {**straight.model_config, "dropout": 0.0} == parent.model_config  # (the fine-tune's own dropout)
    assert not torch.equal(straight.model["logits_bias"], parent.model["logits_bias"])  # it learned


def test_the_imported_model_exports_to_ctranslate2(both, imported, tmp_path):
    pytest.importorskip("ctranslate2")
    from mtkit.export import CT2Translator, export_ctranslate2

    hf_model, hf_tokenizer, ours, lines = both
    exported = CT2Translator.load(export_ctranslate2(imported, tmp_path / "ct2"), "float32")
    settings = dict(beam_size=1, max_len_a=0.0, max_len_b=59)
    assert exported.translate(lines, **settings) == ours.translate(lines, **settings)


def test_provenance_survives_average_and_export(cli, imported, tmp_path):
    """An imported model, averaged, still says where it came from (average dropped imported_from),
    and its export keeps that too."""
    best = imported / "checkpoints" / "best.pt"
    source = checkpoint.load(best).imported_from
    code, _, err = cli("average", best, best, "-o", tmp_path / "avg.pt")
    assert code == 0, err
    averaged = checkpoint.load(tmp_path / "avg.pt")
    assert averaged.imported_from == source and averaged.averaged_from == [str(best)] * 2
    code, _, err = cli("translate", tmp_path / "avg.pt", "-i", "/dev/null")
    assert code == 0 and f"imported from {source['source']}" in err, err
    if importlib.util.find_spec("ctranslate2"):
        code, _, err = cli("export", tmp_path / "avg.pt", "-o", tmp_path / "ct2")
        assert code == 0, err
        kept = json.loads((tmp_path / "ct2" / "mtkit.json").read_text())["provenance"]
        assert kept["imported_from"] == source and kept["averaged_from"] == [str(best)] * 2


def test_the_command_imports_a_model_that_translates_draws_and_explains(cli, marian_dir, demo_dir, tmp_path):
    from mtkit.explain import explain

    code, _, err = cli("import", "marian", marian_dir, "-o", tmp_path / "w")
    assert code == 0 and f"imported -> {tmp_path / 'w' / 'checkpoints' / 'best.pt'}" in err, err
    lines = list(read_lines(demo_dir / "test.en"))[:3]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    code, out, err = cli("translate", tmp_path / "w", "-i", tmp_path / "in.txt")
    assert code == 0 and len(out.splitlines()) == 3, err
    assert f"imported from {marian_dir}" in err  # where it came from, as a fine-tuned model says its parent
    translator = Translator.load(tmp_path / "w")
    assert translator.targets == ["vs"]  # the direction, from tokenizer_config.json
    config = write_config(tmp_path, data={"format": "demo", "dir": str(demo_dir), "src": "en", "tgt": "vs"})
    code, out, err = cli("eval", config, "--checkpoint", tmp_path / "w", "--beam", "1", "--json")
    assert code == 0 and json.loads(out)["bleu"]["score"] >= 0.0, err
    code, _, err = cli("attention", tmp_path / "w", lines[0], "-o", tmp_path / "map.png")
    assert code == 0 and (tmp_path / "map.png").stat().st_size > 1000, err
    pytest.importorskip("fastapi")
    from mtkit.serve import model_facts

    facts = model_facts(translator, translator.options())  # GET /v1/model
    assert facts["imported_from"]["source"] == str(marian_dir) and facts["directions"] == ["en-vs"]
    shown = explain(translator, lines[0], translator.options())  # what the Explorer draws
    assert shown["beam"]["tree"][0]["piece"] == "<pad>"  # Marian's decoder starts from <pad>
    assert shown["beam"]["translation"] == translator.translate(lines[:1])[0]


def test_a_folder_whose_weights_or_vocabulary_do_not_fit_is_refused(cli, marian_dir, tmp_path):
    import shutil

    broken = tmp_path / "no-weights"
    shutil.copytree(marian_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    code, _, err = cli("import", "marian", broken, "-o", tmp_path / "a")
    assert code == 2 and "its weights could not be read" in err and "Traceback" not in err, err
    short = tmp_path / "short-vocab"
    shutil.copytree(marian_dir, short)
    vocab = json.loads((short / "vocab.json").read_text())
    del vocab["<pad>"]
    (short / "vocab.json").write_text(json.dumps(vocab | {"<pad>": len(vocab) + 5}))
    code, _, err = cli("import", "marian", short, "-o", tmp_path / "b")
    assert code == 2 and "its tokenizer files could not be read" in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def corrupt_vocab(folder):
    (folder / "vocab.json").write_text('{"<pad>": 0, ')


def vocab_list(folder):
    (folder / "vocab.json").write_text('["<pad>", "</s>"]')


def truncated_weights(folder):
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])


def few_positions(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2}))


def negative_width(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"d_model": -8}))


@pytest.mark.parametrize("damage", [corrupt_vocab, vocab_list, truncated_weights, few_positions, negative_width],
                         ids=lambda f: f.__name__)
def test_a_damaged_marian_folder_is_one_message(cli, marian_dir, tmp_path, damage):
    """A malformed vocab.json, a truncated model.safetensors or a model of too few positions ended
    in a traceback."""
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(marian_dir, folder)
    damage(folder)
    code, _, err = cli("import", "marian", folder, "-o", tmp_path / "out")
    assert_refused(code, err, str(folder))
    assert not (tmp_path / "out").exists()


def test_a_model_of_few_positions_is_imported_with_a_max_len_that_fits(cli, marian_dir, tmp_path):
    import shutil

    folder = tmp_path / "short"
    shutil.copytree(marian_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 12}))
    code, _, err = cli("import", "marian", folder, "-o", tmp_path / "out")
    assert code == 0, err
    assert checkpoint.load(tmp_path / "out/checkpoints/best.pt").config["data"]["max_len"] == 10


def test_the_explorer_shows_an_imported_model_with_its_own_ids(imported, both):
    """In a real browser: the page draws the imported model's search with Marian's numbering."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Chromium: apt-get install chromium")
    from tests.helpers import Server

    hf_model, hf_tokenizer, ours, lines = both
    server = Server(imported)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#text", lines[0])
            page.wait_for_function("document.body.dataset.version > 0 && document.body.dataset.state === 'ready'",
                                   timeout=60_000)
            assert page.inner_text("#beam-translation") == ours.translate(lines[:1])[0]
            ends = [page.locator(f"#{side}-pieces .piece small").last.inner_text() for side in ("src", "tgt")]
            assert ends == ["0", "0"]  # </s> is 0 in Marian's numbering, on both sides
            labels = page.locator("#decoder th").all_inner_texts()
            assert "<pad>" in labels and "<s>" not in labels  # the decoder starts from <pad>, and reads it
            browser.close()
    finally:
        server.stop()


def test_a_target_language_token_is_one_piece_as_marian_reads_it(marian_dir, tmp_path):
    """Multilingual OPUS-MT models take the target language as a first token (>>fra<<)."""
    import shutil

    from mtkit.tokenizer import Tokenizer

    folder = tmp_path / "multi"
    shutil.copytree(marian_dir, folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    pad = vocab.pop("<pad>")
    vocab |= {">>vs<<": pad, ">>sv<<": pad + 1, "<pad>": pad + 2}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    theirs = transformers.MarianTokenizer.from_pretrained(folder)
    ours = Tokenizer(*((folder / name).read_bytes() for name in ("source.spm", "target.spm", "vocab.json")))
    lines = [">>vs<< The dog sees a cat.", ">>sv<<A boy runs.", "No code here.", ">>xx<< an unknown code",
             "a >>vs<< in the middle", ""]
    assert [ids + [ours.eos_id] for ids in ours.encode_src(lines)] == theirs(lines)["input_ids"]
    assert ours.encode_src(lines[:1])[0][0] == pad
