"""Scale benchmark: tokenizer training, prepare and one epoch of batching on a corpus of N distinct
pairs, with each stage's time and peak RSS (issue: corpora of millions of pairs).

    python3 scripts/bench_scale.py --pairs 1000000 5000000 [--corpus-dir /tmp/mtkit-scale] [--vocab 16000]

The corpus: lines of one to six sentences of the demo grammar (mtkit/demo.py: English -> Veshi),
about 28 words a side on average (WMT14 en-de: ~27), a third of the words given one of 20
endings (tens of thousands of word forms, as in real text), every line distinct (a set of their hashes, in the generating
process only); valid and test are 1,000 lines each. Made once per size into --corpus-dir and
reused, so that runs before and after a change read the same text. Each stage runs in a process
of its own, so that its peak RSS is its own: the tokenizer (`tokenizer.sample_pairs`, default
1,000,000, bounds what it reads), prepare (normalize, filter, dedup, encode, write), and one epoch
of the training batcher over the prepared train split (the sampler's batches, each made into
padded tensors); with --prepare-workers, prepare again with each number of worker processes
(chunks.py; 0: all in one process). Prints a table, then as its last line one JSON object.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# The demo language has ~1,700 word forms (SentencePiece reaches ~3,000 pieces on it): a third of
# the words get one of these endings, the more common ones more often, for a vocabulary of tens of
# thousands of forms as in real text.
ENDINGS = "ka lo mi sen tar vu ne osh il ba ruk em dal fi gon at pre sul ved ix".split()
WEIGHTS = [1 / (k + 1) for k in range(len(ENDINGS))]


def varied(line: str, rng: random.Random) -> str:
    return " ".join(w + rng.choices(ENDINGS, WEIGHTS)[0] if w.isalpha() and rng.random() < 0.33 else w
                    for w in line.split())


def make_corpus(folder: Path, pairs: int, seed: int = 7) -> Path:
    """N distinct train lines (and 1,000 valid, 1,000 test) in folder/N: made once."""
    out = folder / str(pairs)
    if (out / "done").exists():
        return out
    from mtkit.demo import Grammar

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    grammar = Grammar(rng)
    seen: set[int] = set()
    for split, n in (("valid", 1000), ("test", 1000), ("train", pairs)):
        with open(out / f"{split}.en", "w", encoding="utf-8") as en, open(out / f"{split}.vs", "w",
                                                                           encoding="utf-8") as vs:
            written = 0
            while written < n:
                sentences = [grammar.sentence() for _ in range(rng.randint(1, 6))]  # ~28 words a side, as WMT
                line_en, line_vs = (varied(" ".join(s[i] for s in sentences), rng) for i in (0, 1))
                if (key := hash(line_en)) in seen:
                    continue
                seen.add(key)
                en.write(line_en + "\n")
                vs.write(line_vs + "\n")
                written += 1
    (out / "done").touch()
    return out


class ChildrenRSS(threading.Thread):
    """The peak of this process's children's RSS together, sampled from /proc every 0.2 s (Linux).
    (ru_maxrss of the children would count each one's moment as a fork of this process.)"""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kb = 0

    def run(self) -> None:
        me = str(os.getpid())
        while True:
            total = 0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                if fields.get("PPid", "").strip() == me and "VmRSS" in fields:
                    total += int(fields["VmRSS"].split()[0])
            self.peak_kb = max(self.peak_kb, total)
            time.sleep(0.2)


def stage(name: str, corpus: Path, workdir: Path, vocab: int) -> dict:
    """One stage, in this process: its seconds and figures (the caller reads the peak RSS)."""
    from mtkit.config import load_config

    cfg = load_config(REPO / "configs/base.yaml", [f"data.dir={corpus}", "data.src=en", "data.tgt=vs",
                                                   f"experiment.workdir={workdir}", f"tokenizer.vocab_size={vocab}"])
    children = ChildrenRSS()
    if Path("/proc").is_dir():
        children.start()
    start = time.perf_counter()
    if name == "tokenizer":
        from mtkit.train_tokenizer import train_tokenizer

        train_tokenizer(cfg)
        figures = {"sample_pairs": cfg.tokenizer.sample_pairs}
    elif name.startswith("prepare"):
        from mtkit import chunks
        from mtkit.prepare import prepare

        if name != "prepare":  # "prepare:N": N worker processes, whatever prepare would choose
            workers = int(name.split(":")[1])
            chunks.workers_for = lambda pairs, cores: workers if pairs else 0
        train = prepare(cfg, force=True).manifest["splits"]["train"]
        figures = {"pairs_in": train["pairs_in"], "kept": train["kept"],
                   "workers": chunks.workers_for(train["pairs_in"], chunks.cores()),
                   "workers_peak_rss_mb": round(children.peak_kb / 1024)}
    else:
        from mtkit.data import TokenBucketSampler, make_batch, train_arrays
        from mtkit.files import read_json

        manifest = read_json(cfg.data_cache_dir / "manifest.json")
        src, tgt, copies = train_arrays(cfg.data_cache_dir, manifest)
        sampler = TokenBucketSampler(src.lengths, tgt.lengths, cfg.train.max_tokens, cfg.experiment.seed,
                                     copies=copies)
        batches = sampler.epoch_batches(0)
        tokens = 0
        for ix in batches:
            tokens += make_batch(src, tgt, ix, pad_id=0, bos_id=2, eos_id=3, max_positions=256).n_tgt_tokens
        figures = {"batches": len(batches), "tgt_tokens": tokens}
    return {"seconds": round(time.perf_counter() - start, 1), **figures}


def run_stage(name: str, corpus: Path, workdir: Path, vocab: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--stage", name, str(corpus), str(workdir), str(vocab)],
                          capture_output=True, text=True, env={**os.environ, "MTKIT_QUIET": "1"})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--stage":
        figures = stage(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
        me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        figures["peak_rss_mb"] = round(me.ru_maxrss / 1024)
        # CPU seconds: what more cores would shorten (the workers') and what they would not (this process's)
        figures["cpu_seconds"] = round(me.ru_utime + me.ru_stime, 1)
        figures["workers_cpu_seconds"] = round(workers.ru_utime + workers.ru_stime, 1)
        return print(json.dumps(figures))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--corpus-dir", type=Path, default=Path(tempfile.gettempdir()) / "mtkit-scale")
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--prepare-workers", type=int, nargs="*", default=[],
                    help="also time prepare with these numbers of worker processes (0: in one process)")
    args = ap.parse_args()
    from mtkit.console import console, table
    from mtkit.devices import cpu_description

    results = []
    for n in args.pairs:
        start = time.perf_counter()
        corpus = make_corpus(args.corpus_dir, n)
        made = time.perf_counter() - start
        with tempfile.TemporaryDirectory(prefix="mtkit-bench-scale-") as tmp:
            stages = {name: run_stage(name, corpus, Path(tmp) / "run", args.vocab)
                      for name in ("tokenizer", "prepare", "batching", *(f"prepare:{n}" for n in args.prepare_workers))}
        words = sum(len(line.split()) for line in open(corpus / "valid.en", encoding="utf-8")) / 1000
        results.append({"pairs": n, "corpus_seconds": round(made, 1), "words_per_line_en": round(words, 1), **stages})
    t = table("tokenizer, prepare and one epoch of batching", ["pairs", "stage", "seconds", "peak RSS MB", "notes"])
    for r in results:
        for name in (n for n in r if n in ("tokenizer", "batching") or n.startswith("prepare")):
            s = r[name]
            notes = (f"sample of {s.get('sample_pairs', 0):,}" if name == "tokenizer" else
                     f"{s.get('batches', 0):,} batches" if name == "batching" else
                     f"{s['kept']:,} kept, {s['workers']} workers, {s['workers_peak_rss_mb']:,} MB together")
            t.add_row(f"{r['pairs']:,}", name, f"{s['seconds']:.1f}", f"{s['peak_rss_mb']:,}", notes)
    console.print(t)
    print(json.dumps({"cpu": cpu_description(), "cores": os.cpu_count(), "vocab": args.vocab, "runs": results}))


if __name__ == "__main__":
    main()
