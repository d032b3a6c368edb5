"""The real corpus: tokenizer + prepare on Multi30k task 1 (skipped when the files are absent)."""

import pytest

from mtkit.config import load_config
from mtkit.prepare import prepare
from mtkit.train_tokenizer import train_tokenizer
from tests.conftest import MULTI30K, REPO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (MULTI30K / "train.de.gz").is_file(),
                                reason=f"Multi30k not found in {MULTI30K} (set MTKIT_MULTI30K)")]


@pytest.mark.parametrize("pair", ["de_en", "fr_en"])
def test_multi30k_tokenizer_and_prepare(tmp_path, pair):
    cfg = load_config(REPO / "configs" / f"multi30k_{pair}.yaml",
                      [f"data.dir={MULTI30K}", f"experiment.workdir={tmp_path / 'run'}"])
    tok = train_tokenizer(cfg)
    assert not tok.skipped
    result = prepare(cfg)
    splits = result.manifest["splits"]
    assert [splits[s]["pairs_in"] for s in ("train", "valid", "test")] == [29_000, 1_014, 1_000]
    assert splits["valid"]["kept"] == 1_014 and splits["test"]["kept"] == 1_000
    assert 28_900 < splits["train"]["kept"] <= 29_000
    assert result.manifest["src_vocab_size"] == 8000
    assert splits["test"]["src"]["unk"] < 20  # a joint BPE vocabulary covers the test set
    assert prepare(cfg).skipped and train_tokenizer(cfg).skipped


def test_multi30k_four_directions_in_one_model(tmp_path):
    """configs/multi30k_multi.yaml: de<->en and fr<->en (train also de-de and fr-fr, data.denoise's
    noisy copies), one joint vocabulary with the tags whole, each direction's pairs counted and no
    test source seen in train."""
    from mtkit.tokenizer import Tokenizer

    cfg = load_config(REPO / "configs" / "multi30k_multi.yaml",
                      [f"data.dir={MULTI30K}", f"experiment.workdir={tmp_path / 'run'}"])
    train_tokenizer(cfg)
    splits = prepare(cfg).manifest["splits"]
    names = ["de-en", "en-de", "fr-en", "en-fr"]
    for split, n, extra in (("train", 29_000, ["de-de", "fr-fr"]), ("valid", 1_014, []), ("test", 1_000, [])):
        assert {d: s["pairs_in"] for d, s in splits[split]["by_direction"].items()} == dict.fromkeys(names + extra, n)
    assert all(s["overlap_with_train"]["src"] == 0 for s in splits["test"]["by_direction"].values())
    tok = Tokenizer.load(cfg.tokenizer_dir)
    for lang in ("en", "de", "fr"):
        assert tok.src.encode(f"<2{lang}> Ein Hund.", out_type=str)[:2] == ["▁", f"<2{lang}>"]
