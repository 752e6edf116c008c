"""One model, one generation at a time: a worker thread and a bounded queue of jobs.

Requests are answered in arrival order by the one thread that runs MLX. A request finding
`max_waiting` others already waiting is refused at once (`QueueFull`, a 503) instead of piling up.
A job streams its events (prefill progress, generation responses, its result or error) to the
request's event loop. Cancelling a job (the client went away) ends it at the next token or prefill
chunk, or once its prompt is templated and tokenized (work that the request's limits bound, checked
before it was queued): `Job.checkpoint` raises `Cancelled` there, so the model is free for the next job.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

log = logging.getLogger("mlx_unified.server")


class QueueFull(Exception):
    """Every place in the queue is taken."""


class Cancelled(Exception):
    """Raised inside a job's work once its client has gone."""


@dataclass
class Progress:
    done: int  # prompt tokens in the cache so far
    total: int


@dataclass
class Failure:
    error: BaseException


@dataclass
class Result:
    value: Any


DONE = object()  # the last event of every job


@dataclass
class Counters:
    """What the worker has done, for `/health` and the load test."""

    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    refused: int = 0
    peak_waiting: int = 0
    # After a cancel: tokens and prefill chunks the model still computed, and seconds until it was free.
    max_tokens_after_cancel: int = 0
    max_chunks_after_cancel: int = 0
    max_seconds_to_free: float = 0.0


@dataclass
class Job:
    work: Callable[[Job], None]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: int = 0  # generated so far
    chunks: int = 0  # prefill chunks so far
    _cancel: threading.Event = field(default_factory=threading.Event)
    _cancelled_at: tuple[int, int, float] | None = None
    _finished: bool = False

    def emit(self, event: Any) -> None:
        """Send an event to the request (from the worker thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """The client has gone: stop at the next token or prefill chunk (no-op once finished)."""
        if not self._finished and not self._cancel.is_set():
            self._cancelled_at = (self.tokens, self.chunks, time.perf_counter())
            self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def checkpoint(self) -> None:
        if self._cancel.is_set():
            raise Cancelled

    def token_done(self) -> None:
        """Count one generated token, then stop if cancelled."""
        self.tokens += 1
        self.checkpoint()

    def prefill_progress(self, done: int, total: int) -> None:
        """`stream_generate`'s prefill callback: count the chunk, stop if cancelled, report it."""
        self.chunks += 1
        self.checkpoint()
        self.emit(Progress(done, total))


class Worker:
    def __init__(self, max_waiting: int, after_job: Callable[[], None] | None = None) -> None:
        self.max_waiting = max_waiting
        self.after_job = after_job
        self.counters = Counters()
        self.waiting = 0
        self.running: Job | None = None
        self._lock = threading.Lock()
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="mlx-unified-worker", daemon=True)
        self._thread.start()

    def check_room(self) -> None:
        """QueueFull (counted as a refusal) if a job submitted now would be refused: a request checks
        this before decoding its media, so a full queue costs it nothing."""
        with self._lock:
            self._refuse_if_full()

    def submit(self, work: Callable[[Job], None]) -> Job:
        """Queue `work(job)`; QueueFull when `max_waiting` jobs are already waiting."""
        job = Job(work, asyncio.get_running_loop())
        with self._lock:
            self._refuse_if_full()
            self.waiting += 1
            self.counters.peak_waiting = max(self.counters.peak_waiting, self.waiting)
        self._jobs.put(job)
        return job

    def _refuse_if_full(self) -> None:
        if self.waiting >= self.max_waiting:
            self.counters.refused += 1
            raise QueueFull

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                self.waiting -= 1
                self.running = job
            failed = False
            try:
                if not job.cancelled:
                    job.work(job)
            except Cancelled:
                pass
            except Exception as error:  # reported to the request; the worker keeps serving
                failed = True
                if not isinstance(error, InputError):
                    log.exception("request failed")
                job.emit(Failure(error))
            finally:
                if self.after_job is not None:
                    self.after_job()
                self._account(job, failed)
                with self._lock:
                    self.running = None
                job.emit(DONE)

    def _account(self, job: Job, failed: bool) -> None:
        job._finished = True
        counters = self.counters
        if job._cancelled_at is not None:
            tokens, chunks, when = job._cancelled_at
            counters.cancelled += 1
            counters.max_tokens_after_cancel = max(counters.max_tokens_after_cancel, job.tokens - tokens)
            counters.max_chunks_after_cancel = max(counters.max_chunks_after_cancel, job.chunks - chunks)
            counters.max_seconds_to_free = max(counters.max_seconds_to_free, time.perf_counter() - when)
        elif failed:
            counters.failed += 1
        else:
            counters.completed += 1
