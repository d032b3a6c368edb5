"""`mtkit translate`: one output line per input line, always (also fuzzed); streaming; n-best; batch
invariance."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


MTKIT = Path(sys.executable).with_name("mtkit")


def run(args, stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([str(MTKIT), "translate", *map(str, args)], input=stdin, capture_output=True,
                          timeout=120, env={**os.environ, "MTKIT_QUIET": "1"})


@pytest.mark.slow
def test_one_line_out_per_line_in_whatever_the_line(trained):
    lines = [b"The dog follows the cat.", b"", b"   \t ", b"A boy " * 2000, b"caf\xe9 \xff broken bytes",
             b"A girl sees a river.\r", b"\x01control\x7f chars", "Ünïcödé – ok".encode(), "\u200f".encode()]
    data = b"\xef\xbb\xbf" + b"\n".join(lines)  # a BOM, and no newline at the end
    result = run([trained, "--greedy"], data)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode("utf-8").split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines)
    assert out[1] == "" and out[2] == "" and out[8] == ""  # blank in (a direction mark alone too), blank out
    assert out[0] and out[3] and out[4] and out[5]  # everything else gets a translation
    err = result.stderr.decode()
    assert "line 4: longer than the model's" in err
    assert "line 5: invalid UTF-8" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_stdin_is_translated_as_lines_arrive(trained):
    proc = subprocess.Popen([str(MTKIT), "translate", str(trained), "--greedy"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "MTKIT_QUIET": "1"})
    try:
        proc.stdin.write(b"The dog sees a cat.\n")
        proc.stdin.flush()
        start = time.monotonic()
        first = proc.stdout.readline()  # arrives while stdin is still open
        assert first.strip() and time.monotonic() - start < 60
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"\n"
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0


@pytest.mark.slow
def test_batch_size_changes_nothing(trained, tmp_path):
    lines = [f"The {w} follows the cat under the bridge." for w in ("dog", "boy", "girl", "horse")] * 5
    lines += ["A boy did not visit a river.", "We played beside the short big balls."]
    data = "\n".join(lines).encode() + b"\n"
    small = run([trained, "--beam", "3", "--max-tokens", "12"], data)
    large = run([trained, "--beam", "3", "--max-tokens", "5000"], data)
    assert small.returncode == 0 and large.returncode == 0
    assert small.stdout == large.stdout and small.stdout.count(b"\n") == len(lines)


@pytest.mark.slow
def test_nbest_tsv_and_output_file(trained, tmp_path):
    (tmp_path / "in.txt").write_text("The dog follows the cat.\n\nA boy sees a river.\n")
    result = run([trained / "checkpoints/best.pt", "-i", tmp_path / "in.txt", "-o", tmp_path / "out.tsv",
                  "--beam", "4", "--nbest", "3"], b"")
    assert result.returncode == 0, result.stderr
    rows = [r.split("\t") for r in (tmp_path / "out.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == ["1"] * 3 + ["2"] + ["3"] * 3  # a blank line gets one empty row
    for r in rows:
        assert len(r) == 3
        float(r[1])
    scores = [float(r[1]) for r in rows if r[0] == "1"]
    assert scores == sorted(scores, reverse=True)


def test_an_unfinished_translation_is_kept_and_the_same_command_continues_it(trained, demo_dir, cli, monkeypatch,
                                                                          tmp_path):
    """-i FILE -o FILE that does not finish (Ctrl-C here; a kill or a full disk alike) keeps the
    chunks it wrote; the same command then continues after them and writes what an uninterrupted
    run writes (n-best line numbers included). Another input, model or settings starts over."""
    from mtkit import line_io
    from mtkit.translate import Translator

    monkeypatch.setattr(line_io, "CHUNK_LINES", 40)
    lines = (demo_dir / "test.en").read_text().splitlines()[:150]
    src, out = tmp_path / "in.txt", tmp_path / "out.tsv"
    src.write_text("\n".join(lines[:100] + [""] + lines[100:]) + "\n")
    args = ["translate", trained, "-i", src, "-o", out, "--beam", "2", "--nbest", "2"]
    code, _, err = cli(*args[:5], tmp_path / "whole.tsv", *args[6:])
    assert code == 0, err
    search = Translator.search

    def interrupted(self, *a, **k):  # Ctrl-C while the third chunk is searched
        interrupted.calls += 1
        if interrupted.calls == 3:
            raise KeyboardInterrupt
        return search(self, *a, **k)

    interrupted.calls = 0
    monkeypatch.setattr(Translator, "search", interrupted)
    code, _, err = cli(*args)
    tmp, note = tmp_path / ".out.tsv.tmp", tmp_path / ".out.tsv.tmp.json"
    assert code == 130 and "the first 80 lines of" in err and "the same command continues" in err, err
    assert not out.exists() and json.loads(note.read_text())["lines"] == 80
    assert tmp.read_text().splitlines()[-1].startswith("80\t")
    with open(tmp, "a") as f:
        f.write("81\t-0.5\thalf a chunk wri")  # what a kill in the middle of a chunk leaves after the note
    monkeypatch.setattr(Translator, "search", search)
    code, _, err = cli(*args)
    assert code == 0 and "continuing" in err and "after line 80" in err, err
    assert out.read_bytes() == (tmp_path / "whole.tsv").read_bytes() and not tmp.exists() and not note.exists()
    # Interrupted again, then asked with another setting: it starts over.
    out.unlink()
    interrupted.calls = 0
    monkeypatch.setattr(Translator, "search", interrupted)
    assert cli(*args)[0] == 130 and note.exists()
    monkeypatch.setattr(Translator, "search", search)
    code, _, err = cli(*args[:-1], "1")
    assert code == 0 and "from another input, model or settings is started over" in err, err
    assert out.read_text().count("\n") == 151 and "\t" not in out.read_text()  # one best line per line, all new
    assert not tmp.exists() and not note.exists()


def test_a_second_translate_into_the_same_output_at_once_is_refused(trained, cli, tmp_path):
    """Two runs writing one --output at once would interleave their chunks in it (and the second
    would cut the first's text to continue it): the second is refused, the first's text untouched."""
    import fcntl

    (tmp_path / "in.txt").write_text("The dog follows the cat.\n")
    with open(tmp_path / ".out.txt.tmp", "a") as first:  # what a running translate holds
        first.write("1 of a run's lines\n")
        first.flush()
        fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = cli("translate", trained, "-i", tmp_path / "in.txt", "-o", tmp_path / "out.txt")
        assert code == 2 and "another mtkit translate is writing" in err, err
        assert (tmp_path / ".out.txt.tmp").read_text() == "1 of a run's lines\n" and not (tmp_path / "out.txt").exists()
    code, _, err = cli("translate", trained, "-i", tmp_path / "in.txt", "-o", tmp_path / "out.txt")
    assert code == 0 and (tmp_path / "out.txt").read_text().count("\n") == 1 and not (tmp_path / ".out.txt.tmp").exists()


def test_kernel_caches_are_limited_unless_the_user_set_them(monkeypatch):
    from mtkit.fast import limit_kernel_caches
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "500")
    limit_kernel_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
    assert os.environ["LRU_CACHE_CAPACITY"] == "500"


# Fuzzing (hypothesis): whatever the bytes, one output line per input line, in order.

LINES = st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")) |
                 st.text(max_size=200).map(lambda t: t.replace("\n", "").encode("utf-8")), max_size=12)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000))
def test_file_chunks_split_any_bytes_on_newlines_only(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("chunks") / "input"
    path.write_bytes(data)
    from mtkit.line_io import file_chunks

    with open(path, "rb") as f:
        lines = [line for chunk in file_chunks(f) for line in chunk]
    expected = data.split(b"\n")
    if expected[-1] == b"":
        expected.pop()  # a final "\n" ends the last line; it does not start another
    assert lines == expected


@pytest.fixture(scope="module")
def trained_translator(trained):
    from mtkit.translate import Translator

    return Translator.load(trained)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(lines=LINES, chunk=st.integers(min_value=1, max_value=5))
def test_translate_keeps_one_line_per_line_for_any_input(trained_translator, lines, chunk):
    import io

    from mtkit.line_io import translate_stream

    out = io.StringIO()
    opts = trained_translator.options(beam_size=2, max_len_b=5)
    n = translate_stream(trained_translator, [lines[i:i + chunk] for i in range(0, len(lines), chunk)], out, opts)
    written = out.getvalue().split("\n")
    assert n == len(lines) and written[-1] == "" and len(written) - 1 == len(lines)
    blank = [i for i, raw in enumerate(lines) if not raw.strip(b" \t\r") and not raw.startswith(b"\xef\xbb\xbf")]
    assert all(written[i] == "" for i in blank)  # blank in, blank out: the order holds


def test_progress_moves_with_each_attention_map(trained_translator):
    """Drawing a map takes about a second: with --attention the progress counts each line as its
    map is drawn, not a whole chunk (line_io.CHUNK_LINES, 2,000 lines) once they all are."""
    import io

    from mtkit.line_io import translate_stream

    events = []
    lines = [b"A dog.", b"", b"The cat sees a dog.", b"We play."]
    n = translate_stream(trained_translator, [lines], io.StringIO(), trained_translator.options(beam_size=2),
                         on_lines=lambda k: events.append(("lines", k)), on_best=lambda i, *_: events.append(("map", i)))
    assert n == 4
    assert events == [("map", 1), ("lines", 1), ("lines", 1), ("map", 3), ("lines", 1), ("map", 4), ("lines", 1)]


def test_progress_moves_with_each_batch(trained_translator, demo_dir):
    """Progress comes from the search as each batch is done, not once a 2,000-line chunk is (a
    chunk of beam search can take minutes): through translate_stream (mtkit translate) and
    Engine.translate (mtkit eval), blank lines counted first, and the counts add up to the lines."""
    import io

    from mtkit.corpus import read_lines
    from mtkit.line_io import translate_stream

    lines = list(read_lines(demo_dir / "test.en"))[:300]
    raw = [line.encode() for line in lines[:100]] + [b"", b"  "] + [line.encode() for line in lines[100:]]
    seen = []
    out = io.StringIO()
    opts = trained_translator.options(beam_size=2, max_tokens=500)
    assert translate_stream(trained_translator, [raw], out, opts, on_lines=seen.append) == 302
    assert seen[0] == 2 and len(seen) > 4 and sum(seen) == 302, seen
    assert out.getvalue().splitlines() == trained_translator.translate([r.decode() for r in raw], beam_size=2)
    seen.clear()
    assert trained_translator.translate(lines, on_sentences=seen.append, beam_size=1, max_tokens=500)
    assert len(seen) > 4 and sum(seen) == 300, seen


# A model that emits line breaks and tabs: a byte_fallback tokenizer has the pieces <0x0A> (\n),
# <0x09> (\t) and <0x0D> (\r), and this decoder is wired to write them.

@pytest.fixture(scope="module")
def breaking_model(demo_dir, tmp_path_factory) -> tuple[Path, str]:
    """A checkpoint whose decoder writes, after BOS, the script w1 \\n w2 \\t w3 \\r w4 EOS
    whatever the source; and that script decoded raw, as SentencePiece gives it."""
    from dataclasses import asdict

    import torch

    from mtkit import checkpoint
    from mtkit.config import ModelSection
    from mtkit.model import ModelConfig, Transformer
    from mtkit.tokenizer import BOS_ID, EOS_ID, Tokenizer, train_model

    lines = (demo_dir / "train.vs").read_text(encoding="utf-8").splitlines()[:3000]
    tok = Tokenizer(train_model(lines, model_type="bpe", vocab_size=400, character_coverage=1.0,
                                byte_fallback=True, threads=1))
    words = [tok.tgt.piece_to_id(p) for p in ("▁la", "▁ko", "▁le", "▁na")]
    breaks = [tok.tgt.piece_to_id(p) for p in ("<0x0A>", "<0x09>", "<0x0D>")]
    assert len(set(words)) == 4 and 1 not in words + breaks  # all real pieces (1 is <unk>)
    script = [BOS_ID, words[0], breaks[0], words[1], breaks[1], words[2], breaks[2], words[3], EOS_ID]
    cfg = ModelConfig(**ModelSection(d_model=32, heads=2, enc_layers=1, dec_layers=1, ff_dim=64, positions="learned",
                                     tie_embeddings=False, max_positions=64).model_dump(),
                      src_vocab=tok.src_vocab_size, tgt_vocab=tok.tgt_vocab_size)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        # Every decoder sublayer adds nothing and positions are zero, so the decoder's output is
        # LayerNorm(embedding of the previous token): the next token is a function of the last.
        for layer in model.decoder:
            for linear in (layer.self_attention.out, layer.cross_attention.out, layer.feed_forward.outer):
                linear.weight.zero_()
                linear.bias.zero_()
        model.tgt_embed.learned.weight.zero_()
        model.tgt_embed.tokens.weight.zero_()
        model.generator.weight.zero_()
        for i, (token, following) in enumerate(zip(script, script[1:])):
            model.tgt_embed.tokens.weight[token, i] = 1.0  # token i of the script: direction i ...
            model.generator.weight[following, i] = 10.0  # ... which makes the next token most likely
    path = tmp_path_factory.mktemp("breaking") / "model.pt"
    checkpoint.save(checkpoint.Checkpoint(model_config=asdict(cfg), model=model.state_dict(), tokenizer=tok.protos,
                                          tokenizer_fingerprint=tok.fingerprint, precision="fp32",
                                          config={"decode": {"beam_size": 3, "alpha": 0.6}}), path)
    return path, tok.tgt.decode(script[1:-1])


def test_a_model_that_emits_line_breaks_and_tabs_still_writes_one_line_per_line(breaking_model, cli, tmp_path):
    path, raw = breaking_model
    assert "\n" in raw and "\t" in raw and "\r" in raw  # the model really writes them
    expected = " ".join(raw.split())
    (tmp_path / "in.txt").write_text("the dog\n\na cat sees a bird\n")
    for mode in (["--greedy"], ["--beam", "3"]):
        code, out, err = cli("translate", path, "-i", tmp_path / "in.txt", *mode)
        assert code == 0, err
        assert out.split("\n") == [expected, "", expected, ""]
    code, out, err = cli("translate", path, "-i", tmp_path / "in.txt", "--beam", "3", "--nbest", "3")
    assert code == 0, err
    rows = out.split("\n")
    assert rows[-1] == "" and [r.split("\t")[0] for r in rows[:-1]] == ["1"] * 3 + ["2"] + ["3"] * 3
    assert all(len(r.split("\t")) == 3 and "\r" not in r for r in rows[:-1])
    assert rows[0].split("\t")[2] == expected


@pytest.mark.slow
def test_the_ab_benchmark_decodes_with_both_packages_alike(trained, demo_dir):
    """scripts/bench_ab.py --decode, this checkout against a copy of itself: both translate the demo
    test split, their translations are the same, and the last line is the JSON it promises."""
    repo = Path(__file__).parents[1]
    done = subprocess.run([sys.executable, str(repo / "scripts" / "bench_ab.py"), "--against", str(repo), "--decode",
                           str(trained), "--data-dir", str(demo_dir), "--split", "test", "--src", "en", "--pairs", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("greedy_sents_per_s", "beam5_sents_per_s"):
        assert figures[name]["same_output"] is True and figures[name]["this"] > 0, figures
    assert figures["against_model_from"] == "mtkit_against.model"  # not this checkout's mtkit


@pytest.mark.slow
def test_the_decoding_benchmark_runs_and_ends_on_its_json_line(trained, demo_dir):
    """scripts/bench_decode.py on the demo model's test split: it finishes, and its last line is the
    JSON it promises, with both searches' speed and BLEU."""
    script = Path(__file__).parents[1] / "scripts" / "bench_decode.py"
    done = subprocess.run([sys.executable, str(script), "--checkpoint", str(trained), "--data-dir", str(demo_dir),
                           "--split", "test", "--src", "en", "--tgt", "vs"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["sentences"] == 1000 and figures["cpu"], figures
    assert all(figures[name]["sents_per_s"] > 0 and 0 <= figures[name]["bleu"] <= 100 for name in ("greedy", "beam5"))
