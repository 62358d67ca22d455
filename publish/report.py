"""A static HTML report of the warehouse with the paper's figures.

``build_report(warehouse, out)`` writes ``out/index.html`` (from the Jinja2 template
``templates/report.html.j2``, autoescaped) and ``out/figures/*.png`` (``figures.py``); the logit-lens tables
of single prompts are HTML tables in the page (``tokens.case_grid``, ``templates/grid.html.j2``), the same
ones a notebook shows (:func:`render_grid`). The page opens
from disk (no server; images are referenced relatively) and carries a tiny script that, once the page
has loaded, marks on ``<body>`` whether every figure decoded (``data-images-ok``) and shows a banner if
one did not; the tests read that back from headless Chromium. Every number comes from the DuckDB
views, read through one ``blens.store.connect``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from blens.errors import UserError
from blens.store.connect import connect_pinned

from . import edit_figures as EF
from . import figures as F
from .editing import edit_table1
from .markdown import dataset_name, public_name
from .output import output_dir_problem, replace_directory, stage_dir
from .tokens import _plain, case_grid, grid_caption

DEFAULT_N_CASES = 2


class ReportError(UserError, RuntimeError):
    """The report cannot be built for a reason the user can act on; one line."""


@dataclass
class Section:
    key: str
    title: str
    intro: str
    figures: list[F.Figure] = field(default_factory=list)
    table: list[list[str]] | None = None  # header row first: a plain table (every cell autoescaped)


@dataclass
class ReportResult:
    out: Path
    index: Path
    sections: list[Section]
    cases: list[int]
    snapshot: int | None = None  # the DuckLake snapshot version every figure was read at

    @property
    def figure_files(self) -> list[Path]:
        return [self.out / f.file for s in self.sections for f in s.figures if f.file]


@dataclass
class Case:
    """One prompt shown in the report: its text and tokens (position, token, segment)."""

    case_id: int
    model: str
    prompt: str
    subject: str
    target_new: str
    target_true: str
    tokens: list[tuple]


def resolve_cases(con, cases: list[int] | None) -> list[tuple[int, str, str]]:
    """(case_id, run_id, model) for the requested cases, or the first DEFAULT_N_CASES case ids."""
    if not cases:
        ids = [r[0] for r in con.execute("SELECT DISTINCT case_id FROM prompts ORDER BY case_id LIMIT ?",
                                         [DEFAULT_N_CASES]).fetchall()]
    else:
        ids = list(dict.fromkeys(int(c) for c in cases))
    known = {r[0] for r in con.execute(
        "SELECT DISTINCT case_id FROM prompts WHERE list_contains(?, case_id)", [ids]).fetchall()}
    missing = [c for c in ids if c not in known]
    if missing:
        sample = [r[0] for r in con.sql("SELECT DISTINCT case_id FROM prompts ORDER BY 1 LIMIT 5").fetchall()]
        raise ReportError(f"--case {', '.join(map(str, missing))}: not in the warehouse "
                          f"(e.g. {', '.join(map(str, sample))})")
    out = []
    for c in ids:
        for run_id, model in con.execute("SELECT run_id, model FROM prompts WHERE case_id = ? ORDER BY run_id",
                                         [c]).fetchall():
            out.append((c, run_id, model))
    return out


def _templates():
    """The Jinja2 environment of the report and the notebook view: every value autoescaped."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("blens.publish", "templates"), autoescape=select_autoescape(["j2"]))
    env.filters["token"] = _plain
    return env


def render_html(title: str, runs: list[tuple], sections: list[Section], generated: str) -> str:
    """The page, from the Jinja2 template; every value is autoescaped."""
    return _templates().get_template("report.html.j2").render(title=title, runs=runs, sections=sections,
                                                               generated=generated)


def render_grid(grid, case: Case, loss: float, caption: str) -> str:
    """One prompt's lens table as a self-contained HTML fragment (its own styles): a notebook's view of a
    result (``blens.api.Result._repr_html_``), from the same template as the report's tables."""
    return _templates().get_template("notebook.html.j2").render(g=grid, case=case, loss=loss, caption=caption)


def _dicts(cur) -> list[dict]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]


# Columns the figures read that earlier versions of queries/10_figures.sql did not define. Views are stored
# in the warehouse's catalog and re-created by the next writer, so a read-only reader can meet old ones.
NEWEST_VIEW_COLUMNS = {"target_rank_by_layer": ("q25_target_new_rank", "target_true_in_bottom_k", "vocab_size")}


def _stale_views(con) -> str:
    """'view: missing columns' for each view the figures need that lacks them; '' when all are current."""
    missing = []
    for view, need in NEWEST_VIEW_COLUMNS.items():
        have = {r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()}
        if set(need) - have:
            missing.append(f"{view} has no {', '.join(c for c in need if c not in have)}")
    return "; ".join(missing)


def _case_section(con, chosen: list[tuple[int, str, str]]) -> Section:
    section = Section("cases", "2. Logit lens of single prompts",
                      "Per prompt: the gradient's spanning vectors at every token and layer, projected to the "
                      "vocabulary. First: FF2 VJPs δᵢ with their least probable token (the shift, where the new "
                      "target appears); then: FF1 inputs xᵢ with their most probable token (the imprint).")
    for case_id, run_id, model in chosen:
        prompt = con.execute("SELECT prompt, subject, target_new, target_true, target_new_id, target_true_id "
                             "FROM prompts WHERE run_id = ? AND case_id = ?", [run_id, case_id]).fetchone()
        tokens = con.execute("SELECT position, token, segment FROM tokens WHERE run_id = ? AND case_id = ? "
                             "ORDER BY position", [run_id, case_id]).fetchall()
        rows = _dicts(con.execute("SELECT * FROM projections WHERE run_id = ? AND case_id = ?", [run_id, case_id]))
        vocab = con.execute("SELECT max(vocab_size) FROM models WHERE model = ?", [model]).fetchone()[0]
        case = Case(case_id, model, *prompt[:4], tokens=tokens)
        for site in ("ff2_vjp", "ff1_input"):
            grid = case_grid(rows, tokens, site, prompt[4], prompt[5], vocab)
            if grid is not None:
                caption = grid_caption(grid, case_id, model, case.target_new, case.target_true)
                alt = f"Lens table of case {case_id}: {grid.side} probable token by prompt token and layer"
                section.figures.append(F.Figure(file=None, caption=caption, alt=alt, grid=grid,
                                                case=case if site == "ff2_vjp" else None))
    return section


def _paper_section(con, number: int, stage: Path) -> Section:
    """Paper vs ours (``publish/paper.py``): each claim, our number per model, the verdict and its reason; also
    written as ``paper_vs_ours.md`` beside the page (the README's section is that file)."""
    from blens.extract.registry import describe

    from .paper import CLAIMS, markdown, paper_vs_ours

    readings = paper_vs_ours(con)
    (stage / "paper_vs_ours.md").write_text(markdown(readings, {r.model: describe(r.model) for r in readings}),
                                            encoding="utf-8")
    rows = [["paper (EMNLP 2024)", "the paper's claim", "model (weights)", "settings", "ours", "verdict",
             "measured reason"]]
    seen = set()
    for r in readings:
        first = r.claim.key not in seen
        seen.add(r.claim.key)
        rows.append([r.claim.where if first else "", r.claim.paper if first else "", f"{r.model} ({describe(r.model)})",
                     r.settings, r.ours, r.verdict, r.reason])
    rules = "; ".join(f"{c.where}: {c.rule}" for c in CLAIMS)
    intro = ("Each claim of the paper that this warehouse can test, our number for every model (at the settings id "
             "holding most of its prompts), and whether it holds. The paper measured GPT-2 and GPT-2 XL; these are other, "
             "smaller models, quantised and dequantised to fp32, so a claim that fails says what these models do, "
             "measured the paper's way. Verdict rules: " + rules + ".")
    return Section("paper", f"{number}. Paper vs ours", intro, table=rows)


def build_report(warehouse: str | os.PathLike, out: str | os.PathLike, *, cases: list[int] | None = None) -> ReportResult:
    """Render every figure and index.html into ``out`` (replacing an earlier report there)."""
    out = Path(out)
    problem = output_dir_problem(out, "index.html", "blens report", warehouse)
    if problem:
        raise ReportError(problem)
    try:
        con, snapshot = connect_pinned(warehouse)  # every figure from one snapshot, named in the page
    except FileNotFoundError as exc:
        raise ReportError(str(exc)) from None
    n_prompts = con.sql("SELECT count(*) FROM prompts").fetchall()[0][0]
    if not n_prompts:
        con.close()
        raise ReportError(f"warehouse {str(warehouse)!r} has no committed prompts; run `blens extract` first")
    stale = _stale_views(con)
    if stale:
        con.close()
        raise ReportError(f"warehouse {str(warehouse)!r} has views older than this blens ({stale}); rerun its "
                          "`blens extract` command once (it computes nothing again and updates the views)")
    chosen = resolve_cases(con, cases)

    stage = stage_dir(out)
    figs = stage / "figures"
    figs.mkdir(parents=True)
    try:
        sections = [
            Section("rank", "1. Gradient rank equals prompt length", "",
                    [F.fig_rank_equals_length(con, figs / "rank_equals_length.png")]),
            _case_section(con, chosen),
            Section("norms", "3. Where the gradient is: VJP norm by token role and segment", "",
                    [F.fig_norm_by_role(con, figs / "vjp_norm_by_role.png"),
                     F.fig_norm_by_segment(con, figs / "vjp_norm_by_segment.png")]),
            Section("target-rank", "4. target_new in the FF2 VJP projections", "",
                    [F.fig_target_rank(con, figs / "target_rank_by_layer.png")]),
        ]
        if con.sql("SELECT count(*) FROM edit_results").fetchall()[0][0]:
            edits = Section("edits", "5. Knowledge editing", "", [edit_table1(con)])
            edits.figures.append(EF.fig_edit_metrics(con, figs / "edit_metrics.png"))
            cos = EF.fig_edit_cosine(con, figs / "edit_update_grad_cosine.png")
            if cos is not None:
                edits.figures.append(cos)
            sections.append(edits)

        sections.append(_paper_section(con, len(sections) + 1, stage))
        runs = con.sql("SELECT r.run_id, r.model, r.model_revision, r.dataset, "
                       "(SELECT count(*) FROM prompts p WHERE p.run_id = r.run_id) FROM runs r "
                       "ORDER BY r.created_at").fetchall()
        from blens.extract.registry import describe

        # named as the dataset card names them: the extracting machine's folders are not part of a report
        runs = [(run_id, public_name(model), describe(model), rev, dataset_name(dataset), n)
                for run_id, model, rev, dataset, n in runs]
        models = sorted({r[0] for r in con.sql("SELECT DISTINCT model FROM prompts").fetchall()})
        title = f"Backward Lens report — {', '.join(models)}"
        generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + f" from warehouse snapshot {snapshot}"
        (stage / "index.html").write_text(render_html(title, runs, sections, generated), encoding="utf-8")
        replace_directory(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        con.close()
    return ReportResult(out=out, index=out / "index.html", sections=sections, cases=[c[0] for c in chosen],
                        snapshot=snapshot)
