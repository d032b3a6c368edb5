"""Would torch.compile with static shapes pay for itself in training? An A/B on real batches.

    python3 scripts/bench_compile.py --data-dir ../shared/data/multi30k [--batches 4] [--repeats 5]

A: the trainer's model (model.py with fast.py's swaps), eager. B: the textbook model (model.py as
written: inductor makes its own dropout masks and fuses the elementwise work around them) through
torch.compile(dynamic=False), the same weights. Both run forward + backward (the chunked loss
included) on the same real 4,096-token batches of Multi30k de->en, in the precision training
chooses. Each batch shape is a compile of its own under static shapes: the first call of each is
timed as its compile, the median of the next --repeats as its step. The number of distinct batch
shapes in one epoch times the compile per shape is what static shapes would cost a run, against
issue 54's budget of 20 minutes. Prints a table, then as its last line one JSON object.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mtkit.config import load_config
from mtkit.console import console, table
from mtkit.devices import cpu_description
from mtkit.model import Transformer
from mtkit.pipeline import prepare_data
from mtkit.train import set_up

REPO = Path(__file__).resolve().parents[1]


def timed(trainer, batch, repeats: int) -> tuple[float, float]:
    """(the first forward + backward, the median of the next `repeats`), in ms."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        trainer._forward_backward(batch, trainer.precision)
        times.append((time.perf_counter() - start) * 1000)
    trainer.optimizer.zero_grad(set_to_none=True)
    return times[0], statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "multi30k_de_en.yaml")
    ap.add_argument("--batches", type=int, default=4, help="real batches (each its own shape) to time")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mtkit-bench-compile-"))
    cfg = load_config(args.config, [f"data.dir={args.data_dir.resolve()}", f"experiment.workdir={workdir}",
                                    "model.dropout=0.1", "train.max_tokens=4096"])
    prepare_data(cfg)
    trainer = set_up(cfg, resume=False)
    trainer.model.train()
    epoch = [trainer._batch(ix) for ix in trainer.sampler.epoch_batches(0)]
    shapes = {(b.src.shape, b.tgt_in.shape) for b in epoch}
    batches = epoch[:args.batches]
    eager = [timed(trainer, b, args.repeats) for b in batches]

    textbook = Transformer(trainer.model_config)
    textbook.load_state_dict(trainer.model.state_dict())
    trainer.model = textbook.train()
    trainer.net = torch.compile(textbook, dynamic=False)
    torch._dynamo.config.cache_size_limit = max(64, args.batches * 2)
    compiled = [timed(trainer, b, args.repeats) for b in batches]

    compile_s = statistics.median(first - step for first, step in compiled) / 1000
    figures = {
        "precision": trainer.precision, "batches": len(batches), "repeats": args.repeats,
        "eager_ms": [round(step, 1) for _, step in eager], "compiled_ms": [round(step, 1) for _, step in compiled],
        "compiled_over_eager": round(sum(s for _, s in compiled) / sum(s for _, s in eager), 3),
        "compile_s_per_shape": round(compile_s, 1), "shapes_per_epoch": len(shapes),
        "batches_per_epoch": len(epoch), "compile_min_per_epoch_of_shapes": round(compile_s * len(shapes) / 60, 1),
        "torch": torch.__version__, "cpu": cpu_description(),
    }
    t = table(f"torch.compile(dynamic=False) against eager, {trainer.precision}", ["figure", "value"])
    for key, value in figures.items():
        t.add_row(key, str(value))
    console.print(t)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
