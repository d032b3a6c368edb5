"""What several test modules share (fixtures are conftest.py's): the bad-input table's verdicts,
a tiny model and batch, the reference beam search, a real server process, the docs' code blocks.
A test module imports from here or from conftest, never from another test module."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from mtkit.config import ModelSection
from mtkit.model import ModelConfig, Transformer
from mtkit.search import length_penalty
from mtkit.tokenizer import BOS_ID, EOS_ID, PAD_ID

# ---------------------------------------------------------------------------------------------
# The bad-input table: each row is refused with one clear message, or handled correctly.

@dataclass(frozen=True)
class Refused:
    message: str  # a part of the one error line


@dataclass(frozen=True)
class Handled:
    check: Callable  # raises AssertionError when the input was mishandled


def assert_refused(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert message in err, err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
    assert "Traceback" not in err


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write in: read-only permissions, or (for root, whom
    permissions do not stop) sysfs, which refuses new files even to root."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    folder = Path("/sys/kernel")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return folder
    pytest.skip("no folder here refuses root's writes")


# ---------------------------------------------------------------------------------------------
# A tiny model and a batch with padding (tests/test_model.py, test_search.py).

PAD, BOS, EOS = 0, 2, 3


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(d_model=32, heads=4, enc_layers=2, dec_layers=2, ff_dim=64, dropout=0.0, max_positions=64)
    cfg.update(kw)
    section = {k: v for k, v in cfg.items() if k in ModelSection.model_fields}  # defaults and checks: the config's
    extra = {k: v for k, v in cfg.items() if k not in section}
    extra = {"src_vocab": 37, "tgt_vocab": 37, "share_src_tgt": True, **extra}
    return Transformer(ModelConfig(**ModelSection(**section).model_dump(), **extra)).eval()


def batch(b=3, s=7, t=6, vocab=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (b, s), generator=g)
    tgt = torch.randint(4, vocab, (b, t), generator=g)
    src[1, 4:] = PAD  # a short sentence in the batch
    tgt[1, 3:] = PAD
    tgt[:, 0] = BOS
    return src, tgt


# ---------------------------------------------------------------------------------------------
# The textbook beam search, one sentence and one beam at a time, every step over the whole
# prefix (tests/test_reference_decoder.py, test_explain.py).

@torch.no_grad()
def reference_beam(model, src: list[int], k: int, limit: int, alpha: float) -> list[tuple[float, float, list[int]]]:
    """-> up to k finished (score, log_prob, tokens), best first."""
    memory = model.encode(torch.tensor([src + [EOS_ID]]))
    beams = [([BOS_ID], 0.0)]  # (prefix, log-probability)
    finished, count = [], 0
    for step in range(limit + 1):
        totals = []
        for prefix, log_prob in beams:
            next_lp = model.decode(torch.tensor([prefix]), memory)[0][0, -1].float().log_softmax(-1)
            next_lp[[PAD_ID, BOS_ID]] = float("-inf")  # never written
            if step >= limit:  # out of room: only EOS may follow, at no cost
                next_lp = torch.full_like(next_lp, float("-inf"))
                next_lp[EOS_ID] = 0.0
            totals.append(log_prob + next_lp)
        flat = torch.stack(totals).flatten()
        vocab = totals[0].numel()
        top, index = flat.topk(min(2 * k, flat.numel()))
        candidates = [(s, beams[i // vocab][0], i % vocab) for s, i in zip(top.tolist(), index.tolist())]
        for rank, (s, prefix, token) in enumerate(candidates):
            if token == EOS_ID and rank < k and s > float("-inf"):
                finished.append((s / length_penalty(step + 1.0, alpha), s, prefix[1:]))
                count += 1
        finished = sorted(finished, key=lambda f: -f[0])[:k]
        if count >= k or step >= limit:
            return finished
        beams = [(prefix + [token], s) for s, prefix, token in candidates if token != EOS_ID][:k]
    return finished


# ---------------------------------------------------------------------------------------------
# A real `mtkit serve` process (tests/test_serve.py, test_explorer.py, test_marian.py,
# test_multilingual.py).

STARTED: list[subprocess.Popen] = []


# Every wait in these tests is only a guard against a hang: beside a busy core a server took over
# 120 s to start and over 60 s to stop, so none is shorter than this.
HANG = 600


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
        deadline = time.monotonic() + HANG  # a busy machine starts it slowly
        while not found.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"the server did not start (exit code {self.process.poll()}):\n"
                                     + "".join(self.log))

    def request(self, path: str, body=None, timeout: float = HANG) -> tuple[int, dict]:
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
        return self.process.wait(HANG)


def translated(cli, tmp_path: Path, trained: Path, lines: list[str], *args: str) -> list[str]:
    """What `mtkit translate` writes for these lines."""
    source = tmp_path / f"in{len(args)}.txt"
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    code, out, err = cli("translate", trained, "-i", source, *args)
    assert code == 0, err
    return out.split("\n")[:-1]


# ---------------------------------------------------------------------------------------------
# The fenced code blocks of the docs (tests/test_docs.py, test_serve.py, test_explorer.py).

BLOCK = re.compile(r"(?:<!-- (?P<mark>[^>]*) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def blocks(page: Path) -> list[tuple[str | None, str, str]]:
    """(mark, language, text) of each fenced block of a page."""
    return [(m["mark"], m["lang"], m["body"]) for m in BLOCK.finditer(page.read_text(encoding="utf-8"))]


def commands(text: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = text.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def losses(workdir: Path) -> list[tuple[int, float]]:
    """The (step, loss) of each train line a run logged in its metrics.jsonl."""
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in events if e["event"] == "train"]
