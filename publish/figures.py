"""The paper's figures as PNGs (matplotlib, Agg backend), each drawn from one DuckDB view of the warehouse:
rank_equals_length (Figure 3), vjp_norm_by_segment (Figure 5), target_rank_by_layer (Figure 6) and
edit_results (editing outcomes: edit_figures.py). The logit-lens tables of single prompts are HTML, not images
(``tokens.case_grid``); a :class:`Figure` carries either."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from .numbers import percent

SEGMENT_COLORS = {"subject": "#d62728", "last": "#1f77b4", "other": "#7f7f7f"}
# ROME's causal-tracing roles (tokens.role), in prompt order, with the colours of Figure 5
ROLE_COLORS = {"bos": "#bcbd22", "before_subject": "#c7c7c7", "first_subject": "#ff9896",
               "middle_subject": "#e377c2", "last_subject": "#d62728", "first_subsequent": "#2ca02c",
               "further": "#7f7f7f", "last": "#1f77b4"}
# Every figure draws each model at its main settings (the settings id with most prompts, view main_settings), so
# results of different settings are never drawn, or averaged, together.
MAIN = "WHERE (model, settings) IN (SELECT (model, settings) FROM main_settings)"
MATRIX_STYLES = {"ff1": "-", "ff1_gate": ":", "ff2": "--"}
MODEL_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class Figure:
    file: str | None  # relative to out/, e.g. figures/rank_equals_length.png; None for an HTML grid
    caption: str  # plain text (escaped when rendered)
    alt: str
    case: object | None = None  # the prompt a per-case figure shows (rendered above it)
    grid: object | None = None  # a lens table rendered as HTML (templates/grid.html.j2) instead of an image
    table: object | None = None  # a numbers table (publish.editing.Table) rendered as HTML instead of an image


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.family": "DejaVu Sans", "font.size": 10, "axes.titlesize": 11, "axes.spines.top": False,
        "axes.spines.right": False, "figure.dpi": 100, "savefig.dpi": 110, "axes.grid": True,
        "grid.alpha": 0.3,
        # Titles and labels carry model names and tokens from the warehouse: never math ("$...$" made
        # mathtext raise and `blens report` crash) and never TeX.
        "text.parse_math": False, "text.usetex": False,
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


def _figure(path: Path, caption: str, alt: str) -> Figure:
    """The Figure record of a PNG just saved under ``figures/``."""
    return Figure(file=f"figures/{path.name}", caption=caption, alt=alt)


def _query_panels(con, sql: str):
    """Side-by-side panels, one per model, over the rows of ``sql`` (model first)."""
    return _model_panels(_plt(), con.sql(sql).fetchall())


def _layer_axis(ax) -> None:
    """Layers are whole numbers: ticks at integers whatever the depth (matplotlib would put 2.5 for 18 layers)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


LEGEND_FONT = 9  # pt: ~11 CSS px once a 13-inch figure is scaled to a 1280-px wide page (test_report)


def _ranges(layers: list[int]) -> str:
    """Whole numbers as ranges: [12, 13, 14, 20] -> "12–14, 20"."""
    out: list[str] = []
    for x in sorted(set(layers)):
        if out and x == int(out[-1].split("–")[-1]) + 1:
            out[-1] = f"{out[-1].split('–')[0]}–{x}"
        else:
            out.append(str(x))
    return ", ".join(out)


def rank_dips(rows: list[tuple]) -> dict[str, tuple[list[int], float]]:
    """Per model, the layers below the last where some prompts' gradient rank falls below n (rate < 1 for a
    matrix), and the largest share of prompts below n there. ``rows``: (model, matrix, layer, layer_frac, rate, n)."""
    out = {}
    for model in sorted({r[0] for r in rows}):
        mrows = [r for r in rows if r[0] == model]
        top = max(r[2] for r in mrows)
        dips = [r for r in mrows if r[2] < top and r[4] < 1]
        out[model] = (sorted({r[2] for r in dips}), max((1 - r[4] for r in dips), default=0.0))
    return out


def fig_rank_equals_length(con, path: Path) -> Figure:
    """Figure 3, with a second panel for the exceptions: a few prompts in a thousand below n at one layer are
    a 0.1 % step on the 0-100 % axis (invisible: the dips at SmolLM2's layers 12-22 were), so the lower panel
    draws the share of prompts whose rank is below n on its own scale, every layer but the last."""
    plt = _plt()
    rows = con.sql("SELECT model, matrix, layer, layer_frac, rate, n FROM rank_equals_length "
                   f"{MAIN} AND matrix NOT LIKE 'attn_%' ORDER BY model, matrix, layer").fetchall()
    models = sorted({r[0] for r in rows})
    fig, (ax, ax_low) = plt.subplots(2, 1, figsize=(8, 6.4), sharex=True, layout="constrained",
                                     gridspec_kw={"height_ratios": [2, 1.3]})
    summary = []
    dips = rank_dips(rows)
    low_max = 0.0
    for mi, model in enumerate(models):
        color = MODEL_COLORS[mi % len(MODEL_COLORS)]
        mrows = [r for r in rows if r[0] == model]
        top = max(r[2] for r in mrows)
        for matrix in sorted({r[1] for r in mrows}):
            pts = [(r[3], r[4], r[2]) for r in mrows if r[1] == matrix]
            style = MATRIX_STYLES.get(matrix, "-.")
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, color=color, marker="o", markersize=3,
                    label=f"{model} · {matrix}")
            below = [(p[0], 100 * (1 - p[1])) for p in pts if p[2] < top]
            ax_low.plot([p[0] for p in below], [p[1] for p in below], style, color=color, marker="o", markersize=3)
            low_max = max([low_max] + [p[1] for p in below])
        below = [r[4] for r in mrows if r[2] < top]
        last = [r[4] for r in mrows if r[2] == top]
        layers, worst = dips[model]
        summary.append(f"{model}: {percent(sum(below) / len(below)) if below else 'nan'}% on average "
                       f"below the last layer, {percent(sum(last) / len(last))}% at the last layer; "
                       + (f"some prompts below n at layers {_ranges(layers)} (at most {100 * worst:.1f}% of prompts)"
                          if layers else "no prompt below n before the last layer"))
    ax.set_ylabel("prompts with rank(dL/dW) = n  [%]")
    ax.set_ylim(-3, 103)
    ax.set_xlim(-0.02, 1.02)
    ax.set_title("Gradient rank equals prompt length (Figure 3)")
    high = max(1.0, low_max * 1.2)  # its own scale: one prompt in a thousand is visible
    ax_low.set_ylim(-0.04 * high, high)  # 0 % just above the axis line, not hidden in it
    ax_low.set_ylabel("rank < n  [%]\n(all but the last layer)")
    ax_low.set_xlabel("normalised layer (layer / (n_layers − 1))")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize=LEGEND_FONT, frameon=False,
               ncol=min(3, max(1, len(ax.get_lines()))))
    _save(fig, path)
    caption = (
        "Top: share of prompts whose MLP gradient dL/dW has rank exactly n, the prompt length (the upper bound of "
        "Lemma 4.1), by normalised layer; one line per model (colour) and matrix (line style). A line at 100% "
        "means the n spanning vectors are linearly independent. The last layer drops to about 0% because only "
        "the last token's VJP is non-zero there (rank 1). Bottom: the exceptions on their own scale, the share "
        "of prompts whose rank is below n, at every layer but the last. " + "; ".join(summary) + "."
    )
    return _figure(path, caption, "Line charts: share of prompts with gradient rank equal to prompt length by "
                                  "layer, and the share below it")


def fig_norm_by_segment(con, path: Path) -> Figure:
    fig, panels = _query_panels(con, "SELECT model, layer, segment, mean_norm FROM vjp_norm_by_segment "
                                f"{MAIN} AND site = 'ff2_vjp' ORDER BY model, segment, layer")
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
        ax.set_title(f"{model}: mean ‖δᵢ‖ of FF2 VJPs\nby token segment (Figure 5)", fontsize=10)  # two panels side by side: wrap
        _layer_axis(ax)
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


def fig_norm_by_role(con, path: Path) -> Figure:
    """Figure 5 with the paper's segmentation: mean FF2-output VJP norm by layer and token role, one panel per
    model (Gemma: resid_post_vjp, the site comparable to GPT-2's FF2 output VJP)."""
    rows = con.sql(f"SELECT model, layer, role, mean_norm, site FROM vjp_norm_by_role {MAIN} AND role IS NOT NULL AND "
                   "(site = 'resid_post_vjp' OR (site = 'ff2_vjp' AND model NOT IN (SELECT model FROM vjp_norm_by_role "
                   "WHERE site = 'resid_post_vjp'))) ORDER BY model, role, layer").fetchall()
    fig, panels = _model_panels(_plt(), rows)
    for ax, model, mrows in panels:
        site = mrows[0][4] if mrows else "ff2_vjp"
        for role, color in ROLE_COLORS.items():
            pts = [(r[1], r[3]) for r in mrows if r[2] == role and r[3] and r[3] > 0]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, color=color, label=role,
                        linewidth=2.2 if role in ("last_subject", "last") else 1.2)
        ax.set_yscale("log")
        ax.set_title(f"{model}: mean ‖δᵢ‖ ({site})\nby token role (Figure 5)", fontsize=10)
        _layer_axis(ax)
        ax.set_ylabel("mean VJP norm (log scale)")
        ax.legend(frameon=False, fontsize=7.5, ncol=2)
    _save(fig, path)
    caption = ("Mean L2 norm of the FF2-output VJP δᵢ by layer and token role, in ROME's causal-tracing segmentation "
               "(the paper's Figure 5): first / middle / last subject token, the first token after the subject, "
               "further tokens, the last token (and a BOS where the tokenizer adds one). The paper finds the norm "
               "largest at the last subject token in the early layers and at the last token later; the 'paper vs ours' "
               "section says how far that holds here.")
    return _figure(path, caption, "Line chart: mean FF2 VJP norm by layer for each token role")


POSITION_KINDS = (("last", SEGMENT_COLORS["last"], "last token"), ("not_last", SEGMENT_COLORS["other"], "other tokens"))


def _rank_panel(ax, rows: list[dict], target: str, vocab: int, model: str) -> None:
    """Median rank of one target by layer with its interquartile band, last vs other tokens, and V−1."""
    for kind, color, label in POSITION_KINDS:
        pts = [r for r in rows if r["position_kind"] == kind]
        if not pts:
            continue
        layers = [r["layer"] for r in pts]
        ax.fill_between(layers, [r[f"q25_{target}_rank"] for r in pts], [r[f"q75_{target}_rank"] for r in pts],
                        color=color, alpha=0.18, linewidth=0)
        ax.plot(layers, [r[f"median_{target}_rank"] for r in pts], marker="o", markersize=3, color=color,
                label=f"{label}: median, quartiles")
    ax.axhline(vocab - 1, color="black", linestyle="--", linewidth=1, label=f"V−1 = {vocab - 1:,} (least probable)")
    ax.set_ylim(0, vocab * 1.06)
    ax.set_title(f"{model} · rank of {target}", fontsize=10)
    _layer_axis(ax)
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:,.0f}")
    _legend_below(ax)


def _legend_below(ax, ncol: int = 1) -> None:
    """The panel's legend under it, outside the axes: it hides no band or line (inside, one covered the
    interquartile band), at a size legible when the figure is scaled to a 1280-px page."""
    ax.legend(frameon=False, fontsize=LEGEND_FONT, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol)


def fig_target_rank(con, path: Path) -> Figure:
    """Figure 6 per model (one row each): target_new's rank, target_true's beside it as the control, and the
    bottom-k shares; medians with interquartile bands, V−1 drawn, so "at the bottom" can be seen."""
    plt = _plt()
    cur = con.execute(f"SELECT * FROM target_rank_by_layer {MAIN} AND site = 'ff2_vjp' ORDER BY model, position_kind, layer")
    cols = [d[0] for d in cur.description]
    rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 3, figsize=(13, 4.6 * len(models) + 0.3), squeeze=False,
                             layout="constrained")
    notes = []
    for (ax_new, ax_true, ax_k), model in zip(axes, models):
        mrows = [r for r in rows if r["model"] == model]
        vocab = int(max(r["vocab_size"] for r in mrows))
        _rank_panel(ax_new, mrows, "target_new", vocab, model)
        _rank_panel(ax_true, mrows, "target_true", vocab, model)
        ax_new.set_ylabel("rank (0 = most probable)")
        for kind, color, label in POSITION_KINDS:
            pts = [r for r in mrows if r["position_kind"] == kind]
            layers = [r["layer"] for r in pts]
            ax_k.plot(layers, [100 * r["target_new_in_bottom_k"] for r in pts], marker="o", markersize=3,
                      color=color, label=f"target_new, {label}")
            ax_k.plot(layers, [100 * r["target_true_in_bottom_k"] for r in pts], linestyle=":", color=color,
                      label=f"target_true, {label}")
        ax_k.set_ylim(-3, 103)
        ax_k.set_title(f"{model} · in the bottom-k tokens (share of prompts)", fontsize=10)
        _layer_axis(ax_k)
        ax_k.set_ylabel("%")
        _legend_below(ax_k, ncol=2)
        last = [r for r in mrows if r["position_kind"] == "last"]
        if last:
            top = max(r["layer"] for r in last)
            upper = [r for r in last if r["layer"] >= (top + 1) / 2]
            share = sum(r["target_new_in_bottom_k"] for r in upper) / len(upper)
            share_true = sum(r["target_true_in_bottom_k"] for r in upper) / len(upper)
            best = max(last, key=lambda r: r["median_target_new_rank"])
            notes.append(f"{model} (V = {vocab:,}, {last[0]['n']} prompts): at the last token the median rank of "
                         f"target_new peaks at "
                         f"{best['median_target_new_rank']:,.0f} (layer {best['layer']}); in the upper half of the "
                         f"layers it is among the bottom-k tokens for {percent(share)}% of prompts, target_true "
                         f"for {percent(share_true)}%")
    _save(fig, path)
    caption = ("Rank of the new target's first token (left) and, as a control, of the true object's (middle) among "
               "all V vocabulary tokens when the FF2 VJP δᵢ is projected through the logit lens, at the last token "
               "versus all other tokens: median line, interquartile band (25th to 75th percentile over prompts), "
               "and the dashed V−1 line, the least probable token. Right: share of prompts whose bottom-k tokens "
               "contain target_new (solid) or target_true (dotted). A rank at V−1 means target_new is the LEAST "
               "probable token of δᵢ, so a gradient step (which subtracts δᵢ) writes it into the model: the "
               "paper's 'shift'. " + "; ".join(notes) + ".")
    return Figure(file=f"figures/{path.name}", caption=caption,
                  alt="Line charts: median and interquartile rank of target_new and target_true in FF2 VJP "
                      "projections by layer, with the V−1 line, and their bottom-k shares")
