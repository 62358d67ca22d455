"""`blens sql`: SQL over the warehouse, read-only and confined (``blens.store.sandbox``)."""

from __future__ import annotations

import json
import sys
from typing import Iterator, Literal, Optional

import typer

from blens.lifecycle.signals import first_signal, interrupting, set_interrupt_note
from blens.store.query_limits import DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT_S

from . import options
from ._common import fail, one_line
from ._tables import print_table

Format = Literal["table", "csv", "json", "markdown"]
FETCH = 2048  # rows per fetch: a huge result streams out instead of filling memory


def sql(
    query: str = typer.Argument(..., metavar="QUERY", help="SQL over the tables (runs, models, settings, prompts, "
                                "tokens, gradient_ranks, projections, vectors, vjp_similarity, errors, edit_results, "
                                "supersessions) and views (rank_equals_length, target_rank_by_layer, "
                                "target_rank_by_role, vjp_norm_by_segment, vjp_norm_by_role, vjp_layer_similarity, "
                                "edit_summary). Every result row has a settings id; the views group by it."),
    warehouse: options.Warehouse = options.WAREHOUSE,
    fmt: Format = typer.Option("table", "--format", metavar=options.choices(Format),
                               help="table: fits the terminal, folding long values (plain aligned text, every value "
                               "whole, when stdout is not a terminal). csv, json and markdown print every row."),
    max_rows: int = typer.Option(200, "--max-rows", min=1, metavar="N", help="Rows shown in table format."),
    as_of: Optional[str] = typer.Option(None, "--as-of", metavar="SNAPSHOT",
                                        help="Query the warehouse as it was at a snapshot: a version number "
                                        "(`SELECT * FROM ducklake_snapshots('lake')` lists them) or a timestamp "
                                        "such as '2026-11-26 12:00:00+00'."),
    timeout: float = typer.Option(DEFAULT_TIMEOUT_S, "--timeout", min=0.1, max=86400.0, metavar="SECONDS",
                                  help="Stop a query that runs longer than this."),
    memory_limit: str = typer.Option(DEFAULT_MEMORY_LIMIT, "--memory-limit", metavar="SIZE",
                                     help="DuckDB's memory limit for the query (and as much again for spilling "
                                     "to a private temporary folder), e.g. 512MB or 8GB."),
) -> None:
    """Run a read-only SQL query over the warehouse.

    The session is locked down: it attaches the warehouse read-only, runs only queries whose table functions
    are on an allow-list (no file readers, no DuckLake maintenance), can open only the files the catalog
    lists, and has a time and a memory limit. Every error is one line.

    Example: blens sql "SELECT * FROM rank_equals_length ORDER BY layer"
    """
    import duckdb

    from blens.store import sandbox
    from blens.store.connect import connect
    from blens.store.lake import WarehouseError

    set_interrupt_note("the query was cancelled; nothing was written")
    if not query.strip():
        fail("the query is empty; e.g. blens sql \"SELECT * FROM rank_equals_length ORDER BY layer\"")
    try:
        limit = sandbox.check_memory_limit(memory_limit)
    except sandbox.QueryRefused as exc:
        fail(str(exc))
    with sandbox.private_temp_dir() as tmp:
        try:
            con = connect(warehouse, snapshot=as_of, sandbox=True, memory_limit=limit, temp_dir=tmp)
        except (FileNotFoundError, WarehouseError) as exc:
            fail(one_line(exc) + _snapshot_hint(warehouse, as_of, None, exc))
        try:
            with interrupting(con.interrupt), sandbox.time_limit(con, timeout):  # Ctrl-C stops the query at once
                rel = sandbox.run_query(con, query)
                cols = [d[0] for d in rel.description] if rel.description else []
                _print(rel if rel.description else None, cols, fmt, max_rows)
                _say_mixed_settings(con)
                _say_empty_snapshot(con, warehouse, as_of)
        except (sandbox.QueryRefused, sandbox.QueryLimit) as exc:
            fail(one_line(exc))
        except duckdb.Error as exc:
            if first_signal() is not None:  # Ctrl-C / SIGTERM stopped the query (interrupting): the guard
                raise  # prints the one "interrupted" line and exits 130 / 143
            limit_exc = sandbox.memory_error(exc, limit)
            # DuckDB's whole message, on one line: the hints (candidates, LINE n) are the useful part
            fail(one_line(limit_exc or exc) + ("" if limit_exc else _snapshot_hint(warehouse, as_of, con, exc)))
        finally:
            con.interrupt()  # a query a signal cut short may still run on DuckDB's threads: close() would wait for it
            con.close()


def _batches(rel) -> Iterator[list[tuple]]:
    while rel is not None:
        rows = rel.fetchmany(FETCH)
        if not rows:
            return
        yield rows


def _print(rel, cols: list[str], fmt: str, max_rows: int) -> None:
    """Stream the result: only table format keeps rows (at most ``max_rows``) in memory."""
    text = lambda r: ["NULL" if v is None else str(v) for v in r]  # noqa: E731
    if fmt == "csv":
        import csv
        w = csv.writer(sys.stdout)
        w.writerow(cols)
        for rows in _batches(rel):
            w.writerows(rows)
    elif fmt == "json":
        first = True
        sys.stdout.write("[")
        for rows in _batches(rel):
            for r in rows:
                item = json.dumps(dict(zip(cols, r)), default=str, indent=1)
                sys.stdout.write(("\n" if first else ",\n") + "\n".join(" " + line for line in item.splitlines()))
                first = False
        sys.stdout.write("\n]\n" if not first else "]\n")
    elif fmt == "markdown":
        esc = lambda v: v.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        print("| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|")
        for rows in _batches(rel):
            print("\n".join("| " + " | ".join(esc(v) for v in text(r)) + " |" for r in rows))
    else:
        shown: list[list[str]] = []
        n = 0
        for rows in _batches(rel):
            shown.extend(text(r) for r in rows[: max(0, max_rows - len(shown))])
            n += len(rows)
        print_table(f"{n} row(s)", cols, shown)
        if n > max_rows:
            from ._common import err_console

            err_console.print(f"({n} rows, {max_rows} shown; --max-rows or --format csv for all)")


def _say_mixed_settings(con) -> None:
    """One line per model whose results were computed under more than one result setting (stderr, so piped
    output stays clean): the views keep them apart, a query over the tables must filter on ``settings``."""
    from blens.store.reads import mixed_settings

    from ._common import err_console

    for model, ids in mixed_settings(con):
        err_console.print(f"note: {model} holds results under {len(ids)} settings ({', '.join(ids)}); every view "
                          "groups by settings, and a query over the tables should filter on settings "
                          "(SELECT * FROM settings shows each one)", highlight=False, markup=False)


def _snapshot_hint(warehouse, as_of: str | None, con, exc: BaseException) -> str:
    """For an error at ``--as-of``: "; " and which snapshots hold results, when the asked one holds none (a
    table missing at snapshot 0) or does not exist; "" otherwise. Appended to the error's one line."""
    from blens.store import snapshots
    from blens.store.connect import current_snapshot

    if as_of is None or isinstance(exc, FileNotFoundError):
        return ""
    if con is None:
        if "no snapshot" not in str(exc).lower():  # a bad --as-of value, a damaged catalog: its message stands
            return ""
        note = snapshots.no_results_note(warehouse, as_of, None)
    elif snapshots.holds_results(con):
        return ""
    else:
        note = snapshots.no_results_note(warehouse, as_of, current_snapshot(con))
    return f"; {note}" if note else ""


def _say_empty_snapshot(con, warehouse, as_of: str | None) -> None:
    """One line on stderr when ``--as-of`` reads a snapshot that holds no results (a query there returns 0
    rows, unexplained before): which snapshots do."""
    if as_of is None:
        return
    from blens.store import snapshots
    from blens.store.connect import current_snapshot

    from ._common import err_console

    if not snapshots.holds_results(con):
        note = snapshots.no_results_note(warehouse, as_of, current_snapshot(con))
        if note:
            err_console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("sql")(sql)
