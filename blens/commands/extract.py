"""`blens extract`: CounterFact -> backward passes -> Parquet warehouse (a Prefect flow)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import options
from ._common import check_choice, err_console, fail, progress_bar, quiet_prefect

console = Console()


def extract(
    data: options.Data,
    model: options.Model = "smollm2-135m",
    limit: options.Limit = None,
    warehouse: options.Warehouse = Path("warehouse"),
    batch_size: options.BatchSize = 32,
    batch_tokens: options.BatchTokens = 512,
    top_k: options.TopK = 10,
    device: options.Device = "cpu",
    vectors: options.Vectors = "none",
    lens_dtype: options.LensDtype = "fp32",
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: process the deterministic 1/N of records with "
                                        "case_id mod N == I. Shards may run at once on one warehouse."),
    force: bool = typer.Option(False, "--force", help="Recompute prompts this run already finished (default: resume)."),
    threads: options.Threads = None,
    workers: options.Workers = 1,
) -> None:
    """Extract gradient spanning sets and their logit-lens projections for CounterFact prompts.

    Per prompt: one backward pass of the NLL of target_new's first token at the last position; for every
    layer and MLP matrix the inputs x_i and VJPs delta_i at every position; the exact gradient rank from
    them; logit-lens top/bottom-k and target ranks for ff1_input ("imprint") and ff2_vjp ("shift").

    Resumes by default: rerunning the same command skips prompts already committed. Then query with
    `blens sql "SELECT * FROM rank_equals_length ORDER BY layer"`.
    """
    quiet_prefect()
    from pydantic import ValidationError

    from blens.extract.config import ExtractConfig
    from blens.extract.models import ModelLoadError, cached_model
    from blens.extract.records import DataSourceError, load_records
    from blens.store.writer import WarehouseError, init_warehouse

    check_choice("--vectors", vectors, options.VECTOR_CHOICES)
    check_choice("--lens-dtype", lens_dtype, options.LENS_DTYPES)
    if not Path(data).exists() and (data.endswith((".json", ".jsonl")) or "/" in data and Path(data).parent.exists()):
        fail(f"data path not found: {data}")
    try:
        cfg = ExtractConfig(model=model, data=data, limit=limit, warehouse=str(warehouse), batch_size=batch_size,
                            batch_tokens=batch_tokens, top_k=top_k, device=device, vectors=vectors,
                            lens_dtype=lens_dtype, shard=shard, threads=threads, workers=workers, force=force)
    except ValidationError as exc:
        fail("; ".join(e["msg"] for e in exc.errors()))
    try:  # a missing/truncated source fails here: one line, before the model loads or any file is written
        load_records(cfg.data, limit=1)
    except DataSourceError as exc:
        fail(str(exc))
    try:
        with err_console.status(f"loading model {model} ..."):
            cached_model(cfg.model, cfg.device)
        init_warehouse(cfg.warehouse)  # after the model: a failed load leaves no warehouse behind
    except (WarehouseError, ModelLoadError) as exc:
        fail(str(exc))

    from blens.flows.extract_flow import WorkersUnavailable, run_extract

    try:
        with progress_bar("extract", "prompts"):
            summary = run_extract(cfg)
    except (DataSourceError, WorkersUnavailable) as exc:
        fail(str(exc))
    print_summary(cfg, summary)


def print_summary(cfg, summary) -> None:
    from blens.store.connect import connect

    t = Table(title=f"run {summary.run_id}  ({cfg.model}, {cfg.data})", show_edge=False)
    for col in ("records", "done before", "extracted", "failed", "skipped (errors)", "seconds", "prompts/s"):
        t.add_column(col, justify="right")
    t.add_row(str(summary.n_records), str(summary.n_done_before), str(summary.n_extracted), str(summary.n_failed),
              str(summary.n_skipped), f"{summary.seconds:.1f}", f"{summary.rate:.2f}")
    console.print(t)
    con = connect(cfg.warehouse)
    rows = con.execute("""
        SELECT layer, matrix, n, round(rate, 3) AS rate FROM rank_equals_length
        WHERE model = ? AND (layer % 5 = 0 OR layer = (SELECT max(layer) FROM gradient_ranks))
        ORDER BY layer, matrix""", [cfg.model]).fetchall()
    if rows:
        r = Table(title="rank_equals_length (share of prompts whose gradient rank = prompt length)", show_edge=False)
        for col in ("layer", "matrix", "n", "rate"):
            r.add_column(col, justify="right")
        for row in rows:
            r.add_row(*(str(v) for v in row))
        console.print(r)
    con.close()
    n_err = summary.n_skipped + summary.n_failed
    if n_err:
        err_console.print(f"[yellow]{n_err} record(s) skipped; see them with:[/] blens sql \"SELECT * FROM errors\" "
                          f"--warehouse {cfg.warehouse}")


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)
