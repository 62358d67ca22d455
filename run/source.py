"""Reading a run's records once per process.

The CLI reads the records before anything expensive (a missing or wrong file fails in one line, before the
model loads), and the flow's plan needs the same records. Both call :func:`read_source`, which keeps the last
result for as long as the source's files are unchanged (same paths, sizes and modification times), so a
command reads and validates its records once. A hub dataset id (no local file) is not kept.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from blens.extract.sources import LoadResult, load_records

_LAST: dict[str, tuple[tuple, LoadResult]] = {}
_LOCK = threading.Lock()


def _signature(data: str, limit: int | None) -> tuple | None:
    """What must not change for a kept result to be reused; None for a source without local files."""
    path = Path(data)
    try:
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            return None
        return (os.fspath(path.absolute()), limit, tuple((os.fspath(f), f.stat().st_size, f.stat().st_mtime_ns)
                                                       for f in files))
    except OSError:
        return None


def read_source(data: str, limit: int | None) -> LoadResult:
    """``load_records(data, limit=limit)``, read once while the files stay the same."""
    sig = _signature(data, limit)
    with _LOCK:
        kept = _LAST.get("source")
        if sig is not None and kept is not None and kept[0] == sig:
            return kept[1]
    loaded = load_records(data, limit=limit)
    if sig is not None:
        with _LOCK:
            _LAST["source"] = (sig, loaded)
    return loaded
