"""`blens sql`: SQL over the warehouse, read-only and sandboxed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal, Optional

import typer

from . import options
from ._common import fail
from ._tables import print_table

Format = Literal["table", "csv", "json", "markdown"]


def sql(
    query: str = typer.Argument(..., metavar="QUERY", help="SQL over the tables (runs, models, settings, prompts, "
                                "tokens, gradient_ranks, projections, vectors, vjp_similarity, errors, edit_results, "
                                "supersessions) and views (rank_equals_length, target_rank_by_layer, "
                                "target_rank_by_role, vjp_norm_by_segment, vjp_norm_by_role, vjp_layer_similarity, "
                                "edit_summary). Every result row has a settings id; the views group by it."),
    warehouse: options.Warehouse = Path("warehouse"),
    fmt: Format = typer.Option("table", "--format", metavar=options.choices(Format),
                               help="table: fits the terminal, folding long values (plain aligned text, every value "
                               "whole, when stdout is not a terminal). csv, json and markdown print every row."),
    max_rows: int = typer.Option(200, "--max-rows", min=1, metavar="N", help="Rows shown in table format."),
    as_of: Optional[str] = typer.Option(None, "--as-of", metavar="SNAPSHOT",
                                        help="Query the warehouse as it was at a snapshot: a version number "
                                        "(`SELECT * FROM ducklake_snapshots('lake')` lists them) or a timestamp "
                                        "such as '2026-11-26 12:00:00+00'."),
) -> None:
    """Run a read-only SQL query over the warehouse.

    The session is locked down: it attaches the warehouse read-only, and no query can read files or URLs
    outside the warehouse's own data, install or load extensions, or change settings.

    Example: blens sql "SELECT * FROM rank_equals_length ORDER BY layer"
    """
    import duckdb

    from blens.store.connect import QueryRefused, connect, run_query
    from blens.store.lake import WarehouseError

    if not query.strip():
        fail("the query is empty; e.g. blens sql \"SELECT * FROM rank_equals_length ORDER BY layer\"")
    try:
        con = connect(warehouse, snapshot=as_of, sandbox=True)
    except (FileNotFoundError, WarehouseError) as exc:
        fail(str(exc))
    try:
        rel = run_query(con, query)
        cols = [d[0] for d in rel.description] if rel.description else []
        rows = rel.fetchall() if rel.description else []
        _say_mixed_settings(con)
    except QueryRefused as exc:
        fail(str(exc))
    except duckdb.Error as exc:
        fail(str(exc).strip())  # DuckDB's whole message: the hints (candidates, LINE n) are the useful part
    finally:
        con.close()
    text = [["NULL" if v is None else str(v) for v in r] for r in rows]
    if fmt == "csv":
        import csv
        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
    elif fmt == "json":
        sys.stdout.write(json.dumps([dict(zip(cols, r)) for r in rows], default=str, indent=1) + "\n")
    elif fmt == "markdown":
        esc = lambda v: v.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(esc(v) for v in r) + " |" for r in text]
        print("\n".join(lines))
    else:
        print_table(f"{len(rows)} row(s)", cols, text[:max_rows])
        if len(rows) > max_rows:
            from ._common import err_console

            err_console.print(f"({len(rows)} rows, {max_rows} shown; --max-rows or --format csv for all)")


def _say_mixed_settings(con) -> None:
    """One line per model whose results were computed under more than one result setting (stderr, so piped
    output stays clean): the views keep them apart, a query over the tables must filter on ``settings``."""
    from blens.store.reads import mixed_settings

    from ._common import err_console

    for model, ids in mixed_settings(con):
        err_console.print(f"note: {model} holds results under {len(ids)} settings ({', '.join(ids)}); every view "
                          "groups by settings, and a query over the tables should filter on settings "
                          "(SELECT * FROM settings shows each one)", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("sql")(sql)
