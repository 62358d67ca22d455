"""Paper vs ours: each claim of the paper that the warehouse can test, our number for every model, and a verdict.

The paper is Katz, Belinkov, Geva, Wolf, "Backward Lens: Projecting Language Model Gradients into the Vocabulary
Space", EMNLP 2024 (figure and table numbers of that version). Its experiments use GPT-2 and GPT-2 XL; ours are the
models in the warehouse (the embedded ones are quantised checkpoints dequantised to fp32, see ``describe``), so a
claim that "fails" here says what these models do, measured the way the paper measures it, not that the paper erred.

Every number comes from the public views (``queries/10_figures.sql``), read at one settings id per model: the one
holding most prompts (view ``main_settings``), named in each row, so readings never mix settings. The verdict
rules are written next to each claim (``holds`` / ``holds partly`` / ``fails`` / ``not measured``); the thresholds
are ours, stated so a reader can disagree with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .numbers import percent

MLP = ("ff1", "ff1_gate", "ff2")
MIN_GROUP = 10  # prompts a split group needs before its reading counts as a full "holds"
ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_o")


@dataclass(frozen=True)
class Claim:
    key: str
    where: str  # the paper's figure or table (EMNLP 2024 numbering)
    paper: str  # the claim as the paper makes it, with its number where it gives one
    view: str  # where ours is read
    rule: str  # how the verdict is decided


@dataclass
class Reading:
    claim: Claim
    model: str
    settings: str
    ours: str  # our measurement, in words and numbers
    verdict: str  # holds | holds partly | fails | not measured
    reason: str = ""  # the measured reason where it differs


@dataclass(frozen=True)
class Scope:
    """One model's results under one settings id."""

    model: str
    settings: str
    n_prompts: int
    n_layers: int
    vocab_size: int
    shift_site: str  # the FF2-output VJP comparable to GPT-2's: resid_post_vjp behind a post-MLP norm, else ff2_vjp


def _pct(x: float | None) -> str:
    """A share as a percentage that never rounds a non-1 value up to 100 % (0.995 -> '99.5 %'): publish/numbers.py."""
    return "n/a" if x is None else f"{percent(x)} %"


def scopes(con) -> list[Scope]:
    rows = con.execute("""
        SELECT s.model, s.settings, s.n_prompts, d.n_layers, coalesce(v.vocab_size, 0),
               bool_or(x.site = 'resid_post_vjp')
        FROM main_settings AS s
        JOIN (SELECT model, max(layer) + 1 AS n_layers FROM gradient_ranks GROUP BY model) AS d USING (model)
        LEFT JOIN (SELECT model, max(vocab_size) AS vocab_size FROM models GROUP BY model) AS v USING (model)
        LEFT JOIN (SELECT DISTINCT model, site FROM vjp_norm_by_role) AS x USING (model)
        GROUP BY ALL ORDER BY s.model""").fetchall()
    return [Scope(m, s, n, L, V, "resid_post_vjp" if resid else "ff2_vjp") for m, s, n, L, V, resid in rows]


def _one(con, sql: str, params: list) -> tuple:
    return con.execute(sql, params).fetchone()


# ---- the claims -----------------------------------------------------------------------------------------

FIG3 = Claim("fig3", "Figure 3", "The gradient of an MLP matrix has rank at most n, the prompt length (Lemma 4.1), and "
             "in practice exactly n in every layer but the last, where only the last token's VJP is non-zero: rank 1.",
             "rank_equals_length", "holds: rate >= 95 % below the last layer and mean rank 1 at the last layer; "
             "holds partly: rate >= 80 %; else fails")

FIG16 = Claim("fig16", "Figure 16", "The same decomposition holds for the attention projections (Lemma 4.1 covers every "
              "linear map applied per token): rank <= n, and the attention output's VJP can be read through the lens "
              "as the MLP's shift is.", "rank_equals_length, target_rank_by_layer (site attn_vjp)",
              "holds: every attention gradient at rank <= n and at its bound (n; attn_q: n - 1) for >= 95 % below the last layer; "
              "holds partly: rate >= 80 %; else fails")

FIG5 = Claim("fig5", "Figure 5", "The norm of the FF2 VJP is concentrated on the last subject token in the early layers "
             "and on the last token in the later layers (ROME's causal-tracing segments).",
             "vjp_norm_by_role", "holds: last_subject is the largest non-last role in most of the first third of the "
             "layers AND last is the largest role in most of the last third; holds partly: one of the two; else fails")

FIG6 = Claim("fig6", "Figure 6", "Projected through the logit lens, the FF2 VJP at the last position puts target_new among "
             "the LEAST probable tokens in the upper layers (the 'shift': a gradient step subtracts the VJP, writing "
             "target_new in).", "target_rank_by_layer",
             "holds: over the upper half of the layers, the median rank of target_new at the last position averages "
             ">= 99 % of V-1; holds partly: >= 90 %, or target_new in the bottom-k for >= 50 % of prompts; else fails")

FIG19 = Claim("fig19", "Figures 19-20", "The shift reading does not depend on the model's own prediction: split by "
              "whether the model's answer (its argmax at the last position) is correct, target_new still sits at the "
              "bottom of the last position's FF2 VJP lens in the upper layers.", "target_rank_by_role",
              "holds: the Figure 6 criterion (>= 90 % of V-1) in both groups, each of >= 10 prompts; holds partly: "
              "in one group, or a group under 10 prompts; not measured: a group is empty")

APPG = Claim("appg", "Appendix G", "The last position's VJPs of nearby layers point in similar directions, and the "
             "similarity decays with the distance between layers.", "vjp_layer_similarity",
             "holds: mean cosine of adjacent layers >= 0.5 and above that of layers half the depth apart by >= 0.1; "
             "holds partly: adjacent above distant; else fails")

TABLE1 = Claim("table1", "Table 1", "Forward-pass shift on GPT-2 XL: efficacy 99.4, paraphrase 41.6, neighbourhood "
               "6.02 (ROME: 99.4 / 71.9 / 10.91).", "edit_summary",
               "holds: efficacy >= 95 % for a shift method; holds partly: >= 80 %; not measured: no edits stored")

CLAIMS = (FIG3, FIG16, FIG5, FIG6, FIG19, APPG, TABLE1)


def _rank_claim(con, sc: Scope, claim: Claim, matrices: tuple[str, ...]) -> Reading:
    """Lemma 4.1's reading for a set of matrices. attn_q is held to n - 1: the first token attends to itself alone,
    a softmax over one key is constant, so its query's VJP is exactly zero and rank(dL/dW_q) <= n - 1."""
    last = sc.n_layers - 1
    full = _one(con, "SELECT avg((rank = n_tokens - (matrix = 'attn_q')::INT)::DOUBLE), "
                "avg((rank <= n_tokens)::DOUBLE) FROM gradient_ranks WHERE model = ? AND settings = ? AND layer < ? "
                "AND list_contains(?, matrix)", [sc.model, sc.settings, last, list(matrices)])
    at_last = con.execute("SELECT matrix, avg(rank) FROM gradient_ranks WHERE model = ? AND settings = ? "
                          "AND layer = ? AND list_contains(?, matrix) GROUP BY matrix ORDER BY matrix",
                          [sc.model, sc.settings, last, list(matrices)]).fetchall()
    dips = con.execute("SELECT layer, min(r) FROM (SELECT layer, matrix, avg((rank = n_tokens - (matrix = 'attn_q')::INT)"
                       "::DOUBLE) AS r FROM gradient_ranks WHERE model = ? AND settings = ? AND layer < ? AND "
                       "list_contains(?, matrix) GROUP BY ALL) GROUP BY layer HAVING min(r) < 0.99 ORDER BY layer",
                       [sc.model, sc.settings, last, list(matrices)]).fetchall()
    if full[0] is None:
        return Reading(claim, sc.model, sc.settings, "no gradient ranks for these matrices", "not measured")
    rate, bounded = full
    last_txt = ", ".join(f"{mx} {r:.2f}" for mx, r in at_last)
    ours = (f"rank = n{' (attn_q: n - 1)' if 'attn_q' in matrices else ''} for {_pct(rate)} of prompt-matrices below "
            f"the last layer; rank <= n for {_pct(bounded)}; mean rank at the last layer: {last_txt}")
    last_one = all(r <= 1.0 + 1e-9 for mx, r in at_last if mx in ("ff1", "ff1_gate", "ff2", "attn_q", "attn_o"))
    verdict = "holds" if rate >= 0.95 and bounded == 1 and last_one else "holds partly" if rate >= 0.8 else "fails"
    reasons = []
    if dips:
        reasons.append("rank below the bound for some prompts at layers "
                       + ", ".join(f"{layer} ({_pct(r)} at it)" for layer, r in dips[:8]))
    if matrices == ATTENTION:
        reasons.append("attn_q's bound is n - 1 (the first token's query has a zero VJP: softmax over one key); at "
                       "the last layer attn_k and attn_v keep rank ~n (every position's key and value reach the last "
                       "token), attn_q and attn_o drop to 1")
        shift = _one(con, "SELECT avg(target_new_in_bottom_k) FROM target_rank_by_layer WHERE model = ? AND "
                     "settings = ? AND site = 'attn_vjp' AND position_kind = 'last' AND layer_frac >= 0.5",
                     [sc.model, sc.settings])
        if shift[0] is not None:
            ours += f"; attn_vjp: target_new in the bottom-k at the last position, upper half: {_pct(shift[0])}"
    return Reading(claim, sc.model, sc.settings, ours, verdict, "; ".join(reasons))


def _fig3(con, sc: Scope) -> Reading:
    return _rank_claim(con, sc, FIG3, MLP)


def _fig16(con, sc: Scope) -> Reading:
    return _rank_claim(con, sc, FIG16, ATTENTION)


def _fig5(con, sc: Scope) -> Reading:
    rows = con.execute("SELECT layer, layer_frac, role, mean_norm FROM vjp_norm_by_role WHERE model = ? AND "
                       "settings = ? AND site = ? AND role IS NOT NULL", [sc.model, sc.settings, sc.shift_site]).fetchall()
    if not rows:
        return Reading(FIG5, sc.model, sc.settings, "no roles stored", "not measured")
    by_layer: dict[int, dict[str, float]] = {}
    frac = {}
    for layer, f, role, norm in rows:
        by_layer.setdefault(layer, {})[role] = norm or 0.0
        frac[layer] = f
    early = [layer for layer in by_layer if frac[layer] <= 1 / 3]
    late = [layer for layer in by_layer if frac[layer] >= 2 / 3]

    def top_non_last(layer):
        roles = {r: v for r, v in by_layer[layer].items() if r != "last"}
        return max(roles, key=roles.get) if roles else None

    ls_top = [layer for layer in early if top_non_last(layer) == "last_subject"]
    ls_above_last = [layer for layer in sorted(by_layer)
                     if by_layer[layer].get("last_subject", 0) > by_layer[layer].get("last", float("inf"))]
    last_top = [layer for layer in late if max(by_layer[layer], key=by_layer[layer].get) == "last"]
    ls_anywhere = [layer for layer in sorted(by_layer) if layer < sc.n_layers - 1 and top_non_last(layer) == "last_subject"]
    ours = (f"site {sc.shift_site}: last_subject is the largest non-last role in {len(ls_top)} of {len(early)} early "
            f"layers (at layers {_layers(ls_anywhere)} overall) and above the last token at layers "
            f"{_layers(ls_above_last)}; the last token is the largest role in {len(last_top)} of {len(late)} late layers")
    a, b = len(ls_top) > len(early) / 2, len(last_top) > len(late) / 2
    verdict = "holds" if a and b else "holds partly" if a or b else "fails"
    # the measured reason behind the coarse segment view: the first position's small norm
    first = _one(con, "SELECT avg(norm) FILTER (WHERE position = 0), avg(norm) FILTER (WHERE position > 0 AND "
                 "segment <> 'last') FROM projections AS x WHERE model = ? AND settings = ? AND site = ? "
                 "AND layer >= ?", [sc.model, sc.settings, sc.shift_site, sc.n_layers // 3])
    reason = ""
    if first[0] is not None and first[1]:
        ratio = first[0] / first[1]
        reason = (f"position 0 carries {ratio:.2f}x the mean norm of the other non-last positions from layer "
                  f"{sc.n_layers // 3} on" + (" and most CounterFact subjects start there: averaged with it, the coarse "
                                             "'subject' segment (vjp_norm_by_segment) comes out low" if ratio < 0.5 else ""))
    return Reading(FIG5, sc.model, sc.settings, ours, verdict, reason)


def _layers(layers: list[int]) -> str:
    """'0-2, 12-22' from [0, 1, 2, 12, ..., 22]."""
    if not layers:
        return "none"
    runs, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(runs)


def _shift_numbers(con, sc: Scope, where: str = "", params: list | None = None) -> tuple:
    return _one(con, "SELECT avg(median_target_new_rank) / (max(vocab_size) - 1), avg(target_new_in_bottom_k), "
                "avg(target_true_in_bottom_k), avg(median_target_true_rank) / (max(vocab_size) - 1), max(n) "
                f"FROM target_rank_by_layer WHERE model = ? AND settings = ? AND site = ? AND position_kind = 'last' "
                f"AND layer_frac >= 0.5 {where}", [sc.model, sc.settings, sc.shift_site] + (params or []))


def _fig6(con, sc: Scope) -> Reading:
    norm_rank, bottom, true_bottom, true_rank, _ = _shift_numbers(con, sc)
    if norm_rank is None:
        return Reading(FIG6, sc.model, sc.settings, "no projections", "not measured")
    ours = (f"site {sc.shift_site}, last position, upper half of the layers: median rank of target_new at "
            f"{_pct(norm_rank)} of V-1, in the bottom-k for {_pct(bottom)} of prompts (control target_true: "
            f"{_pct(true_rank)} of V-1, bottom-k {_pct(true_bottom)})")
    verdict = "holds" if norm_rank >= 0.99 else "holds partly" if norm_rank >= 0.9 or bottom >= 0.5 else "fails"
    return Reading(FIG6, sc.model, sc.settings, ours, verdict)


def _fig19(con, sc: Scope) -> Reading:
    rows = con.execute("SELECT model_answer_is_true, avg(median_target_new_rank), avg(model_answer_in_top_k), "
                       "max(n) FROM target_rank_by_role WHERE model = ? AND settings = ? AND site = ? AND role = 'last' "
                       "AND layer_frac >= 0.5 AND model_answer_is_true IS NOT NULL GROUP BY ALL ORDER BY 1",
                       [sc.model, sc.settings, sc.shift_site]).fetchall()
    groups = {bool(r[0]): r for r in rows}
    n_true = _one(con, "SELECT count(*) FILTER (WHERE model_answer_is_true), count(model_answer_is_true) "
                  "FROM prompts WHERE model = ? AND settings = ?", [sc.model, sc.settings])
    if len(groups) < 2:
        return Reading(FIG19, sc.model, sc.settings, f"the model answered target_true for {n_true[0]} of {n_true[1]} "
                       "prompts: one group is empty", "not measured")
    ok = {k: (g[1] / (sc.vocab_size - 1)) >= 0.9 for k, g in groups.items()}
    ours = (f"the model's argmax is target_true for {n_true[0]} of {n_true[1]} prompts; median rank of target_new at the "
            f"last position, upper half: {_pct(groups[True][1] / (sc.vocab_size - 1))} of V-1 when correct, "
            f"{_pct(groups[False][1] / (sc.vocab_size - 1))} when not; the model's own answer is in the VJP's top-k "
            f"for {_pct(groups[True][2])} / {_pct(groups[False][2])}")
    verdict = "holds" if all(ok.values()) else "holds partly" if any(ok.values()) else "fails"
    reason = ""
    small = min(n_true[0], n_true[1] - n_true[0])
    if small < MIN_GROUP:
        verdict = "holds partly" if verdict == "holds" else verdict
        top = _one(con, "SELECT model_answer_token, count(*) FROM prompts WHERE model = ? AND settings = ? "
                   "GROUP BY ALL ORDER BY 2 DESC, 1 LIMIT 1", [sc.model, sc.settings])
        reason = (f"one group has only {small} prompts (< {MIN_GROUP}): the model rarely answers CounterFact's true "
                  f"object with its first token (its most frequent argmax is {top[0]!r}, for {top[1]} prompts)")
    return Reading(FIG19, sc.model, sc.settings, ours, verdict, reason)


def _appg(con, sc: Scope) -> Reading:
    site = "ff2_vjp"
    near, far = _one(con, "SELECT avg(mean_cosine) FILTER (WHERE abs(layer_a - layer_b) = 1), avg(mean_cosine) FILTER "
                     "(WHERE abs(layer_a - layer_b) >= ?) FROM vjp_layer_similarity WHERE model = ? AND settings = ? "
                     "AND site = ?", [max(1, sc.n_layers // 2), sc.model, sc.settings, site])
    if near is None:
        return Reading(APPG, sc.model, sc.settings, "no similarity rows", "not measured")
    attn = _one(con, "SELECT avg(mean_cosine) FILTER (WHERE abs(layer_a - layer_b) = 1) FROM vjp_layer_similarity "
                "WHERE model = ? AND settings = ? AND site = 'attn_vjp'", [sc.model, sc.settings])[0]
    ours = (f"{site}: mean cosine {near:.2f} between adjacent layers, {far:.2f} between layers >= {sc.n_layers // 2} "
            "apart" + (f"; attn_vjp adjacent: {attn:.2f}" if attn is not None else ""))
    verdict = "holds" if near >= 0.5 and near - far >= 0.1 else "holds partly" if near > far else "fails"
    return Reading(APPG, sc.model, sc.settings, ours, verdict)


def _table1(con, sc: Scope) -> Reading:
    try:
        row = _one(con, "SELECT method, layer, n, efficacy, generalization, locality FROM edit_summary WHERE model = ? "
                   "AND method LIKE 'shift%' AND n > 0 ORDER BY efficacy DESC, n DESC LIMIT 1", [sc.model])
    except Exception:  # noqa: BLE001 - an edit view of another shape: say nothing rather than guess
        row = None
    if row is None:
        return Reading(TABLE1, sc.model, "-", "no edits stored for this model (blens edit)", "not measured")
    method, layer, n, eff, gen, loc = row
    ours = (f"{method} at layer {layer} on {n} edits: efficacy {_pct(eff)}, paraphrase {_pct(gen)}, "
            f"neighbourhood {_pct(loc)}")
    verdict = "holds" if eff >= 0.95 else "holds partly" if eff >= 0.8 else "fails"
    return Reading(TABLE1, sc.model, "-", ours, verdict, "another model and size than the paper's GPT-2 XL; see the "
                   "editing section for every method")


MEASURES: dict[str, Callable] = {"fig3": _fig3, "fig16": _fig16, "fig5": _fig5, "fig6": _fig6, "fig19": _fig19,
                                 "appg": _appg, "table1": _table1}


def paper_vs_ours(con) -> list[Reading]:
    """Every claim for every model (at its main settings), in the order of :data:`CLAIMS`."""
    out = []
    for sc in scopes(con):
        for claim in CLAIMS:
            out.append(MEASURES[claim.key](con, sc))
    return sorted(out, key=lambda r: ([c.key for c in CLAIMS].index(r.claim.key), r.model))


def markdown(readings: list[Reading], provenance: dict[str, str]) -> str:
    """The section as Markdown (README, docs): one table, then the rules."""
    lines = ["| paper (EMNLP 2024) | the paper's claim | model | ours | verdict | measured reason |",
             "|---|---|---|---|---|---|"]
    seen = set()
    for r in readings:
        claim = "" if r.claim.key in seen else r.claim.paper
        where = "" if r.claim.key in seen else r.claim.where
        seen.add(r.claim.key)
        model = f"{r.model} ({provenance.get(r.model, r.model)})"
        cells = [where, claim, model, r.ours, f"**{r.verdict}**", r.reason]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"
