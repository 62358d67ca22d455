"""`blens sweep`: tune layer and step size of each editing method on the train split (never the report data)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from blens.lifecycle.prefect import quiet_prefect

from ._common import err_console, fail
from ._tables import print_table
from . import options
from .edit import GEMMA3, SMOLLM2, print_summary, run_edit, set_threads

# Relative to the current directory, as every data path in the README: run from the repository root with the
# data beside it in ../shared. A default taken from where blens is installed would change with the install.
TRAIN = "../shared/data/counterfact/counterfact-train.json"


# Default grid per model (any option given on the command line wins); other models get SmolLM2's grid.
GRIDS: dict[str, dict[str, str]] = {
    SMOLLM2: dict(layers="8,12,16,20,24,28", shift_lrs="0.12,0.24,0.5", sgd_layers="16,20,24,28", sgd_lrs="1,3,10",
                  normalized="512,1024", normalized_layers="20,24", minimal="1.25", minimal_layers="24"),
    # 18 layers. FF2's output goes through post_feedforward_layernorm, so any update that dominates FF2's output
    # saturates (every step above it gives the same edit, and the model then says the target everywhere): the
    # grid spans the unsaturated range found by a 20-edit train pilot (docs/gemma.md), sgd lr and normalized c
    # ~100-1000x smaller than SmolLM2's.
    GEMMA3: dict(layers="6,9,12,15", shift_lrs="0.06,0.12,0.24", sgd_layers="9,12,15", sgd_lrs="0.001,0.003,0.01,0.03",
                 normalized="1,2,4", normalized_layers="12,15", minimal="1.25", minimal_layers="12,15"),
}


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
    data: str = typer.Option(TRAIN, "--data", metavar="PATH",
                             help="Tuning records: the CounterFact train split, never the split you report on. The "
                             "default is relative to the current directory (the repository root in the README)."),
    model: options.Model = SMOLLM2,
    limit: Optional[int] = typer.Option(100, "--limit", min=1, metavar="N", help="Train edits to use."),
    warehouse: options.Warehouse = Path("warehouse"),
    layers: Optional[str] = typer.Option(None, "--layers", metavar="N,N,...",
                                         help="Layers to try (comma-separated). Default: per "
                                         "model (SmolLM2 8,12,16,20,24,28; Gemma 3 270M 6,9,12,15)."),
    shift_lrs: Optional[str] = typer.Option(None, "--shift-lrs", metavar="X,X,...",
                                            help="eta values for the paper's shift "
                                            "(default 0.12,0.24,0.5)."),
    sgd_layers: Optional[str] = typer.Option(None, "--sgd-layers", metavar="N,N,...",
                                             help="Layers for the one-step sgd baseline "
                                             "(default: per model)."),
    sgd_lrs: Optional[str] = typer.Option(None, "--sgd-lrs", metavar="X,X,...",
                                          help="Learning rates for the one-step sgd baseline "
                                          "(default: per model)."),
    normalized: Optional[str] = typer.Option(None, "--normalized", metavar="X,X,...",
                                             help="c values for --step normalized ('' = "
                                             "skip; default: per model)."),
    normalized_layers: Optional[str] = typer.Option(None, "--normalized-layers", metavar="N,N,...",
                                                    help="Layers for --step "
                                                    "normalized (default: per model)."),
    minimal: Optional[str] = typer.Option(None, "--minimal", metavar="X,X,...",
                                          help="Margins for --step minimal ('' = skip; "
                                          "default 1.25)."),
    minimal_layers: Optional[str] = typer.Option(None, "--minimal-layers", metavar="N,N,...",
                                                 help="Layers for --step minimal (each "
                                                 "probe costs ~7 extra forward passes of the edit prompt; default: "
                                                 "per model)."),
    min_efficacy: float = typer.Option(0.95, "--min-efficacy", metavar="FRACTION",
                                       help="Defaults: among configs reaching this "
                                       "efficacy the one leaving most neighbourhood predictions unchanged (else the "
                                       "most efficacious)."),
    device: options.Device = "auto",
    batch_size: int = typer.Option(8, "--batch-size", min=1, metavar="N", help="Edits per Prefect task."),
    threads: options.Threads = None,
    fluency_tokens: int = typer.Option(0, "--fluency-tokens", min=0, metavar="N",
                                       help="Greedy new tokens per prompt for the fluency column; 0 (default) = "
                                       "skip: the selection rule does not use it and it costs a generation per cell."),
) -> None:
    """Grid over layers x step sizes for shift and sgd (+ shift step variants) on the train split; writes every
    cell to edit_results (kind 'sweep') and prints the chosen default per method.

    Each edit computes one forward+backward for all layers; each cell then re-runs only the layers above
    the edited one. Default grid for SmolLM2: 100 edits x 36 cells, ~13 min on a busy 2-core machine with
    --threads 1; the grid is per model (GRIDS), a smaller one for Gemma 3 270M's 18 layers.
    """
    quiet_prefect()
    from blens.edit.spec import EditSpec, check_layer
    from blens.extract.hub import check_hub_model
    from blens.extract.models import ModelLoadError, cached_model
    from blens.store.writer import WarehouseError, init_warehouse

    set_threads(threads)
    grid = GRIDS.get(model, GRIDS[SMOLLM2])
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
                            fluency_tokens=fluency_tokens))
    print_summary(str(warehouse), summary.run_id, summary)
    print_table(f"chosen defaults (efficacy >= {min_efficacy}, then most neighbourhood predictions unchanged; "
                "else highest efficacy)", ["method", "layer", "lr", "n", "efficacy", "generalization", "locality",
                                          "locality_unchanged"],
                [[m, str(d["layer"]), f"{d['lr']:.3g}", str(d["n"]),
                  *(f"{100 * (d[k] or 0):.1f}" for k in ("efficacy", "generalization", "locality", "locality_unchanged"))]
                 for m, d in sorted(summary.defaults.items())])


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
