"""How a run's batches run under Prefect: the schedules the run layer's ``execute`` takes (``blens.run``).

A schedule yields each batch with a callable that returns its result; the run layer does the rest
(registration, progress, the failure policy). Making one from a Prefect task is the same for every kind of run,
so it lives here once.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Callable, Iterator

from prefect.futures import as_completed


def one_after_another(task: Callable[..., Any]) -> Callable[..., Iterator[tuple[Any, Callable[[], Any]]]]:
    """Each batch a call of ``task(job, batch, commit)`` in this process, in order (the default task runner)."""

    def schedule(job: Any, batches: list, commit: Any) -> Iterator[tuple[Any, Callable[[], Any]]]:
        for batch in batches:
            yield batch, lambda batch=batch: task(job, batch, commit)

    return schedule


def fanned_out(task: Any, slots: Callable[[], int]) -> Callable[..., Iterator[tuple[Any, Callable[[], Any]]]]:
    """Batches submitted to the flow's task runner (Dask workers) a window at a time; results as they complete.

    At most ``2 * slots() + 2`` batches are in flight (``slots``: the cluster's worker threads, asked again at
    every refill, so workers that join a running cluster get work), and the next batch is submitted as one
    completes. Why not every batch at once: on the 2-core box a submission took ~0.1 s beside busy workers
    (Prefect makes the task run, the batch is pickled), so 400 batches submitted up front held the first
    progress line back by 40 s while the workers were already busy, and a 20,000-prompt run would sit in the
    scheduler whole. Twice the threads keeps every worker fed while the flow's process handles a finished batch."""

    def schedule(job: Any, batches: list, commit: Any) -> Iterator[tuple[Any, Callable[[], Any]]]:
        waiting = iter(batches)
        in_flight: dict[Any, Any] = {}

        def refill() -> None:
            for batch in islice(waiting, max(0, 2 * max(1, slots()) + 2 - len(in_flight))):
                in_flight[task.submit(job, batch, commit)] = batch

        refill()
        while in_flight:
            completions = as_completed(list(in_flight))
            future = next(completions)
            completions.close()
            yield in_flight.pop(future), future.result
            refill()

    return schedule
