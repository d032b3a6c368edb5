"""The output layer and the loss (loss.ProjectedCrossEntropy), forward + backward, alone: what a
training step of the benchmark protocol spends there, and an A/B against another version of loss.py.

    python3 scripts/bench_loss.py [--rows 4054 --padding 0.087 --vocab 8000 --width 256] [--repeats 30]
        [--against path/to/older/mtkit/loss.py]    # e.g. from `git worktree add /tmp/old <commit>`

The defaults are a 4,096-token Multi30k de->en step of bench_train.py: 4,054 target rows of which
8.7% padding, the 8,000-word joint vocabulary, d_model 256, under bf16 autocast where the CPU has
bf16 (fp32 elsewhere), with the process settings training makes (fast.py). With --against, the
two versions alternate call by call in this one process, so the machine's noise hits both alike.
Prints a table, then as its last line one JSON object (median ms of each).
"""

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from mtkit import fast
from mtkit.console import console, table
from mtkit.devices import cpu_description, this_machine
from mtkit.loss import ProjectedCrossEntropy


def load(path: Path):
    spec = importlib.util.spec_from_file_location(f"loss_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ProjectedCrossEntropy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4054)
    ap.add_argument("--padding", type=float, default=0.087)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--against", type=Path, default=None, help="another loss.py, timed alternating with this one")
    args = ap.parse_args()

    fast.limit_kernel_caches()
    fast.keep_freed_memory()
    bf16 = this_machine().cpu_bf16
    torch.manual_seed(0)
    states = torch.randn(args.rows, args.width, requires_grad=True)
    weight = (0.05 * torch.randn(args.vocab, args.width)).requires_grad_()
    target = torch.randint(1, args.vocab, (args.rows,))
    target[torch.rand(args.rows) < args.padding] = 0
    versions = {"this": ProjectedCrossEntropy} | ({"against": load(args.against)} if args.against else {})
    times = {name: [] for name in versions}
    for round_ in range(args.repeats + 2):  # the first two rounds warm the kernels up, untimed
        for name, function in versions.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = function.apply(states, weight, None, target, 0, 0.1)
            loss.backward()
            if round_ >= 2:
                times[name].append((time.perf_counter() - start) * 1000)
            states.grad = weight.grad = None
    figures = {f"ms_{name}": round(statistics.median(t), 1) for name, t in times.items()}
    figures |= {"rows": args.rows, "real_rows": int((target != 0).sum()), "vocab": args.vocab, "width": args.width,
                "precision": "bf16" if bf16 else "fp32", "repeats": args.repeats,
                "against": str(args.against) if args.against else None,
                "torch": torch.__version__, "cpu": cpu_description()}
    t = table("output layer + loss, forward + backward (median ms)", ["version", "ms"])
    for name in versions:
        t.add_row(name, f"{figures[f'ms_{name}']:,}")
    console.print(t)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
