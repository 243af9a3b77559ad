"""Slide reads off the event loop, each bounded by a timeout, so one slow or stuck file never blocks
the server.

Two modes:

* ``process`` (default): reads run in a few worker processes (``spawn``). HDF5 calls in h5py hold
  the GIL, so a read stuck inside HDF5 (a slow network mount, a file that blocks on open) would
  freeze every thread of the server, event loop and ``/health`` included; in a worker process it
  only stalls that process, which is killed at the timeout and replaced. A read that crashes its
  process (a damaged file tripping HDF5) is reported, and the server lives on. The loaded tiles
  travel back pickled (12 MiB for 2,048 × 1,536 float32).
* ``thread``: reads run in a thread pool. Enough for loaders that release the GIL while they wait;
  a timed-out read keeps its thread until it returns (the request is answered anyway).

The loader is any ``path -> Slide`` callable; in ``process`` mode it must be picklable (a module-level
function or a ``functools.partial`` of one).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..data.slides import Slide, SlideError

log = logging.getLogger("wsi_llava.serve")

READER_MODES = ("process", "thread")
START_TIMEOUT = 120.0
"""Seconds a new worker process may take to start (not counted in a read's timeout)."""


class SlideReadTimeout(Exception):
    """A read took longer than the timeout (or no reader became free in that time)."""


class SlideReaderCrashed(Exception):
    """The worker process died while reading (e.g. HDF5 crashed on a damaged file)."""


def _worker_main(conn, load: Callable[[str], Slide]) -> None:
    """A worker process: say ``("ready", None)``, then read each path sent and answer ``("ok", slide)``,
    ``("slide_error", message)`` or ``("error", text)``; exit when the pipe closes."""
    try:
        conn.send(("ready", None))
    except (OSError, ValueError):
        return
    while True:
        try:
            path = conn.recv()
        except (EOFError, OSError):
            return
        try:
            answer = ("ok", load(path))
        except SlideError as e:
            answer = ("slide_error", str(e))
        except Exception as e:  # noqa: BLE001 - reported to the server, which logs it
            answer = ("error", f"{type(e).__name__}: {e}")
        try:
            conn.send(answer)
        except (OSError, ValueError):
            return


class _Process:
    """One worker process and its pipe; used by one read at a time."""

    def __init__(self, ctx, load):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, load), name="wsi-llava-slide-reader", daemon=True)
        self.proc.start()
        child.close()
        self.ready = False

    def read(self, path: str, timeout: float) -> Slide:
        """Blocking: (wait for the process to start,) send ``path``, wait up to ``timeout`` for the answer.
        On timeout the process is killed (:class:`SlideReadTimeout`); a dead process raises
        :class:`SlideReaderCrashed`."""
        try:
            if not self.ready:
                if not self.conn.poll(START_TIMEOUT) or self.conn.recv()[0] != "ready":
                    self.kill()
                    raise SlideReaderCrashed(f"the reader process did not start within {START_TIMEOUT:g} s")
                self.ready = True
            self.conn.send(path)
            if not self.conn.poll(timeout):
                self.kill()
                raise SlideReadTimeout(path)
            kind, value = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as e:
            self.kill()
            raise SlideReaderCrashed(f"exit code {self.proc.exitcode}") from e
        if kind == "ok":
            return value
        if kind == "slide_error":
            raise SlideError(value)
        raise RuntimeError(value)

    @property
    def alive(self) -> bool:
        return self.proc.is_alive() and not self.conn.closed

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def close(self) -> None:
        """Ask the process to exit (closing its pipe), kill it if it does not."""
        self.conn.close()
        self.proc.join(2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)


class SlideReader:
    """Reads slides with at most ``workers`` reads at a time, each bounded by ``timeout`` seconds.

    :meth:`read` (async) waits at most ``timeout`` for a free reader, then at most ``timeout`` for the
    read; raises :class:`SlideReadTimeout`, :class:`SlideReaderCrashed`, or what the loader raised
    (:class:`~wsi_llava.data.slides.SlideError`; other errors as ``RuntimeError`` in process mode).
    """

    def __init__(self, load: Callable[[str], Slide], workers: int = 2, timeout: float = 30.0, mode: str = "process"):
        if mode not in READER_MODES:
            raise ValueError(f"slide reader mode {mode!r}; use one of {', '.join(READER_MODES)}")
        if workers < 1 or timeout <= 0:
            raise ValueError("a slide reader needs workers >= 1 and timeout > 0")
        self.load, self.workers, self.timeout, self.mode = load, int(workers), float(timeout), mode
        self._slots: asyncio.Semaphore | None = None
        self._idle: list[_Process] = []
        self._busy: set[_Process] = set()
        self._lock = threading.Lock()
        self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="wsi-llava-slide-read") \
            if mode == "thread" else None
        self._ctx = multiprocessing.get_context("spawn") if mode == "process" else None
        self._closed = False
        self.timeouts = 0
        """Reads abandoned at the timeout."""
        self.crashes = 0
        """Worker processes that died while reading."""

    async def read(self, path: str) -> Slide:
        if self._closed:
            raise RuntimeError("the slide reader is closed")
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout)
        except asyncio.TimeoutError:
            self.timeouts += 1
            raise SlideReadTimeout(f"all {self.workers} slide readers stayed busy for {self.timeout:g} s") from None
        try:
            if self._threads is not None:
                future = asyncio.get_running_loop().run_in_executor(self._threads, self.load, path)
                try:
                    return await asyncio.wait_for(asyncio.shield(future), self.timeout)
                except asyncio.TimeoutError:
                    self.timeouts += 1
                    raise SlideReadTimeout(path) from None
            return await asyncio.to_thread(self._read_in_process, path)
        finally:
            self._slots.release()

    def _read_in_process(self, path: str) -> Slide:
        with self._lock:
            proc = None
            while self._idle and proc is None:
                candidate = self._idle.pop()
                if candidate.alive:
                    proc = candidate
                else:
                    candidate.kill()
            if proc is None:
                proc = _Process(self._ctx, self.load)
            self._busy.add(proc)
        ok = False
        try:
            slide = proc.read(path, self.timeout)
            ok = True
            return slide
        except SlideReadTimeout:
            self.timeouts += 1
            log.warning("reading %s took longer than %g s: its reader process was killed", path, self.timeout)
            raise
        except SlideReaderCrashed:
            self.crashes += 1
            log.error("the reader process died while reading %s", path)
            raise
        except (SlideError, RuntimeError):
            ok = True  # the process answered: it is fine to reuse
            raise
        finally:
            with self._lock:
                self._busy.discard(proc)
                reuse = ok and not self._closed
                if reuse:
                    self._idle.append(proc)
            if ok and not reuse:
                proc.close()  # (a timed-out or crashed process is already gone)

    def stats(self) -> dict:
        """``{"mode", "workers", "timeout_s", "timeouts", "crashes"}``."""
        return {"mode": self.mode, "workers": self.workers, "timeout_s": self.timeout, "timeouts": self.timeouts,
                "crashes": self.crashes}

    def close(self) -> None:
        """Stop the worker processes (busy ones are killed) and the thread pool (without waiting)."""
        self._closed = True
        with self._lock:
            idle, busy = self._idle, list(self._busy)
            self._idle = []
        for proc in idle:
            proc.close()
        for proc in busy:
            proc.kill()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
