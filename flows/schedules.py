"""How a run's batches run under Prefect: the schedules the run layer's ``execute`` takes (``blens.run``).

A schedule yields each batch with a callable that returns its result; the run layer does the rest
(registration, progress, the failure policy). Making one from a Prefect task is the same for every kind of run,
so it lives here once.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prefect.futures import as_completed


def one_after_another(task: Callable[..., Any]) -> Callable[..., Iterator[tuple[Any, Callable[[], Any]]]]:
    """Each batch a call of ``task(job, batch, commit)`` in this process, in order (the default task runner)."""

    def schedule(job: Any, batches: list, commit: Any) -> Iterator[tuple[Any, Callable[[], Any]]]:
        for batch in batches:
            yield batch, lambda batch=batch: task(job, batch, commit)

    return schedule


def all_at_once(task: Any) -> Callable[..., Iterator[tuple[Any, Callable[[], Any]]]]:
    """Every batch submitted at once to the flow's task runner (Dask workers); results as they complete."""

    def schedule(job: Any, batches: list, commit: Any) -> Iterator[tuple[Any, Callable[[], Any]]]:
        futures = {task.submit(job, batch, commit): batch for batch in batches}
        for future in as_completed(list(futures)):
            yield futures[future], future.result

    return schedule
