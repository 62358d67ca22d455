"""`blens report`: a static HTML page with the paper's figures, recomputed from the warehouse."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import options
from ._common import err_console, fail


def report(
    warehouse: options.Warehouse = options.WAREHOUSE,
    out: Path = typer.Option(Path("report"), "--out", metavar="DIR",
                             help="Output directory for index.html and figures/."),
    case: Optional[List[int]] = typer.Option(None, "--case", metavar="CASE_ID",
                                             help="Prompt(s) to show as logit-lens tables (repeatable; "
                                                  "default: the first 2 case ids)."),
) -> None:
    """Write OUT/index.html, a static page that opens from disk, with the paper's figures recomputed from the
    warehouse.

    Plots (PNG, in OUT/figures/): rank = prompt length by layer (Figure 3), VJP norm by token role and by
    segment (Figure 5), target_new's rank in the FF2 VJP lens (Figure 6), editing results. The logit lens of
    each --case prompt: token x layer HTML tables in the page. "Paper vs ours": each claim of the paper
    (EMNLP 2024 numbering), our number for every model and whether it holds; also OUT/paper_vs_ours.md.
    Each model is drawn at the settings id holding most of its prompts (view main_settings).

    Example: blens report --warehouse warehouse --out report --case 177 --case 5443
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
