"""The one error policy: which failures belong to a record (an ``errors`` row; the run goes on) and
which stop the run. Extraction, editing and the flows all ask here, so the rule cannot drift apart.

A record failure is what one prompt's computation can raise: a tensor op that fails for this input
(RuntimeError, also torch's device errors), a value or index out of range. Everything else propagates and
stops the run: the environment failing (OSError: disk full, permissions, I/O; MemoryError), an assertion
such as a weight that did not restore, KeyboardInterrupt, a programming error. An environmental failure is
never recorded as a bad record, so a rerun after recovery redoes exactly what was lost.
"""

from __future__ import annotations

RECORD_FAILURES: tuple[type[BaseException], ...] = (RuntimeError, ValueError, IndexError, ArithmeticError)


def is_record_failure(exc: BaseException) -> bool:
    """True if ``exc`` should become an ``errors`` row for the record(s) being processed."""
    return isinstance(exc, RECORD_FAILURES) and not isinstance(exc, AssertionError)


def describe(exc: BaseException, limit: int = 300) -> str:
    """One line for an ``errors`` row's message: the exception type and the start of its text."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__
