"""Stage `mtkit serve`: a model behind HTTP/JSON, searching concurrent requests together.

The model is loaded once. Every search runs in one worker thread (`Batcher`), off the event loop,
so /health answers while a long request is translated. Requests that wait together with the same
settings are searched as one batch: the same search_sorted as `mtkit translate` sorts their lines
by length and cuts token budgets, so each caller gets what `mtkit translate` gives for its lines,
and many callers cost little more than one. The HTTP side (FastAPI on uvicorn, pip install
'mtkit[serve]') is a thin layer over the engine: it validates, encodes, waits and answers.
"""

import asyncio
import contextlib
import signal
import socket
import threading
import time
from concurrent.futures import Future
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtkit import checkpoint
from mtkit.config import DecodeSection as DecodeOptions, ServeSection
from mtkit.console import info
from mtkit.engine import Engine, cut
from mtkit.errors import MtkitError
from mtkit.explain import MAX_BEAM, BadInput, explain, explorer_page
from mtkit.lineage import describe
from mtkit.translate import Translator


@dataclass(eq=False)  # a job is itself, not its content: two requests of the same lines are two jobs
class Job:
    """One request's lines, waiting for the worker; or a call to run on the engine alone."""
    ids: list[list[int]]
    opts: DecodeOptions | None
    future: Future
    arrived: float
    tokens: int
    call: Callable[[Engine], object] | None = None


class Batcher:
    """One worker thread runs every search. It takes the oldest waiting request, lets others join
    it for up to `wait` seconds (fewer when enough tokens are waiting), and searches the lines of
    all that share its settings as one list; requests with other settings wait for the next turn.
    It waits only for company that is likely: as many requests as the last search served (the
    callers it answered, coming back), or two when this one came while it was busy. A lone
    client's request is searched at once."""

    def __init__(self, load: Callable[[], Engine], wait: float = 0.0):
        """load: makes the engine, in the worker thread (`loaded` says when, or why not)."""
        self.wait = wait
        self.loaded: Future = Future()
        self.pending: list[Job] = []
        self.changed = threading.Condition()
        self.closing = False
        self.requests = self.searches = 0
        self.free_at, self.last_size = 0.0, 0  # when the last search ended; how many requests it served
        self.thread = threading.Thread(target=self._work, args=(load,), name="mtkit-search", daemon=True)
        self.thread.start()

    def submit(self, ids: list[list[int]], opts: DecodeOptions) -> Future:
        """The future of [(score, text), ...] (n-best, best first) for each line of `ids`."""
        job = Job(ids, opts, Future(), time.monotonic(), sum(len(x) + 1 for x in ids))
        with self.changed:
            self.pending.append(job)
            self.requests += 1
            self.changed.notify()
        return job.future

    def run(self, call: Callable[[Engine], object]) -> Future:
        """The future of call(engine), run by the worker in its turn (the Explorer's searches)."""
        job = Job([], None, Future(), time.monotonic(), 0, call)
        with self.changed:
            self.pending.append(job)
            self.requests += 1
            self.changed.notify()
        return job.future

    def close(self) -> None:
        """Search what is waiting, then stop the worker."""
        with self.changed:
            self.closing = True
            self.changed.notify()
        self.thread.join()

    def _next(self) -> list[Job] | None:
        with self.changed:
            while not self.pending and not self.closing:
                self.changed.wait()
            if not self.pending:
                return None
            first = self.pending[0]
            if first.call is not None:
                return [self.pending.pop(0)]
            budget = first.opts.max_tokens

            def alike() -> list[Job]:
                return [j for j in self.pending if j.call is None and j.opts == first.opts]
            # Closed-loop clients come back after each answer: wait (at most `wait`) for as many as
            # the last search served, or for two when this one came while the worker was busy.
            expected = max(self.last_size, 2) if first.arrived < self.free_at else self.last_size
            until = max(first.arrived, self.free_at) + self.wait
            while (len(same := alike()) < expected and sum(j.tokens for j in same) < budget
                   and (left := until - time.monotonic()) > 0):
                self.changed.wait(left)
            batch, tokens = [], 0
            for job in alike():  # the oldest first; the first always goes, however large
                if batch and tokens + job.tokens > budget:
                    break
                batch.append(job)
                tokens += job.tokens
            self.pending = [j for j in self.pending if j not in batch]
            return batch

    def _work(self, load: Callable[[], Engine]) -> None:
        # The model is loaded in the thread that searches with it: torch's OpenMP threads belong to
        # the thread that starts them, and a second set (loading in one thread, searching in
        # another) made each search about 30% slower (measured).
        try:
            self.engine = load()
        except BaseException as e:  # noqa: BLE001 -- said by whoever waits for `loaded`
            self.loaded.set_exception(e)
            return
        self.loaded.set_result(self.engine)
        while (batch := self._next()) is not None:
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]  # gone: skipped
            if not batch:
                continue
            self.searches += 1
            if batch[0].call is not None:
                _settle(batch[0].future, batch[0].call, self.engine)
                continue
            try:
                found = self.engine.translate_ids([x for job in batch for x in job.ids], batch[0].opts)
            except Exception as e:  # noqa: BLE001 -- the server outlives any request: theirs fail, not it
                found = e
            self.free_at, self.last_size = time.monotonic(), len(batch)  # before any caller can come back
            start = 0
            for job in batch:
                if isinstance(found, Exception):
                    job.future.set_exception(found)
                else:
                    job.future.set_result(found[start:start + len(job.ids)])
                start += len(job.ids)


def _settle(future: Future, call: Callable[[Engine], object], engine: Engine) -> None:
    try:
        future.set_result(call(engine))
    except Exception as e:  # noqa: BLE001 -- the caller's failure, not the server's
        future.set_exception(e)


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: list[str] = Field(description="Lines to translate: one translation each, in order.")
    beam_size: int | None = Field(None, ge=1, description="Beam size (1: greedy); default: the server's.")
    alpha: float | None = Field(None, ge=0.0, description="Length penalty exponent; default: the server's.")
    n_best: int | None = Field(None, ge=1, description="Hypotheses per line (at most beam_size).")
    target_lang: str | None = Field(None, description="The language to translate into (a model of several needs it).")


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="One sentence to translate and explain.")
    beam_size: int | None = Field(None, ge=1, le=MAX_BEAM, description="Beam size (1: greedy); default: the server's.")
    alpha: float | None = Field(None, ge=0.0, le=5.0, description="Length penalty exponent; default: the server's.")
    translation: str | None = Field(None, description="What if: a translation for the model to score, subword by subword.")
    target_lang: str | None = Field(None, description="The language to translate into (a model of several needs it).")


class Scored(BaseModel):
    text: str
    score: float


class TranslateResponse(BaseModel):
    translations: list[str] = Field(description="The best translation of each line; a blank line gives \"\".")
    nbest: list[list[Scored]] | None = Field(None, description="With n_best > 1: each line's hypotheses, best first.")
    warnings: list[str] = Field(default_factory=list, description="Lines cut to the model's length, by index.")


def create_app(batcher: Batcher, defaults: DecodeOptions, settings: ServeSection) -> FastAPI:
    """The HTTP application over the batcher's loaded model (`defaults`: the decoding settings of
    a request that gives none)."""
    translator = batcher.loaded.result()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()  # uvicorn has let the requests in flight finish

    app = FastAPI(title="mtkit", version="1", lifespan=lifespan,
                  description="Machine translation with a model trained by mtkit. The search batches concurrent requests.")
    about = model_facts(translator, defaults)
    add_explorer(app, batcher, defaults, settings)

    @app.post("/v1/translate", response_model=TranslateResponse, response_model_exclude_none=True)
    async def translate(request: TranslateRequest) -> TranslateResponse:
        """Translate lines: the contract of `mtkit translate` (one translation per line, in order)."""
        if len(request.text) > settings.max_lines:
            raise HTTPException(413, f"{len(request.text):,} lines: a request takes at most serve.max_lines "
                                     f"({settings.max_lines:,})")
        chars = sum(map(len, request.text))
        if chars > settings.max_chars:
            raise HTTPException(413, f"{chars:,} characters: a request takes at most serve.max_chars "
                                     f"({settings.max_chars:,})")
        opts = request_options(defaults, request.model_dump(exclude={"text", "target_lang"}, exclude_none=True))
        ids = encode(translator, request.text, request.target_lang)
        warnings = [f"text[{i}]: longer than the model's {translator.max_source_tokens} source tokens; "
                    f"translated its beginning only" for i in cut(translator, ids)]
        found = await asyncio.wrap_future(batcher.submit(ids, opts))
        nbest = [[Scored(text=t, score=s) for s, t in hyps] for hyps in found] if opts.n_best > 1 else None
        return TranslateResponse(translations=[hyps[0][1] for hyps in found], nbest=nbest, warnings=warnings)

    @app.get("/v1/model")
    async def model() -> dict:
        """The model: languages, size, configuration, decoding defaults, where it comes from."""
        return about

    @app.get("/health")
    async def health() -> dict:
        """Liveness: answers whenever the process does, a search in progress or not."""
        return {"status": "ok", "requests": batcher.requests, "searches": batcher.searches}

    @app.get("/ready")
    async def ready() -> dict:
        """Readiness: the model is loaded and the search worker runs (503 otherwise)."""
        if not batcher.thread.is_alive() or batcher.closing:
            raise HTTPException(503, "not ready")
        return {"status": "ready"}

    return app


def add_explorer(app: FastAPI, batcher: Batcher, defaults: DecodeOptions, settings: ServeSection) -> None:
    """The Explorer page at / and the data it draws, POST /v1/explain."""
    page = explorer_page(live=True)

    @app.post("/v1/explain")
    async def explain_(request: ExplainRequest) -> dict:
        """One sentence laid open: its subwords, the search tree (beam and greedy), the attention of
        the winning translation, and the score of a what-if translation (the Explorer's data)."""
        longest = max(len(request.text), len(request.translation or ""))
        if longest > settings.max_chars:
            raise HTTPException(413, f"{longest:,} characters: a request takes at most serve.max_chars "
                                     f"({settings.max_chars:,})")
        given = request.model_dump(include={"beam_size", "alpha"}, exclude_none=True)
        opts = request_options(defaults.model_copy(update={"n_best": 1}), given)
        try:
            return await asyncio.wrap_future(batcher.run(lambda engine: explain(engine, request.text, opts,
                                                                                  request.translation,
                                                                                  request.target_lang)))
        except BadInput as e:
            raise RequestValidationError([{"type": "value_error", "loc": ("body", e.field), "msg": e.message,
                                           "input": getattr(request, e.field)}]) from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def explorer() -> str:
        """The Explorer: a page that asks /v1/explain and draws the answer."""
        return page


def encode(translator: Engine, lines: list[str], target_lang: str | None) -> list[list[int]]:
    """The request's lines as source ids; a model of several target languages needs target_lang
    (a 422 naming it, else)."""
    try:
        return translator.encode(lines, target_lang)
    except MtkitError as e:
        raise RequestValidationError([{"type": "value_error", "loc": ("body", "target_lang"), "msg": e.message,
                                       "input": target_lang}]) from None


def request_options(defaults: DecodeOptions, given: dict) -> DecodeOptions:
    """The server's decoding settings with the request's own (`given`); a contradiction (n_best
    above the beam) is a 422 naming the field, as the request's own validation says it."""
    try:
        return DecodeOptions(**defaults.model_dump() | given)
    except ValidationError as e:
        field = "n_best" if "n_best" in given else "beam_size"
        raise RequestValidationError([{"type": "value_error", "loc": ("body", field),
                                       "msg": err["msg"].removeprefix("Value error, ").replace("decode.", ""),
                                       "input": given.get(field)}
                                      for err in e.errors()]) from None


def model_facts(translator: Translator, defaults: DecodeOptions) -> dict:
    state = checkpoint.load(translator.path, mmap=True)
    data = translator.config.get("data", {})
    return {"source_language": data.get("src"), "target_language": data.get("tgt"),
            "directions": translator.directions,
            "target_languages": translator.targets,
            "parameters": sum(p.numel() for p in translator.model.parameters()),
            "model": asdict(translator.model.cfg), "decode": defaults.model_dump(),
            "checkpoint": str(translator.path), "step": state.get("step"),
            "init_from": state.get("init_from"), "lineage": describe(state.get("init_from")),
            "imported_from": state.get("imported_from"),
            "valid_bleu": state.get("progress", {}).get("best_bleu"),
            "precision": translator.precision, "device": str(translator.device)}


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken port is said at once, and a
    client that connects while the model loads waits instead of being refused."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise MtkitError(f"--host {host}: {e.strerror}", hint="an address of this machine, e.g. 127.0.0.1 or 0.0.0.0")
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)  # from now on connections wait in the queue, until the server takes them
    except OSError as e:
        sock.close()
        raise MtkitError(f"cannot listen on {host}:{port}: {e.strerror}",
                         hint="another server may hold the port: choose another with --port") from None
    return sock


def serve(path: Path, *, host: str, port: int, device: str, precision: str, decode: dict, limits: dict) -> None:
    """Load the model and serve until SIGTERM or Ctrl-C, which stop accepting requests, let the
    ones in flight finish, and return."""
    sock = listen(host, port)
    batcher = Batcher(lambda: Translator.load(path, device, precision))
    try:
        translator = batcher.loaded.result()
        try:
            settings = ServeSection(**translator.config.get("serve", {}) | limits)
        except ValidationError as e:
            raise MtkitError("bad serve settings: " + "; ".join(
                f"serve.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())) from None
        batcher.wait = settings.batch_wait_ms / 1000
        app = create_app(batcher, translator.options(**decode), settings)
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=None))
        bound = sock.getsockname()
        info(f"serve: {translator.path} at http://{bound[0]}:{bound[1]} (API docs at /docs); "
             f"Ctrl-C stops after the requests in flight")
        # uvicorn re-raises the signal that stopped it once it has drained: answered by a handler
        # that does nothing, it ends the server with exit code 0 instead of killing the process.
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run(sockets=[sock])
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        batcher.close()
        sock.close()
