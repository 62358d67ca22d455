"""The paper's figures as PNGs (matplotlib, Agg backend), each drawn from one DuckDB view of the warehouse:
rank_equals_length (Figure 3), projections (the logit-lens tables of single prompts), vjp_norm_by_segment
(Figure 5), target_rank_by_layer (Figure 6) and edit_results (editing outcomes)."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .tokens import display_token

SEGMENT_COLORS = {"subject": "#d62728", "last": "#1f77b4", "other": "#7f7f7f"}
MATRIX_STYLES = {"ff1": "-", "ff1_gate": ":", "ff2": "--"}
MODEL_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class Figure:
    file: str  # relative to out/, e.g. figures/rank_equals_length.png
    caption: str  # plain text (escaped when rendered)
    alt: str
    case: object | None = None  # the prompt a per-case figure shows (rendered above the image)
    wide: bool = False  # shown at natural size with a horizontal scroll instead of fitted to the page


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.family": "DejaVu Sans", "font.size": 10, "axes.titlesize": 11, "axes.spines.top": False,
        "axes.spines.right": False, "figure.dpi": 100, "savefig.dpi": 110, "axes.grid": True,
        "grid.alpha": 0.3,
    })
    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
        warnings.filterwarnings("ignore", message=r".*tight_layout.*")
        fig.savefig(path, bbox_inches="tight", facecolor="white")
    import matplotlib.pyplot as plt

    plt.close(fig)


def _model_panels(plt, rows: list[tuple]):
    """One subplot per model (rows' first column), side by side: (figure, [(axis, model, that model's rows)])."""
    models = sorted({r[0] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(max(7, 5.5 * len(models)), 4.2), squeeze=False)
    return fig, [(ax, m, [r for r in rows if r[0] == m]) for ax, m in zip(axes[0], models)]


def _figure(path: Path, caption: str, alt: str, wide: bool = False) -> Figure:
    """The Figure record of a PNG just saved under ``figures/``."""
    return Figure(file=f"figures/{path.name}", caption=caption, alt=alt, wide=wide)


def _query_panels(con, sql: str):
    """Side-by-side panels, one per model, over the rows of ``sql`` (model first)."""
    return _model_panels(_plt(), con.sql(sql).fetchall())


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60]


def _layer_span(layers: list[int]) -> str:
    return f"{min(layers)}–{max(layers)}" if layers else "–"


def fig_rank_equals_length(con, path: Path) -> Figure:
    plt = _plt()
    rows = con.sql("SELECT model, matrix, layer, layer_frac, rate, n FROM rank_equals_length "
                   "ORDER BY model, matrix, layer").fetchall()
    models = sorted({r[0] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.2))
    summary = []
    for mi, model in enumerate(models):
        color = MODEL_COLORS[mi % len(MODEL_COLORS)]
        for matrix in sorted({r[1] for r in rows if r[0] == model}):
            pts = [(r[3], r[4], r[2]) for r in rows if r[0] == model and r[1] == matrix]
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], MATRIX_STYLES.get(matrix, "-.") ,
                    color=color, marker="o", markersize=3, label=f"{model} · {matrix}")
        mrows = [r for r in rows if r[0] == model]
        top = max(r[2] for r in mrows)
        below = [r[4] for r in mrows if r[2] < top]
        last = [r[4] for r in mrows if r[2] == top]
        summary.append(f"{model}: {100 * (sum(below) / len(below) if below else float('nan')):.0f}% on average "
                       f"below the last layer, {100 * sum(last) / len(last):.0f}% at the last layer")
    ax.set_xlabel("normalised layer (layer / (n_layers − 1))")
    ax.set_ylabel("prompts with rank(dL/dW) = n  [%]")
    ax.set_ylim(-3, 103)
    ax.set_xlim(-0.02, 1.02)
    ax.set_title("Gradient rank equals prompt length (Figure 3)")
    ax.legend(fontsize=8, loc="lower left", frameon=False, ncol=2)
    _save(fig, path)
    caption = (
        "Share of prompts whose MLP gradient dL/dW has rank exactly n, the prompt length (the upper bound of "
        "Lemma 4.1), by normalised layer; one line per model (colour) and matrix (line style). A line at 100% "
        "means the n spanning vectors are linearly independent. The last layer drops to about 0% because only "
        "the last token's VJP is non-zero there (rank 1). " + "; ".join(summary) + "."
    )
    return _figure(path, caption, "Line chart: share of prompts with gradient rank equal to prompt length, by layer")


def _case_rows(con, run_id: str, case_id: int, site: str):
    # DuckDB lists are 1-based: [1] is the most (top_tokens) or least (bottom_tokens) probable token.
    return con.execute(
        "SELECT position, layer, norm, top_tokens[1], bottom_tokens[1], segment FROM projections "
        "WHERE run_id = ? AND case_id = ? AND site = ? ORDER BY position, layer",
        [run_id, case_id, site]).fetchall()


def fig_case_table(con, run_id: str, case_id: int, site: str, path: Path, tokens: list[tuple]) -> Figure | None:
    """Rows = prompt tokens, columns = layers; each cell the lens token, coloured by the vector's norm."""
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    plt = _plt()
    rows = _case_rows(con, run_id, case_id, site)
    if not rows:
        return None
    positions = sorted({r[0] for r in rows})
    layers = sorted({r[1] for r in rows})
    T, L = len(positions), len(layers)
    pi = {p: i for i, p in enumerate(positions)}
    li = {l: i for i, l in enumerate(layers)}
    norms = np.full((T, L), np.nan)
    labels = [["" for _ in range(L)] for _ in range(T)]
    use_bottom = site == "ff2_vjp"
    for pos, layer, norm, top, bottom, _seg in rows:
        norms[pi[pos], li[layer]] = norm
        if norm and norm > 0:
            labels[pi[pos]][li[layer]] = display_token(bottom if use_bottom else top, max_chars=8)
    positive = norms[np.isfinite(norms) & (norms > 0)]
    if positive.size and positive.max() / max(positive.min(), 1e-30) > 50:
        cnorm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-4), vmax=positive.max())
        scale = "log scale"
    else:
        lo, hi = (float(positive.min()), float(positive.max())) if positive.size else (0.0, 1.0)
        cnorm = Normalize(vmin=lo - 0.05 * (hi - lo), vmax=hi if hi > lo else lo + 1)
        scale = "linear scale"
    masked = np.ma.masked_where(~(np.isfinite(norms) & (norms > 0)), norms)
    cmap = plt.get_cmap("YlOrRd").with_extremes(bad="#eeeeee")

    cell_w, cell_h = 0.62, 0.34
    fig_w = 1.6 + cell_w * L + 1.0
    fig_h = 1.1 + cell_h * T
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    im = ax.imshow(masked, aspect="auto", cmap=cmap, norm=cnorm, interpolation="nearest")
    ax.grid(False)
    for s in ax.spines.values():
        s.set_visible(False)
    tok_by_pos = {t[0]: t for t in tokens}
    ylabels = []
    for p in positions:
        t = tok_by_pos.get(p)
        ylabels.append(f"{display_token(t[1], max_chars=14) if t else '?'}  {p}")
    ax.set_yticks(range(T), ylabels, fontsize=8)
    for tick, p in zip(ax.get_yticklabels(), positions):
        seg = tok_by_pos.get(p, (None, None, "other"))[2]
        tick.set_color(SEGMENT_COLORS.get(seg, "black"))
        if seg in ("subject", "last"):
            tick.set_fontweight("bold")
    ax.set_xticks(range(L), [str(l) for l in layers], fontsize=7)
    ax.xaxis.set_ticks_position("top")
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("layer", fontsize=9)
    ax.tick_params(length=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
        for i in range(T):
            for j in range(L):
                if labels[i][j]:
                    r, g, b, _a = cmap(float(cnorm(norms[i, j])))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.55
                    ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=6.5,
                            color="white" if dark else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    what = "‖δᵢ‖ (FF2 VJP norm)" if use_bottom else "‖xᵢ‖ (FF1 input norm)"
    cb.set_label(f"{what}, {scale}", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    _save(fig, path)

    if use_bottom:
        caption = (f"Case {case_id} (run {run_id}): the logit lens of the FF2 VJPs δᵢ. Each cell is the LEAST "
                   "probable token when δᵢ of that token (row) at that layer (column) is projected to the "
                   "vocabulary — the token a gradient-descent step pushes the model towards. Colour is ‖δᵢ‖ "
                   f"({scale}); grey cells are exactly zero (no gradient flows there). Subject tokens are red, "
                   "the last token blue; ␣ marks a leading space.")
    else:
        caption = (f"Case {case_id} (run {run_id}): the logit lens of the FF1 inputs xᵢ. Each cell is the MOST "
                   "probable token when xᵢ (the 'imprint' the gradient writes into FF1) is projected to the "
                   f"vocabulary. Colour is ‖xᵢ‖ ({scale}). Subject tokens are red, the last token blue; ␣ marks a "
                   "leading space.")
    alt = f"Table of {'least' if use_bottom else 'most'} probable lens tokens for case {case_id}, tokens by layers"
    return _figure(path, caption, alt, wide=True)


def fig_norm_by_segment(con, path: Path) -> Figure:
    fig, panels = _query_panels(con, "SELECT model, layer, segment, mean_norm FROM vjp_norm_by_segment "
                                "WHERE site = 'ff2_vjp' ORDER BY model, segment, layer")
    notes = []
    for ax, model, mrows in panels:
        positive = [r[3] for r in mrows if r[3] and r[3] > 0]
        logy = bool(positive) and max(positive) / min(positive) > 50
        for seg in ("subject", "last", "other"):
            pts = [(r[1], r[3]) for r in mrows if r[2] == seg]
            if logy:
                pts = [(x, y) for x, y in pts if y and y > 0]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                        color=SEGMENT_COLORS[seg], label=seg)
        if logy:
            ax.set_yscale("log")
        ax.set_title(f"{model}: mean ‖δᵢ‖ of FF2 VJPs by token segment (Figure 5)", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("mean VJP norm" + (" (log scale)" if logy else ""))
        ax.legend(frameon=False, fontsize=8)
        # which segment carries the most norm, averaged over layers
        avg = {}
        for seg in ("subject", "last", "other"):
            vals = [r[3] for r in mrows if r[2] == seg and r[3] is not None]
            if vals:
                avg[seg] = sum(vals) / len(vals)
        if avg:
            order = sorted(avg, key=avg.get, reverse=True)
            notes.append(f"{model}: largest on average for {order[0]} tokens, then {', '.join(order[1:])}")
    _save(fig, path)
    caption = ("Mean L2 norm of the FF2 VJP δᵢ (how strongly each token contributes to the FF2 gradient) by "
               "layer, for subject tokens, the last token and all other tokens. The paper finds the gradient "
               "concentrated on the subject and the last token. " + "; ".join(notes) + ".")
    return _figure(path, caption, "Line chart: mean FF2 VJP norm by layer for subject, last and other tokens")


def fig_target_rank(con, path: Path) -> Figure:
    fig, panels = _query_panels(con, "SELECT model, layer, position_kind, median_target_new_rank, "
                                "target_new_in_bottom_k FROM target_rank_by_layer WHERE site = 'ff2_vjp' "
                                "ORDER BY model, position_kind, layer")
    notes = []
    for ax, model, mrows in panels:
        for kind, color, label in (("last", SEGMENT_COLORS["last"], "last token"),
                                   ("not_last", SEGMENT_COLORS["other"], "all other tokens")):
            pts = [(r[1], r[3]) for r in mrows if r[2] == kind]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, color=color, label=label)
        ax.set_title(f"{model}: rank of target_new in the FF2 VJP lens (Figure 6)", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("median rank of target_new (0 = most probable)")
        ax.legend(frameon=False, fontsize=8)
        ax.ticklabel_format(axis="y", style="plain")
        last = [r for r in mrows if r[2] == "last"]
        if last:
            upper = [r for r in last if r[1] >= (max(r[1] for r in last) + 1) / 2]
            share = sum(r[4] for r in upper) / len(upper)
            notes.append(f"{model}: in the upper half of the layers target_new is among the bottom-k tokens of the "
                         f"last token's VJP for {100 * share:.0f}% of prompts")
    _save(fig, path)
    caption = ("Median rank of the new target's first token among all vocabulary tokens when the FF2 VJP δᵢ is "
               "projected through the logit lens, at the last token versus all other tokens (0 = most probable, "
               "V−1 = least probable). A high rank means target_new is among the LEAST probable tokens of δᵢ, so a "
               "gradient step (which subtracts δᵢ) writes it into the model — the paper's 'shift'. "
               + "; ".join(notes) + ".")
    return _figure(path, caption, "Line chart: median rank of target_new in FF2 VJP projections by layer, last vs other tokens")


def fig_edit_metrics(con, path: Path) -> Figure:
    import numpy as np

    plt = _plt()
    rows = con.sql("SELECT method, avg(efficacy), avg(generalization), avg(locality), count(*) FROM edit_results "
                   "WHERE error IS NULL GROUP BY method ORDER BY method").fetchall()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 3), 4))
    metrics = ("efficacy", "generalization", "locality")
    colors = ("#1f77b4", "#2ca02c", "#ff7f0e")
    x = np.arange(len(rows))
    w = 0.26
    for k, (metric, color) in enumerate(zip(metrics, colors)):
        vals = [100 * (r[1 + k] if r[1 + k] is not None else float("nan")) for r in rows]
        bars = ax.bar(x + (k - 1) * w, vals, w, label=metric, color=color)
        for b, v in zip(bars, vals):
            if not math.isnan(v):
                ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"{r[0]}\n(n={r[4]})" for r in rows])
    top = max([100.0] + [100 * v for r in rows for v in r[1:4] if v is not None])
    ax.set_ylim(0, top * 1.08)
    ax.set_ylabel("mean top-1 accuracy [%]")
    ax.set_title("Knowledge editing: efficacy / generalization / locality by method", pad=28)
    ax.legend(frameon=False, fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    _save(fig, path)
    parts = [f"{r[0]}: {100 * (r[1] or 0):.0f}% / {100 * (r[2] or 0):.0f}% / {100 * (r[3] or 0):.0f}%" for r in rows]
    caption = ("Mean editing outcome per method (successful edits only): efficacy = target_new is the top-1 "
               "prediction on the edit prompt; generalization = the same on rephrased prompts; locality = "
               "neighbourhood prompts keep their answer. Efficacy / generalization / locality: " + "; ".join(parts) + ".")
    return _figure(path, caption, "Bar chart of editing metrics by method")


def fig_edit_cosine(con, path: Path) -> Figure | None:
    import numpy as np

    plt = _plt()
    rows = con.sql("SELECT method, update_grad_cosine FROM edit_results WHERE update_grad_cosine IS NOT NULL "
                   "ORDER BY method").fetchall()
    if not rows:
        return None
    methods = sorted({r[0] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-1, 1, 41)
    notes = []
    for mi, m in enumerate(methods):
        vals = np.array([r[1] for r in rows if r[0] == m], dtype=float)
        ax.hist(vals, bins=bins, alpha=0.55, color=MODEL_COLORS[mi % len(MODEL_COLORS)], label=f"{m} (n={len(vals)})")
        notes.append(f"{m}: median {np.median(vals):.2f}")
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("cosine(weight update, gradient)  ·  update_grad_cosine")
    ax.set_ylabel("edits")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(-1, 1)
    ax.set_title("How gradient-like is each method's update?")
    ax.legend(frameon=False, fontsize=8)
    _save(fig, path)
    caption = ("Distribution of the cosine between each edit's weight update and the single-step gradient of the "
               "same loss (edit_results.update_grad_cosine). Values near ±1 mean the method's update is (a "
               "multiple of) the gradient, i.e. it writes the same low-rank imprint/shift. " + "; ".join(notes) + ".")
    return _figure(path, caption, "Histogram of update-gradient cosine by method")
