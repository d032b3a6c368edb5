import pytest

from mtkit import corpus
from mtkit.config import load_config
from mtkit.errors import MtkitError
from mtkit.files import read_json
from mtkit.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from mtkit.train_tokenizer import train_tokenizer


def test_joint_bpe_round_trips_and_has_fixed_special_ids(demo_config, demo_dir):
    cfg = load_config(demo_config)
    result = train_tokenizer(cfg)
    tok = Tokenizer.load(result.folder)
    assert tok.joint and tok.src_vocab_size == tok.tgt_vocab_size == 500
    sp = tok.src
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    lines = (demo_dir / "test.vs").read_text().splitlines()[:50]
    assert tok.decode_tgt(tok.encode_tgt(lines)) == lines
    vocab = (result.folder / "spm.vocab").read_text().splitlines()
    assert len(vocab) == 500 and vocab[0].startswith("<pad>\t")
    info = read_json(result.folder / "tokenizer.json")
    assert info["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert info["pairs_used"] == 30_000
    # A model's output may end on the lone word-boundary piece: no trailing space in the text.
    boundary = sp.piece_to_id("\u2581")
    assert sp.id_to_piece(boundary) == "\u2581"
    assert tok.decode_tgt([tok.encode_tgt(lines[:1])[0] + [boundary]]) == lines[:1]


def test_separate_unigram_vocabularies(demo_config):
    cfg = load_config(demo_config, ["tokenizer.joint=false", "tokenizer.type=unigram",
                                    "tokenizer.vocab_size=300"])
    result = train_tokenizer(cfg)
    assert sorted(p.name for p in result.folder.iterdir()) == [
        "src.model", "src.vocab", "tgt.model", "tgt.vocab", "tokenizer.json"]
    tok = Tokenizer.load(result.folder)
    assert not tok.joint and tok.src is not tok.tgt
    # The English model has never seen Veshi words: they fall apart into small pieces.
    assert len(tok.src.encode("Lai fornai pomai vetai")) > len(tok.tgt.encode("Lai fornai pomai vetai"))


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sampled_cuts_spell_the_line_and_follow_their_seed_alone(demo_config, demo_dir, kind):
    """Subword sampling (data.subword_sampling): a drawn cut decodes to the same line; a seed
    gives the same cuts again whatever was drawn in between, another seed others."""
    tok = Tokenizer.load(train_tokenizer(load_config(demo_config, [f"tokenizer.type={kind}"])).folder)
    lines = (demo_dir / "test.en").read_text().splitlines()[:200]
    first = tok.encode_src(lines, sampling=0.2, seed=7)
    other = tok.encode_src(lines, sampling=0.2, seed=8)
    assert tok.encode_src(lines, sampling=0.2, seed=7) == first != other
    assert first != tok.encode_src(lines)
    assert [tok.src.decode(ids) for ids in first] == [tok.src.decode(ids) for ids in tok.encode_src(lines)]
    assert sum(map(len, first)) > sum(map(len, tok.encode_src(lines)))


def test_training_is_deterministic(demo_config):
    cfg = load_config(demo_config)
    first = train_tokenizer(cfg).fingerprint
    model = (cfg.tokenizer_dir / "spm.model").read_bytes()
    second = train_tokenizer(cfg, force=True)
    assert not second.skipped and second.fingerprint == first
    assert (cfg.tokenizer_dir / "spm.model").read_bytes() == model


def test_rerun_is_a_no_op_until_something_changes(demo_config, capsys):
    cfg = load_config(demo_config)
    train_tokenizer(cfg)
    stamp = (cfg.tokenizer_dir / "spm.model").stat().st_mtime_ns
    assert train_tokenizer(cfg).skipped
    assert "tokenizer: up to date" in capsys.readouterr().err
    assert (cfg.tokenizer_dir / "spm.model").stat().st_mtime_ns == stamp
    assert not train_tokenizer(load_config(demo_config, ["tokenizer.vocab_size=400"])).skipped
    assert not train_tokenizer(load_config(demo_config, ["experiment.seed=2"])).skipped


def test_sample_cap_is_seeded(demo_config):
    def vocab(seed):
        cfg = load_config(demo_config, ["tokenizer.sample_pairs=2000", f"experiment.seed={seed}"])
        train_tokenizer(cfg, force=True)
        info = read_json(cfg.tokenizer_dir / "tokenizer.json")
        assert (info["pairs_seen"], info["pairs_used"]) == (30_000, 2000)
        return (cfg.tokenizer_dir / "spm.vocab").read_text()

    assert vocab(1) == vocab(1)
    assert vocab(1) != vocab(2)


def test_unreachable_vocab_size_says_the_maximum(demo_config):
    with pytest.raises(MtkitError) as info:
        train_tokenizer(load_config(demo_config, ["tokenizer.vocab_size=50000"]))
    message = info.value.message
    assert "tokenizer.vocab_size 50000 cannot be reached on the train split" in message
    maximum = int(message.rsplit("at most ", 1)[1].split()[0])
    assert 1000 < maximum < 50000
    assert f"set tokenizer.vocab_size to {maximum} or less" == info.value.hint
    assert not load_config(demo_config).tokenizer_dir.exists()  # nothing half-written


def test_separate_vocab_error_names_the_side(demo_config):
    with pytest.raises(MtkitError) as info:
        train_tokenizer(load_config(demo_config, ["tokenizer.vocab_size=5000", "tokenizer.joint=false"]))
    assert "on the en side" in info.value.message


def test_load_without_a_tokenizer(tmp_path):
    with pytest.raises(MtkitError) as info:
        Tokenizer.load(tmp_path)
    assert "mtkit tokenizer train" in info.value.hint


def test_tokenizer_trains_on_normalized_text(tmp_path):
    (tmp_path / "train.de").write_text("a  b\u00a0c\n" * 50 + "Cafe\u0301\n" * 50)
    (tmp_path / "train.en").write_text("x\n" * 100)
    from tests.conftest import write_config

    cfg = load_config(write_config(tmp_path, data={"dir": str(tmp_path), "src": "de", "tgt": "en"},
                                   tokenizer={"vocab_size": 12}))
    tok = Tokenizer.load(train_tokenizer(cfg).folder)
    pieces = {tok.src.id_to_piece(i) for i in range(tok.src_vocab_size)}
    assert "\u0301" not in pieces and "\u00a0" not in pieces  # NFC and whitespace applied first
    assert corpus.normalize("Cafe\u0301") == "Café"


def test_byte_fallback_spells_unseen_characters_as_bytes(demo_config):
    def encode_unseen(byte_fallback: bool) -> list[int]:
        cfg = load_config(demo_config, [f"tokenizer.byte_fallback={str(byte_fallback).lower()}",
                                        "tokenizer.vocab_size=600"])
        tok = Tokenizer.load(train_tokenizer(cfg).folder)
        ids = tok.encode_src(["The dog ✓"])[0]
        assert tok.src.decode(ids) == ("The dog ✓" if byte_fallback else "The dog  ⁇ ")
        return ids

    assert UNK_ID in encode_unseen(False)
    assert UNK_ID not in encode_unseen(True)  # ✓ becomes its three UTF-8 byte pieces
