"""`blens sweep`: tune layer and step size of each editing method on the train split (never the report data)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from blens.edit.spec import SweepConfig
from blens.edit.tuned import describe_grid, grid_for
from blens.lifecycle.prefect import quiet_prefect

from ._common import err_console, fail
from ._tables import print_table
from . import options
from .edit import print_summary, run_edit, set_threads

# Relative to the current directory, as every data path in the README: run from the repository root with the
# data beside it in ../shared. A default taken from where blens is installed would change with the install.
TRAIN = "../shared/data/counterfact/counterfact-train.json"


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


def _grid_option(key: str, metavar: str, text: str):
    return typer.Option(None, "--" + key.replace("_", "-"), metavar=metavar, help=f"{text} ({describe_grid(key)}).")


@options.with_config_options(options.ExtractConfig, {"threads": {}, "prefect": {}})
@options.with_config_options(SweepConfig, {
    "data": dict(default=TRAIN, metavar="PATH", help="Tuning records: the CounterFact train split, never the split "
                 "you report on. The default is relative to the current directory (the repository root in the "
                 "README)."),
    "model": {}, "limit": dict(help="Train edits to use."), "warehouse": {},
    "min_efficacy": dict(metavar="X", help="Defaults: among configs reaching this efficacy (a fraction) the one "
                         "leaving most neighbourhood predictions unchanged (else the most efficacious)."),
    "device": {}, "batch_size": dict(metavar="N", help="Edits per Prefect task."),
    "fluency_tokens": dict(metavar="N", help="Greedy new tokens per prompt for the fluency column; 0 = skip: the "
                           "selection rule does not use it and it costs a generation per cell.")})
def sweep(
    layers: Optional[str] = _grid_option("layers", "N,N,...", "Layers to try for shift, comma-separated"),
    shift_lrs: Optional[str] = _grid_option("shift_lrs", "X,X,...", "eta values for the paper's shift"),
    sgd_layers: Optional[str] = _grid_option("sgd_layers", "N,N,...", "Layers for the one-step sgd baseline"),
    sgd_lrs: Optional[str] = _grid_option("sgd_lrs", "X,X,...", "Learning rates for the one-step sgd baseline"),
    normalized: Optional[str] = _grid_option("normalized", "X,X,...", "c values for --step normalized ('' = skip)"),
    normalized_layers: Optional[str] = _grid_option("normalized_layers", "N,N,...", "Layers for --step normalized"),
    minimal: Optional[str] = _grid_option("minimal", "X,X,...", "Margins for --step minimal ('' = skip)"),
    minimal_layers: Optional[str] = _grid_option("minimal_layers", "N,N,...", "Layers for --step minimal (each "
                                                 "probe costs ~7 extra forward passes of the edit prompt)"),
    **settings,
) -> None:
    """Grid over layers x step sizes for shift and sgd (+ shift step variants) on the train split; writes every
    cell to edit_results (kind 'sweep') and prints the chosen default per method.

    Each edit computes one forward+backward for all layers; each cell then re-runs only the layers above
    the edited one. Default grid for SmolLM2: 100 edits x 36 cells, ~13 min on a busy 2-core machine with
    --threads 1; the grid is per model (blens.edit.tuned.GRIDS), a smaller one for Gemma 3 270M's 18 layers.
    """
    data, model, limit, warehouse, min_efficacy, device, batch_size, threads, prefect, fluency_tokens = (settings.pop(k) for k in (
        "data", "model", "limit", "warehouse", "min_efficacy", "device", "batch_size", "threads", "prefect", "fluency_tokens"))
    quiet_prefect()
    from blens.edit.spec import EditSpec, check_layer
    from blens.extract.hub import check_hub_model
    from blens.extract.models import ModelLoadError, cached_model
    from blens.store.writer import WarehouseError, init_warehouse

    set_threads(threads)
    grid = grid_for(model)
    given = dict(layers=layers, shift_lrs=shift_lrs, sgd_layers=sgd_layers, sgd_lrs=sgd_lrs, normalized=normalized,
                 normalized_layers=normalized_layers, minimal=minimal, minimal_layers=minimal_layers)
    layers, shift_lrs, sgd_layers, sgd_lrs, normalized, normalized_layers, minimal, minimal_layers = (
        grid[k] if v is None else v for k, v in given.items())
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
        where = "" if Path(data).is_absolute() else f" (relative to the current directory {Path.cwd()})"
        fail(f"data path not found: {data}{where}; pass --data PATH to the CounterFact train split")
    try:
        check_hub_model(model)  # offline, a hub name fails now, not after the hub client's retries
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
                            device=device, batch_size=batch_size, kind="sweep", min_efficacy=min_efficacy,
                            fluency_tokens=fluency_tokens, prefect=prefect))
    print_summary(str(warehouse), summary.run_id, summary)
    print_table(f"chosen defaults (efficacy >= {min_efficacy}, then most neighbourhood predictions unchanged; "
                "else highest efficacy)", ["method", "layer", "lr", "n", "efficacy", "generalization", "locality",
                                          "locality_unchanged"],
                [[m, str(d["layer"]), f"{d['lr']:.3g}", str(d["n"]),
                  *(f"{100 * (d[k] or 0):.1f}" for k in ("efficacy", "generalization", "locality", "locality_unchanged"))]
                 for m, d in sorted(summary.defaults.items())])


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
