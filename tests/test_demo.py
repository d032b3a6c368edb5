import pytest

from mtkit import demo
from mtkit.errors import MtkitError

SMALL = {"train": 3000, "valid": 200, "test": 200}


@pytest.fixture(scope="module")
def splits():
    return demo.generate(SMALL)


def test_generation_is_deterministic_and_sized(splits):
    assert demo.generate(SMALL) == splits
    assert demo.generate(SMALL, seed=7) != splits
    assert {k: len(v) for k, v in splits.items()} == SMALL


def test_held_out_sentences_are_distinct_and_absent_from_train(splits):
    train_src = {en for en, _ in splits["train"]}
    for split in ("valid", "test"):
        sources = [en for en, _ in splits[split]]
        assert len(set(sources)) == len(sources)
        assert not train_src & set(sources)
    assert not {en for en, _ in splits["valid"]} & {en for en, _ in splits["test"]}


def pairs(splits):
    return [p for split in splits.values() for p in split]


def test_verb_comes_last_and_carries_person_and_number(splits):
    # Sentence-initial pronouns (dropped in Veshi) and the verb ending that must carry them.
    endings = {"I": "m", "You": "s", "He": "t", "She": "t", "We": "mus", "You all": "tis", "They": "nt"}
    stems = [entry.split()[-1] for entry in (demo.TRANSITIVE + ";" + demo.INTRANSITIVE).split(";")]
    checked = 0
    for en, vs in pairs(splits):
        if " and " in en:
            continue
        pronoun = "You all" if en.startswith("You all ") else en.split()[0]
        if pronoun in endings:
            verb = vs.rstrip(".").split()[-1].lower()
            assert verb in {stem + tense + endings[pronoun] for stem in stems for tense in "ei"}, (en, vs)
            checked += 1
    assert checked > 200


def test_structure_words_map_one_to_one(splits):
    for en, vs in pairs(splits):
        en_words, vs_words = en.lower().rstrip(".").split(), vs.lower().rstrip(".").split()
        assert en_words.count("and") == vs_words.count("i")
        assert en_words.count("not") == vs_words.count("na")
        assert en[0].isupper() and vs[0].isupper() and en.endswith(".") and vs.endswith(".")


def test_article_and_adjectives_agree_with_the_noun():
    # "the big red dogs": dog is an a-class noun; plural ending -ai on noun and adjectives.
    for en, vs in pairs(demo.generate(SMALL, seed=3)):
        words = vs.rstrip(".").split()
        for i, w in enumerate(words[:-1]):
            if w.lower() in ("lai", "len"):
                ending = "ai" if w.lower() == "lai" else "en"
                assert words[i + 1].endswith(ending), (en, vs)


def test_ensure_corpus_writes_once_and_refuses_foreign_folders(tmp_path):
    folder = tmp_path / "demo"
    demo.ensure_corpus(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"{s}.{l}" for s in ("train", "valid", "test") for l in ("en", "vs", "sv"))
    assert len((folder / "train.en").read_text().splitlines()) == demo.SIZES["train"]
    stamp = (folder / "train.en").stat().st_mtime_ns
    demo.ensure_corpus(folder)
    assert (folder / "train.en").stat().st_mtime_ns == stamp
    # a corpus written before Ihsev existed gets its .sv files from its .vs ones, and keeps the rest
    ihsev = (folder / "test.sv").read_text()
    for split in ("train", "valid", "test"):
        (folder / f"{split}.sv").unlink()
    demo.ensure_corpus(folder)
    assert (folder / "test.sv").read_text() == ihsev and (folder / "train.en").stat().st_mtime_ns == stamp
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(MtkitError):
        demo.ensure_corpus(other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_ihsev_is_veshi_written_backwards_line_for_line(demo_dir):
    veshi, ihsev = ((demo_dir / f"valid.{lang}").read_text().splitlines() for lang in ("vs", "sv"))
    assert len(veshi) == len(ihsev) == demo.SIZES["valid"]
    for vs, sv in zip(veshi, ihsev):
        assert sv.endswith(".") and sv[0].isupper()
        assert sv.rstrip(".").lower()[::-1] == vs.rstrip(".").lower()
    assert demo.ihsev("Le amike kvete ambulet.") == "Telubma etevk ekima el."
