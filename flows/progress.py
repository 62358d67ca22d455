"""Progress events from flows to whoever is watching (the CLI's progress bar, a notebook), without
passing callbacks as flow parameters: a flow's parameters are its config, stored by Prefect as JSON.

The flow body calls :func:`emit`; a caller that wants to watch wraps the run in ``with watching(fn):``.
Events are emitted from the flow's own process (batch results come back to it even under Dask), and
watchers run synchronously and should be quick.
"""

from __future__ import annotations

import contextlib
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
