"""Decoding benchmark: sentences/s and target tokens/s of greedy and beam-5 search on Multi30k
test_2016_flickr (de->en by default), model load excluded, with the BLEU/chrF of the same output.

    python3 scripts/bench_decode.py --data-dir ../shared/data/multi30k --checkpoint runs/x/checkpoints/best.pt
    python3 scripts/bench_decode.py ... --engine ctranslate2 --checkpoint EXPORT_DIR --compute-type int8
    python3 scripts/bench_decode.py ... --precision bf16     # mtkit's decoding precision (default auto)

Prints a table, then as its last line one JSON object with the figures.
"""

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from mtkit import metrics
from mtkit.console import console, table
from mtkit.corpus import read_lines
from mtkit.devices import cpu_description
from mtkit.translate import Translator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint file or an experiment workdir")
    ap.add_argument("--split", default="test_2016_flickr")
    ap.add_argument("--src", default="de")
    ap.add_argument("--tgt", default="en")
    ap.add_argument("--max-tokens", type=int, default=None, help="source tokens per batch (default: the config's)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    ap.add_argument("--repeats", type=int, default=1, help="time each search this many times; report the median")
    ap.add_argument("--engine", default="mtkit", choices=["mtkit", "ctranslate2"],
                    help="ctranslate2: --checkpoint is a folder from mtkit export")
    ap.add_argument("--compute-type", default="default", help="with --engine ctranslate2: int8, float32, ...")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="mtkit's decoding precision (as mtkit translate --precision)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    sources = list(read_lines(_find(args.data_dir, f"{args.split}.{args.src}")))
    references = list(read_lines(_find(args.data_dir, f"{args.split}.{args.tgt}")))
    if args.engine == "ctranslate2":
        from mtkit.export import CT2Translator

        translator = CT2Translator.load(args.checkpoint, args.compute_type)  # not timed
    else:
        translator = Translator.load(args.checkpoint, precision=args.precision)
    figures = {"checkpoint": str(args.checkpoint), "engine": args.engine, "sentences": len(sources),
               "threads": torch.get_num_threads(),
               "precision": translator.precision, "torch": torch.__version__, "machine": platform.machine(),
               "cpu": cpu_description()}
    translator.translate(sources[:16], beam_size=1)  # warm-up (allocator, kernels)
    for name, beam in (("greedy", 1), ("beam5", 5)):
        opts = translator.options(beam_size=beam, n_best=1, max_tokens=args.max_tokens)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            hyps = translator.translate(sources, **opts.model_dump())
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        tokens = sum(len(ids) for ids in translator.tokenizer.encode_tgt(hyps))
        scores = metrics.score(hyps, [references], ("bleu", "chrf"))
        figures[name] = {"seconds": round(seconds, 2), "sents_per_s": round(len(sources) / seconds, 1),
                         "tgt_tokens_per_s": round(tokens / seconds, 1), "bleu": round(scores["bleu"]["score"], 2),
                         "chrf": round(scores["chrf"]["score"], 2), "max_tokens": opts.max_tokens,
                         "alpha": opts.alpha, "bleu_signature": scores["bleu"]["signature"]}
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    t = table(f"decode {args.split}.{args.src}->{args.tgt}: {len(sources):,} sentences, "
              f"{figures['threads']} threads, {figures['precision']}", ["search", "sents/s", "tgt tok/s", "BLEU", "chrF", "s"])
    for name in ("greedy", "beam5"):
        f = figures[name]
        t.add_row(name, f"{f['sents_per_s']:.1f}", f"{f['tgt_tokens_per_s']:,.0f}", f"{f['bleu']:.2f}",
                  f"{f['chrf']:.2f}", f"{f['seconds']:.2f}")
    console.print(t)
    print(json.dumps(figures))


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise SystemExit(f"{folder}: no {stem} or {stem}.gz")


if __name__ == "__main__":
    main()
