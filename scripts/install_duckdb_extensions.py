"""Put the bundled DuckDB extensions where any DuckDB on this machine looks for them, so `LOAD ducklake` works
offline in a plain DuckDB session (the CLI, or Python with only `duckdb`), not only inside blens.

The duckdb-ext-ducklake / -sqlite (/ -postgres) pip packages hold DuckDB's own signed extension files under
their package directory; blens points `extension_directory` there, but a plain session looks in DuckDB's
standard directory, ~/.duckdb/extensions/v<version>/<platform>/ (platform as `PRAGMA platform` names it).
This copies the files there (run by scripts/setup.sh, also with --install-only). A file already there with
the same bytes is left alone; a new one is written beside and renamed, so a session never sees half a file.

    .venv/bin/python scripts/install_duckdb_extensions.py   # prints what it installed
"""

from __future__ import annotations

import filecmp
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import duckdb


def bundled_dir() -> Path | None:
    """The duckdb-ext-* packages' extension tree for this DuckDB (<pkg>/extensions/v1.4.4/<platform>)."""
    spec = importlib.util.find_spec("duckdb_ext")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "extensions" / f"v{duckdb.__version__}" / platform()
        if path.is_dir():
            return path
    return None


def platform() -> str:
    return duckdb.execute("PRAGMA platform").fetchone()[0]


def standard_dir() -> Path:
    """DuckDB's default extension directory for this version and platform (it follows $HOME)."""
    return Path.home() / ".duckdb" / "extensions" / f"v{duckdb.__version__}" / platform()


def install() -> list[Path]:
    """Copy every bundled extension file into :func:`standard_dir`; returns the files now there."""
    src = bundled_dir()
    if src is None:
        raise SystemExit(f"no duckdb-ext-* extensions for DuckDB {duckdb.__version__} ({platform()}) in this "
                         "environment: pip install duckdb-ext-ducklake duckdb-ext-sqlite")
    dest = standard_dir()
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(src.glob("*.duckdb_extension")):
        target = dest / f.name
        if not (target.exists() and filecmp.cmp(f, target, shallow=False)):
            tmp = target.with_name(f".{f.name}.{os.getpid()}.tmp")
            shutil.copyfile(f, tmp)
            os.replace(tmp, target)
        out.append(target)
    return out


if __name__ == "__main__":
    files = install()
    print(f"[setup] DuckDB extensions in {standard_dir()}: {', '.join(f.name for f in files)}", file=sys.stderr)
