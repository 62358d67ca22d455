"""The card's headline statistics: the paper's Figure 3 (gradient rank equals prompt length) and Figure 6 (where
target_new lands in the FF2 VJP) as Markdown tables per model, from the warehouse's views at each model's main
settings."""

from __future__ import annotations

from .markdown import _md_escape, _md_table, public_name
from .numbers import percent


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{percent(x)}%"


def _by_layer(rows: list[tuple]) -> dict[int, dict[str, tuple]]:
    """(layer, kind, *values) rows as {layer: {kind: values}}: one table row per layer, a column per kind."""
    out: dict[int, dict[str, tuple]] = {}
    for layer, kind, *values in rows:
        out.setdefault(layer, {})[kind] = tuple(values)
    return out


# One settings id per model: the one holding most of its prompts (view main_settings), so the card's tables never
# average results of different settings (a warehouse may hold --top-k 10 and --top-k 20 runs of one model).
_MAIN = "(model, settings) IN (SELECT (model, settings) FROM main_settings)"


def _stats_sections(con) -> list[str]:
    out: list[str] = []
    models = [r[0] for r in con.sql("SELECT DISTINCT model FROM prompts ORDER BY 1").fetchall()]
    for model in models:
        out.append(f"### {_md_escape(public_name(model))}\n")
        rows = con.execute(
            "SELECT layer, matrix, rate, mean_rank, mean_n_tokens, n FROM rank_equals_length WHERE model = ? "
            f"AND {_MAIN} ORDER BY layer, matrix", [model]).fetchall()
        matrices = sorted({r[1] for r in rows}, key=lambda m: (m.startswith("attn_"), m))  # MLP first, as Figure 3
        by_layer = _by_layer(rows)
        out.append(
            "**Gradient rank equals prompt length** (paper Figure 3, view `rank_equals_length`): share of "
            "prompts whose dL/dW has rank exactly n (Lemma 4.1's upper bound), with the mean rank / mean n "
            "in brackets. The last layer is rank 1: only the last position's VJP is non-zero there.\n")
        table_rows = []
        for layer in sorted(by_layer):
            cells = [layer]
            for m in matrices:
                v = by_layer[layer].get(m)
                cells.append("–" if v is None else f"{_pct(v[0])} ({v[1]:.1f} / {v[2]:.1f})")
            table_rows.append(cells)
        out.append(_md_table(["layer"] + matrices, table_rows) + "\n")

        rows = con.execute(
            "SELECT layer, position_kind, median_target_new_rank, target_new_in_bottom_k, target_new_in_top_k, n "
            f"FROM target_rank_by_layer WHERE model = ? AND {_MAIN} AND site = 'ff2_vjp' ORDER BY layer, position_kind",
            [model]).fetchall()
        if rows:
            stats = _by_layer(rows)
            out.append(
                "**Where target_new lands in the FF2 VJP** (paper Figure 6, view `target_rank_by_layer`, "
                "site `ff2_vjp`): median rank of target_new among all vocabulary tokens when delta_i is "
                "projected through the logit lens (0 = most probable; the paper finds it among the *least* "
                "probable tokens at the last position of upper layers), and the share of prompts with "
                "target_new among the k bottom tokens. The least probable rank is V-1 (V = vocabulary size).\n")
            table_rows = []
            for layer in sorted(stats):
                last = stats[layer].get("last")
                other = stats[layer].get("not_last")
                table_rows.append([
                    layer,
                    "–" if last is None else f"{last[0]:.0f}",
                    "–" if last is None else _pct(last[1]),
                    "–" if other is None else f"{other[0]:.0f}",
                    "–" if other is None else _pct(other[1]),
                ])
            out.append(_md_table(["layer", "median rank (last token)", "in bottom-k (last)",
                                  "median rank (other tokens)", "in bottom-k (other)"], table_rows) + "\n")
    return out
