"""`blens edit`: forward-pass knowledge editing (paper Section 7) and its CounterFact evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from blens.edit.spec import Method, Step
from blens.edit.tuned import DEFAULT_SHIFT_STEP, DEFAULTS
from blens.lifecycle.prefect import quiet_prefect

from . import options
from ._common import err_console, fail, progress_bar, report_errors
from ._tables import print_table


def resolve_spec(method: str, step: Optional[str], layer: Optional[int], lr: Optional[float], model: str):
    """The EditSpec the options ask for; defaults only for the models they were tuned on
    (:data:`blens.edit.tuned.DEFAULTS`).

    --step defaults to 'minimal' for shift (the sweep's winner on train). --lr never changes the step: what
    --lr means depends on the step (eta, c or a margin), so --lr with --method shift needs --step.
    """
    from blens.edit.spec import METHODS, STEPS, EditSpec

    if method not in METHODS:
        fail(f"--method must be one of {', '.join(METHODS)} (got {method!r})")
    if step is not None and step not in STEPS:
        fail(f"--step must be one of {', '.join(STEPS)} (got {step!r})")
    if method != "shift" and step is not None:
        fail("--step applies to --method shift only")
    if method == "none":
        return EditSpec("none")
    if method == "rome":
        if lr is not None:
            fail("--lr does not apply to --method rome (it uses ROME's published hyper-parameters, blens.edit.rome)")
        if layer is None:
            if model not in DEFAULTS:
                fail(f"--method rome on {model!r} needs --layer (ROME's relative depth 17/48 of the layers is a "
                     "sensible start; defaults exist for " + " and ".join(DEFAULTS) + ")")
            layer = DEFAULTS[model]["rome"][0]
        return EditSpec("rome", layer, None)
    if method == "shift" and step is None:
        if lr is not None:
            fail("--lr with --method shift needs --step: fixed (--lr = eta, the paper), normalized (--lr = c) or "
                 "minimal (--lr = margin over the smallest eta; the default step)")
        step = DEFAULT_SHIFT_STEP
    step = step or "fixed"
    key = method if step == "fixed" else f"{method}-{step}"
    if layer is None or lr is None:
        if model not in DEFAULTS:
            fail(f"--method {method} on {model!r} needs --layer and --lr (defaults are tuned for "
                 f"{' and '.join(DEFAULTS)} only)")
        d_layer, d_lr = DEFAULTS[model][key]
        layer = d_layer if layer is None else layer
        lr = d_lr if lr is None else lr
    if not lr > 0:
        fail(f"--lr must be positive (got {lr})")
    return EditSpec(method, layer, lr, step)


def describe_spec(spec) -> str:
    """One line naming every setting an edit run uses, printed before it starts."""
    if spec.method == "none":
        return "method none (the unedited model)"
    if spec.method == "rome":
        return f"method rome: layer {spec.layer}, ROME's hyper-parameters (blens.edit.rome.RomeHparams)"
    if spec.method == "sgd":
        return f"method sgd: layer {spec.layer}, lr {spec.lr:g}"
    meaning = {"fixed": "eta", "normalized": "c", "minimal": "margin"}[spec.step]
    return f"method shift: layer {spec.layer}, step {spec.step}, {meaning} {spec.lr:g} (column method = {spec.label})"


@options.with_config_options(options.ExtractConfig, {"threads": {}, "prefect": {}})
@options.with_config_options(options.EditConfig, {
    "data": dict(metavar="PATH", help="CounterFact records (.json/.jsonl/dir, EasyEdit or ROME layout). Report on "
                 "held-out data (counterfact-edit-1k.json); tune with `blens sweep` on train."),
    "model": {}, "limit": {}, "warehouse": {}, "device": {},
    "batch_size": dict(metavar="N", help="Edits per Prefect task (one commit each)."),
    "fluency_tokens": dict(metavar="N", help="Greedy new tokens per prompt for the fluency column (ROME's "
                           "generation n-gram entropy); 0 = skip."),
    "stats_data": dict(metavar="PATH", help="rome only: CounterFact records whose prompts, paraphrases and "
                       "neighbourhood prompts estimate the key covariance C. Default: counterfact-train.json beside "
                       "--data, else --data.")})
def edit(
    method: Method = typer.Option(..., "--method", metavar=options.choices(Method),
                                  help="none (unedited baseline) | shift (the paper: W += lr * "
                                  "x_n^T E_t on FF2 of --layer, forward pass only) | sgd (one gradient step "
                                  "W -= lr * dL/dW on the same matrix) | rome (ROME's rank-one update of the same "
                                  "matrix, ROME's hyper-parameters)."),
    layer: Optional[int] = typer.Option(None, "--layer", metavar="N",
                                        help="Block whose FF2 (Llama down_proj, GPT-2 c_proj) is edited. Default: the "
                                        "sweep's choice for the embedded models (docs/editing.md, docs/gemma.md)."),
    lr: Optional[float] = typer.Option(None, "--lr", metavar="X",
                                       help="shift: eta (step=fixed), c in eta = c/(|x_n|^2|E_t|^2) (normalized), or "
                                       "the margin over the smallest eta that makes target_new the argmax (minimal); "
                                       "sgd: the learning rate; rome: not used. With --method shift it needs --step. "
                                       "Default: the sweep's choice."),
    step: Optional[Step] = typer.Option(None, "--step", metavar=options.choices(Step),
                                        help="Step size of --method shift: fixed (the paper's eta), normalized, "
                                        f"minimal. Default: {DEFAULT_SHIFT_STEP} (the sweep's winner); --lr never "
                                        "changes it."),
    **settings,
) -> None:
    """Edit CounterFact facts one at a time and score each edit.

    Metrics (edit_summary columns = the paper's names): efficacy, generalization = paraphrase, locality =
    neighbourhood accuracy, locality_unchanged = neighbourhood predictions kept, fluency = ROME's generation
    n-gram entropy, update_grad_cosine, n_not_converged. Every edit starts from the original
    weights: the edited matrix is restored bit-exactly after each one. Rows land in edit_results; compare with
    `blens sql "SELECT method, layer, lr, n, efficacy, generalization, locality, locality_unchanged, fluency
    FROM edit_summary"`.
    """
    model, data, limit, warehouse, device, batch_size, threads, prefect, fluency_tokens, stats_data = (settings.pop(k) for k in (
        "model", "data", "limit", "warehouse", "device", "batch_size", "threads", "prefect", "fluency_tokens", "stats_data"))
    quiet_prefect()
    from blens.edit.spec import check_layer
    from blens.extract.hub import check_hub_model
    from blens.extract.models import ModelLoadError, cached_model
    from blens.store.writer import WarehouseError, init_warehouse

    spec = resolve_spec(method, step, layer, lr, model)
    err_console.print(describe_spec(spec), highlight=False, soft_wrap=True)
    set_threads(threads)
    if not Path(data).exists() and data.endswith((".json", ".jsonl")):
        fail(f"data path not found: {data}")
    try:
        check_hub_model(model)  # offline, a hub name fails now (before torch), not after the hub's retries
        with err_console.status(f"loading model {model} ..."):
            lm = cached_model(model, device)
        check_layer(lm.view, spec.layer)
        init_warehouse(warehouse)
    except ValueError as exc:
        fail(f"--layer: {exc}")
    except (WarehouseError, ModelLoadError) as exc:
        fail(str(exc))
    summary = run_edit(dict(model=model, data=data, specs=[spec], warehouse=str(warehouse), limit=limit,
                            device=device, batch_size=batch_size, kind="edit", fluency_tokens=fluency_tokens, prefect=prefect,
                            stats_data=stats_data))
    print_summary(str(warehouse), summary.run_id, summary)


def set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_edit(settings: dict):
    """Build the EditConfig and run it (the edit flow when Prefect is wanted) under a progress bar; one line for a
    bad data source."""
    from blens.edit.spec import EditConfig
    from blens.extract.records import DataSourceError
    from blens.lifecycle.prefect import wants_prefect

    from blens.extract.sources import summarize
    from blens.run.source import read_source

    prefect = settings.pop("prefect", None)
    cfg = EditConfig(**settings)
    if wants_prefect(prefect):
        from blens.flows.edit_flow import edit_flow as run
    else:  # the same run layer, without Prefect's start-up
        from blens.run.edit import run_in_process as run
    try:  # a missing/truncated source (or one file of a directory) fails here: one line, no flow traceback
        source = summarize(read_source(cfg.data, cfg.limit))  # read once: the flow's plan gets the same records
    except DataSourceError as exc:
        fail(str(exc))
    if source.all_rejected:  # something was there, but not one usable record: the wrong file or layout
        fail(source.message())
    if source.empty:  # an empty source is not an error: say so and write nothing
        err_console.print(source.message(), highlight=False, soft_wrap=True)
        raise typer.Exit(0)
    try:
        with progress_bar(cfg.kind, "edits"):
            return run(cfg)
    except DataSourceError as exc:
        fail(str(exc))


# The edit_summary columns `blens edit` and `blens sweep` print, under their own names (the paper's in --help).
SUMMARY_COLUMNS = ("efficacy", "generalization", "locality", "locality_unchanged", "new_gt_true",
                   "rephrase_new_gt_true", "fluency", "mean_update_grad_cosine", "n_not_converged")


def print_summary(warehouse: str, run_id: str, summary) -> None:
    from blens.store.connect import connect

    con = connect(warehouse)
    rows = con.execute(f"""
        SELECT method, layer, lr, n, {', '.join(SUMMARY_COLUMNS)}
        FROM edit_summary WHERE run_id = ? ORDER BY method, layer, lr""", [run_id]).fetchall()
    con.close()
    fmt = lambda v: "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    print_table(f"run {run_id}: {summary.n_records} edits in {summary.seconds:.0f} s ({summary.rate:.2f} edits/s); "
                "% except fluency (bits), cosine and counts",
                ["method", "layer", "lr", "n", *SUMMARY_COLUMNS],
                [[r[0], fmt(r[1]), fmt(r[2]), str(r[3]), *(pct(v) for v in r[4:10]), fmt(r[10]), fmt(r[11]),
                  str(r[12])] for r in rows])
    report_errors(summary.n_errors + summary.n_load_errors, "edit(s)/record(s) failed", warehouse, run_id)


def register(app: typer.Typer) -> None:
    app.command("edit")(edit)
