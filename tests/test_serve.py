"""mtkit serve: a real server process on a real port, real HTTP requests, a real trained model.

The contract is `mtkit translate`'s (one translation per line, in order, blank lines blank, long
lines cut with a warning), and concurrent requests, searched together, must each get exactly what
`mtkit translate` gives for their lines. Bad requests get 4xx answers that name the problem, and
none of them disturbs the others; SIGTERM lets the requests in flight finish, then exits 0.
"""

import json
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True, scope="module")
def no_server_outlives_the_tests():
    yield
    for process in STARTED:  # one a failed test did not stop
        if process.poll() is None:
            process.kill()


class Server:
    """`mtkit serve MODEL --port 0 ARGS`, started and read until it says where it listens."""

    def __init__(self, model: Path, *args: str):
        self.process = subprocess.Popen([sys.executable, "-m", "mtkit", "serve", str(model), "--port", "0", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        STARTED.append(self.process)
        self.log: list[str] = []
        found = threading.Event()

        def read(stream) -> None:
            for line in stream:
                self.log.append(line)
                if " at http://" in line:
                    self.url = line.split(" at ")[1].split()[0]
                    found.set()
        for stream in (self.process.stdout, self.process.stderr):
            threading.Thread(target=read, args=(stream,), daemon=True).start()
        if not found.wait(120):
            self.process.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.log))

    def request(self, path: str, body=None, timeout: float = 120) -> tuple[int, dict]:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def translate(self, lines: list[str], **settings) -> tuple[int, dict]:
        return self.request("/v1/translate", {"text": lines, **settings})

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


@pytest.fixture(scope="module")
def server(trained):
    s = Server(trained, "--set", "serve.batch_wait_ms=50", "--set", "serve.max_lines=100",
               "--set", "serve.max_chars=20000")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def lines(demo_dir) -> list[str]:
    return (demo_dir / "test.en").read_text(encoding="utf-8").splitlines()[:60]


def translated(cli, tmp_path: Path, trained: Path, lines: list[str], *args: str) -> list[str]:
    """What `mtkit translate` writes for these lines."""
    source = tmp_path / f"in{len(args)}.txt"
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    code, out, err = cli("translate", trained, "-i", source, *args)
    assert code == 0, err
    return out.split("\n")[:-1]


def test_the_translate_contract(server, cli, tmp_path, trained, lines):
    text = [lines[0], "", "   ", lines[1], " ".join(lines[2:40])]  # blank, whitespace-only, over 127 tokens
    code, body = server.translate(text)
    assert code == 200, body
    assert body["translations"] == translated(cli, tmp_path, trained, text)
    assert body["translations"][1:3] == ["", ""] and all(body["translations"][i] for i in (0, 3, 4))
    assert body["warnings"] == ["text[4]: longer than the model's 127 source tokens; translated its beginning only"]
    assert "nbest" not in body

    code, body = server.translate(text[:2], n_best=3, beam_size=4, alpha=0.0)
    assert code == 200, body
    rows = translated(cli, tmp_path, trained, text[:2], "--nbest", "3", "--beam", "4", "--alpha", "0")
    assert [[(h["text"], round(h["score"], 4)) for h in hyps] for hyps in body["nbest"]] == \
        [[(row.split("\t")[2], float(row.split("\t")[1])) for row in rows if row.startswith(f"{i + 1}\t")] for i in range(2)]
    assert body["translations"] == [hyps[0]["text"] for hyps in body["nbest"]]
    assert body["nbest"][1] == [{"text": "", "score": 0.0}]
    assert server.translate([]) == (200, {"translations": [], "warnings": []})


def test_concurrent_requests_are_searched_together_and_each_gets_its_own(server, cli, tmp_path, trained, lines):
    expected = {beam: translated(cli, tmp_path, trained, lines, "--beam", str(beam)) for beam in (1, 5)}
    before = server.request("/health")[1]
    # 24 clients at once, each its own slice of the lines, half greedy and half beam 5.
    slices = [(3 * i, 3 * i + 1 + i % 4, 1 if i % 2 else 5) for i in range(20)]
    slices += [(0, 60, 5), (10, 11, 1), (30, 50, 1), (59, 60, 5)]
    answers: dict[int, tuple] = {}
    start = threading.Barrier(len(slices))

    def client(n: int, a: int, b: int, beam: int) -> None:
        start.wait()
        answers[n] = server.translate(lines[a:b], beam_size=beam)
    threads = [threading.Thread(target=client, args=(n, *s)) for n, s in enumerate(slices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, (a, b, beam) in enumerate(slices):
        code, body = answers[n]
        assert code == 200, body
        assert body["translations"] == expected[beam][a:b], (a, b, beam)
    after = server.request("/health")[1]
    assert after["requests"] - before["requests"] == len(slices)
    assert after["searches"] - before["searches"] < len(slices) / 2  # merged, several to a search


def test_model_info(server, trained):
    code, about = server.request("/v1/model")
    assert code == 200
    assert (about["source_language"], about["target_language"]) == ("en", "vs")
    assert about["model"]["d_model"] == 32 and about["parameters"] > 0 and about["step"] == 800
    assert about["decode"]["beam_size"] == 5 and isinstance(about["valid_bleu"], float)
    assert server.request("/health")[0] == 200 and server.request("/ready") == (200, {"status": "ready"})
    with urllib.request.urlopen(server.url + "/docs", timeout=30) as r:
        assert r.status == 200 and b"swagger" in r.read().lower()
    assert "/v1/translate" in server.request("/openapi.json")[1]["paths"]


BAD_REQUESTS = {
    # name: (body, status, what the answer must say)
    "malformed JSON": (b'{"text": ["a"', 422, "json_invalid"),
    "no text": ({"beam_size": 2}, 422, '"loc": ["body", "text"]'),
    "text is one string": ({"text": "A dog."}, 422, '"loc": ["body", "text"]'),
    "a line is a number": ({"text": ["A dog.", 7]}, 422, '"loc": ["body", "text", 1]'),
    "a negative beam": ({"text": ["A dog."], "beam_size": -1}, 422, '"loc": ["body", "beam_size"]'),
    "beam is text": ({"text": ["A dog."], "beam_size": "five"}, 422, '"loc": ["body", "beam_size"]'),
    "a negative alpha": ({"text": ["A dog."], "alpha": -0.5}, 422, '"loc": ["body", "alpha"]'),
    "n_best above the beam": ({"text": ["A dog."], "n_best": 6}, 422, "n_best (6) cannot exceed beam_size (5)"),
    "n_best above a given beam": ({"text": ["A dog."], "n_best": 3, "beam_size": 2}, 422, '"loc": ["body", "n_best"]'),
    "an unknown field": ({"text": ["A dog."], "beam": 3}, 422, '"loc": ["body", "beam"]'),
    "the body is a list": ([["A dog."]], 422, '"loc": ["body"]'),
    "too many lines": ({"text": ["A dog."] * 101}, 413, "serve.max_lines (100)"),
    "too many characters": ({"text": ["A dog. " * 3000]}, 413, "serve.max_chars (20,000)"),
    "not UTF-8": (b'{"text": ["\xff\xfe A dog."]}', 400, "error parsing the body"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_a_bad_request_is_refused_clearly_and_harms_nothing(server, name):
    body, status, needle = BAD_REQUESTS[name]
    code, answer = server.request("/v1/translate", body)
    assert code == status and needle in json.dumps(answer), answer
    code, answer = server.translate(["The dog sees a cat."])
    assert code == 200 and answer["translations"][0]


EXPLAIN_BAD_REQUESTS = {
    # name: (body, status, what the answer must say): /v1/explain, the Explorer's data
    "no text": ({"beam_size": 2}, 422, '"loc": ["body", "text"]'),
    "an empty sentence": ({"text": ""}, 422, '"loc": ["body", "text"], "msg": "nothing to explain'),
    "a blank sentence": ({"text": " \t "}, 422, "the sentence is empty"),
    "text as a list": ({"text": ["A dog."]}, 422, '"loc": ["body", "text"]'),
    "beam 0": ({"text": "A dog.", "beam_size": 0}, 422, '"loc": ["body", "beam_size"]'),
    "beam 17": ({"text": "A dog.", "beam_size": 17}, 422, "less than or equal to 16"),
    "alpha above 5": ({"text": "A dog.", "alpha": 7}, 422, '"loc": ["body", "alpha"]'),
    "an empty what-if": ({"text": "A dog.", "translation": ""}, 422, '"loc": ["body", "translation"]'),
    "a what-if over the output limit": ({"text": "A dog.", "translation": "la " * 100}, 422,
                                        "the search lets this sentence's translation have at most"),
    "an unknown field": ({"text": "A dog.", "n_best": 2}, 422, '"loc": ["body", "n_best"]'),
    "too many characters": ({"text": "A dog. " * 3000}, 413, "serve.max_chars (20,000)"),
}


@pytest.mark.parametrize("name", sorted(EXPLAIN_BAD_REQUESTS))
def test_a_bad_explain_request_is_refused_naming_the_field(server, name):
    body, status, needle = EXPLAIN_BAD_REQUESTS[name]
    code, answer = server.request("/v1/explain", body)
    assert code == status and needle in json.dumps(answer), answer
    code, answer = server.request("/v1/explain", {"text": "The dog sees a cat.", "beam_size": 2})
    assert code == 200 and answer["beam"]["translation"] == server.translate(["The dog sees a cat."], beam_size=2)[1][
        "translations"][0]


def test_a_client_that_goes_away_costs_nothing_else(server, lines):
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"text": lines * 1}).encode()
    for _ in range(3):  # sent whole, then gone before the answer; and cut off halfway through the body
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // (1 + _ % 2)])
    code, answer = server.translate(lines[:3])
    assert code == 200 and len(answer["translations"]) == 3
    assert server.process.poll() is None


def test_health_answers_during_a_long_request_and_sigterm_lets_it_finish(trained, lines):
    s = Server(trained, "--set", "serve.max_chars=1000000")
    long = [" ".join(lines[i:i + 4]) for i in range(0, 50)] * 20  # 1,000 long lines, beam 5: seconds of work
    result = {}
    def client() -> None:
        began = time.perf_counter()
        result["answer"] = s.translate(long, beam_size=5)
        result["seconds"] = time.perf_counter() - began
    worker = threading.Thread(target=client)
    worker.start()
    time.sleep(0.5)
    assert s.request("/health", timeout=60)[0] == 200
    assert worker.is_alive()  # answered while the search runs (an order of events, not a duration)
    s.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert worker.is_alive()  # still in flight when the signal came
    with pytest.raises(OSError):  # no new requests once stopping
        s.request("/health", timeout=5)
    assert s.process.wait(120) == 0
    worker.join()
    code, body = result["answer"]
    print(f"the long request took {result['seconds']:.1f}s")
    assert code == 200 and len(body["translations"]) == len(long) and all(body["translations"])
    assert "Finished server process" in "".join(s.log)


def test_the_commands_of_docs_serving_md(trained):
    """docs/serving.md's block, run: each `mtkit serve` line on a free port (--port 0), then its
    curl line against the first server."""
    from tests.test_docs import blocks, commands

    from tests.conftest import REPO

    (block,) = [body for mark, lang, body in blocks(REPO / "docs" / "serving.md") if lang == "bash"]
    lines = commands(block)
    servers = []
    try:
        for line in lines:
            argv = shlex.split(line)
            if argv[:2] == ["mtkit", "serve"]:
                if "--port" in argv:
                    del argv[argv.index("--port"):argv.index("--port") + 2]
                servers.append(Server(trained, *argv[3:]))
        assert len(servers) == 2
        (curl,) = [line for line in lines if line.startswith("curl ")]
        url = servers[0].url
        out = subprocess.run(shlex.split(curl.replace("localhost:8000", url.removeprefix("http://"))),
                             capture_output=True, text=True, timeout=60, check=True).stdout
        assert json.loads(out)["translations"][1] == "" and len(json.loads(out)["translations"]) == 3
        assert servers[1].request("/v1/model")[1]["decode"]["beam_size"] == 4
    finally:
        for s in servers:
            assert s.stop() == 0


def test_a_lone_client_waits_for_nobody(trained):
    """The batch window is for company that is likely: one request after another, each alone,
    is searched at once (here the window is an hour; neither request waits it)."""
    from mtkit.serve import Batcher
    from mtkit.translate import Translator

    t = Translator.load(trained)
    batcher = Batcher(lambda: t, wait=3600.0)
    for line in ["The dog sees a cat.", "A boy runs."]:
        found = batcher.submit(t.encode([line]), t.options(beam_size=2)).result(timeout=600)
        assert found[0][0][1] == t.translate([line], beam_size=2)[0]
    batcher.close()
    assert not batcher.thread.is_alive() and (batcher.requests, batcher.searches) == (2, 2)


def test_the_serve_benchmark_runs_and_ends_on_its_json_line(trained, demo_dir):
    """scripts/bench_serve.py against a real server, cut small: it finishes, and its last line is
    the JSON it promises (once it stopped at a name left over from an earlier cpuinfo reader)."""
    script = Path(__file__).parents[1] / "scripts" / "bench_serve.py"
    done = subprocess.run([sys.executable, str(script), "--checkpoint", str(trained), "--data-dir", str(demo_dir),
                           "--split", "test", "--src", "en", "--clients", "2", "--beams", "1", "--alone", "3",
                           "--soak", "0"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["cpu"] and figures["server_exit_code"] is not None
    assert [(r["clients"], r["beam"], r["requests"], r["errors"]) for r in figures["runs"]] == [(2, 1, 1000, 0)]
