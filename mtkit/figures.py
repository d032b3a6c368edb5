"""Pictures of a model and a run, as PNG files (matplotlib): attention maps and learning curves.

matplotlib is imported here only, with its file-only backend (Agg): no display is needed, and
`mtkit --help` does not pay for the import.
"""

import io
import json
import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from mtkit.errors import MtkitError
from mtkit.files import check_output, output_file

if TYPE_CHECKING:  # only named in annotations: figures draws what translate computes, not the other way
    from mtkit.translate import AttentionMap


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attention_png(amap: "AttentionMap", path: Path, layer: int | None = None, head: int | None = None) -> Path:
    """Draw the cross-attention of one translation: a grid with one heatmap per layer (rows) and
    head (columns), plus each layer's head average in the last column. Rows of a heatmap are the
    target subwords, columns the source subwords; dark = much attention."""
    plt = _pyplot()
    n_layers, n_heads = amap.weights.shape[1], amap.weights.shape[2]
    layers = range(n_layers) if layer is None else [_pick(layer, n_layers, "layer")]
    heads = list(range(n_heads)) if head is None else [_pick(head, n_heads, "head")]
    columns = heads + ["mean"] if len(heads) > 1 else heads
    cell = 0.28  # inches per subword: labels stay readable for sentences up to ~40 subwords
    width = max(2.5, 1.2 + cell * len(amap.source))
    height = max(2.0, 1.0 + cell * len(amap.target))
    fig, axes = plt.subplots(len(layers), len(columns), figsize=(width * len(columns), height * len(layers) + 0.8),
                             squeeze=False, layout="constrained")
    for r, l in enumerate(layers):
        for c, h in enumerate(columns):
            ax = axes[r][c]
            w = amap.weights[:, l].mean(dim=1) if h == "mean" else amap.weights[:, l, h]
            ax.imshow(w.numpy(), cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_xticks(range(len(amap.source)), amap.source, rotation=90, fontsize=8)
            ax.set_yticks(range(len(amap.target)), amap.target, fontsize=8)
            ax.set_title(f"layer {l + 1}, " + ("mean of heads" if h == "mean" else f"head {h + 1}"), fontsize=9)
    fig.suptitle(f"{_short(amap.line)}\n→ {_short(amap.translation)}   (score {amap.score:.3f})", fontsize=10)
    return _save(fig, path)


FORMATS = (".png", ".svg", ".pdf", ".jpg", ".jpeg")


def check_picture_path(path: Path) -> Path:
    """A picture is written where it is named, or refused before any work: matplotlib would take
    a name without a known ending for a folder-less PNG name (`-o maps` writes maps.png) and fail
    on an unknown one after the work is done."""
    path = check_output(path, "picture.png")
    if path.suffix.lower() not in FORMATS:
        raise MtkitError(f"the picture {path}: its format comes from its ending, one of {', '.join(FORMATS)}",
                         hint=f"e.g. {shlex.quote(str(path.with_suffix('.png')))}", setting="output")
    return path


def _save(fig, path: Path) -> Path:
    """Write the figure as every output file is written (files.output_file)."""
    path = check_picture_path(path)
    try:
        picture = io.BytesIO()  # PIL opens a file name for reading too, which a FIFO is not
        fig.savefig(picture, dpi=110, format=path.suffix[1:].lower())
        with output_file(path) as name:
            name.write_bytes(picture.getvalue())
    except OSError as e:
        raise MtkitError(f"cannot write {path}: {e.strerror or e}", hint="check that its folder is writable") from None
    finally:
        _pyplot().close(fig)
    return path


def _pick(index: int, count: int, what: str) -> int:
    """A 1-based layer or head number (as the picture labels them) -> 0-based."""
    if not 1 <= index <= count:
        raise MtkitError(f"{what} {index}: the model has {count} (numbered 1 to {count})", setting=what)
    return index - 1


def _short(text: str, limit: int = 90) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def read_metrics(workdir: Path) -> tuple[list[dict], list[dict]]:
    """The train and valid events of a run's metrics.jsonl (a run in progress too: a line cut
    short by the writer is skipped)."""
    path = Path(workdir) / "metrics.jsonl"
    if Path(workdir).is_file():
        path = Path(workdir)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MtkitError(f"cannot read {path}: {e.strerror}", hint="name an experiment workdir (it holds metrics.jsonl)")
    except UnicodeDecodeError:
        raise MtkitError(f"{path} is not a metrics log (not UTF-8 text)",
                         hint="name an experiment workdir, or its metrics.jsonl") from None
    train, valid = [], []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        {"train": train, "valid": valid}.get(event.get("event"), []).append(event)
    if not train and not valid:
        raise MtkitError(f"{path} has no train or valid events yet", hint="wait for the first log_every steps")
    return train, valid


def loss_lines(train: list[dict], valid: list[dict]) -> list[tuple[str, list[dict], str]]:
    """The loss panel's lines, (label, events, key). The train loss twice: label-smoothed, as
    minimized, and plain ("nll", what the valid loss is): smoothing keeps the first above a floor
    (~1.2 for 0.1 over 8,000 words) whatever the model learns, so only the second compares with
    valid. Without smoothing they are one line; a run logged before "nll" existed has only the first."""
    smoothed = any(e.get("nll") != e.get("loss") for e in train)
    return [("train (label-smoothed)", train, "loss")] * smoothed + [("train", train, "nll"), ("valid", valid, "loss")]


def bleu_lines(valid: list[dict]) -> list[tuple[str, list[dict], str]]:
    """The BLEU panel's lines, as loss_lines'. A run of several directions logs each one's BLEU
    beside their mean (which chooses best.pt): the mean and a line per direction."""
    directions = sorted({d for e in valid for d in e.get("bleu_by_direction", {})})
    return [("mean of directions" if directions else "valid", valid, "bleu")] + [
        (d, [{"step": e["step"], "bleu": e["bleu_by_direction"][d]} for e in valid if d in e.get("bleu_by_direction", {})],
         "bleu") for d in directions]


def curves_png(workdir: Path, path: Path) -> Path:
    """Learning curves of a run: loss (loss_lines), valid BLEU (bleu_lines), learning rate and
    target tokens/s, each against the step."""
    plt = _pyplot()
    train, valid = read_metrics(workdir)
    panels = [("loss", loss_lines(train, valid)),
              ("valid BLEU", bleu_lines(valid)),
              ("learning rate", [("train", train, "lr")]),
              ("target tokens/s", [("train", train, "tgt_tokens_per_s")])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.3 * len(panels)), sharex=True, layout="constrained")
    for ax, (title, series) in zip(axes, panels):
        for label, events, key in series:
            points = [(e["step"], e[key]) for e in events if isinstance(e.get(key), (int, float))
                      and math.isfinite(e[key])]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=label)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    axes[-1].set_xlabel("step")
    last = max([e["step"] for e in train + valid])
    best = max(valid, key=lambda e: e["bleu"]) if valid else None
    note = f", best valid BLEU {best['bleu']:.2f} at step {best['step']:,}" if best else ""
    fig.suptitle(f"{Path(workdir)}: {last:,} steps{note}", fontsize=10)
    return _save(fig, path)
