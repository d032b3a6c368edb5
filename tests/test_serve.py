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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers import HANG, Server, translated

pytestmark = pytest.mark.slow  # the full suite's (CI's); `pytest -m "not slow"` is the fast tier

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def server(trained):
    s = Server(trained, "--set", "serve.batch_wait_ms=50", "--set", "serve.max_lines=100",
               "--set", "serve.max_chars=20000", "--set", "serve.max_body_bytes=100000")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def lines(demo_dir) -> list[str]:
    return (demo_dir / "test.en").read_text(encoding="utf-8").splitlines()[:60]


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
    with urllib.request.urlopen(server.url + "/docs", timeout=HANG) as r:
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
    # Each request's work is bounded, and every number held to the config's rule (config.Checked):
    # a beam of 30,000 took 41 s and 760 MB while others waited; 1e9, NaN, Infinity, 1e308 and a
    # lone surrogate were 500s with a traceback in the log; true was taken for a beam of 1.
    "beam 30,000": ({"text": ["A dog."], "beam_size": 30000}, 422, "serve.max_beam_size (16)"),
    "beam 1e9": ({"text": ["A dog."], "beam_size": 10**9}, 422, "serve.max_beam_size (16)"),
    "n_best 17": ({"text": ["A dog."], "n_best": 17}, 422, '"loc": ["body", "n_best"]'),
    "beam true": ({"text": ["A dog."], "beam_size": True}, 422, "a number, not true"),
    "alpha NaN": (b'{"text": ["A dog."], "alpha": NaN}', 422, "finite number"),
    "alpha Infinity": (b'{"text": ["A dog."], "alpha": Infinity}', 422, "finite number"),
    "alpha 1e308": ({"text": ["A dog."], "alpha": 1e308}, 422, "less than or equal to 10"),
    "a lone surrogate": (b'{"text": ["A dog.", "\\ud800"]}', 422, "text[1] holds '\\\\ud800'"),
    "a body over serve.max_body_bytes": ({"text": ["A dog."] * 20_000}, 413, "serve.max_body_bytes (100,000 bytes)"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_a_bad_request_is_refused_clearly_and_harms_nothing(server, name):
    body, status, needle = BAD_REQUESTS[name]
    code, answer = server.request("/v1/translate", body)
    assert code == status and needle in json.dumps(answer), answer
    code, answer = server.translate(["The dog sees a cat."])
    assert code == 200 and answer["translations"][0]
    assert "Traceback" not in "".join(server.log)


def test_a_refusal_does_not_echo_the_body(server):
    code, answer = server.request("/v1/translate", {"text": "x" * 90_000})  # one string, not a list
    assert code == 422 and len(json.dumps(answer)) < 500, len(json.dumps(answer))


def test_a_chunked_body_is_counted_as_it_arrives(server):
    """No Content-Length to judge by: the body is refused once it is over serve.max_body_bytes."""
    host, port = server.url.removeprefix("http://").split(":")
    chunk = b'["' + b"a" * 60_000 + b'",'
    with socket.create_connection((host, int(port)), timeout=HANG) as s:
        s.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(2):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        s.sendall(b"0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 413")
    assert server.translate(["A dog."])[0] == 200 and "Traceback" not in "".join(server.log)


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
    "alpha NaN": (b'{"text": "A dog.", "alpha": NaN}', 422, "finite number"),
    "a lone surrogate in the what-if": (b'{"text": "A dog.", "translation": "\\udfff"}', 422, "surrogate"),
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
    assert server.process.poll() is None and "Traceback" not in "".join(server.log)


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
    assert s.request("/health")[0] == 200
    assert worker.is_alive()  # answered while the search runs (an order of events, not a duration)
    s.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert worker.is_alive()  # still in flight when the signal came
    with pytest.raises(OSError):  # no new requests once stopping
        s.request("/health", timeout=5)
    assert s.process.wait(HANG) == 0
    worker.join()
    code, body = result["answer"]
    print(f"the long request took {result['seconds']:.1f}s")
    assert code == 200 and len(body["translations"]) == len(long) and all(body["translations"])
    assert "Finished server process" in "".join(s.log)


def test_the_commands_of_docs_serving_md(trained):
    """docs/serving.md's block, run: each `mtkit serve` line on a free port (--port 0), then its
    curl line against the first server."""
    from tests.helpers import blocks, commands

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
                             capture_output=True, text=True, timeout=HANG, check=True).stdout
        assert json.loads(out)["translations"][1] == "" and len(json.loads(out)["translations"]) == 3
        assert servers[1].request("/v1/model")[1]["decode"]["beam_size"] == 4
    finally:
        for s in servers:
            assert s.stop() == 0


def test_a_lone_client_waits_for_nobody(trained):
    """The batch window is for company that is likely: one request after another, each alone,
    is searched at once (here the window is an hour; neither request waits it)."""
    from mtkit.batcher import Batcher
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
                           "--soak", "0", "--timeout", "3600"], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["cpu"] and figures["server_exit_code"] is not None
    # (a client waits as long as the machine needs: beside a busy core, 2 of 1,000 once were errors, whose kind
    # was not kept; the client's 120-s timeout is the likely one. Should it happen again, the errors are shown.)
    assert [(r["clients"], r["beam"], r["requests"], r["errors"]) for r in figures["runs"]] == [(2, 1, 1000, 0)], \
        [r["error_samples"] for r in figures["runs"]]


def test_a_search_whose_client_hung_up_stops_at_its_next_batch(trained, lines):
    """Batcher.forget: a request still waiting is never searched, and a running search that serves
    only forgotten requests stops after the batch of sentences in hand. The engine is the real one,
    held after its first batch until the client is gone, so that the order of events is certain."""
    from mtkit.batcher import Batcher, Unwanted
    from mtkit.translate import Translator

    t = Translator.load(trained)
    running, forgotten, batches = threading.Event(), threading.Event(), []
    search = t.translate_ids

    def held(ids, opts, on_sentences=None):
        def hook(n):
            batches.append(n)
            running.set()
            forgotten.wait(HANG)
            on_sentences(n)
        return search(ids, opts, on_sentences=hook)
    t.translate_ids = held
    batcher = Batcher(lambda: t)
    first = batcher.submit(t.encode(lines), t.options(beam_size=2, max_tokens=40))  # many batches
    assert running.wait(HANG)
    waiting = batcher.submit(t.encode(lines[:2]), t.options(beam_size=3))  # other settings: the next turn
    batcher.forget(waiting)
    batcher.forget(first)
    forgotten.set()
    with pytest.raises(Unwanted):
        first.result(timeout=HANG)
    assert waiting.cancelled() and len(batches) == 1 and batcher.abandoned == 2
    t.translate_ids = search
    later = batcher.submit(t.encode(lines[:2]), t.options(beam_size=2))
    assert [h[0][1] for h in later.result(timeout=HANG)] == t.translate(lines[:2], beam_size=2)
    batcher.close()


def test_a_client_that_hangs_up_is_forgotten(trained, lines):
    """Over HTTP: the request is sent whole, the client closes the connection, and the server
    counts it abandoned (before or during its search), then answers the next client. The search
    it gave up ends in silence (asyncio once logged its exception as never retrieved)."""
    s = Server(trained, "--set", "decode.max_tokens=30", "--set", "serve.max_chars=1000000")
    try:
        before = s.request("/health")[1]
        long = [" ".join(lines[i:i + 4]) for i in range(0, 50)] * 4  # 200 long lines, beam 16, ~50 batches
        body = json.dumps({"text": long, "beam_size": 16}).encode()
        host, port = s.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as c:
            c.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 600  # only against a hang
            while s.request("/health")[1]["requests"] == before["requests"]:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        while s.request("/health")[1]["abandoned"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        code, answer = s.translate(lines[:2], beam_size=2)
        assert code == 200 and len(answer["translations"]) == 2
    finally:
        assert s.stop() == 0
    assert "Traceback" not in "".join(s.log) and "never retrieved" not in "".join(s.log), "".join(s.log)


# Requests drawn from the request models' fields: each of the right type or not, with the extremes
# (NaN, infinities, huge and negative numbers, true/false, a lone surrogate, unknown fields).
NUMBERS = st.one_of(st.integers(-2 ** 70, 2 ** 70), st.sampled_from([0, 1, 16, 17, 30_000, 10 ** 9]),
                    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), st.text(max_size=4))
LINES = st.one_of(st.text(max_size=40), st.sampled_from(["\ud800", "A dog.\udfff", "", " \t ", "\x00", "\u200f"]))
REQUESTS = st.fixed_dictionaries({}, optional={
    "text": st.one_of(st.lists(LINES, max_size=5), LINES, NUMBERS),
    "beam_size": NUMBERS, "alpha": NUMBERS, "n_best": NUMBERS, "translation": st.one_of(st.none(), LINES, NUMBERS),
    "target_lang": st.one_of(st.none(), st.text(max_size=5), NUMBERS), "beam": NUMBERS})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=REQUESTS)
def test_any_request_is_answered_or_refused_never_an_error(server, body):
    """2xx or 4xx for whatever a client sends, and the server still answers after it."""
    data = json.dumps(body).encode()  # NaN and Infinity as JS writes them
    for path in ("/v1/translate", "/v1/explain"):
        code, answer = server.request(path, data)
        assert 200 <= code < 500, (path, body, code, answer)
    assert "Traceback" not in "".join(server.log)
