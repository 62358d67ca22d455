"""Tokens as a reader should see them, in the report and the notebook: one token's text with its invisible
characters made visible (:func:`display_token`), and one prompt's logit-lens table, tokens x layers
(:func:`case_grid`), as data for ``templates/grid.html.j2``.

A lens table is read token by token, and a token that renders as nothing (a space, a non-breaking space,
a zero-width joiner) reads as an empty cell, i.e. as "no result". So every character that would draw
nothing gets a visible stand-in, and the stand-ins differ where the characters do: an ordinary space is
'␣', any other space (U+00A0 no-break space, U+202F, U+3000, ...) is '⍽', so ' Paris' and '\u00a0Paris'
never look alike. Tokens are shown in HTML only, so any glyph the browser has is kept as it is.

Why the lens tables are HTML and not images: a 30-layer table of token cells is ~2,000 px wide as a legible
PNG, so at the width people read (1280 px) the upper layers, where the new target appears, and the colour
bar sat behind a sideways scroll. As HTML the table folds into blocks of layers, stays text (searchable;
each cell's tooltip carries its k tokens and both target ranks) and marks the target's cells.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

MAX_TOKEN_CHARS = 10

_CONTROL = {"\n": "↵", "\r": "↵", "\t": "⇥", "\u2028": "↵", "\u2029": "↵", "\x85": "↵"}


def _visible(ch: str) -> str:
    """One character as it should be seen: unchanged when it draws something, else its stand-in."""
    if ch == " ":
        return "␣"
    if ch in _CONTROL:
        return _CONTROL[ch]
    category = unicodedata.category(ch)
    if category == "Zs":  # a space that is not U+0020 (no-break, narrow, ideographic, ...)
        return "⍽"
    if category in ("Cc", "Cf", "Co", "Cs", "Cn"):  # control, format (zero-width), private, surrogate, unassigned
        return "·"
    return ch


def display_token(token: str | None, *, max_chars: int = MAX_TOKEN_CHARS) -> str:
    """A token as a reader should see it: spaces as '␣' (other spaces as '⍽'), newlines/tabs as arrows,
    control and zero-width characters as '·', the empty token as '∅', and long tokens cut with '..'."""
    if token is None:
        return ""
    text = "".join(_visible(ch) for ch in token)
    if text == "":
        return "∅"
    if len(text) > max_chars:
        text = text[: max_chars - 2] + ".."
    return text


def _plain(token: str | None, max_chars: int = 40) -> str:
    """Token text for the report's prompt strip (longer than a table cell allows)."""
    return display_token(token, max_chars=max_chars)


GRID_MAX_LAYERS = 15  # layer columns per block: 15 cells of 8 characters fit 1280 px with the token column
GRID_CELL_CHARS = 8
GRID_LABEL_CHARS = 14


@dataclass
class GridCell:
    text: str
    title: str  # the tooltip: the full lens tokens, the norm and both target ranks
    style: str  # background and text colour from the vector's norm
    classes: str  # "zero" and the target marks: "mark-new", "mark-new-k", "mark-true"


@dataclass
class GridRow:
    label: str
    position: int
    segment: str
    cells: list[GridCell]


@dataclass
class GridBlock:
    layers: list[int]
    rows: list[GridRow]


@dataclass
class Grid:
    """One prompt's logit-lens table (tokens x layers) as data for ``templates/grid.html.j2``.

    Layers are folded into blocks of at most :data:`GRID_MAX_LAYERS` (30 layers: two halves of 15) so that
    every layer is on screen at 1280 px; the template stacks the blocks, or sets them side by side where
    the page is wide enough.
    """

    site: str
    side: str  # "least" (ff2_vjp: the shift) or "most" (ff1_input: the imprint)
    norm_label: str
    blocks: list[GridBlock]
    gradient: str  # CSS linear-gradient of the colour bar
    ticks: list[tuple[float, str]]  # (percent along the colour bar, value)
    scale: str  # "log scale" or "linear scale"
    marks: dict[str, int]  # cells per mark class


def _colour_norm(norms: list[float]):
    """Log scale where the norms span more than 50x (they shrink by decades towards the first layers)."""
    from matplotlib.colors import LogNorm, Normalize

    positive = [n for n in norms if n and n > 0]
    if positive and max(positive) / max(min(positive), 1e-30) > 50:
        return LogNorm(vmin=max(min(positive), max(positive) * 1e-4), vmax=max(positive), clip=True), "log scale"
    lo, hi = (min(positive), max(positive)) if positive else (0.0, 1.0)
    return Normalize(vmin=lo - 0.05 * (hi - lo), vmax=hi if hi > lo else lo + 1, clip=True), "linear scale"


def _hex(rgba) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in rgba[:3]))


def _blocks(layers: list[int]) -> list[list[int]]:
    n = math.ceil(len(layers) / GRID_MAX_LAYERS)
    size = math.ceil(len(layers) / n)
    return [layers[i:i + size] for i in range(0, len(layers), size)]


def case_grid(rows: list[dict], tokens: list[tuple], site: str, target_new_id: int, target_true_id: int,
              vocab_size: int | None = None) -> Grid | None:
    """The lens table of one prompt and site from its ``projections`` rows (dicts with the view's columns).

    A cell shows the least (ff2_vjp) or most (ff1_input) probable token of that token's vector at that
    layer, coloured by the vector's norm. Marks: ``mark-new`` where the shown token is target_new,
    ``mark-new-k`` where target_new is among the k tokens of that side but not first, ``mark-true`` where
    the shown token is target_true. Zero vectors (no gradient reaches them) are blank and grey.
    """
    from matplotlib import colormaps

    rows = [r for r in rows if r["site"] == site]
    if not rows:
        return None
    least = site == "ff2_vjp"
    side = "least" if least else "most"
    ids_col, tok_col = ("bottom_ids", "bottom_tokens") if least else ("top_ids", "top_tokens")
    cnorm, scale = _colour_norm([r["norm"] for r in rows if not r["zero_vector"]])
    cmap = colormaps["YlOrRd"]
    tok_by_pos = {t[0]: t for t in tokens}
    of_v = f" of {vocab_size:,}" if vocab_size else ""
    by_cell = {(r["position"], r["layer"]): r for r in rows}
    positions = sorted({r["position"] for r in rows})
    marks = {"mark-new": 0, "mark-new-k": 0, "mark-true": 0}

    def cell(pos: int, layer: int) -> GridCell:
        r = by_cell.get((pos, layer))
        where = f"layer {layer} · position {pos} {display_token(tok_by_pos.get(pos, (0, '?'))[1], max_chars=40)}"
        if r is None or r["zero_vector"]:
            return GridCell("", f"{where}: zero vector (no gradient reaches it), its lens tokens mean nothing",
                            "", "zero")
        ids = list(r[ids_col])
        mark = ("mark-new" if ids[0] == target_new_id else "mark-new-k" if target_new_id in ids
                else "mark-true" if ids[0] == target_true_id else "")
        if mark:
            marks[mark] += 1
        rgba = cmap(float(cnorm(r["norm"])))
        dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.55
        title = (f"{where}\n{side} probable: "
                 f"{', '.join(display_token(t, max_chars=40) for t in r[tok_col])}\n"
                 f"norm {r['norm']:.3g} · rank of target_new {r['target_new_rank']:,}{of_v}, "
                 f"of target_true {r['target_true_rank']:,}{of_v} (0 = most probable)")
        return GridCell(display_token(r[tok_col][0], max_chars=GRID_CELL_CHARS), title,
                        f"background:{_hex(rgba)};color:{'#fff' if dark else '#000'}", mark)

    blocks = []
    for layers in _blocks(sorted({r["layer"] for r in rows})):
        grid_rows = []
        for pos in positions:
            seg = tok_by_pos.get(pos, (pos, None, "other"))[2] or "other"
            label = display_token(tok_by_pos[pos][1], max_chars=GRID_LABEL_CHARS) if pos in tok_by_pos else "?"
            grid_rows.append(GridRow(label, pos, seg, [cell(pos, layer) for layer in layers]))
        blocks.append(GridBlock(layers, grid_rows))
    stops = ", ".join(f"{_hex(cmap(t / 10))} {10 * t}%" for t in range(11))
    ticks = [(100 * t, f"{cnorm.inverse(t):.2g}") for t in (0.0, 0.5, 1.0)]
    label = "‖δᵢ‖, FF2 VJP norm" if least else "‖xᵢ‖, FF1 input norm"
    return Grid(site=site, side=side, norm_label=label, blocks=blocks,
                gradient=f"linear-gradient(to right, {stops})", ticks=ticks, scale=scale, marks=marks)


def grid_caption(grid: Grid, case_id: int, model: str, target_new: str, target_true: str) -> str:
    """What a reader needs to read the grid, and how many cells carry each target."""
    n_new, n_k, n_true = grid.marks["mark-new"], grid.marks["mark-new-k"], grid.marks["mark-true"]
    if grid.side == "least":
        what = ("the logit lens of the FF2 VJPs δᵢ (the 'shift'). Each cell is the LEAST probable token when δᵢ "
                "of that token (row) at that layer (column) is projected to the vocabulary: the token a gradient-"
                "descent step (which subtracts δᵢ) pushes the model towards.")
    else:
        what = ("the logit lens of the FF1 inputs xᵢ (the 'imprint' the gradient writes into FF1). Each cell is "
                "the MOST probable token when xᵢ is projected to the vocabulary.")
    return (f"Case {case_id} · {model}: {what} Colour is {grid.norm_label} ({grid.scale}); grey cells are exactly "
            f"zero (no gradient flows there). Outlined: the cell's token is target_new “{target_new}” "
            f"({n_new} cells); dashed: target_new is among the k {grid.side} probable tokens ({n_k}); green: the "
            f"cell's token is target_true “{target_true}” ({n_true}). Subject tokens are red, the last token blue; "
            "␣ is a space, ⍽ a non-breaking or other space. Hover a cell for its k tokens and target ranks.")
