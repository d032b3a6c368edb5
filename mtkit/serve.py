"""Stage `mtkit serve`: a model behind HTTP/JSON, searching concurrent requests together.

The model is loaded once. Every search runs in one worker thread (batcher.py), off the event loop,
so /health answers while a long request is translated. Requests that wait together with the same
settings are searched as one batch: the same search_sorted as `mtkit translate` sorts their lines
by length and cuts token budgets, so each caller gets what `mtkit translate` gives for its lines,
and many callers cost little more than one. Each request's work is bounded (serve.* limits). The HTTP side (FastAPI on uvicorn, pip install
'mtkit[serve]') is a thin layer over the engine: it validates, encodes, waits and answers.
"""

import asyncio
import contextlib
import signal
import socket
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError, field_validator

from mtkit import checkpoint
from mtkit.config import DecodeSection, ServeSection
from mtkit.config_text import Checked
from mtkit.batcher import Batcher
from mtkit.console import info
from mtkit.engine import Engine, cut
from mtkit.errors import MtkitError
from mtkit.explain import MAX_BEAM, BadInput, explain, explorer_page
from mtkit.lineage import describe
from mtkit.translate import Translator


def _unicode(text: str, field: str) -> str:
    """JSON can carry a lone surrogate ("\\ud800"), which no tokenizer can encode: a 422, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{field} holds {text[e.start]!a}, half of a UTF-16 surrogate pair: not a character") from None
    return text


class TranslateRequest(Checked):  # finite numbers, no true/false for one: the config's rule
    text: list[str] = Field(description="Lines to translate: one translation each, in order.")
    beam_size: int | None = Field(None, ge=1, description="Beam size (1: greedy), at most serve.max_beam_size; "
                                                          "default: the server's.")
    alpha: float | None = Field(None, ge=0.0, description="Length penalty exponent; default: the server's.")
    n_best: int | None = Field(None, ge=1, description="Hypotheses per line (at most beam_size).")
    target_lang: str | None = Field(None, description="The language to translate into (a model of several needs it).")

    @field_validator("text")
    @classmethod
    def _characters(cls, lines: list[str]) -> list[str]:
        return [_unicode(line, f"text[{i}]") for i, line in enumerate(lines)]


class ExplainRequest(Checked):
    text: str = Field(description="One sentence to translate and explain.")
    beam_size: int | None = Field(None, ge=1, le=MAX_BEAM, description="Beam size (1: greedy); default: the server's.")
    alpha: float | None = Field(None, ge=0.0, le=5.0, description="Length penalty exponent; default: the server's.")
    translation: str | None = Field(None, description="What if: a translation for the model to score, subword by subword.")
    target_lang: str | None = Field(None, description="The language to translate into (a model of several needs it).")

    @field_validator("text", "translation")
    @classmethod
    def _characters(cls, text: str | None, info) -> str | None:
        return text if text is None else _unicode(text, info.field_name)


class Scored(BaseModel):
    text: str
    score: float


class TranslateResponse(BaseModel):
    translations: list[str] = Field(description="The best translation of each line; a blank line gives \"\".")
    nbest: list[list[Scored]] | None = Field(None, description="With n_best > 1: each line's hypotheses, best first.")
    warnings: list[str] = Field(default_factory=list, description="Lines cut to the model's length, by index.")


def create_app(batcher: Batcher, defaults: DecodeSection, settings: ServeSection) -> FastAPI:
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
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, refused)
    add_explorer(app, batcher, defaults, settings)

    @app.post("/v1/translate", response_model=TranslateResponse, response_model_exclude_none=True)
    async def translate(request: TranslateRequest, http: Request) -> TranslateResponse:
        """Translate lines: the contract of `mtkit translate` (one translation per line, in order)."""
        if len(request.text) > settings.max_lines:
            raise HTTPException(413, f"{len(request.text):,} lines: a request takes at most serve.max_lines "
                                     f"({settings.max_lines:,})")
        chars = sum(map(len, request.text))
        if chars > settings.max_chars:
            raise HTTPException(413, f"{chars:,} characters: a request takes at most serve.max_chars "
                                     f"({settings.max_chars:,})")
        given = request.model_dump(exclude={"text", "target_lang"}, exclude_none=True)
        opts = request_options(defaults, given, settings)
        ids = encode(translator, request.text, request.target_lang)
        warnings = [f"text[{i}]: longer than the model's {translator.max_source_tokens} source tokens; "
                    f"translated its beginning only" for i in cut(translator, ids)]
        found = await answer(batcher, batcher.submit(ids, opts), http)
        nbest = [[Scored(text=t, score=s) for s, t in hyps] for hyps in found] if opts.n_best > 1 else None
        return TranslateResponse(translations=[hyps[0][1] for hyps in found], nbest=nbest, warnings=warnings)

    @app.get("/v1/model")
    async def model() -> dict:
        """The model: languages, size, configuration, decoding defaults, where it comes from."""
        return about

    @app.get("/health")
    async def health() -> dict:
        """Liveness: answers whenever the process does, a search in progress or not."""
        return {"status": "ok", "requests": batcher.requests, "searches": batcher.searches,
                "abandoned": batcher.abandoned}

    @app.get("/ready")
    async def ready() -> dict:
        """Readiness: the model is loaded and the search worker runs (503 otherwise)."""
        if not batcher.thread.is_alive() or batcher.closing:
            raise HTTPException(503, "not ready")
        return {"status": "ready"}

    return app


def add_explorer(app: FastAPI, batcher: Batcher, defaults: DecodeSection, settings: ServeSection) -> None:
    """The Explorer page at / and the data it draws, POST /v1/explain."""
    page = explorer_page(live=True)

    @app.post("/v1/explain")
    async def explain_(request: ExplainRequest, http: Request) -> dict:
        """One sentence laid open: its subwords, the search tree (beam and greedy), the attention of
        the winning translation, and the score of a what-if translation (the Explorer's data)."""
        longest = max(len(request.text), len(request.translation or ""))
        if longest > settings.max_chars:
            raise HTTPException(413, f"{longest:,} characters: a request takes at most serve.max_chars "
                                     f"({settings.max_chars:,})")
        given = request.model_dump(include={"beam_size", "alpha"}, exclude_none=True)
        opts = request_options(defaults.model_copy(update={"n_best": 1}), given, settings)
        try:
            return await answer(batcher, batcher.run(lambda engine: explain(engine, request.text, opts,
                                                                            request.translation, request.target_lang)),
                                http)
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


def request_options(defaults: DecodeSection, given: dict, settings: ServeSection) -> DecodeSection:
    """The server's decoding settings with the request's own (`given`); a contradiction (n_best
    above the beam) or a search wider than serve.max_beam_size is a 422 naming the field. The cap
    bounds what one request costs the others: a beam of 30,000 took 41 s and 760 MB."""
    for field in ("beam_size", "n_best"):
        if given.get(field, 0) > settings.max_beam_size:
            raise RequestValidationError([{"type": "less_than_equal", "loc": ("body", field),
                                           "msg": f"{field} {given[field]}: this server searches at most "
                                                  f"serve.max_beam_size ({settings.max_beam_size}) beams"}])
    try:
        return DecodeSection(**defaults.model_dump() | given)
    except ValidationError as e:
        field = "n_best" if "n_best" in given else next((f for f in ("beam_size", "alpha") if f in given), "beam_size")
        raise RequestValidationError([{"type": "value_error", "loc": ("body", field),
                                       "msg": err["msg"].removeprefix("Value error, ").replace("decode.", "")}
                                      for err in e.errors()]) from None


async def answer(batcher: Batcher, future: Future, http: Request):
    """The search's result; a client that hangs up meanwhile is forgotten (Batcher.forget)."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.25)
        if done:
            return waiting.result()
        if await http.is_disconnected():
            batcher.forget(future)
            waiting.cancel()  # nobody reads the search's end (Unwanted): asyncio would log it as unread
            raise HTTPException(499, "the client closed the request")  # nginx's code; nobody reads it


async def refused(request: Request, e: RequestValidationError) -> JSONResponse:
    """A 422 naming each field and what is wrong with it, without echoing what was sent: a 20 MB
    body came back whole, and NaN or a lone surrogate in it made the answer itself fail (a 500)."""
    return JSONResponse(status_code=422, content={"detail": [
        {"type": err["type"], "loc": list(err["loc"]), "msg": err["msg"]} for err in e.errors()]})


class BodyLimit:
    """Refuse a request body over `limit` bytes (413) before it is read further, let alone parsed:
    by its Content-Length, or by counting a chunked body as it arrives (then the application is
    told the client left, and what it would answer is dropped)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse(status_code=413, content={"detail": f"the body is over serve.max_body_bytes "
                                                                     f"({self.limit:,} bytes)"})
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit and not refused:
                refused = True
                await too_large(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def unless_refused(message):
            if not refused:
                await send(message)
        await self.app(scope, counted, unless_refused)


def model_facts(translator: Translator, defaults: DecodeSection) -> dict:
    state = checkpoint.load(translator.path, mmap=True)
    data = translator.config.get("data", {})
    return {"source_language": data.get("src"), "target_language": data.get("tgt"),
            "directions": translator.directions,
            "target_languages": translator.targets,
            "parameters": sum(p.numel() for p in translator.model.parameters()),
            "model": asdict(translator.model.cfg), "decode": defaults.model_dump(),
            "checkpoint": str(translator.path), "step": state.step,
            "init_from": state.init_from, "lineage": describe(state.init_from),
            "imported_from": state.imported_from,
            "valid_bleu": (state.progress or {}).get("best_bleu"),
            "precision": translator.precision, "device": str(translator.device)}


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken port is said at once, and a
    client that connects while the model loads waits instead of being refused."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise MtkitError(f"the host {host}: {e.strerror}", hint="an address of this machine, e.g. 127.0.0.1 or 0.0.0.0",
                         setting="host")
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
        defaults = translator.options(**decode)
        if defaults.beam_size > settings.max_beam_size:
            raise MtkitError(f"decode.beam_size {defaults.beam_size} is over serve.max_beam_size "
                             f"({settings.max_beam_size}): a request without a beam_size would be refused",
                             hint=f"--set serve.max_beam_size={defaults.beam_size}, or a smaller decode.beam_size")
        app = create_app(batcher, defaults, settings)
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
