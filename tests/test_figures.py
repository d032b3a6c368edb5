"""Seeing inside: attention maps (mtkit attention, translate --attention) and learning curves
(mtkit plot), drawn from the tiny demo model and its real training run."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_refused

MTKIT = Path(sys.executable).with_name("mtkit")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG file; fails if it is not one."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_attention_map_is_the_search_s_own_for_the_translation(trained):
    from mtkit.translate import Translator

    translator = Translator.load(trained)
    amap = translator.attention("The dog follows the cat under the bridge.", beam_size=4)
    ids = translator.encode([amap.line])[0]
    assert amap.source == translator.tokenizer.src.id_to_piece(ids) + ["</s>"]
    assert amap.translation == translator.translate([amap.line], beam_size=4)[0]
    assert translator.tokenizer.tgt.decode(translator.tokenizer.tgt.piece_to_id(amap.target[:-1])) == amap.translation
    layers, heads = translator.model.cfg.dec_layers, translator.model.cfg.heads
    assert amap.weights.shape == (len(amap.target), layers, heads, len(amap.source))
    assert torch.allclose(amap.weights.sum(dim=-1), torch.ones(len(amap.target), layers, heads), atol=1e-5)
    strongest = amap.strongest()
    assert [t for t, _, _ in strongest] == amap.target and all(s in amap.source for _, s, _ in strongest)


def test_mtkit_attention_draws_every_layer_and_head(cli, trained, tmp_path):
    code, _, err = cli("attention", trained, "The dog follows the cat.", "-o", tmp_path / "all.png", "--beam", "3")
    assert code == 0, err
    assert "looks most at" in err and "attention map ->" in err
    code, _, err = cli("attention", trained, "The dog follows the cat.", "-o", tmp_path / "one.png",
                       "--layer", "1", "--head", "2")
    assert code == 0, err
    assert png_size(tmp_path / "all.png")[0] > 2 * png_size(tmp_path / "one.png")[0]  # the tiny model has 2 heads: 2 maps and their mean side by side, against 1
    code, _, err = cli("attention", trained, "The dog.", "-o", tmp_path / "x.png", "--head", "3")
    assert_refused(code, err, "--head: head 3: the model has 2 (numbered 1 to 2)")
    code, _, err = cli("attention", trained, "   ", "-o", tmp_path / "x.png")
    assert_refused(code, err, "nothing to translate")


@pytest.mark.slow
def test_translate_with_attention_draws_one_map_per_line_and_writes_the_same(trained, tmp_path):
    text = b"The dog follows the cat.\n\nA boy sees a river.\n"
    env = {**os.environ, "MTKIT_QUIET": "1"}
    plain = subprocess.run([MTKIT, "translate", trained, "--beam", "2"], input=text, capture_output=True, env=env)
    drawn = subprocess.run([MTKIT, "translate", trained, "--beam", "2", "--attention", tmp_path / "maps"],
                           input=text, capture_output=True, env=env)
    assert drawn.returncode == 0, drawn.stderr
    assert drawn.stdout == plain.stdout and drawn.stdout.count(b"\n") == 3
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["000001.png", "000003.png"]  # none for a blank
    png_size(tmp_path / "maps/000003.png")


def test_plot_draws_the_curves_of_a_run_also_while_it_runs(cli, trained, tmp_path):
    code, _, err = cli("plot", trained, "-o", tmp_path / "curves.png")
    assert code == 0, err
    png_size(tmp_path / "curves.png")
    # A run in progress: its last line cut short by the writer.
    events = (trained / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(events[:5]) + "\n" + events[5][:20])
    code, _, err = cli("plot", tmp_path, "-o", tmp_path / "partial.png")
    assert code == 0, err
    png_size(tmp_path / "partial.png")
    code, _, err = cli("plot", tmp_path / "nowhere", "-o", tmp_path / "x.png")
    assert_refused(code, err, "cannot read")


def test_the_loss_panel_shows_the_train_loss_that_compares_with_valid(trained):
    """The demo run (label smoothing 0.1) logs both train losses: both are drawn, labelled. A run
    without smoothing draws one train line; one logged before nll existed, the smoothed one alone."""
    from mtkit.figures import loss_lines, read_metrics

    train, valid = read_metrics(trained)
    assert all(e["nll"] < e["loss"] for e in train[len(train) // 2:])  # (at the start they are about equal)
    assert [(label, key) for label, _, key in loss_lines(train, valid)] == [
        ("train (label-smoothed)", "loss"), ("train", "nll"), ("valid", "loss")]
    plain = [{**e, "loss": e["nll"]} for e in train]
    assert [label for label, _, _ in loss_lines(plain, valid)] == ["train", "valid"]
    old = [{k: v for k, v in e.items() if k != "nll"} for e in train]
    assert [label for label, _, _ in loss_lines(old, valid)] == ["train (label-smoothed)", "train", "valid"]


def test_tensorboard_gets_the_same_curves_as_metrics_jsonl(cli, tmp_path, demo_dir):
    import json

    from tests.conftest import tiny_config

    pytest.importorskip("tensorboard")  # the optional extra (installed with the dev extras, so in CI)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, _, err = cli("train", tiny_config(tmp_path, demo_dir), "--set", "train.tensorboard=true")
    assert code == 0, err
    events = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    board = EventAccumulator(str(tmp_path / "run/tensorboard"))
    board.Reload()
    for kind, key in (("train", "loss"), ("train", "nll"), ("train", "lr"), ("valid", "bleu"), ("valid", "loss")):
        logged = [(e["step"], e[key]) for e in events if e["event"] == kind]
        shown = [(s.step, s.value) for s in board.Scalars(f"{kind}/{key}")]
        assert len(shown) == len(logged) > 0 and all(a == b and abs(x - y) < 1e-6 * max(1, abs(x))
                                                     for (a, x), (b, y) in zip(logged, shown)), (kind, key)
    from tensorboard.util.tensor_util import make_ndarray  # the Text tab: each validation's example sentence

    texts = [(t.step, make_ndarray(t.tensor_proto)[0].decode()) for t in board.Tensors("valid/example/en-vs/text_summary")]
    examples = [(e["step"], e["examples"]["en-vs"]) for e in events if e["event"] == "valid"]
    assert len(texts) == 2 and texts == [(step, f"{e['source']} → {e['translation']}  (reference: {e['reference']})")
                                         for step, e in examples]


@pytest.mark.slow
def test_no_title_of_an_attention_map_hides_under_the_picture_s_title(monkeypatch, tmp_path):
    """The sentence and its translation head the picture; with three layers (a Multi30k model's)
    tight_layout put that heading over the middle map's title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from mtkit import figures
    from mtkit.translate import AttentionMap

    drawn, save = [], figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    source, target = [f"▁src{i}" for i in range(17)] + ["</s>"], [f"▁tgt{i}" for i in range(18)] + ["</s>"]
    weights = torch.softmax(torch.randn(len(target), 3, 4, len(source)), dim=-1)
    amap = AttentionMap("Ein Boston Terrier läuft über saftig-grünes Gras vor einem weißen Zaun.",
                        "A Boston Terrier runs across the grass in front of a white fence.", -3.9, source, target, weights)
    figures.attention_png(amap, tmp_path / "map.png")
    figures.attention_png(amap, tmp_path / "one.png", layer=2)
    for fig in drawn:
        canvas = FigureCanvasAgg(fig)  # as saved: the layout is made when the figure is drawn
        canvas.draw()
        heading = fig._suptitle.get_window_extent(canvas.get_renderer())
        hidden = [ax.get_title() for ax in fig.axes if ax.title.get_window_extent(canvas.get_renderer()).overlaps(heading)]
        assert len(fig.axes) in (15, 5) and hidden == []
