"""Two versions of mtkit in one process, their training steps (or translations) alternating, so that the
shared machine's noise hits both alike: a change worth 2% is lost in the ±10% between two processes.

    git worktree add /tmp/old <commit>
    python3 scripts/bench_ab.py --against /tmp/old --data-dir ../shared/data/multi30k [--pairs 40]
    python3 scripts/bench_ab.py --against /tmp/old --data-dir ../shared/data/multi30k \\
        --decode runs/x/checkpoints/best.pt [--against-checkpoint a copy the older code reads] [--pairs 12]

The older checkout's `mtkit/` is copied into a temporary folder as the package `mtkit_against` (its
imports rewritten to it), beside this checkout's `mtkit`. Training: both build the benchmark protocol's
trainer (bench_train.py's: --config, dropout 0.1, 4,096-token batches, then --set) on the same data and
seed, take --warmup-steps each, then alternate steps for --pairs pairs, which one goes first swapping
every pair. Decoding: both load the checkpoint and translate the whole --split, greedy and beam 5.
Prints a table, then as its last line one JSON object: each version's median speed and the median of
the pairs' ratios (this / against: above 1, this checkout is faster).
"""

import argparse
import importlib
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mtkit.console import console, table
from mtkit.corpus import read_lines
from mtkit.devices import cpu_description

REPO = Path(__file__).resolve().parents[1]
IMPORT = re.compile(r"^(\s*)(from|import) mtkit\b", re.M)


def load_against(checkout: Path) -> str:
    """The older checkout's package, importable as mtkit_against; returns that name."""
    folder = Path(tempfile.mkdtemp(prefix="mtkit-ab-")) / "mtkit_against"
    for source in sorted((checkout / "mtkit").rglob("*")):
        target = folder / source.relative_to(checkout / "mtkit")
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif source.suffix == ".py":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(IMPORT.sub(r"\1\2 mtkit_against", source.read_text(encoding="utf-8")), encoding="utf-8")
    sys.path.insert(0, str(folder.parent))
    return "mtkit_against"


def trainer(package: str, args, workdir: Path):
    config, pipeline, train = (importlib.import_module(f"{package}.{m}") for m in ("config", "pipeline", "train"))
    cfg = config.load_config(args.config, [f"data.dir={args.data_dir.resolve()}", f"experiment.workdir={workdir}",
                                           "model.dropout=0.1", "train.max_tokens=4096", *args.overrides])
    pipeline.prepare_data(cfg)
    t = train.set_up(cfg, resume=False)
    t.model.train()
    for _ in range(args.warmup_steps):
        t._step()
    return t


def alternate(run_this, run_against, pairs: int) -> dict:
    """Calls both `pairs` times, which first swapping each time; each returns an amount of work (tokens,
    sentences) and is timed. Medians of each one's speed and of the pairs' ratios."""
    speeds = {"this": [], "against": []}
    for i in range(pairs):
        for name, run in ((("this", run_this), ("against", run_against))[::1 if i % 2 == 0 else -1]):
            start = time.perf_counter()
            work = run()
            speeds[name].append(work / (time.perf_counter() - start))
    ratios = [a / b for a, b in zip(speeds["this"], speeds["against"])]
    return {"this": round(statistics.median(speeds["this"]), 1), "against": round(statistics.median(speeds["against"]), 1),
            "ratio": round(statistics.median(ratios), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, required=True, help="an older checkout (a folder holding mtkit/)")
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "multi30k_de_en.yaml")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--warmup-steps", type=int, default=8)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--decode", type=Path, default=None, help="a checkpoint: time translating instead of training")
    ap.add_argument("--against-checkpoint", type=Path, default=None, help="with --decode: the older code's copy")
    ap.add_argument("--split", default="test_2016_flickr")
    ap.add_argument("--src", default="de")
    args = ap.parse_args()
    against = load_against(args.against.resolve())
    figures = {"against": str(args.against), "pairs": args.pairs, "torch": torch.__version__, "cpu": cpu_description()}
    if args.decode is None:
        work = Path(tempfile.mkdtemp(prefix="mtkit-ab-runs-"))
        this, older = trainer("mtkit", args, work / "this"), trainer(against, args, work / "against")
        figures["train_tgt_tokens_per_s"] = alternate(lambda: this._step()[2], lambda: older._step()[2], args.pairs)
    else:
        stem = args.data_dir / f"{args.split}.{args.src}"
        sources = list(read_lines(stem if stem.exists() else stem.with_name(stem.name + ".gz")))
        this = importlib.import_module("mtkit.translate").Translator.load(args.decode, precision="auto")
        older = importlib.import_module(f"{against}.translate").Translator.load(args.against_checkpoint or args.decode,
                                                                              precision="auto")
        for name, beam in (("greedy", 1), ("beam5", 5)):
            options = [t.options(beam_size=beam, n_best=1).model_dump() for t in (this, older)]
            same = this.translate(sources, **options[0]) == older.translate(sources, **options[1])
            figures[f"{name}_sents_per_s"] = alternate(lambda: len(this.translate(sources, **options[0])),
                                                       lambda: len(older.translate(sources, **options[1])), args.pairs)
            figures[f"{name}_sents_per_s"]["same_output"] = same
    # Where the older model's code came from: mtkit_against.*, or the rewriting missed an import.
    figures["against_model_from"] = type(older.model.encoder[0]).__module__
    t = table(f"this checkout against {args.against}: {args.pairs} pairs, alternating in one process",
              ["speed", "this", "against", "median ratio"])
    for key, value in figures.items():
        if isinstance(value, dict):
            t.add_row(key, f"{value['this']:,}", f"{value['against']:,}", f"{value['ratio']}")
    console.print(t)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
