"""`blens init-sql`, `blens compact`, `blens check`: the warehouse as a table store (plain DuckDB access,
maintenance, integrity)."""

from __future__ import annotations

from typing import Optional

import typer

from . import options
from ._common import fail
from ._tables import print_table


def init_sql(
    warehouse: options.Warehouse = options.WAREHOUSE,
    write: bool = typer.Option(False, "--write", help="Attach read-write (default: read-only)."),
) -> None:
    """Print the SQL that makes the warehouse queryable from a plain DuckDB session, no project code needed.

    Save it and run `duckdb.connect().execute(open(FILE).read())` in Python (only `duckdb` needed), or
    `duckdb -init FILE` in a DuckDB 1.4.4 CLI. Every table and view is then queryable by name; the views live
    in the warehouse's catalog, so a persisted DuckDB database keeps working in the next session after running
    the same SQL. The SQL names no path in this checkout: the extensions load from DuckDB's standard directory
    (~/.duckdb/extensions), where scripts/setup.sh installs the bundled ones (offline).
    """
    from blens.store.lake import init_sql as make_sql, is_warehouse

    if not is_warehouse(warehouse):
        fail(f"no warehouse at {str(warehouse)!r} (run `blens extract` first)")
    print(make_sql(warehouse, read_only=not write), end="")


def compact(
    warehouse: options.Warehouse = options.WAREHOUSE,
    expire_older_than: Optional[str] = typer.Option(
        "7 days", "--expire-older-than", metavar="INTERVAL",
        help="Expire snapshots older than this interval and delete the files only "
        "they used ('' keeps every snapshot: full time travel, no space reclaimed)."),
) -> None:
    """Rewrite the warehouse's small files into large ones (atomically: queries give the same answers before
    and after), then expire superseded data older than the retention period."""
    from blens.store.lake import WarehouseError
    from blens.store.maintenance import compact as do_compact

    try:
        res = do_compact(warehouse, expire_older_than=expire_older_than or None)
    except (FileNotFoundError, WarehouseError) as exc:
        fail(str(exc))
    rows = [[t, str(res.before.get(t, 0)), str(res.after.get(t, 0))] for t in sorted(set(res.before) | set(res.after))]
    print_table(f"compacted {warehouse} in {res.seconds:.1f} s", ["table", "files before", "files after"], rows)


def check(
    warehouse: options.Warehouse = options.WAREHOUSE,
    repair: bool = typer.Option(False, "--repair", help="Quarantine unreadable files (moved to WAREHOUSE/quarantine/"
                                " and dropped from the current snapshot) and delete incomplete results, so the "
                                "next `blens extract` of the same data recomputes them."),
) -> None:
    """Check the warehouse: every file the catalog lists is readable, every stored prompt is complete.

    Exits 1 when something is wrong, naming each bad file; with --repair, fixes it and says what to rerun.
    """
    from blens.store.check import check as run_check
    from blens.store.lake import WarehouseError

    try:
        res = run_check(warehouse, repair=repair)
    except (FileNotFoundError, WarehouseError) as exc:
        fail(str(exc))
    for table, path, why in res.bad_files:
        print(f"{table}: {path}: {why}" + (" -> quarantined" if path in res.quarantined else ""))
    if res.removed:
        print(f"{res.removed} incomplete result(s) deleted; rerun the extraction command to recompute them")
    if res.incomplete:
        print(f"{len(res.incomplete)} incomplete result(s): run `blens check --repair --warehouse {warehouse}`")
    if res.bad_files and not repair:
        print(f"run `blens check --repair --warehouse {warehouse}` to quarantine the bad file(s)")
    if (res.bad_files or res.incomplete) and not (repair and not res.incomplete):
        raise typer.Exit(1)
    print("ok" if not res.bad_files else "repaired")


def register(app: typer.Typer) -> None:
    app.command("init-sql")(init_sql)
    app.command("compact")(compact)
    app.command("check")(check)
