"""`blens extract`: CounterFact -> backward passes -> Parquet warehouse (the run layer; a Prefect flow when asked)."""

from __future__ import annotations

from pathlib import Path

import typer

from blens.lifecycle.prefect import quiet_prefect

from . import options
from ._common import err_console, fail, progress_bar, report_errors
from ._tables import print_table


@options.extraction_options
@options.with_config_options(options.ExtractConfig, {
    "data": {}, "limit": {},
    "shard": dict(metavar="I/N", help="I/N: process the deterministic 1/N of records with case_id mod N == I. "
                  "Shards may run at once on one warehouse."),
    "force": dict(help="Recompute prompts this run already finished (default: resume)."),
    "threads": {},
    "prefect": {}})
def extract(**settings) -> None:
    """Extract gradient spanning sets and their logit-lens projections for CounterFact prompts.

    Per prompt: one backward pass of the NLL of target_new's first token at the last position; for every
    layer and MLP matrix the inputs x_i and VJPs delta_i at every position; the exact gradient rank from
    them; logit-lens top/bottom-k and target ranks for ff1_input ("imprint") and ff2_vjp ("shift").

    Resumes by default: rerunning the same command skips prompts already committed, and one with nothing
    left to do answers in about a second (no model load, no Prefect). Then query with
    `blens sql "SELECT * FROM rank_equals_length ORDER BY layer"`.
    """
    data, limit, shard, force, threads, prefect = (settings.pop(k) for k in ("data", "limit", "shard", "force",
                                                                               "threads", "prefect"))
    quiet_prefect()
    from pydantic import ValidationError

    from blens.extract.config import ExtractConfig
    from blens.extract.hub import check_hub_model
    from blens.extract.records import DataSourceError
    from blens.extract.registry import ModelLoadError
    from blens.extract.sources import summarize
    from blens.run.source import read_source
    from blens.store.writer import WarehouseError, init_warehouse

    if not Path(data).exists() and (data.endswith((".json", ".jsonl")) or "/" in data and Path(data).parent.exists()):
        fail(f"data path not found: {data}")
    try:
        cfg = ExtractConfig(data=data, limit=limit, shard=shard, threads=threads, force=force, prefect=prefect,
                            **{**settings, "warehouse": str(settings["warehouse"])})
    except ValidationError as exc:
        fail("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors()))  # pydantic's prefix
    try:  # a missing/truncated source fails here: one line, before the model loads or any file is written
        loaded = read_source(cfg.data, cfg.limit)  # read once: the flow's plan gets the same records
    except DataSourceError as exc:
        fail(str(exc))
    source = summarize(loaded)
    if source.all_rejected:  # something was there but nothing usable: the wrong file or layout
        fail(source.message())
    if source.empty:
        err_console.print(source.message(), highlight=False, soft_wrap=True)
        return
    if answered_without_work(cfg, loaded):
        return
    try:
        check_hub_model(cfg.model)  # offline, a hub name fails now (before torch), not after the hub's retries
        from blens.extract.models import cached_model

        with err_console.status(f"loading model {cfg.model} ..."):
            cached_model(cfg.model, cfg.device)
        init_warehouse(cfg.warehouse)  # after the model: a failed load leaves no warehouse behind
    except (WarehouseError, ModelLoadError) as exc:
        fail(str(exc))

    import duckdb

    from blens.errors import UserError
    from blens.lifecycle.prefect import wants_prefect

    if wants_prefect(cfg.prefect, cfg.fans_out()):
        from blens.flows.extract_flow import run_extract
    else:  # the same run layer, without Prefect's start-up
        from blens.run.extract import run_in_process as run_extract
    try:
        with progress_bar("extract", "prompts"):
            summary = run_extract(cfg)
    except (DataSourceError, WarehouseError, UserError) as exc:
        fail(str(exc))
    except OSError as exc:  # the environment, not a record: nothing was recorded as a bad record
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        fail(f"extraction stopped: {exc.strerror or exc}{where}; committed batches are kept, rerun the same "
             "command after fixing this to finish", code=1)
    except duckdb.Error as exc:
        fail(f"extraction stopped: the warehouse could not be read or written: {' '.join(str(exc).split())[:400]}"
             f" (`blens check --warehouse {cfg.warehouse}` finds damaged files, `--repair` fixes them)", code=1)
    print_summary(cfg, summary)


def answered_without_work(cfg, loaded) -> bool:
    """A rerun with nothing left to do (``blens.run.resume.nothing_to_do``): say so as the flow would, without
    loading the model or starting Prefect. False when that cannot be decided; the normal path then runs (and
    reports a damaged warehouse in its own words)."""
    import duckdb

    from blens.run.resume import nothing_to_do
    from blens.store.lake import WarehouseError

    try:
        finished = nothing_to_do(cfg, loaded)
    except (WarehouseError, duckdb.Error):
        return False
    if finished is None:
        return False
    summary, notes = finished
    for note in notes:
        err_console.print(f"[yellow]{note}[/]", highlight=False, soft_wrap=True)
    err_console.print(f"{summary.n_done_before} record(s) already in the warehouse (skipped), 0 to go")
    print_summary(cfg, summary)
    return True


def print_summary(cfg, summary) -> None:
    from blens.store.connect import connect
    from blens.store.lake import sql_str

    print_table(f"run {summary.run_id}  ({cfg.model}, {cfg.data})",
                ["records", "done before", "extracted", "failed", "skipped (errors)", "seconds", "prompts/s"],
                [[str(summary.n_records), str(summary.n_done_before), str(summary.n_extracted), str(summary.n_failed),
                  str(summary.n_skipped), f"{summary.seconds:.1f}", f"{summary.rate:.2f}"]])
    con = connect(cfg.warehouse)
    model = sql_str(cfg.model)
    # this run's settings (a rerun that did nothing: the model's main settings), so another --top-k never mixes in
    settings = (f"coalesce((SELECT any_value(settings) FROM prompts WHERE run_id = {sql_str(summary.run_id)}), "
                f"(SELECT settings FROM main_settings WHERE model = {model}))")
    matrices = ("ff1", "ff1_gate", "ff2", "attn_q", "attn_k", "attn_v", "attn_o")
    cols = ", ".join(f"round(max(rate) FILTER (WHERE matrix = '{m}'), 3)" for m in matrices)
    # every 5th layer, the last, and every layer where some prompt's gradient fell below rank n (the exceptions)
    rows = con.execute(f"""
        SELECT layer, max(n), {cols} FROM rank_equals_length
        WHERE model = {model} AND settings = {settings}
        GROUP BY layer
        HAVING layer % 5 = 0 OR layer = (SELECT max(layer) FROM gradient_ranks WHERE model = {model})
            OR min(rate) FILTER (WHERE matrix NOT IN ('attn_q')) < 1
        ORDER BY layer""").fetchall()  # bound parameters import pandas
    if rows:
        keep = [i for i in range(len(matrices)) if any(r[2 + i] is not None for r in rows)]
        print_table("rank_equals_length (share of prompts whose gradient rank = prompt length; attn_q's bound is "
                    "n - 1: the first token's query gets no gradient)",
                    ["layer", "n"] + [matrices[i] for i in keep],
                    [[str(r[0]), str(r[1])] + ["" if r[2 + i] is None else str(r[2 + i]) for i in keep] for r in rows])
    con.close()
    report_errors(summary.n_skipped + summary.n_failed, "record(s) skipped", cfg.warehouse)


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)
