"""Explorer benchmark: how long `POST /v1/explain` takes for sentences of 10, 30 and 60 subwords.

    python3 scripts/bench_explain.py --checkpoint runs/multi30k_de_en/checkpoints/best.pt \
        --data-dir ../shared/data/multi30k

Source sentences of exactly N subwords are cut from the val split (sentences joined, then cut at
N pieces and decoded back to text); each is explained by a real `mtkit serve` over loopback, beam 5
(and greedy search beside it, as the page asks), five times after one warm-up; reported: the
median and slowest wall time per request (search, attention, JSON, HTTP) and the answer's size,
with and without a what-if translation. Prints a table, then as its last line one JSON object.
"""

import argparse
import http.client
import json
import platform
import statistics
import time
from pathlib import Path

from mtkit.console import console, table
from mtkit.corpus import read_lines
from mtkit.devices import cpu_description
from mtkit.tokenizer import Tokenizer
from mtkit import checkpoint as checkpoints

from bench_serve import start_server  # noqa: E402 -- the scripts folder is on sys.path when run


def sentence_of(tokenizer: Tokenizer, lines: list[str], pieces: int) -> str:
    ids = [i for line in lines for i in tokenizer.encode_src([line])[0]]
    return tokenizer.src.decode(ids[:pieces])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    state = checkpoints.load(checkpoints.resolve(args.checkpoint), mmap=True)
    tokenizer = Tokenizer(*state["tokenizer"])
    src = state["config"]["data"]["src"]
    lines = list(read_lines(args.data_dir / f"val.{src}.gz"))[:200]
    process, host, port = start_server(args.checkpoint, 0)
    rows = []
    try:
        connection = http.client.HTTPConnection(host, port, timeout=120)
        for pieces in (10, 30, 60):
            text = sentence_of(tokenizer, lines, pieces)
            for whatif in (None, "A man is sitting on a bench."):
                body = json.dumps({"text": text, "beam_size": 5} | ({"translation": whatif} if whatif else {}))
                times, size = [], 0
                for i in range(args.repeats + 1):
                    began = time.perf_counter()
                    connection.request("POST", "/v1/explain", body, {"Content-Type": "application/json"})
                    answer = connection.getresponse().read()
                    if i:  # the first is a warm-up
                        times.append(time.perf_counter() - began)
                    size = len(answer)
                found = json.loads(answer)
                rows.append({"pieces": len(found["source"]["pieces"]) - 1, "whatif": whatif is not None,
                             "median_ms": round(statistics.median(times) * 1000, 1),
                             "max_ms": round(max(times) * 1000, 1), "kb": round(size / 1024),
                             "tree_nodes": len(found["beam"]["tree"])})
    finally:
        process.terminate()
        process.wait(60)
    t = table(f"POST /v1/explain, beam 5 (+ greedy): {platform.processor() or platform.machine()}",
              ["subwords", "what-if", "median ms", "max ms", "answer KB", "tree nodes"])
    for r in rows:
        t.add_row(str(r["pieces"]), "yes" if r["whatif"] else "no", f"{r['median_ms']:.0f}", f"{r['max_ms']:.0f}",
                  str(r["kb"]), str(r["tree_nodes"]))
    console.print(t)
    cpu = cpu_description()
    print(json.dumps({"benchmark": "explain", "cpu": cpu, "checkpoint": str(args.checkpoint), "rows": rows}))


if __name__ == "__main__":
    main()
