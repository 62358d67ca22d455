"""`blens sweep`: tune layer and step size of each editing method on the train split (never the report data)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import err_console, fail, print_table, quiet_prefect
from . import options
from .edit import SMOLLM2, print_summary, run_edit, set_threads

TRAIN = str(Path(__file__).resolve().parents[3] / "shared" / "data" / "counterfact" / "counterfact-train.json")


def _floats(text: str, option: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{option} must be a comma-separated list of numbers (got {text!r})")
    if not vals or any(not v > 0 for v in vals):
        fail(f"{option} needs positive numbers (got {text!r})")
    return vals


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{option} must be a comma-separated list of integers (got {text!r})")


def sweep(
    data: str = typer.Option(TRAIN, "--data", help="Tuning records: CounterFact train split (never the split you "
                             "report on)."),
    model: options.Model = SMOLLM2,
    limit: Optional[int] = typer.Option(100, "--limit", min=1, help="Train edits to use."),
    warehouse: options.Warehouse = Path("warehouse"),
    layers: str = typer.Option("8,12,16,20,24,28", "--layers", help="Layers to try (comma-separated)."),
    shift_lrs: str = typer.Option("0.12,0.24,0.5", "--shift-lrs", help="eta values for the paper's shift."),
    sgd_layers: str = typer.Option("16,20,24,28", "--sgd-layers", help="Layers for the one-step sgd baseline."),
    sgd_lrs: str = typer.Option("1,3,10", "--sgd-lrs", help="Learning rates for the one-step sgd baseline."),
    normalized: str = typer.Option("512,1024", "--normalized", help="c values for --step normalized ('' = skip)."),
    normalized_layers: str = typer.Option("20,24", "--normalized-layers", help="Layers for --step normalized."),
    minimal: str = typer.Option("1.25", "--minimal", help="Margins for --step minimal ('' = skip)."),
    minimal_layers: str = typer.Option("24", "--minimal-layers", help="Layers for --step minimal (each probe "
                                       "costs ~7 extra forward passes of the edit prompt)."),
    min_efficacy: float = typer.Option(0.95, "--min-efficacy", help="Defaults: among configs reaching this "
                                       "efficacy the one leaving most neighbourhood predictions unchanged (else the "
                                       "most efficacious)."),
    device: options.Device = "cpu",
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Edits per Prefect task."),
    threads: options.Threads = None,
) -> None:
    """Grid over layers x step sizes for shift and sgd (+ shift step variants) on the train split; writes every
    cell to edit_results (kind 'sweep') and prints the chosen default per method.

    Each edit computes one forward+backward for all layers; each cell then re-runs only the layers above
    the edited one. Default grid: 100 edits x 36 cells, ~13 min on a busy 2-core machine with --threads 1.
    """
    quiet_prefect()
    from blens.edit.spec import EditSpec, check_layer
    from blens.extract.models import ModelLoadError, cached_model
    from blens.store.writer import WarehouseError, init_warehouse

    set_threads(threads)
    lay, sgd_lay = _ints(layers, "--layers"), _ints(sgd_layers, "--sgd-layers")
    norm_lay, min_lay = _ints(normalized_layers, "--normalized-layers"), _ints(minimal_layers, "--minimal-layers")
    eta, sgd_lr = _floats(shift_lrs, "--shift-lrs"), _floats(sgd_lrs, "--sgd-lrs")
    norm = _floats(normalized, "--normalized") if normalized.strip() else []
    mini = _floats(minimal, "--minimal") if minimal.strip() else []
    specs = [EditSpec("none")]
    specs += [EditSpec("shift", layer, e) for layer in lay for e in eta]
    specs += [EditSpec("sgd", layer, lr) for layer in sgd_lay for lr in sgd_lr]
    specs += [EditSpec("shift", layer, c, "normalized") for layer in norm_lay for c in norm]
    specs += [EditSpec("shift", layer, m, "minimal") for layer in min_lay for m in mini]
    vlay = sgd_lay + norm_lay + min_lay
    if not Path(data).exists() and data.endswith((".json", ".jsonl")):
        fail(f"data path not found: {data}")
    try:
        with err_console.status(f"loading model {model} ..."):
            lm = cached_model(model, device)
        for layer in sorted(set(lay) | set(vlay)):
            check_layer(lm.view, layer)
        init_warehouse(warehouse)
    except ValueError as exc:
        fail(f"--layers: {exc}")
    except (WarehouseError, ModelLoadError) as exc:
        fail(str(exc))
    summary = run_edit(dict(model=model, data=data, specs=specs, warehouse=str(warehouse), limit=limit,
                            device=device, batch_size=batch_size, kind="sweep", min_efficacy=min_efficacy))
    print_summary(str(warehouse), summary.run_id, summary)
    print_table(f"chosen defaults (efficacy >= {min_efficacy}, then most neighbourhood predictions unchanged; "
                "else highest efficacy)", ["method", "layer", "lr", "n", "efficacy", "paraphrase", "neighborhood",
                                          "nbhd unchanged"],
                [[m, str(d["layer"]), f"{d['lr']:.3g}", str(d["n"]),
                  *(f"{100 * (d[k] or 0):.1f}" for k in ("efficacy", "generalization", "locality", "locality_unchanged"))]
                 for m, d in sorted(summary.defaults.items())])


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
