"""Batching: padding, and the token-bucket sampler's promises (every sentence once per epoch, the
token budget, determinism, exact resume mid-epoch), also over subword-sampled copies."""

import numpy as np
import pytest

from mtkit.data import ArrayWriter, Stacked, TokenArray, TokenBucketSampler, length_batches, make_batch

PAD, BOS, EOS = 0, 2, 3


def lengths(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 60, n), rng.integers(1, 60, n)


def test_every_sentence_once_per_epoch_within_budget():
    src, tgt = lengths()
    sampler = TokenBucketSampler(src, tgt, max_tokens=800, seed=3)
    cost = np.maximum(src, tgt) + 1
    for epoch in range(2):
        batches = [next(sampler) for _ in range(len(sampler.epoch_batches(epoch)))]
        seen = np.concatenate(batches)
        assert sorted(seen.tolist()) == list(range(len(src)))
        for b in batches:
            assert len(b) == 1 or len(b) * cost[b].max() <= 800
    assert sampler.state_dict() == {"epoch": 1, "position": len(sampler.epoch_batches(1))}


def test_bucketing_keeps_padding_small():
    src, tgt = lengths()
    sampler = TokenBucketSampler(src, tgt, max_tokens=2000, seed=1)
    cost = np.maximum(src, tgt) + 1
    batches = sampler.epoch_batches(0)
    real = sum(cost[b].sum() for b in batches)
    padded = sum(len(b) * cost[b].max() for b in batches)
    assert real / padded > 0.9
    # ...while the order of batches is still shuffled (not short-to-long).
    longest = [cost[b].max() for b in batches]
    assert longest != sorted(longest)


def test_seed_decides_everything():
    src, tgt = lengths()
    a = TokenBucketSampler(src, tgt, 1000, seed=5).epoch_batches(0)
    b = TokenBucketSampler(src, tgt, 1000, seed=5).epoch_batches(0)
    c = TokenBucketSampler(src, tgt, 1000, seed=6).epoch_batches(0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("stop_after", [1, 17, 60])
def test_resume_mid_epoch_continues_exactly(stop_after):
    src, tgt = lengths(n=1500)
    whole = TokenBucketSampler(src, tgt, 900, seed=2)
    n_epoch = len(whole.epoch_batches(0))
    expected = [next(whole) for _ in range(n_epoch + 20)]  # into the second epoch
    first = TokenBucketSampler(src, tgt, 900, seed=2)
    got = [next(first) for _ in range(stop_after)]
    state = first.state_dict()
    resumed = TokenBucketSampler(src, tgt, 900, seed=2)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(n_epoch + 20 - stop_after)]
    assert all(np.array_equal(x, y) for x, y in zip(got, expected))
    # Across the resume, epoch 1 still holds every sentence exactly once.
    assert sorted(np.concatenate(got[:n_epoch]).tolist()) == list(range(1500))


def test_length_batches_puts_an_overlong_sentence_alone():
    cost = np.array([3, 3, 50, 3])
    assert [b.tolist() for b in length_batches(np.array([0, 1, 3, 2]), cost, 10)] == [[0, 1, 3], [2]]


def test_make_batch_places_bos_eos_and_padding(tmp_path):
    for side, rows in (("src", [[10, 11, 12], [13]]), ("tgt", [[20], [21, 22, 23, 24]])):
        w = ArrayWriter(tmp_path / f"train.{side}", np.dtype(np.uint16))
        w.add(rows)
        w.close()
    src, tgt = (TokenArray(tmp_path, "train", side, "uint16") for side in ("src", "tgt"))
    b = make_batch(src, tgt, np.array([0, 1]), pad_id=PAD, bos_id=BOS, eos_id=EOS, max_positions=64)
    assert b.src.tolist() == [[10, 11, 12, EOS], [13, EOS, PAD, PAD]]
    assert b.tgt_in.tolist() == [[BOS, 20, PAD, PAD, PAD], [BOS, 21, 22, 23, 24]]
    assert b.tgt_out.tolist() == [[20, EOS, PAD, PAD, PAD], [21, 22, 23, 24, EOS]]
    assert (b.n_src_tokens, b.n_tgt_tokens) == (6, 7)
    # Longer than the model's positions (valid/test are never filtered): cut to fit.
    short = make_batch(src, tgt, np.array([1, 0]), pad_id=PAD, bos_id=BOS, eos_id=EOS, max_positions=3)
    assert short.src.tolist() == [[13, EOS, PAD], [10, 11, EOS]]
    assert short.tgt_out.tolist() == [[21, 22, EOS], [20, EOS, PAD]]


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_temperature_sampling_flattens_the_directions_and_resumes_exactly(temperature):
    """Two directions of 900 and 100 sentences: T = 1 draws them as they are (every sentence once
    an epoch); T = 5 draws them as 900^0.2 : 100^0.2 (61% : 39%), the small one's sentences
    several times each. An epoch is as many sentences as there are, and seeded as before."""
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(3, 30, 1000), rng.integers(3, 30, 1000)
    sampler = TokenBucketSampler(src, tgt, max_tokens=600, seed=4, groups=[(0, 900), (900, 1000)],
                                 temperature=temperature)
    drawn = np.concatenate(sampler.epoch_batches(0))
    small = (drawn >= 900).mean()
    if temperature == 1.0:
        assert sorted(drawn.tolist()) == list(range(1000))
    else:
        share = 100 ** 0.2 / (900 ** 0.2 + 100 ** 0.2)
        assert small == pytest.approx(share, abs=0.01) and len(drawn) == pytest.approx(1000, abs=2)
        assert np.bincount(drawn[drawn >= 900] - 900).min() >= 3  # each small-side sentence, 3 or 4 times
        assert len(set(drawn[drawn < 900].tolist())) == (drawn < 900).sum()  # the large side: no repeats
    again = TokenBucketSampler(src, tgt, max_tokens=600, seed=4, groups=[(0, 900), (900, 1000)],
                               temperature=temperature)
    assert all(np.array_equal(a, b) for a, b in zip(again.epoch_batches(0), sampler.epoch_batches(0)))


@pytest.mark.parametrize("groups", [None, [(0, 700), (700, 1000)]])
def test_subword_sampled_copies_take_turns_by_epoch_and_resume_exactly(tmp_path, groups):
    """Three copies of 1,000 sentences (data.subword_sampling), stacked: epoch e reads copy e % 3,
    every sentence once, within the budget of that copy's lengths; a resume lands on the same copy."""
    rng = np.random.default_rng(1)
    copies = [(rng.integers(1, 40, 1000), rng.integers(1, 40, 1000)) for _ in range(3)]
    src, tgt = (np.concatenate([c[side] for c in copies]) for side in (0, 1))
    sampler = TokenBucketSampler(src, tgt, 800, seed=3, groups=groups, temperature=3.0 if groups else 1.0,
                                 copies=3)
    epochs = [np.concatenate(sampler.epoch_batches(e)) for e in range(4)]
    for e, drawn in enumerate(epochs):
        copy = e % 3
        assert drawn.min() >= copy * 1000 and drawn.max() < (copy + 1) * 1000
        if groups is None:
            assert sorted(drawn.tolist()) == list(range(copy * 1000, (copy + 1) * 1000))
    for batch in sampler.epoch_batches(1):
        assert len(batch) * (np.maximum(src, tgt)[batch].max() + 1) <= 800 or len(batch) == 1
    # epoch 3 reads copy 0 again, drawn anew: another order
    assert not np.array_equal(epochs[3], epochs[0])
    n = sum(len(sampler.epoch_batches(e)) for e in range(2))
    whole = [next(sampler) for _ in range(n + 5)]
    first = TokenBucketSampler(src, tgt, 800, seed=3, groups=groups, temperature=3.0 if groups else 1.0, copies=3)
    got = [next(first) for _ in range(n - 3)]
    resumed = TokenBucketSampler(src, tgt, 800, seed=3, groups=groups, temperature=3.0 if groups else 1.0, copies=3)
    resumed.load_state_dict(first.state_dict())
    got += [next(resumed) for _ in range(8)]
    assert all(np.array_equal(a, b) for a, b in zip(got, whole)) and len(got) == len(whole)


def test_stacked_copies_read_as_one_array(tmp_path):
    arrays = []
    for k in range(2):
        w = ArrayWriter(tmp_path / f"train.s{k}.src", np.dtype(np.uint16))
        w.add([[k, 1], [k, 2, 2], [k]])
        w.close()
        arrays.append(TokenArray(tmp_path, f"train.s{k}", "src", "uint16"))
    stacked = Stacked(arrays)
    assert len(stacked) == 6
    assert [stacked[i].tolist() for i in range(6)] == [[0, 1], [0, 2, 2], [0], [1, 1], [1, 2, 2], [1]]
    assert stacked.lengths.tolist() == [2, 3, 1, 2, 3, 1]


def test_the_sampler_keeps_a_sentence_in_2_bytes_and_batches_as_with_8():
    """50 million pairs with 16 subword-sampled copies: 800 million costs, 6.4 GB in int64. Kept in
    the smallest type that holds them, and cut into the same batches: rows x longest computed in
    Python ints (in uint16, 300 rows of 256 tokens wrap to 11,264)."""
    rng = np.random.default_rng(1)
    src, tgt = rng.integers(1, 400, 5000), rng.integers(1, 400, 5000)
    sampler = TokenBucketSampler(src, tgt, max_tokens=100_000, seed=3)
    assert sampler.cost.dtype == np.uint16 and sampler.cost.nbytes == 2 * 5000
    order = np.argsort(sampler.cost, kind="stable")
    wide = [b.tolist() for b in length_batches(order, sampler.cost.astype(np.int64), 100_000)]
    assert [b.tolist() for b in length_batches(order, sampler.cost, 100_000)] == wide and len(wide) > 5


def test_lengths_come_in_the_smallest_type_that_holds_them_and_one_more(tmp_path):
    """A train split's lengths in int64 took 8 bytes a sentence and copy (6.4 GB a side for 50
    million pairs in 16 sampled copies) before the sampler cut them down; the one more is the EOS
    that a sentence's cost adds."""
    for longest, dtype in ((254, np.uint8), (255, np.uint16), (70_000, np.uint32)):
        w = ArrayWriter(tmp_path / f"s{longest}.src", np.dtype(np.uint16))
        w.add([[5] * 3, [6] * longest, []])
        w.close()
        lengths = TokenArray(tmp_path, f"s{longest}", "src", "uint16").lengths
        assert lengths.dtype == dtype and lengths.tolist() == [3, longest, 0]


def test_a_direction_weighed_down_is_drawn_that_much_less_and_the_rest_fill_the_epoch():
    """data.denoise_weight 0.25 (config.py: the copies' weight, times their direction's): three
    directions of 400 sentences, the third at weight 0.25, draw 4 : 4 : 1 of an epoch of 1,200."""
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(3, 30, 1200), rng.integers(3, 30, 1200)
    groups = [(0, 400), (400, 800), (800, 1200)]
    drawn = np.concatenate(TokenBucketSampler(src, tgt, max_tokens=600, seed=4, groups=groups,
                                              weights=[1.0, 1.0, 0.25]).epoch_batches(0))
    assert len(drawn) == pytest.approx(1200, abs=2)
    assert (drawn >= 800).mean() == pytest.approx(1 / 9, abs=0.005)
    assert len(set(drawn[drawn >= 800].tolist())) == (drawn >= 800).sum()  # a sample, no repeats


def test_denoise_weight_is_the_copies_weight_times_their_directions():
    from mtkit.config import DataSection

    data = DataSection(corpora=[{"dir": "a", "src": "de", "tgt": "en", "weight": 2.0},
                                {"dir": "b", "src": "fr", "tgt": "en"}], denoise=["de", "fr"], denoise_weight=0.25)
    assert [(p.src, p.tgt, p.weight) for p in data.denoising] == [("de", "de", 0.5), ("fr", "fr", 0.25)]
    assert [p.weight for p in DataSection(directions=["de-en", "fr-en"], denoise=["fr"]).denoising] == [1.0]
