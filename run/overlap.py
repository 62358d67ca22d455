"""Overlap the host work of batch k (Arrow building, Parquet writing, bookkeeping) with the device work of
batch k+1.

:class:`BackgroundWriter` is one worker thread behind a bounded queue. The producer (the thread that
drives the model) computes a batch, hands the host-side rest to :meth:`~BackgroundWriter.submit` and
goes on with the next batch; ``submit`` blocks while ``depth`` jobs are already waiting, so at most
``depth + 1`` batches are in host memory at once. Jobs run strictly in submission order.

Failure is never lost and never followed by more writes: the first exception a job raises is re-raised
in the producer by the next ``submit`` or by ``close``, and every job queued after the failing one is
dropped without running. Atomicity of a single commit (nothing half-visible) is the commit's own
business (the store writes files under temporary names and makes a batch visible last); the writer adds
the ordering guarantee: no batch after a failed one is committed.

:func:`run_overlapped` is the loop a job would write with it::

    run_overlapped(batches, compute=lambda b: compute_batch(lm, b, ...),
                   commit=lambda host: commit(build_tables(lm, host, run_id, ...)))

The worker is a thread, not a process: torch ops, Arrow building and Parquet writing release the GIL
for their heavy parts, and the batch's arrays are shared, not pickled.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")

_STOP = object()


class WriterClosedError(RuntimeError):
    """submit() after close()."""


class BackgroundWriter:
    """One worker thread running submitted jobs in order; the first job error fails the producer."""

    def __init__(self, depth: int = 1, name: str = "blens-writer"):
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._closed = False
        self.completed = 0  # jobs that ran to the end (read after close)
        self.dropped = 0  # jobs skipped because an earlier one failed or the producer gave up
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    return
                if self._error is not None or self._cancel.is_set():
                    self.dropped += 1  # keep draining so a blocked submit() wakes up and sees the error
                    continue
                try:
                    job()
                    self.completed += 1
                except BaseException as exc:  # noqa: BLE001 - handed to the producer, never swallowed
                    self._error = exc
            finally:
                self._queue.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], object]) -> None:
        """Queue ``job`` (blocks while the queue is full); raises the first error of an earlier job."""
        if self._closed:
            raise WriterClosedError("submit() on a closed BackgroundWriter")
        self._raise_if_failed()
        self._queue.put(job)
        self._raise_if_failed()  # it may have failed while we waited for room

    def close(self, cancel: bool = False) -> None:
        """Wait for the queued jobs (or drop them, ``cancel``), stop the thread, raise the first job error."""
        if not self._closed:
            self._closed = True
            if cancel:
                self._cancel.set()
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> "BackgroundWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # The producer failed: commit nothing more, and let its exception (not a writer one) propagate.
        try:
            self.close(cancel=True)
        except BaseException:  # noqa: BLE001 - the producer's exception is the one to report
            pass


def run_overlapped(items: Iterable[T], compute: Callable[[T], object], commit: Callable[[object], object],
                   depth: int = 1) -> int:
    """``commit(compute(item))`` for every item, in order, with commit k running beside compute k+1.

    Returns the number of commits. A failing ``commit`` stops the loop at the next item (its exception
    propagates, later results are not committed); a failing ``compute`` commits nothing after it.
    """
    with BackgroundWriter(depth) as writer:
        for item in items:
            result = compute(item)
            writer.submit(lambda r=result: commit(r))
    return writer.completed
