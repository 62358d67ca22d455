"""Progress events from runs to whoever is watching (the CLI's progress bar, a notebook, a served run's log),
without passing callbacks as flow parameters: a flow's parameters are its config, stored by Prefect as JSON.

The run loop (``blens.run.extract.execute``, ``blens.run.edit.execute``) calls :func:`emit`; a caller that wants to watch wraps the run in ``with watching(fn):``
(the CLI's progress bar), or in ``with logged(logger):`` where no terminal watches (a served deployment's
runs: Prefect's run logger sends the lines to the server).
Events are emitted from the flow's own process (batch results come back to it even under Dask), and
watchers run synchronously and should be quick.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class Event:
    kind: str  # "plan" (a RunPlan / EditPlan) or "batch" (a BatchResult / EditBatchResult)
    payload: Any
    n: int = 0  # prompts or records this event accounts for


_watchers: list[Callable[[Event], None]] = []


@contextlib.contextmanager
def watching(watcher: Callable[[Event], None]) -> Iterator[None]:
    _watchers.append(watcher)
    try:
        yield
    finally:
        _watchers.remove(watcher)


def emit(kind: str, payload: Any, n: int = 0) -> None:
    event = Event(kind, payload, n)
    for w in list(_watchers):
        w(event)


@contextlib.contextmanager
def logged(logger: logging.Logger | logging.LoggerAdapter, unit: str = "prompts") -> Iterator[None]:
    """Progress as log lines: what the run found to do, then one line per batch with the running rate."""
    seen = {"n": 0, "total": 0, "seconds": 0.0}

    def watch(event: Event) -> None:
        if event.kind == "plan":
            seen["total"] = event.n
            for note in getattr(event.payload, "notes", ()):
                logger.warning(note)
            done_before = getattr(event.payload, "n_skipped_done", 0)
            logger.info(f"{event.n} {unit} to do; {done_before} record(s) already in the warehouse")
            return
        seen["n"] += event.n
        seen["seconds"] += event.payload.seconds
        rate = seen["n"] / seen["seconds"] if seen["seconds"] else 0.0
        logger.info(f"{seen['n']}/{seen['total']} {unit}, {rate:.2f}/s")

    with watching(watch):
        yield
