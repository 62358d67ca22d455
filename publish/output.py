"""Output directories of the products (dataset, report): checked before anything is written, swapped
into place whole, so a reader sees the old output or the new one, never a mix."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from blens.store.sandbox import process_alive


def output_dir_problem(out: Path, marker: str | tuple[str, ...], command: str,
                       warehouse: str | os.PathLike | None = None) -> str | None:
    """Why ``out`` may not be (re)written by ``command``: it must be absent, empty, or an earlier output of
    that command (recognised by ``marker``, or any of several), and never inside the warehouse it reads; None
    if it may."""
    markers = (marker,) if isinstance(marker, str) else marker
    if warehouse is not None and "://" not in str(warehouse) and not str(warehouse).startswith("postgres:"):
        wh = Path(warehouse).resolve()
        target = Path(out).resolve()
        if target == wh or wh in target.parents or target in wh.parents:
            return f"--out {str(out)!r} overlaps the warehouse {str(warehouse)!r}; choose a directory outside it"
    if out.exists() and not out.is_dir():
        return f"--out {str(out)!r} exists and is not a directory"
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in markers):
        return f"--out {str(out)!r} is not empty and is not an earlier `{command}` output; choose a new directory"
    return None


def remove_stale(out: Path) -> list[Path]:
    """Remove the staging and swap-out folders of ``out`` (``.<name>.partial-<pid>-*``, ``.<name>.old-<pid>-*``)
    whose process is gone: a publish or report killed with -9 left them, and nothing else would."""
    removed = []
    for kind in ("partial", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
            if path.is_dir() and (not pid.isdigit() or not process_alive(int(pid))):  # no pid: an older blens's
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def stage_dir(out: Path) -> Path:
    """A fresh folder beside ``out`` to build the new output in (named with our pid, see remove_stale)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    return stage


def replace_directory(stage: Path, out: Path) -> None:
    """Swap a fully built directory into place: readers see the old one or the new one, never a mix."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)
