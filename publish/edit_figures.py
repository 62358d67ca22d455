"""The editing figures of the report (``edit_results`` / ``edit_summary``): what each method reaches and keeps, and
how gradient-like its update is. Lens figures are in :mod:`figures`, which shares its drawing helpers."""

from __future__ import annotations

import math
from pathlib import Path

from .figures import MODEL_COLORS, Figure, _figure, _plt, _save

def _edit_label(method: str, layer, lr) -> str:
    """One editing configuration, as the figures name it: method, layer and step (the lr column)."""
    parts = [method]
    if layer is not None:
        parts.append(f"L{layer}")
    if lr is not None:
        parts.append(f"{lr:g}")
    return " ".join(parts)


EDIT_METRICS = (  # (edit_summary column, what it is, colour)
    ("efficacy", "efficacy", "#1f77b4"),
    ("generalization", "paraphrase (generalization)", "#2ca02c"),
    ("locality", "neighbourhood accuracy (locality)", "#ff7f0e"),
    ("locality_unchanged", "neighbourhood unchanged (locality_unchanged)", "#9467bd"),
)


def fig_edit_metrics(con, path: Path) -> Figure:
    import numpy as np

    plt = _plt()
    # means over converged edits only; non-converged minimal-step edits are counted, not averaged
    ok = "FILTER (WHERE converged IS NOT FALSE)"
    rows = con.sql(f"SELECT model, method, layer, lr, avg(efficacy) {ok}, avg(generalization) {ok}, avg(locality) {ok}, "
                   f"avg(locality_unchanged) {ok}, count(*) {ok}, count(*) FILTER (WHERE converged IS FALSE) "
                   "FROM edit_results WHERE error IS NULL GROUP BY ALL ORDER BY ALL").fetchall()
    models = sorted({r[0] for r in rows})
    many = len(models) > 1
    fig, ax = plt.subplots(figsize=(max(7, 2.0 * len(rows) + 3), 4.4))
    x = np.arange(len(rows))
    w = 0.2
    for k, (_col, label, color) in enumerate(EDIT_METRICS):
        vals = [100 * (r[4 + k] if r[4 + k] is not None else float("nan")) for r in rows]
        bars = ax.bar(x + (k - 1.5) * w, vals, w, label=label, color=color)
        for b, v in zip(bars, vals):
            if not math.isnan(v):
                ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, [(f"{r[0]}\n" if many else "") + f"{_edit_label(*r[1:4])}\n(n={r[8]}"
                      + (f", {r[9]} not conv." if r[9] else "") + ")" for r in rows], fontsize=7)
    ax.set_ylim(0, 108)
    ax.set_ylabel("mean over edits [%]")
    ax.set_title("Knowledge editing by configuration (method, layer, step)", pad=40)
    ax.legend(frameon=False, fontsize=7, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    _save(fig, path)
    parts = [f"{_edit_label(*r[1:4])}: {100 * (r[4] or 0):.0f}% / {100 * (r[5] or 0):.0f}% / "
             f"{100 * (r[6] or 0):.0f}% / {100 * (r[7] or 0):.0f}%" for r in rows]
    caption = ("Mean editing outcome per configuration (method, layer, step size; error-free edits whose step "
               "search converged): efficacy = target_new is the top-1 prediction on the edit prompt; paraphrase "
               "(generalization) = the same on rephrased prompts; neighbourhood accuracy (locality) = a "
               "neighbourhood prompt's true answer is the top-1 prediction (low for the unedited model too); "
               "neighbourhood unchanged (locality_unchanged) = a neighbourhood prompt keeps the unedited "
               "model's top-1 prediction (preservation; 100% for the unedited model). "
               "Efficacy / paraphrase / neighbourhood accuracy / unchanged: " + "; ".join(parts) + ".")
    return _figure(path, caption, "Bar chart of editing metrics by configuration")


def fig_edit_cosine(con, path: Path) -> Figure | None:
    import numpy as np

    plt = _plt()
    rows = con.sql("SELECT method, layer, lr, update_grad_cosine FROM edit_results WHERE update_grad_cosine IS NOT NULL "
                   "AND error IS NULL AND converged IS NOT FALSE ORDER BY ALL").fetchall()
    if not rows:
        return None
    rows = [(_edit_label(*r[:3]), r[3]) for r in rows]
    methods = sorted({r[0] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-1, 1, 41)
    notes = []
    for mi, m in enumerate(methods):
        vals = np.array([r[1] for r in rows if r[0] == m], dtype=float)
        ax.hist(vals, bins=bins, alpha=0.55, color=MODEL_COLORS[mi % len(MODEL_COLORS)], label=f"{m} (n={len(vals)})")
        notes.append(f"{m}: median {np.median(vals):.2f}")
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("cosine(weight update, −gradient)  ·  update_grad_cosine")
    ax.set_ylabel("edits")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-1, 1)
    ax.set_title("How gradient-like is each method's update?")
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path)
    caption = ("Distribution of the cosine between each edit's own weight update and the negative gradient "
               "−dL/dW of the edited matrix (L = NLL of target_new's first token; edit_results.update_grad_cosine), "
               "per configuration (method, layer, step). sgd's update is −lr·dL/dW, so its cosine is 1; the "
               "shift's direction x_nᵀE[t] does not depend on η. " + "; ".join(notes) + ".")
    return _figure(path, caption, "Histogram of update-gradient cosine by method")
