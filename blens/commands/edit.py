"""`blens edit`: forward-pass knowledge editing (paper Section 7) and its CounterFact evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

from . import options
from ._common import err_console, fail, progress_bar, quiet_prefect, report_errors
from ._tables import print_table


SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"
# Per model: method/step -> (layer, lr), chosen by `blens sweep` on counterfact-train only.
# SmolLM2-135M: 100 train edits, see docs/editing.md. Gemma 3 270M: see docs/gemma.md.
# For other models pass --layer/--lr (the paper: GPT2-xl layer 35, eta 0.24).
DEFAULTS: dict[str, dict[str, tuple[int, float]]] = {
    SMOLLM2: {
        "shift": (24, 0.24),
        "shift-normalized": (24, 1024.0),
        "shift-minimal": (24, 1.25),
        "sgd": (24, 3.0),
    },
    # 100 train edits x 33 cells (run 55864b3899728c7a); the post-FF norm saturates large steps, so sgd's lr and
    # the normalized c are orders of magnitude below SmolLM2's.
    GEMMA3: {
        "shift": (15, 0.24),
        "shift-normalized": (15, 2.0),
        "shift-minimal": (15, 1.25),
        "sgd": (12, 0.01),
    },
}
# The sweep's minimal step beat the paper's fixed eta on train (97% efficacy / 52% neighbourhood unchanged
# vs at best 85% / 44%), so it is the default step of --method shift; --step fixed is the paper's recipe.
DEFAULT_SHIFT_STEP = "minimal"
# The choices of --method and --step, declared here so that --help never imports torch; they are
# blens.edit.spec's METHODS and STEPS (a test checks).
Method = Literal["none", "shift", "sgd"]
Step = Literal["fixed", "normalized", "minimal"]


def resolve_spec(method: str, step: Optional[str], layer: Optional[int], lr: Optional[float], model: str):
    """The EditSpec the options ask for; defaults only for the models they were tuned on (:data:`DEFAULTS`).

    --step defaults to 'minimal' for shift when no --lr is given (the sweep's winner on train), and to
    'fixed' (the paper's eta) when an --lr is given without --step.
    """
    from blens.edit.spec import METHODS, STEPS, EditSpec

    if method not in METHODS:
        fail(f"--method must be one of {', '.join(METHODS)} (got {method!r})")
    if step is None:
        step = DEFAULT_SHIFT_STEP if method == "shift" and lr is None else "fixed"
    if step not in STEPS:
        fail(f"--step must be one of {', '.join(STEPS)} (got {step!r})")
    if method != "shift" and step != "fixed":
        fail("--step applies to --method shift only")
    if method == "none":
        return EditSpec("none")
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


def edit(
    method: Method = typer.Option(..., "--method", metavar=options.choices(Method),
                                  help="none (unedited baseline) | shift (the paper: W += lr * "
                               "x_n^T E_t on FF2 of --layer, forward pass only) | sgd (one gradient step "
                               "W -= lr * dL/dW on the same matrix)."),
    data: str = typer.Option(..., "--data", metavar="PATH",
                             help="CounterFact records (.json/.jsonl/dir, EasyEdit or ROME layout). "
                             "Report on held-out data (counterfact-edit-1k.json); tune with `blens sweep` on train."),
    model: options.Model = SMOLLM2,
    limit: options.Limit = None,
    warehouse: options.Warehouse = Path("warehouse"),
    layer: Optional[int] = typer.Option(None, "--layer", metavar="N",
                                        help="Block whose FF2 (Llama down_proj, GPT-2 c_proj) is edited. Default: the "
                                        "sweep's choice for the embedded models (docs/editing.md, docs/gemma.md)."),
    lr: Optional[float] = typer.Option(None, "--lr", metavar="X",
                                       help="shift: eta (step=fixed), c in eta = c/(|x_n|^2|E_t|^2) (normalized), or "
                                       "the margin over the smallest eta that makes target_new the argmax (minimal); "
                                       "sgd: the learning rate. Default: the sweep's choice."),
    step: Optional[Step] = typer.Option(None, "--step", metavar=options.choices(Step),
                                        help="Step size of --method shift: fixed (the paper's eta), normalized, "
                                        "minimal. Default: minimal (the sweep's winner) unless --lr is given, then "
                                        "fixed."),
    device: options.Device = "auto",
    batch_size: int = typer.Option(16, "--batch-size", min=1, metavar="N",
                                   help="Edits per Prefect task (one commit each)."),
    threads: options.Threads = None,
) -> None:
    """Edit CounterFact facts one at a time and score each edit (top-1 efficacy, paraphrase, neighborhood).

    Every edit starts from the original weights: the edited matrix is restored bit-exactly after each one.
    Rows land in edit_results; compare methods with
    `blens sql "SELECT method, layer, lr, n, efficacy, generalization, locality FROM edit_summary"`.
    """
    quiet_prefect()
    from blens.edit.spec import check_layer
    from blens.extract.hub import check_hub_model
    from blens.extract.models import ModelLoadError, cached_model
    from blens.store.writer import WarehouseError, init_warehouse

    spec = resolve_spec(method, step, layer, lr, model)
    set_threads(threads)
    if not Path(data).exists() and data.endswith((".json", ".jsonl")):
        fail(f"data path not found: {data}")
    try:
        check_hub_model(model)  # offline, a hub name fails now, not after the hub client's retries
        with err_console.status(f"loading model {model} ..."):
            lm = cached_model(model, device)
        check_layer(lm.view, spec.layer)
        init_warehouse(warehouse)
    except ValueError as exc:
        fail(f"--layer: {exc}")
    except (WarehouseError, ModelLoadError) as exc:
        fail(str(exc))
    summary = run_edit(dict(model=model, data=data, specs=[spec], warehouse=str(warehouse), limit=limit,
                            device=device, batch_size=batch_size, kind="edit"))
    print_summary(str(warehouse), summary.run_id, summary)


def set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_edit(settings: dict):
    """Build the EditConfig and run the edit flow under a progress bar; one line for a bad data source."""
    from blens.edit.spec import EditConfig
    from blens.extract.records import DataSourceError
    from blens.flows.edit_flow import edit_flow

    cfg = EditConfig(**settings)
    from blens.extract.sources import describe_source

    try:  # a missing/truncated source (or one file of a directory) fails here: one line, no flow traceback
        source = describe_source(cfg.data, limit=cfg.limit)
    except DataSourceError as exc:
        fail(str(exc))
    if source.all_rejected:  # something was there, but not one usable record: the wrong file or layout
        fail(source.message())
    if source.empty:  # an empty source is not an error: say so and write nothing
        err_console.print(source.message(), highlight=False, soft_wrap=True)
        raise typer.Exit(0)
    try:
        with progress_bar(cfg.kind, "edits"):
            return edit_flow(cfg)
    except DataSourceError as exc:
        fail(str(exc))


def print_summary(warehouse: str, run_id: str, summary) -> None:
    from blens.store.connect import connect

    con = connect(warehouse)
    rows = con.execute("""
        SELECT method, layer, lr, n, efficacy, generalization, locality, locality_unchanged, new_gt_true,
               rephrase_new_gt_true, mean_update_grad_cosine
        FROM edit_summary WHERE run_id = ? ORDER BY method, layer, lr""", [run_id]).fetchall()
    con.close()
    fmt = lambda v: "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    pct = lambda v: "" if v is None else f"{100 * v:.1f}"  # noqa: E731
    print_table(f"run {run_id}: {summary.n_records} edits in {summary.seconds:.0f} s ({summary.rate:.2f} edits/s)",
                ["method", "layer", "lr", "n", "efficacy", "paraphrase", "neighborhood", "nbhd unchanged",
                 "P(new)>P(true)", "rephr. P(new)>P(true)", "cos(update,-grad)"],
                [[r[0], fmt(r[1]), fmt(r[2]), str(r[3]), *(pct(v) for v in r[4:10]), fmt(r[10])] for r in rows])
    report_errors(summary.n_errors + summary.n_load_errors, "edit(s)/record(s) failed", warehouse, run_id)


def register(app: typer.Typer) -> None:
    app.command("edit")(edit)
