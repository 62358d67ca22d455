"""The commit phase: :class:`Committer`, the only writer of a run.

Everything a run writes goes through one object the run owns: its registration (run row, model row, records
rejected before any work), each batch's result tables, and error rows. Extraction and editing share it.

Why an object and not a per-batch choice: the run owns the ordering guarantee. With ``background=True`` the
commits run on one thread (``overlap.BackgroundWriter``, depth 1: at most two batches in host memory) in
submission order, so batch k is committed while the device computes batch k+1; the first commit that fails is
raised by the next ``submit`` or on leaving the ``with`` block, and nothing after it is committed. A background
commit gets the retries a batch task gets from Prefect (a transient I/O error, a lock), since nothing else would
retry it. Without ``background`` a commit runs in the caller's thread and a failure propagates to it (the batch
task's retries). Error rows and the registration always go through the same path, so a run never commits from
two threads at once.

A Committer without a background thread holds only names, so it can be handed to Dask worker processes
(``--workers N``), where each worker commits its own batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pyarrow as pa

from blens.store.runs import ErrorLike, errors_table, register_run
from blens.store.writer import commit_batch

from .overlap import BackgroundWriter

COMMIT_RETRIES, COMMIT_RETRY_DELAY_S = 2, 1.0  # as the batch task's retries in blens.flows.extract_flow


@dataclass(frozen=True)
class Registration:
    """What registering a run commits, decided by the plan and written by the Committer."""

    run_id: str
    model: str
    revision: str
    dataset: str
    fingerprint: str
    config: str | dict  # JSON of the run's config (the runs table keeps it as provenance)
    kind: str  # extract, edit, sweep
    model_facts: dict
    # (stage, errors, their result keys or None): records turned away before any work (load, prepare)
    rejected: tuple[tuple[str, tuple[ErrorLike, ...], tuple[str, ...] | None], ...] = field(default=())


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS after a batch.

    Batches allocate many mid-sized buffers whose sizes change with prompt length (length-sorted runs grow them
    steadily); glibc keeps such freed chunks in its heap, so without this the RSS of a long run creeps up with
    the number of prompts instead of staying at the size of one batch.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


class Committer:
    """The only writer of one run (see the module docstring). Use it as a context manager: leaving the block
    waits for the last background commit and raises the first one that failed."""

    def __init__(self, warehouse: str, run_id: str, *, background: bool = False):
        self.warehouse = warehouse
        self.run_id = run_id
        self.background = background
        self._writer: BackgroundWriter | None = None

    def __enter__(self) -> "Committer":
        if self.background:
            self._writer = BackgroundWriter(depth=1, name=f"blens-commit-{self.run_id[:8]}")
            self._writer.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.__exit__(exc_type, exc, tb)

    def __getstate__(self) -> dict:
        if self._writer is not None:
            raise TypeError("a Committer with a background thread stays in its process")
        return dict(self.__dict__)

    # --- what a run writes ---------------------------------------------------------------------------------

    def register(self, reg: Registration) -> None:
        """The run's row, its model's row and the records it rejected before any work, in one transaction.
        Always in the caller's thread, before any batch: a run that cannot register stops before its work."""
        register_run(self.warehouse, reg.run_id, model=reg.model, revision=reg.revision, dataset=reg.dataset,
                     fingerprint=reg.fingerprint, config=reg.config, kind=reg.kind, model_facts=reg.model_facts,
                     rejected=reg.rejected)

    def results(self, make_tables: Callable[[], dict[str, pa.Table | None]], *, kind: str = "extract",
                replace: Iterable[str] = ()) -> None:
        """Commit one batch's result tables (built by ``make_tables()``, on the background thread when there is
        one). ``replace``: keys whose stored rows this batch replaces (a deliberate recompute)."""
        replace = set(replace)

        def job() -> None:
            tables = make_tables()
            commit_batch(self.warehouse, tables, kind=kind, replace=replace)
            del tables
            release_freed_memory()

        self._submit(job)

    def error_rows(self, errors: Iterable[ErrorLike], stage: str, keys: Iterable[str] | None = None) -> pa.Table:
        """This run's ``errors`` rows for records that failed at ``stage`` (to commit with a batch's results);
        ``keys``: their result keys, so that a later success of the same result clears them."""
        return errors_table(self.run_id, list(errors), stage, None if keys is None else list(keys))

    def errors(self, errors: Iterable[ErrorLike], stage: str, keys: Iterable[str] | None = None) -> None:
        """Commit :meth:`error_rows` on their own (a record that failed while nothing else is committed)."""
        table = self.error_rows(errors, stage, keys)
        if table.num_rows:
            self._submit(lambda: commit_batch(self.warehouse, {"errors": table}, kind="meta"))

    # --- how -------------------------------------------------------------------------------------------------

    def _submit(self, job: Callable[[], None]) -> None:
        if self._writer is None:
            job()  # a failure propagates to the caller (a batch task's retries)
        else:
            self._writer.submit(lambda: _with_retries(job))  # raises an earlier commit's failure: the run stops


def _with_retries(job: Callable[[], None]) -> None:
    for attempt in range(COMMIT_RETRIES + 1):
        try:
            return job()
        except Exception:  # noqa: BLE001 - re-raised after the last attempt
            if attempt == COMMIT_RETRIES:
                raise
            time.sleep(COMMIT_RETRY_DELAY_S)
