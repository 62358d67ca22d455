"""What `blens sweep` chose and where it searches: the tuned editing defaults per model, and the sweep grids.

Domain knowledge of editing, not of the command line: `blens edit` and `blens sweep` read it (and their
``--help`` shows it), and a new model's tuned values are added here only. Plain data: no torch, no pydantic
(the CLI imports it to render ``--help``).
"""

from __future__ import annotations

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma3-270m"

# Per model: method/step -> (layer, lr), chosen by `blens sweep` on counterfact-train only.
# SmolLM2-135M: 100 train edits, see docs/editing.md. Gemma 3 270M: see docs/gemma.md.
# For other models pass --layer/--lr (the paper: GPT2-xl layer 35, eta 0.24).
DEFAULTS: dict[str, dict[str, tuple[int, float | None]]] = {
    SMOLLM2: {
        "shift": (24, 0.24),
        "shift-normalized": (24, 1024.0),
        "shift-minimal": (24, 1.25),
        "sgd": (24, 3.0),
        "rome": (11, None),  # ROME's relative depth (GPT-2 XL layer 17 of 48), blens.edit.rome.default_layer
    },
    # 100 train edits x 33 cells (run 55864b3899728c7a); the post-FF norm saturates large steps, so sgd's lr and
    # the normalized c are orders of magnitude below SmolLM2's.
    GEMMA3: {
        "shift": (15, 0.24),
        "shift-normalized": (15, 2.0),
        "shift-minimal": (15, 1.25),
        "sgd": (12, 0.01),
        "rome": (6, None),
    },
}
# The sweep's minimal step beat the paper's fixed eta on train (97% efficacy / 52% neighbourhood unchanged
# vs at best 85% / 44%), so it is the default step of --method shift; --step fixed is the paper's recipe.
DEFAULT_SHIFT_STEP = "minimal"

# The sweep's default grid per model (any option given on the command line wins); other models get SmolLM2's.
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


def grid_for(model: str) -> dict[str, str]:
    """The default grid of ``model`` (SmolLM2's for a model with none of its own)."""
    return GRIDS.get(model, GRIDS[SMOLLM2])


def describe_grid(key: str) -> str:
    """How ``--help`` states a grid entry's default: one value, or each model's."""
    values = {grid[key] for grid in GRIDS.values()}
    if len(values) == 1:
        return f"default {values.pop()}"
    return "default: per model, " + "; ".join(f"{model} {grid[key]}" for model, grid in GRIDS.items())
