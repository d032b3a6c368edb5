"""Training benchmark: steady-state throughput of mtkit's training step on Multi30k de->en with the
peers' reference model (configs/multi30k_de_en.yaml: joint BPE 8k, d_model 256, 3+3 layers, 4
heads, FFN 1024, dropout 0.1, tied embeddings, 4,096-token batches).

    python3 scripts/bench_train.py --data-dir ../shared/data/multi30k [--seconds 120] [--precision auto]
        [--set train.max_tokens=1024 --set model.dropout=0.2]   # the shipped 45-minute config's steps

Tokenizer and data preparation, model set-up and the first --warmup-steps steps are not timed;
neither validation nor checkpoints run. Prints a table, then as its last line one JSON object.

FLOP count (gflops_per_s, and so fraction_of_matmul): 2 FLOPs per multiply-add of every weight
matrix, times 3 for forward + backward, applied to the real (non-padding) tokens that pass through
it: encoder layers and the decoder's cross-attention K/V projections per source token, the rest
of the decoder and the output projection (D x V) per target token. Attention scores (QK^T, AV)
are left out (they are small for Multi30k's short sentences), so the fraction is a lower bound.

What the arithmetic could do (matmul_gflops_per_s) is measured, not taken from a data sheet: the
machine's CPU changes between sessions, and an Intel Xeon's AMX units multiply bf16 matrices about
ten times as fast as an AMD EPYC's AVX-512 does. Every weight matrix of the model (the output
projection included) multiplies a batch of one step's target tokens, alone, in the step's
precision; fraction_of_matmul is the share of that speed the whole training step reaches.
"""

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mtkit.config import load_config
from mtkit.console import console, table
from mtkit.devices import cpu_description
from mtkit.pipeline import prepare_data
from mtkit.train import set_up

REPO = Path(__file__).resolve().parents[1]


def flops_per_step(model: torch.nn.Module, n_src: int, n_tgt: int) -> float:
    src_side = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and (
        n.startswith("encoder.") or ".cross_attention.kv." in n))
    tgt_side = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("decoder.")
                   and ".cross_attention.kv." not in n)
    output = model.cfg.d_model * model.cfg.tgt_vocab
    return 3 * 2 * (src_side * n_src + (tgt_side + output) * n_tgt)


def matmul_gflops(model: torch.nn.Module, rows: int, precision: str, seconds: float = 3.0) -> float:
    """GFLOP/s of the model's weight matrices, each multiplying `rows` random rows in `precision`."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    weights = [p.detach().to(dtype) for p in model.parameters() if p.dim() == 2]
    inputs = [torch.randn(rows, w.shape[1], dtype=dtype) for w in weights]
    # Into outputs made once: a fresh 59 MB block (4,096 tokens' logits) costs glibc an mmap and
    # page faults every time, which would be measured as if it were arithmetic.
    outputs = [torch.empty(rows, w.shape[0], dtype=dtype) for w in weights]
    flops = sum(2 * rows * w.shape[0] * w.shape[1] for w in weights)
    rounds, start = -1, time.perf_counter()  # round -1: oneDNN compiles each shape's kernel
    while rounds < 3 or time.perf_counter() - start < seconds:
        for x, w, y in zip(inputs, weights, outputs):
            torch.matmul(x, w.T, out=y)
        rounds += 1
        if rounds == 0:
            start = time.perf_counter()
    return flops * rounds / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "multi30k_de_en.yaml")
    ap.add_argument("--seconds", type=float, default=120.0, help="timed training, after the warm-up steps")
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override after the protocol's (e.g. train.max_tokens=1024); repeatable")
    args = ap.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mtkit-bench-train-"))
    # The benchmark protocol's dropout and batch size (the shipped config trains with 0.2 and 1,024).
    cfg = load_config(args.config, [f"data.dir={args.data_dir.resolve()}", f"experiment.workdir={workdir}",
                                    f"train.precision={args.precision}", f"train.threads={args.threads}",
                                    "model.dropout=0.1", "train.max_tokens=4096", *args.overrides])
    prepare_data(cfg)
    trainer = set_up(cfg, resume=False)
    trainer.model.train()
    for _ in range(args.warmup_steps):
        trainer._step()
    step_ms, tgt, src, flops = [], 0, 0, 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        t0 = time.perf_counter()
        _, _, n_tgt, n_src = trainer._step()
        step_ms.append((time.perf_counter() - t0) * 1000)
        tgt, src = tgt + n_tgt, src + n_src
        flops += flops_per_step(trainer.model, n_src, n_tgt)
    seconds = sum(step_ms) / 1000
    matmul = matmul_gflops(trainer.model, round(tgt / len(step_ms)), trainer.precision)
    figures = {
        "precision": trainer.precision, "precision_reason": trainer.precision_reason,
        "threads": torch.get_num_threads(), "steps": len(step_ms), "seconds": round(seconds, 1),
        "tgt_tokens_per_s": round(tgt / seconds, 1), "src_tokens_per_s": round(src / seconds, 1),
        "ms_per_step_median": round(statistics.median(step_ms), 1),
        "tgt_tokens_per_step": round(tgt / len(step_ms), 1),
        "gflops_per_s": round(flops / seconds / 1e9, 1), "matmul_gflops_per_s": round(matmul, 1),
        "fraction_of_matmul": round(flops / seconds / 1e9 / matmul, 3),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch": torch.__version__, "cpu": cpu_description(),
    }
    t = table(f"train {cfg.experiment.name}: {figures['steps']} steps in {figures['seconds']} s, "
              f"{figures['threads']} threads, {figures['precision']}", ["figure", "value"])
    for key in ("tgt_tokens_per_s", "src_tokens_per_s", "ms_per_step_median", "tgt_tokens_per_step",
                "gflops_per_s", "matmul_gflops_per_s", "fraction_of_matmul", "peak_rss_mb"):
        t.add_row(key, f"{figures[key]:,}")
    console.print(t)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
