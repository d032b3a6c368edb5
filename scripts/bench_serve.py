"""Serving benchmark: `mtkit serve` under 1, 8 and 64 concurrent clients, beside offline translation.

    python3 scripts/bench_serve.py --checkpoint runs/multi30k_de_en/checkpoints/best.pt \
        --data-dir ../shared/data/multi30k

The test_2016_flickr sentences are sent one per request (loopback only) by N client threads with
kept-alive connections, greedy and beam 5; reported: sentences/s and p50/p95/p99 latency, beside
the same model translating the whole file in this process (offline, model load excluded) and one
sentence at a time (the latency a single client cannot beat), and whether the server's
translations equal the offline ones. Then a soak (`--soak` requests, 64 clients, greedy): errors
and the server's RSS at its start and end. The server and the clients share the machine's cores.
Prints a table, then as its last line one JSON object with the figures.
"""

import argparse
import http.client
import json
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from mtkit.console import console, table
from mtkit.corpus import read_lines
from mtkit.devices import cpu_description
from mtkit.translate import Translator


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_server(checkpoint: Path, wait_ms: float) -> tuple[subprocess.Popen, str, int]:
    """`mtkit serve` on a free port (torch's default threads: one per core)."""
    process = subprocess.Popen([sys.executable, "-m", "mtkit", "serve", str(checkpoint), "--port", "0",
                                "--set", f"serve.batch_wait_ms={wait_ms}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if " at http://" in line:
            host, port = line.split(" at http://")[1].split()[0].split(":")
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # drain
            return process, host, int(port)
    raise SystemExit("the server did not start")


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def load(host: str, port: int, sentences: list[str], clients: int, beam: int, requests: int | None = None,
         timeout: float = 120) -> dict:
    """Send `requests` (default: one per sentence) single-sentence requests from `clients` threads,
    each waiting up to `timeout` seconds for its answer (counted an error after)."""
    work: queue.Queue = queue.Queue()
    for i in range(requests or len(sentences)):
        work.put(i)
    latencies: list[float] = []
    outputs: dict[int, str] = {}
    errors: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        while True:
            try:
                i = work.get_nowait()
            except queue.Empty:
                break
            body = json.dumps({"text": [sentences[i % len(sentences)]], "beam_size": beam})
            began = time.perf_counter()
            try:
                conn.request("POST", "/v1/translate", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                answer = response.read()
                if response.status != 200:
                    errors.append(f"{response.status} {answer[:200]!r}")
                    continue
                latencies.append(time.perf_counter() - began)
                outputs[i] = json.loads(answer)["translations"][0]
            except (OSError, http.client.HTTPException) as e:
                errors.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.close()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    return {"clients": clients, "beam": beam, "requests": len(latencies) + len(errors), "errors": len(errors),
            "sents_per_s": round(len(latencies) / seconds, 1),
            **{f"p{q}_ms": round(1000 * percentile(latencies, q), 1) for q in (50, 95, 99)},
            "outputs": outputs, "error_samples": errors[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint file or an experiment workdir")
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--split", default="test_2016_flickr")
    ap.add_argument("--src", default="de")
    ap.add_argument("--clients", default="1,8,64", help="client counts to measure ('': only the soak)")
    ap.add_argument("--beams", default="1,5")
    ap.add_argument("--alone", type=int, default=200, help="sentences timed one at a time in this process")
    ap.add_argument("--soak", type=int, default=20_000, help="requests of the soak (0: none)")
    ap.add_argument("--wait-ms", type=float, default=50.0, help="the server's serve.batch_wait_ms")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds a client waits for an answer (an error after)")
    args = ap.parse_args()
    path = args.data_dir / f"{args.split}.{args.src}"
    sentences = list(read_lines(path if path.exists() else path.with_name(path.name + ".gz")))
    beams = [int(b) for b in args.beams.split(",") if b]

    translator = Translator.load(args.checkpoint, device="cpu")
    translator.translate(sentences[:16], beam_size=1)  # warm-up
    offline, alone = {}, {}
    for beam in beams:
        began = time.perf_counter()
        offline[beam] = translator.translate(sentences, beam_size=beam)
        offline_s = time.perf_counter() - began
        times = []
        for s in sentences[:args.alone]:
            began = time.perf_counter()
            translator.translate([s], beam_size=beam)
            times.append(time.perf_counter() - began)
        alone[beam] = {"offline_sents_per_s": round(len(sentences) / offline_s, 1),
                       "alone_p50_ms": round(1000 * statistics.median(times), 1)}
    del translator

    process, host, port = start_server(args.checkpoint, args.wait_ms)
    figures = {"checkpoint": str(args.checkpoint), "sentences": len(sentences), "threads": torch.get_num_threads(),
               "batch_wait_ms": args.wait_ms,
               "torch": torch.__version__, "machine": platform.machine(),
               "cpu": cpu_description(), "runs": []}
    try:
        load(host, port, sentences[:64], 8, 1)  # warm-up
        rss_start = rss_mb(process.pid)
        t = table(f"mtkit serve, {len(sentences):,} sentences one per request ({figures['cpu']})",
                  ["beam", "clients", "sents/s", "offline sents/s", "ratio", "p50 ms", "p95 ms", "p99 ms",
                   "alone p50 ms", "same as offline", "errors"])
        for beam in beams:
            for clients in (int(c) for c in args.clients.split(",") if c):
                run = load(host, port, sentences, clients, beam, timeout=args.timeout)
                outputs = run.pop("outputs")
                same = sum(outputs.get(i) == offline[beam][i] for i in range(len(sentences)))
                run |= alone[beam] | {"same_as_offline": same,
                                      "ratio_to_offline": round(run["sents_per_s"] / alone[beam]["offline_sents_per_s"], 2)}
                figures["runs"].append(run)
                t.add_row(str(beam), str(clients), f"{run['sents_per_s']:.0f}", f"{run['offline_sents_per_s']:.0f}",
                          f"{run['ratio_to_offline']:.2f}", f"{run['p50_ms']:.0f}", f"{run['p95_ms']:.0f}",
                          f"{run['p99_ms']:.0f}", f"{run['alone_p50_ms']:.0f}", f"{same}/{len(sentences)}",
                          str(run["errors"]))
        console.print(t)
        if args.soak:  # in quarters, the server's memory after each: flat, or growing?
            began, rss, soaks = rss_mb(process.pid)[0], [], []
            for _ in range(4):
                soaks.append(load(host, port, sentences, 64, 1, args.soak // 4))
                rss.append(round(rss_mb(process.pid)[0], 1))
            figures["soak"] = {"requests": sum(r["requests"] for r in soaks), "errors": sum(r["errors"] for r in soaks),
                               "sents_per_s": round(statistics.mean(r["sents_per_s"] for r in soaks), 1),
                               "rss_start_mb": round(began, 1), "rss_after_each_quarter_mb": rss,
                               "peak_rss_mb": round(rss_mb(process.pid)[1], 1), "rss_first_run_mb": round(rss_start[0], 1)}
            soak = figures["soak"]
            console.print(f"soak: {soak['requests']:,} requests (64 clients, greedy), {soak['errors']} errors, "
                          f"{soak['sents_per_s']:.0f}/s; server RSS {soak['rss_start_mb']:.0f} MB at its start, "
                          f"{', '.join(f'{x:.0f}' for x in rss)} MB after each quarter (peak {soak['peak_rss_mb']:.0f})")
    finally:
        process.terminate()
        figures["server_exit_code"] = process.wait(120)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
