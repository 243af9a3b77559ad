"""Request batching: a bounded queue of jobs and one worker thread that runs them in batches.

The event loop puts jobs (``BatchQueue.put`` raises :class:`QueueFull` → HTTP 429); the single
worker thread takes the oldest job plus up to ``max_batch - 1`` later jobs with the same batch key
(requests that can share one ``generate`` call) and runs them together. Results travel back
through each job's ``notify`` callback (thread-safe on the event-loop side). Cancelled jobs (timed
out, client gone) are dropped without running.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from .errors import ApiError, internal_error

log = logging.getLogger("wsi_llava.serve")


class QueueFull(Exception):
    """The queue holds ``maxsize`` jobs already."""


@dataclass(eq=False)
class Job:
    """One request waiting for (or in) generation."""

    payload: Any
    """What the batch runner needs (a generation row)."""
    key: Hashable
    """Jobs with equal keys may share a batch."""
    notify: Callable[[str, object], None]
    """Called from the worker thread with ``("delta", str)``, then one ``("done", result)`` or
    ``("error", ApiError)``."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set by the request side when the answer is no longer wanted."""
    _finished: bool = False

    def emit(self, kind: str, value: object) -> None:
        """Send an event unless the job already finished; ``done``/``error`` finish it."""
        if self._finished:
            return
        if kind in ("done", "error"):
            self._finished = True
        try:
            self.notify(kind, value)
        except Exception:  # the request side is gone (e.g. its event loop closed)
            log.debug("could not deliver %s event", kind, exc_info=True)

    @property
    def finished(self) -> bool:
        """Whether ``done`` or ``error`` was sent."""
        return self._finished


class BatchQueue:
    """FIFO of jobs with a size bound; ``take`` groups jobs of equal key, oldest first."""

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = int(maxsize)
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, job: Job) -> None:
        """Append a job; raises QueueFull when ``maxsize`` live jobs wait, RuntimeError when closed."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the queue is closed")
            self._drop_cancelled()
            if len(self._jobs) >= self.maxsize:
                raise QueueFull(f"{len(self._jobs)} requests are waiting (queue size {self.maxsize})")
            self._jobs.append(job)
            self._cond.notify()

    def _drop_cancelled(self) -> None:
        if any(j.cancelled.is_set() for j in self._jobs):
            self._jobs = deque(j for j in self._jobs if not j.cancelled.is_set())

    def take(self, max_batch: int, timeout: float | None = None) -> list[Job]:
        """Block until a job waits (or ``timeout`` passes, or the queue closes), then remove and return
        the oldest live job and up to ``max_batch - 1`` later jobs with its key, in arrival order.
        Returns ``[]`` on timeout or when closed."""
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._jobs or self._closed:
                    break
                if not self._cond.wait(timeout):
                    return []
            if not self._jobs:
                return []
            head = self._jobs.popleft()
            batch, rest = [head], deque()
            while self._jobs:
                job = self._jobs.popleft()
                if len(batch) < max_batch and job.key == head.key:
                    batch.append(job)
                else:
                    rest.append(job)
            self._jobs = rest
            return batch

    def close(self) -> list[Job]:
        """Refuse new jobs, wake the worker, and return the jobs still waiting."""
        with self._cond:
            self._closed = True
            left = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
            return left

    def __len__(self) -> int:
        with self._cond:
            return sum(1 for j in self._jobs if not j.cancelled.is_set())


class BatchWorker:
    """One thread: ``take`` a batch, ``run_batch(jobs)``, repeat until the queue closes.

    ``on_start`` runs first in the thread (e.g. thread-local torch settings). ``run_batch`` must
    finish every job (``emit`` done/error); a job it leaves unfinished or an
    exception it raises ends those jobs with an internal error (the traceback goes to the log).
    """

    def __init__(self, queue: BatchQueue, run_batch: Callable[[list[Job]], None], max_batch: int,
                 name: str = "wsi-llava-batch-worker", on_start: Callable[[], None] | None = None):
        self.queue = queue
        self.on_start = on_start
        self.run_batch = run_batch
        self.max_batch = int(max_batch)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.batches = 0
        """Batches run so far."""
        self.jobs = 0
        """Jobs run so far."""
        self.largest_batch = 0
        """Largest batch run so far."""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the queue (waiting jobs get a 503), let the current batch finish, join the thread."""
        for job in self.queue.close():
            job.emit("error", ApiError(503, "the server is shutting down", code="shutting_down"))
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)

    def _loop(self) -> None:
        if self.on_start is not None:
            self.on_start()
        while True:
            jobs = self.queue.take(self.max_batch)
            if not jobs:
                return
            self.batches += 1
            self.jobs += len(jobs)
            self.largest_batch = max(self.largest_batch, len(jobs))
            try:
                self.run_batch(jobs)
            except Exception:
                log.exception("batch of %d request(s) failed", len(jobs))
            for job in jobs:
                if not job.finished:
                    job.emit("error", internal_error())

    def stats(self) -> dict:
        """``{"batches", "jobs", "largest_batch", "queued"}``."""
        return {"batches": self.batches, "jobs": self.jobs, "largest_batch": self.largest_batch,
                "queued": len(self.queue)}
