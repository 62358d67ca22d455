"""A static HTML report of the warehouse with the paper's figures.

``build_report(warehouse, out)`` writes ``out/index.html`` (from the Jinja2 template
``templates/report.html.j2``, autoescaped) and ``out/figures/*.png`` (``figures.py``). The page opens
from disk (no server; images are referenced relatively) and carries a tiny script that, once the page
has loaded, marks on ``<body>`` whether every figure decoded (``data-images-ok``) and shows a banner if
one did not; the tests read that back from headless Chromium. Every number comes from the DuckDB
views, read through one ``blens.store.connect``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from blens.store.connect import connect

from . import figures as F
from .output import output_dir_problem, replace_directory
from .tokens import _plain

DEFAULT_N_CASES = 2


class ReportError(RuntimeError):
    """The report cannot be built for a reason the user can act on; one line."""


@dataclass
class Section:
    key: str
    title: str
    intro: str
    figures: list[F.Figure] = field(default_factory=list)


@dataclass
class ReportResult:
    out: Path
    index: Path
    sections: list[Section]
    cases: list[int]

    @property
    def figure_files(self) -> list[Path]:
        return [self.out / f.file for s in self.sections for f in s.figures]


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


def render_html(title: str, runs: list[tuple], sections: list[Section], generated: str) -> str:
    """The page, from the Jinja2 template; every value is autoescaped."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("blens.publish", "templates"), autoescape=select_autoescape(["j2"]))
    env.filters["token"] = _plain
    return env.get_template("report.html.j2").render(title=title, runs=runs, sections=sections, generated=generated)


def _case_section(con, chosen: list[tuple[int, str, str]], figs: Path) -> Section:
    section = Section("cases", "2. Logit lens of single prompts",
                      "Per prompt: the gradient's spanning vectors at every token and layer, projected to the "
                      "vocabulary. Top: FF2 VJPs δᵢ with their least probable token; bottom: FF1 inputs xᵢ with "
                      "their most probable token. Wide tables scroll sideways.")
    for case_id, run_id, model in chosen:
        prompt = con.execute("SELECT prompt, subject, target_new, target_true FROM prompts "
                             "WHERE run_id = ? AND case_id = ?", [run_id, case_id]).fetchone()
        tokens = con.execute("SELECT position, token, segment FROM tokens WHERE run_id = ? AND case_id = ? "
                             "ORDER BY position", [run_id, case_id]).fetchall()
        case = Case(case_id, model, *prompt, tokens=tokens)
        base = f"case-{case_id}-{F._safe_name(run_id)}"
        for site in ("ff2_vjp", "ff1_input"):
            fig = F.fig_case_table(con, run_id, case_id, site, figs / f"{base}-{site}.png", tokens)
            if fig is not None:
                fig.case = case if site == "ff2_vjp" else None
                section.figures.append(fig)
    return section


def build_report(warehouse: str | os.PathLike, out: str | os.PathLike, *, cases: list[int] | None = None) -> ReportResult:
    """Render every figure and index.html into ``out`` (replacing an earlier report there)."""
    out = Path(out)
    problem = output_dir_problem(out, "index.html", "blens report", warehouse)
    if problem:
        raise ReportError(problem)
    try:
        con = connect(warehouse)
    except FileNotFoundError as exc:
        raise ReportError(str(exc)) from None
    n_prompts = con.sql("SELECT count(*) FROM prompts").fetchall()[0][0]
    if not n_prompts:
        con.close()
        raise ReportError(f"warehouse {str(warehouse)!r} has no committed prompts; run `blens extract` first")
    chosen = resolve_cases(con, cases)

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    figs = stage / "figures"
    figs.mkdir(parents=True)
    try:
        sections = [
            Section("rank", "1. Gradient rank equals prompt length", "",
                    [F.fig_rank_equals_length(con, figs / "rank_equals_length.png")]),
            _case_section(con, chosen, figs),
            Section("norms", "3. Where the gradient is: VJP norm by token segment", "",
                    [F.fig_norm_by_segment(con, figs / "vjp_norm_by_segment.png")]),
            Section("target-rank", "4. target_new in the FF2 VJP projections", "",
                    [F.fig_target_rank(con, figs / "target_rank_by_layer.png")]),
        ]
        if con.sql("SELECT count(*) FROM edit_results").fetchall()[0][0]:
            edits = Section("edits", "5. Knowledge editing", "", [F.fig_edit_metrics(con, figs / "edit_metrics.png")])
            cos = F.fig_edit_cosine(con, figs / "edit_update_grad_cosine.png")
            if cos is not None:
                edits.figures.append(cos)
            sections.append(edits)

        runs = con.sql("SELECT r.run_id, r.model, r.model_revision, r.dataset, "
                       "(SELECT count(*) FROM prompts p WHERE p.run_id = r.run_id) FROM runs r "
                       "ORDER BY r.created_at").fetchall()
        models = sorted({r[0] for r in con.sql("SELECT DISTINCT model FROM prompts").fetchall()})
        title = f"Backward Lens report — {', '.join(models)}"
        generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        (stage / "index.html").write_text(render_html(title, runs, sections, generated), encoding="utf-8")
        replace_directory(stage, out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        con.close()
    return ReportResult(out=out, index=out / "index.html", sections=sections, cases=[c[0] for c in chosen])
