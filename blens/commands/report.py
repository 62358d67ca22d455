"""`blens report`: a static HTML page with the paper's figures, recomputed from the warehouse."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._common import err_console, fail


def report(
    warehouse: Path = typer.Option(Path("warehouse"), "--warehouse", help="Warehouse directory."),
    out: Path = typer.Option(Path("report"), "--out", help="Output directory for index.html and figures/."),
    case: Optional[List[int]] = typer.Option(None, "--case", metavar="CASE_ID",
                                             help="Prompt(s) to show as logit-lens tables (repeatable; "
                                                  "default: the first 2 case ids)."),
) -> None:
    """Render the paper's figures (rank = length, logit-lens tables, VJP norms, target_new rank, editing)
    as PNGs and a static OUT/index.html that opens from disk.

    Example: blens report --warehouse warehouse --out report --case 0 --case 7
    """
    from blens.publish.report import ReportError, build_report

    try:
        result = build_report(warehouse, out, cases=case or None)
    except ReportError as exc:
        fail(str(exc))
    n = len(result.figure_files)
    err_console.print(f"wrote {result.index} ({n} figures, cases {', '.join(map(str, result.cases))}); "
                      f"open it in a browser: file://{result.index.resolve()}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
