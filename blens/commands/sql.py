"""`blens sql`: read-only SQL over the warehouse views."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ._common import fail

READ_ONLY_TYPES = ("SELECT", "EXPLAIN", "PRAGMA", "VARIABLE_SET")


def check_read_only(con, query: str) -> None:
    """Refuse anything but queries: `blens sql` never writes, attaches or copies."""
    for stmt in con.extract_statements(query):
        kind = str(stmt.type).split(".")[-1]
        if kind not in READ_ONLY_TYPES:
            raise ValueError(f"only read-only queries are allowed, not {kind}")


def sql(
    query: str = typer.Argument(..., help="SQL over the views: runs, prompts, tokens, gradient_ranks, projections, "
                                "vectors, errors, edit_results, rank_equals_length, target_rank_by_layer, "
                                "vjp_norm_by_segment, edit_summary."),
    warehouse: Path = typer.Option(Path("warehouse"), "--warehouse", help="Warehouse directory."),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
    max_rows: int = typer.Option(200, "--max-rows", help="Rows shown in table format (csv/json print all)."),
) -> None:
    """Run a read-only SQL query over the warehouse's DuckDB views.

    Example: blens sql "SELECT * FROM rank_equals_length ORDER BY layer"
    """
    import duckdb

    from blens.store.connect import connect

    if fmt not in ("table", "csv", "json"):
        fail(f"--format must be table, csv or json (got {fmt!r})")
    try:
        con = connect(warehouse)
    except FileNotFoundError as exc:
        fail(str(exc))
    try:
        check_read_only(con, query)
        rel = con.execute(query)
        cols = [d[0] for d in rel.description] if rel.description else []
        rows = rel.fetchall()
    except (duckdb.Error, ValueError) as exc:
        fail(str(exc).splitlines()[0])
    if fmt == "csv":
        import csv
        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
    elif fmt == "json":
        sys.stdout.write(json.dumps([dict(zip(cols, r)) for r in rows], default=str, indent=1) + "\n")
    else:
        t = Table(show_edge=False)
        for c in cols:
            t.add_column(c)
        for r in rows[:max_rows]:
            t.add_row(*("NULL" if v is None else str(v) for v in r))
        Console().print(t)
        if len(rows) > max_rows:
            Console(stderr=True).print(f"({len(rows)} rows, {max_rows} shown; --max-rows or --format csv for all)")


def register(app: typer.Typer) -> None:
    app.command("sql")(sql)
