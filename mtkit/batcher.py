"""Searching concurrent translation requests together: one worker thread runs every search, so
a server's event loop stays free, and requests that wait together with the same settings are
searched as one batch. What `mtkit serve` answers HTTP with (serve.py); nothing here knows HTTP.
"""

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from mtkit.config import DecodeSection
from mtkit.engine import Engine


@dataclass(eq=False)  # a job is itself, not its content: two requests of the same lines are two jobs
class Job:
    """One request's lines, waiting for the worker; or a call to run on the engine alone."""
    ids: list[list[int]]
    opts: DecodeSection | None
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
        self.requests = self.searches = self.abandoned = 0
        self.gone: set[Future] = set()  # requests whose client hung up: a search of only those stops
        self.free_at, self.last_size = 0.0, 0  # when the last search ended; how many requests it served
        self.thread = threading.Thread(target=self._work, args=(load,), name="mtkit-search", daemon=True)
        self.thread.start()

    def submit(self, ids: list[list[int]], opts: DecodeSection) -> Future:
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

    def forget(self, future: Future) -> None:
        """The client of `future` hung up: a request still waiting is never searched, and a search
        that serves only such requests stops at its next batch of sentences."""
        with self.changed:
            if future.cancel():
                self.abandoned += 1
            else:
                self.gone.add(future)

    def _still_wanted(self, batch: list[Job]) -> None:
        if all(job.future in self.gone for job in batch):
            raise Unwanted()

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
                found = self.engine.translate_ids([x for job in batch for x in job.ids], batch[0].opts,
                                                  on_sentences=lambda _: self._still_wanted(batch))
            except Exception as e:  # noqa: BLE001 -- the server outlives any request: theirs fail, not it
                found = e
            with self.changed:
                self.gone.difference_update(job.future for job in batch)
                self.abandoned += isinstance(found, Unwanted)
            self.free_at, self.last_size = time.monotonic(), len(batch)  # before any caller can come back
            start = 0
            for job in batch:
                if isinstance(found, Exception):
                    job.future.set_exception(found)
                else:
                    job.future.set_result(found[start:start + len(job.ids)])
                start += len(job.ids)


class Unwanted(Exception):
    """Every client of a search has hung up."""


def _settle(future: Future, call: Callable[[Engine], object], engine: Engine) -> None:
    try:
        future.set_result(call(engine))
    except Exception as e:  # noqa: BLE001 -- the caller's failure, not the server's
        future.set_exception(e)
