"""Memory benchmark: what a training step of each shipped config holds, for sizing a GPU's batch.

    python3 scripts/bench_memory.py [--configs configs/demo.yaml ...] [--length 32]

For each config, in a fresh process each: the model (the config's shape, its vocabulary size in
both languages, untied when not shared), fused AdamW as training builds it, and training steps on
random batches of `max_tokens` tokens (sentences of --length tokens each side), in fp32 and in bf16
autocast. Reported: the parameters; weights + gradients + Adam's two moments (16 bytes a parameter,
in fp32 whatever the precision); and how much the process's peak memory (ru_maxrss) grows from
before the first step to after the third: that state plus the step's activations and the
allocator's slack, an upper bound for what the same tensors take on a GPU (where the CUDA context
adds its own 0.3-0.5 GB). No data, tokenizer or GPU is needed. Prints a table, then as its last
line one JSON object.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["configs/demo.yaml", "configs/multi30k_de_en.yaml", "configs/multi30k_de_en_20min.yaml",
           "configs/multi30k_multi.yaml", "configs/base.yaml"]

ONE = """
import json, resource, sys, torch
from mtkit import fast
from mtkit.config import load_config
from mtkit.devices import autocast
from mtkit.loss import translation_loss
from mtkit.model import ModelConfig, Transformer

cfg, precision, length = load_config(sys.argv[1]), sys.argv[2], int(sys.argv[3])
vocab = cfg.tokenizer.vocab_size
model = fast.apply(Transformer(ModelConfig(**cfg.model.model_dump(), src_vocab=vocab, tgt_vocab=vocab,
                                          share_src_tgt=cfg.model.tie_embeddings)))  # as the trainer does
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
rows = max(1, cfg.train.max_tokens // length)
src, tgt = (torch.randint(4, vocab, (rows, length)) for _ in range(2))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(3):
    with autocast(torch.device("cpu"), precision):
        states = model(src, tgt, project=False)
        loss, _, _ = translation_loss(states, *model.output_layer(), tgt, pad_id=0, smoothing=0.1)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()), "grown_mb": round(grown / 1024),
                  "max_tokens": cfg.train.max_tokens}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=SHIPPED)
    parser.add_argument("--length", type=int, default=32, help="tokens per sentence, each side")
    args = parser.parse_args()
    from mtkit.console import console, table
    from mtkit.devices import cpu_description

    results = []
    for config in args.configs:
        row = {"config": config}
        for precision in ("fp32", "bf16"):
            done = subprocess.run([sys.executable, "-c", ONE, str(REPO / config), precision, str(args.length)],
                                  capture_output=True, text=True, check=True)
            measured = json.loads(done.stdout.splitlines()[-1])
            row.update(parameters=measured["parameters"], max_tokens=measured["max_tokens"],
                       state_mb=round(measured["parameters"] * 16 / 2**20), **{f"step_mb_{precision}": measured["grown_mb"]})
        results.append(row)
    t = table("memory of a training step", ["config", "parameters", "max_tokens", "weights+grads+Adam",
                                            "step, fp32", "step, bf16"])
    for r in results:
        t.add_row(r["config"], f"{r['parameters']:,}", f"{r['max_tokens']:,}", f"{r['state_mb']:,} MB",
                  f"{r['step_mb_fp32']:,} MB", f"{r['step_mb_bf16']:,} MB")
    console.print(t)
    print(json.dumps({"cpu": cpu_description(), "length": args.length, "configs": results}))


if __name__ == "__main__":
    main()
