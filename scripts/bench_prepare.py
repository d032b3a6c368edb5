"""Prepare benchmark: pairs/s and peak RSS of `mtkit prepare` (normalize, filter, encode, write
the memory-mapped arrays) on Multi30k de->en train, and on a ~1,000,000-pair corpus made by
repeating it (memory must stay flat as the corpus grows), and on Multi30k as four directions in one
model (configs/multi30k_multi.yaml: de-en, en-de, fr-en, en-fr, 116,000 train pairs; memory must
stay flat as the directions add up).

    python3 scripts/bench_prepare.py --data-dir ../shared/data/multi30k [--pairs 1000000]

Each case runs in its own process so that its peak RSS is its own. The tokenizer is trained
first (on at most 29,000 sampled pairs in every case) and not timed. The repeated corpus is
measured with dedup off (every pair is encoded and written) and on (repeats are dropped before
encoding). The encode step alone (both sides of the normalized train pairs, through SentencePiece
with a thread per core) is also timed, in the train case after its run. Prints a table, then as
its last line one JSON object.
"""

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(data_dir: Path, workdir: Path, dedup: bool, encode_step: bool, config: str) -> None:
    from mtkit.config import load_config
    from mtkit.prepare import prepare
    from mtkit.train_tokenizer import train_tokenizer

    cfg = load_config(REPO / "configs" / config,
                      [f"data.dir={data_dir}", f"experiment.workdir={workdir}", "tokenizer.sample_pairs=29000",
                       f"data.dedup={str(dedup).lower()}",
                       # the four directions alone, as measured before multi30k_multi.yaml shipped a zero-shot recipe
                       "data.denoise=[]", "data.backtranslate=[]"])
    tokenizer = train_tokenizer(cfg)
    start = time.perf_counter()
    result = prepare(cfg, force=True)
    seconds = time.perf_counter() - start
    train = result.manifest["splits"]["train"]
    pairs = sum(s["pairs_in"] for s in result.manifest["splits"].values())
    figures = {"pairs": pairs, "train_pairs": train["pairs_in"], "kept": train["kept"],
               "seconds": round(seconds, 2), "pairs_per_s": round(pairs / seconds, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if encode_step:  # the encode step alone, on the normalized train pairs held in memory
        from mtkit.corpus import normalize, read_lines
        from mtkit.tokenizer import Tokenizer

        tok = Tokenizer.load(tokenizer.folder)
        srcs = [normalize(x) for x in read_lines(data_dir / "train.de.gz")]
        tgts = [normalize(x) for x in read_lines(data_dir / "train.en.gz")]
        threads = os.cpu_count() or 1
        start = time.perf_counter()
        tok.encode_src(srcs, threads), tok.encode_tgt(tgts, threads)
        figures["encode_step_pairs_per_s"] = round(len(srcs) / (time.perf_counter() - start), 1)
    print(json.dumps(figures))


def repeat_corpus(data_dir: Path, out: Path, pairs: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("val", "test_2016_flickr"):
        for lang in ("de", "en"):
            shutil.copy(data_dir / f"{name}.{lang}.gz", out / f"{name}.{lang}.gz")
    times = 0
    for lang in ("de", "en"):
        with gzip.open(data_dir / f"train.{lang}.gz", "rb") as f:
            lines = f.read()
        n = lines.count(b"\n")
        times = -(-pairs // n)
        with open(out / f"train.{lang}", "wb") as f:
            for _ in range(times):
                f.write(lines)
    return times * n


def run_case(data_dir: Path, workdir: Path, dedup: bool, encode_step: bool = False,
             config: str = "multi30k_de_en.yaml") -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", str(data_dir), str(workdir), str(dedup),
                             str(encode_step), config],
                            capture_output=True, text=True, env={**os.environ, "MTKIT_QUIET": "1"})
    if result.returncode:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "True", sys.argv[5] == "True", sys.argv[6])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--pairs", type=int, default=1_000_000, help="size of the repeated corpus")
    args = ap.parse_args()
    from mtkit.console import console, table

    data_dir = args.data_dir.resolve()
    with tempfile.TemporaryDirectory(prefix="mtkit-bench-prepare-") as tmp:
        tmp = Path(tmp)
        big = tmp / "repeated"
        n_big = repeat_corpus(data_dir, big, args.pairs)
        cases = {"train": run_case(data_dir, tmp / "run-train", True, encode_step=True),
                 "repeated_no_dedup": run_case(big, tmp / "run-big", False),
                 "repeated_dedup": run_case(big, tmp / "run-big-dedup", True),
                 "four_directions": run_case(data_dir, tmp / "run-multi", True, config="multi30k_multi.yaml")}
    figures = {"repeated_train_pairs": n_big, **cases}
    t = table("prepare Multi30k: de->en, repeated, four directions (all splits; tokenizer not timed)",
              ["case", "pairs", "train kept", "seconds", "pairs/s", "peak RSS MB"])
    for name, c in cases.items():
        t.add_row(name, f"{c['pairs']:,}", f"{c['kept']:,}", f"{c['seconds']:.1f}", f"{c['pairs_per_s']:,.0f}",
                  f"{c['peak_rss_mb']:,.0f}")
    console.print(t)
    console.print(f"encode step alone (SentencePiece, {os.cpu_count()} threads, normalized train pairs in memory): "
                  f"{cases['train']['encode_step_pairs_per_s']:,.0f} pairs/s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
