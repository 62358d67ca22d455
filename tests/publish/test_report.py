"""Tests for `blens report`: the figures, captions and case tables, token display, escaping, and the page as
a browser shows it (headless Chromium over the DevTools protocol, stdlib only)."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import markupsafe
import pytest

from builders import NBSP, TRICKY, add_edits, make_warehouse

CHROMIUM = next((p for p in (os.environ.get("BLENS_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser"), shutil.which("google-chrome"))
                 if p and Path(p).exists()), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not installed (run scripts/install_test_services.sh)")


@pytest.fixture(scope="module")
def warehouses(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("wh")
    plain = make_warehouse(base / "plain")
    with_edits = base / "edits"
    shutil.copytree(plain, with_edits)
    from blens.store.connect import connect

    con = connect(with_edits)
    add_edits(with_edits, [r[0] for r in con.sql("SELECT case_id FROM prompts").fetchall()])
    con.close()
    return {"plain": plain, "edits": with_edits}


@pytest.fixture(scope="module")
def report(warehouses, tmp_path_factory):
    from blens.publish.report import build_report

    return build_report(warehouses["edits"], tmp_path_factory.mktemp("rep") / "report",
                        cases=[TRICKY["case_id"]])


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def sections(page: str) -> list[str]:
    return re.findall(r'<section class="report-figure".*?</section>', page, flags=re.S)


def test_page_has_every_figure_with_caption(report):
    page = report.index.read_text()
    secs = sections(page)
    assert len(secs) == 6  # rank, cases, norms, target rank, edits, paper vs ours
    for sec in secs:
        if 'id="paper"' in sec:  # a table of claims (tests/publish/test_paper_vs_ours.py), no figure
            assert sec.count("<tr>") > 7
            continue
        imgs = re.findall(r'<img src="([^"]+)"', sec)
        grids = re.findall(r'<div class="blens-grid"', sec)
        tables = re.findall(r'<figure>\s*<table class="runs numbers"', sec)  # the editing Table 1
        assert imgs or grids or tables, sec[:200]
        assert len(re.findall(r"<figcaption>[^<]{60,}</figcaption>", sec)) == len(imgs) + len(grids) + len(tables)
        for src in imgs:
            assert not src.startswith(("/", "http", "file:")), src  # relative: opens from disk
            w, h = png_size(report.out / src)
            assert w > 300 and h > 150 and (report.out / src).stat().st_size > 8000, src
    assert len(re.findall(r'<div class="blens-grid"', sections(page)[1])) == 2  # the case's shift and imprint
    assert len(report.figure_files) == 1 + 2 + 1 + 2  # rank; norms by role and by segment; target rank; edits
    assert all(p.exists() for p in report.figure_files)
    assert "efficacy" in page and "update_grad_cosine" in page
    # Table 1: the paper's GPT-2 XL rows beside ours, locality shown as accuracy and as preservation
    table1 = re.search(r'<figure>\s*<table class="runs numbers".*?</figure>', secs[4], flags=re.S).group(0)
    assert "Katz, Belinkov, Geva, Wolf, EMNLP 2024, Table 1" in table1 and "71.9" in table1 and "99.4" in table1
    assert "neighbourhood unchanged (locality_unchanged)" in table1 and "Ours: tiny-gpt2" in table1
    assert re.search(r"<td>rome</td><td>2</td><td></td><td>\d+</td>", table1)


def test_without_edits_four_sections_and_default_cases(warehouses, tmp_path):
    from blens.store.connect import connect
    from blens.publish.report import build_report

    res = build_report(warehouses["plain"], tmp_path / "r")
    page = res.index.read_text()
    assert len(sections(page)) == 5  # no edits section; paper vs ours is there
    con = connect(warehouses["plain"])
    first_two = [r[0] for r in con.sql(
        "SELECT DISTINCT case_id FROM prompts ORDER BY 1 LIMIT 2").fetchall()]
    assert res.cases == first_two
    for c in first_two:
        assert f"Case {c} " in page
        assert f"Case {c} · tiny-gpt2: the logit lens of the FF2 VJPs" in page
        assert f"Case {c} · tiny-gpt2: the logit lens of the FF1 inputs" in page
    assert page.count('data-site="ff2_vjp"') == page.count('data-site="ff1_input"') == 2


def test_case_table_shows_prompt_tokens_escaped(report, warehouses):
    from blens.store.connect import connect
    from blens.publish.tokens import _plain

    page = report.index.read_text()
    con = connect(warehouses["edits"])
    tokens = [r[0] for r in con.execute(
        "SELECT token FROM tokens WHERE case_id = ? ORDER BY position", [TRICKY["case_id"]]).fetchall()]
    assert len(tokens) > 5
    strip = re.search(r'<ol class="tokens".*?</ol>', page, flags=re.S).group(0)
    shown = [html.unescape(t) for t in re.findall(r"<li [^>]*>(.*?)</li>", strip)]
    assert shown == [_plain(t) for t in tokens]
    assert "␣Danielle" in shown or "␣Dan" in "".join(shown)
    # every piece of data is escaped: the tricky prompt's markup never reaches the page as markup
    assert "<b>native</b>" not in page
    assert str(markupsafe.escape(TRICKY["prompt"])) in page  # the template engine's escaping (&#34; for ")


def test_display_token():
    from blens.publish.tokens import display_token

    assert display_token(" English") == "␣English"
    assert display_token("\n") == "↵"
    assert display_token("a\tb\x07") == "a⇥b·"
    assert display_token("") == "∅"
    assert display_token(" internationalisation") == "␣interna.."
    assert len(display_token("x" * 50)) == 10
    assert display_token("漢字") == "漢字"  # shown in HTML only: the browser has the glyphs
    # nothing that draws nothing: every space is visible, and a no-break space is not an ordinary one
    assert display_token("\u00a0") == "⍽" and display_token("\u00a0Paris") == "⍽Paris"
    assert display_token("   ") == "␣␣␣" and display_token("a b ") == "a␣b␣"
    assert display_token("\u3000\u202f") == "⍽⍽"
    assert display_token("\u200b") == display_token("\u00ad") == display_token("\ufeff") == "·"
    assert display_token("\u2028") == "↵"


def test_views_older_than_the_report_are_one_clear_error(warehouses, tmp_path):
    """A warehouse last written by an earlier blens keeps its views until a writer opens it: say so, and how."""
    from blens.publish.report import ReportError, build_report
    from blens.store.writer import writer_connection

    old = tmp_path / "old"
    shutil.copytree(warehouses["plain"], old)
    writer_connection(old).execute("CREATE OR REPLACE VIEW target_rank_by_layer AS "
                                   "SELECT model, site, layer FROM projections")
    with pytest.raises(ReportError, match=r"target_rank_by_layer has no q25_target_new_rank, target_true_in_bottom"
                                          r".*rerun its `blens extract` command once"):
        build_report(old, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_unknown_case_is_one_clear_error(warehouses, tmp_path):
    from blens.publish.report import ReportError, build_report

    with pytest.raises(ReportError, match=r"--case 424242: not in the warehouse"):
        build_report(warehouses["plain"], tmp_path / "r", cases=[424242])
    assert not (tmp_path / "r").exists()


def synthetic_rows(n_layers: int = 30, new_id: int = 7, true_id: int = 8) -> list[dict]:
    """Lens rows of a 3-token prompt where target_new (id 7) is the least probable token of the shift from
    layer 21 on, among the bottom-k at layer 20, and target_true (id 8) the least probable at layer 5."""
    rows = []
    for layer in range(n_layers):
        for pos in range(3):
            bottom = [100 + i for i in range(10)]
            if layer >= 21:
                bottom[0] = new_id
            elif layer == 20:
                bottom[3] = new_id
            elif layer == 5:
                bottom[0] = true_id
            zero = layer == n_layers - 1 and pos < 2
            rows.append({"site": "ff2_vjp", "layer": layer, "position": pos, "zero_vector": zero,
                         "norm": 0.0 if zero else 10.0 ** (layer / 10), "bottom_ids": bottom, "top_ids": list(range(10)),
                         "bottom_tokens": ["\u00a0" if layer == 3 else "<b>x</b>"] + ["y"] * 9,
                         "top_tokens": ["z"] * 10, "target_new_rank": 3, "target_true_rank": 4})
    return rows


def test_case_grid_folds_layers_marks_targets_and_shows_spaces():
    from blens.publish.report import Case, render_grid
    from blens.publish.tokens import case_grid, grid_caption

    tokens = [(0, "\u00a0", "subject"), (1, " Paris", "other"), (2, " is", "last")]
    grid = case_grid(synthetic_rows(), tokens, "ff2_vjp", 7, 8, vocab_size=50)
    assert [b.layers for b in grid.blocks] == [list(range(15)), list(range(15, 30))]  # two stacked halves
    assert [r.label for r in grid.blocks[0].rows] == ["⍽", "␣Paris", "␣is"]
    assert [r.segment for r in grid.blocks[1].rows] == ["subject", "other", "last"]
    assert grid.marks == {"mark-new": 3 * 8 + 1, "mark-new-k": 3, "mark-true": 3}  # layer 29: one non-zero cell
    cells = {(layer, r.position): c for b in grid.blocks for r in b.rows for layer, c in zip(b.layers, r.cells)}
    assert cells[(21, 2)].classes == "mark-new" and cells[(20, 0)].classes == "mark-new-k"
    assert cells[(5, 1)].classes == "mark-true" and cells[(4, 1)].classes == ""
    assert cells[(29, 0)].classes == "zero" and cells[(29, 0)].text == "" and "zero vector" in cells[(29, 0)].title
    assert cells[(3, 0)].text == "⍽"  # a no-break-space token is a visible cell, not an empty one
    assert "rank of target_new 3 of 50" in cells[(10, 1)].title
    assert grid.scale == "log scale" and grid.ticks[0][1] == "1" and grid.ticks[-1][1] == "7.9e+02"
    assert cells[(0, 0)].style != cells[(28, 0)].style  # coloured by norm
    caption = grid_caption(grid, 1, "m", "Rome", "Paris")
    assert "target_new “Rome” (25 cells)" in caption and "k least probable tokens (3)" in caption
    assert "target_true “Paris” (3)" in caption
    page = render_grid(grid, Case(1, "m<i>", "p", "s", "Rome", "Paris", tokens), 1.5, caption)
    assert page.count('class="mark-new"') == grid.marks["mark-new"]
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page and "m&lt;i&gt;" in page
    assert case_grid(synthetic_rows(), tokens, "ff1_input", 7, 8) is None  # no rows of that site
    small = case_grid(synthetic_rows(n_layers=4), tokens, "ff2_vjp", 7, 8)
    assert [b.layers for b in small.blocks] == [[0, 1, 2, 3]] and small.scale == "linear scale"


def test_case_table_cells_are_the_warehouse_tokens(report, warehouses):
    """Every row of the lens table is a prompt token, every cell the least probable token stored for it."""
    from blens.publish.tokens import display_token
    from blens.store.connect import connect

    con = connect(warehouses["edits"])
    page = report.index.read_text()
    grid = re.search(r'<div class="blens-grid" data-site="ff2_vjp"[^>]*>.*?</table>', page, flags=re.S).group(0)
    labels = [html.unescape(t) for t in re.findall(r'<th scope="row"[^>]*>(.*?)<small>', grid)]
    tokens = [r[0] for r in con.execute("SELECT token FROM tokens WHERE case_id = ? ORDER BY position",
                                        [TRICKY["case_id"]]).fetchall()]
    assert labels == [display_token(t, max_chars=14) for t in tokens]
    first_row = re.search(r"<tbody>\s*<tr.*?</tr>", grid, flags=re.S).group(0)
    cells = [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", first_row)]
    stored = [r[0] for r in con.execute(
        "SELECT CASE WHEN NOT zero_vector THEN bottom_tokens[1] END FROM projections "
        "WHERE case_id = ? AND site = 'ff2_vjp' AND position = 0 ORDER BY layer", [TRICKY["case_id"]]).fetchall()]
    assert None in stored  # the last layer's VJP is zero at every position but the last: a blank cell
    assert cells == [display_token(t, max_chars=8) for t in stored]


def test_target_rank_view_has_quartiles_vocab_and_controls(warehouses):
    from blens.store.connect import connect

    con = connect(warehouses["plain"])
    rows = con.sql("SELECT q25_target_new_rank, median_target_new_rank, q75_target_new_rank, q25_target_true_rank, "
                   "median_target_true_rank, q75_target_true_rank, target_true_in_bottom_k, vocab_size "
                   "FROM target_rank_by_layer").fetchall()
    vocab = con.sql("SELECT vocab_size FROM models").fetchone()[0]
    assert rows and vocab == 50257
    for q25n, medn, q75n, q25t, medt, q75t, share, v in rows:
        assert q25n <= medn <= q75n and q25t <= medt <= q75t and 0 <= share <= 1 and v == vocab
        assert q75n < v and q75t < v
    # the quartiles are the quartiles of the stored ranks
    layer0 = con.sql("SELECT quantile_cont(target_new_rank, [0.25, 0.75]) FROM projections "
                     "WHERE site = 'ff2_vjp' AND layer = 0 AND segment = 'last' AND NOT zero_vector").fetchone()[0]
    assert layer0 == list(con.sql("SELECT q25_target_new_rank, q75_target_new_rank FROM target_rank_by_layer "
                                  "WHERE site = 'ff2_vjp' AND layer = 0 AND position_kind = 'last'").fetchone())


# ------------------------------------------------------------------------------ headless Chromium


def _onto_3_and_4(read_end: int, write_end: int) -> None:
    """In the child: the browser reads commands from fd 3 and writes replies to fd 4."""
    a, b = os.dup(read_end), os.dup(write_end)  # out of the way if the pipes already sit on 3 or 4
    os.dup2(a, 3)
    os.dup2(b, 4)


class Browser:
    """Chromium driven over --remote-debugging-pipe (fd 3: to the browser, fd 4: from it), NUL-framed JSON."""

    def __init__(self, chromium: str):
        self.profile = tempfile.mkdtemp(prefix="blens-chromium-")
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={self.profile}",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, preexec_fn=lambda: _onto_3_and_4(to_r, from_w))
        os.close(to_r)
        os.close(from_w)
        self.w, self.r = to_w, from_r
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self.buf:
            if not select.select([self.r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 20):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        while True:
            ev = self._read_message(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def open(self, url: str, width: int = 1400, height: int = 3000) -> str:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        self.send("Page.navigate", {"url": url}, session=session)
        self.wait_event("Page.loadEventFired")
        return session

    def evaluate(self, session: str, expression: str):
        return self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                         session=session)["result"].get("value")

    def console_errors(self) -> list[str]:
        errs = []
        for ev in self.events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errs.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                errs.append(p.get("exceptionDetails", {}).get("text", "exception"))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errs.append(p["entry"].get("text", ""))
        return errs

    def screenshot(self, session: str, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.w)
        os.close(self.r)
        shutil.rmtree(self.profile, ignore_errors=True)


CHECK = ("JSON.stringify({ok: document.body.dataset.imagesOk, total: document.images.length,"
         " widths: Array.from(document.images).map(i => i.naturalWidth),"
         " figures: document.querySelectorAll('section.report-figure').length,"
         " grids: document.querySelectorAll('.blens-grid').length,"
         " captions: document.querySelectorAll('figcaption').length})")


@needs_chromium
def test_page_renders_in_chromium(report, tmp_path):
    browser = Browser(CHROMIUM)
    try:
        session = browser.open(report.index.resolve().as_uri())
        state = json.loads(browser.evaluate(session, CHECK))
        shot = Path(os.environ.get("BLENS_SCREENSHOT", tmp_path / "report.png"))
        browser.screenshot(session, shot)
        errors = browser.console_errors()
    finally:
        browser.close()
    n_tables = sum(1 for sec in report.sections for f in sec.figures if f.table)  # the editing Table 1 (HTML)
    assert state["total"] == len(report.figure_files) == state["captions"] - state["grids"] - n_tables
    assert state["grids"] == 2
    assert all(w > 0 for w in state["widths"]), state
    assert state["ok"] == "true" and state["figures"] == 6  # rank, cases, norms, target rank, edits, paper vs ours
    assert errors == []
    assert png_size(shot)[0] == 1400


@needs_chromium
def test_chromium_check_catches_broken_pages(report):
    """The check above is not vacuous: a missing figure and a console error are both seen."""
    bad = report.out / "broken.html"
    page = report.index.read_text().replace("figures/rank_equals_length.png", "figures/missing.png")
    bad.write_text(page.replace("<script>", '<script>console.error("deliberate");', 1))
    browser = Browser(CHROMIUM)
    try:
        session = browser.open(bad.resolve().as_uri())
        state = json.loads(browser.evaluate(session, CHECK))
        banner = browser.evaluate(session, "document.getElementById('img-warning').textContent")
        errors = browser.console_errors()
    finally:
        browser.close()
        bad.unlink()
    assert state["ok"] == "false" and 0 in state["widths"]
    assert "figures/missing.png" in banner
    assert any("deliberate" in e for e in errors)
    assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in errors), errors


@pytest.fixture(scope="module")
def deep_warehouse(tmp_path_factory) -> Path:
    """Two models in one warehouse, one of them 30 layers deep (SmolLM2's depth), and the no-break-space prompt."""
    root = tmp_path_factory.mktemp("deep") / "wh"
    make_warehouse(root, n=2, n_layer=30, model_name="tiny-gpt2-30", run_id="run-deep", extra=(NBSP,))
    make_warehouse(root, n=2, n_layer=4, model_name="tiny-gpt2-4", run_id="run-shallow", extra=(NBSP,))
    return root


@pytest.fixture(scope="module")
def deep_built(deep_warehouse, tmp_path_factory):
    """The deep warehouse's report, and every matplotlib figure it saved, by file name."""
    from blens.publish.report import build_report

    with pytest.MonkeyPatch.context() as mp:
        figs = _capture_figures(mp)
        rep = build_report(deep_warehouse, tmp_path_factory.mktemp("rep") / "deep", cases=[NBSP["case_id"]])
    return rep, figs


@pytest.fixture(scope="module")
def deep_report(deep_built):
    return deep_built[0]


VISIBLE = ("(() => { const vw = window.innerWidth; const all = s => Array.from(document.querySelectorAll(s));"
           " const out = el => { const r = el.getBoundingClientRect();"
           "                     return r.width === 0 || r.left < 0 || r.right > vw; };"
           " const grids = all('.blens-grid');"
           " return JSON.stringify({vw, page: document.documentElement.scrollWidth, grids: grids.length,"
           "  layers: grids.map(g => new Set(Array.from(g.querySelectorAll('thead th[scope=col]:not(.corner)'))"
           "                                .map(h => h.textContent)).size),"
           "  off_screen: all('.blens-grid th, .blens-grid td, .cbar-bar, img').filter(out).length,"
           "  scrolled: all('.blens-grid .block').filter(b => b.scrollWidth > b.clientWidth).length,"
           "  colour_bars: all('.cbar-bar').filter(c => !out(c)).length,"
           "  blank: all('.blens-grid td:not(.zero), .blens-grid tbody th').filter(c => c.innerText.trim() === '').length,"
           "  nbsp_rows: all('.blens-grid tbody th').filter(t => t.innerText.startsWith('⍽')).length,"
           "  models: all('figure h3').map(h => h.textContent)}); })()")


def assert_lens_tables_fit(state: dict, width: int) -> None:
    """VISIBLE's answer at ``width`` px: every layer of every table, every colour bar and figure on screen, no
    sideways scroll anywhere, no blank cell or token label, both models in the report."""
    assert state["page"] <= state["vw"] == width, state
    assert state["grids"] == 4 and state["layers"] == [30, 30, 4, 4], state  # 2 models x (shift, imprint)
    assert state["off_screen"] == 0 and state["scrolled"] == 0, state
    assert state["colour_bars"] == 4 and state["blank"] == 0, state
    assert state["nbsp_rows"] == 2 + 2 + 1 + 1, state  # a visible row label in every block of every table
    assert state["models"] == [f"Case {NBSP['case_id']} · tiny-gpt2-30", f"Case {NBSP['case_id']} · tiny-gpt2-4"]


@needs_chromium
def test_lens_tables_fit_the_page_at_1920_px(deep_report):
    """A wide screen: see :func:`assert_lens_tables_fit` (1280 px: test_report_reads_well_at_1280_px)."""
    browser = Browser(CHROMIUM)
    try:
        session = browser.open(deep_report.index.resolve().as_uri(), width=1920, height=2000)
        state = json.loads(browser.evaluate(session, VISIBLE))
        errors = browser.console_errors()
    finally:
        browser.close()
    assert errors == []
    assert_lens_tables_fit(state, 1920)


def test_figure6_has_a_row_per_model(deep_report):
    fig6 = next(f for s in deep_report.sections for f in s.figures if f.file and "target_rank" in f.file)
    w, h = png_size(deep_report.out / fig6.file)
    assert h > 0.5 * w  # two rows of three panels (one row is ~0.3 w)
    for model in ("tiny-gpt2-30", "tiny-gpt2-4"):
        assert f"{model} (V = 50,257, 4 prompts)" in fig6.caption
    assert "interquartile" in fig6.caption and "V−1" in fig6.caption and "target_true" in fig6.caption


# ------------------------------------------------------------------------------ legible at 1280 px (issue 25)


def _capture_figures(monkeypatch) -> dict[str, object]:
    """Every matplotlib figure the report saves, by file name (``figures._save`` wrapped: still saved)."""
    from blens.publish import figures

    seen: dict[str, object] = {}
    real = figures._save

    def save(fig, path):
        seen[Path(path).name] = fig
        real(fig, path)

    monkeypatch.setattr(figures, "_save", save)
    return seen


def _smallest_text_px(fig) -> float:
    """The smallest text of a saved figure in the PNG's own pixels (font size in pt at savefig's dpi)."""
    import matplotlib
    from matplotlib.text import Text

    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return min(sizes) * matplotlib.rcParams["savefig.dpi"] / 72


PAGE_AT = ("(() => JSON.stringify({vw: window.innerWidth, page: document.documentElement.scrollWidth,"
           " images: Array.from(document.images).map(i => ({src: i.getAttribute('src'), natural: i.naturalWidth,"
           "                                               shown: i.getBoundingClientRect().width}))}))()")


@needs_chromium
def test_report_reads_well_at_1280_px(deep_built, tmp_path):
    """A 1280-px wide browser: the page never scrolls sideways, every figure is shown at a size where its
    smallest text is at least 10.5 CSS px (about 8 pt, beside the page's 16-px text; Figure 6's 7.5-pt legends,
    scaled to the page, were 9.9 px with glyphs ~7 px tall), and the lens tables fit (:func:`assert_lens_tables_fit`:
    the same report as ``deep_report``, so one browser checks both). The screenshot is kept (BLENS_SCREENSHOT_1280)."""
    rep, figs = deep_built
    browser = Browser(CHROMIUM)
    try:
        session = browser.open(rep.index.resolve().as_uri(), width=1280, height=2400)
        state = json.loads(browser.evaluate(session, PAGE_AT))
        tables = json.loads(browser.evaluate(session, VISIBLE))
        shot = Path(os.environ.get("BLENS_SCREENSHOT_1280", tmp_path / "report-1280.png"))
        browser.screenshot(session, shot)
        errors = browser.console_errors()
    finally:
        browser.close()
    assert errors == [] and png_size(shot)[0] == 1280
    assert state["vw"] == 1280 and state["page"] <= 1280, state
    assert_lens_tables_fit(tables, 1280)
    assert len(state["images"]) == len(rep.figure_files) >= 4
    for img in state["images"]:
        name = Path(img["src"]).name
        assert img["natural"] == png_size(rep.out / img["src"])[0], img
        smallest = _smallest_text_px(figs[name]) * img["shown"] / img["natural"]
        assert smallest >= 10.5, (name, round(smallest, 1), img)


def test_figure6_legends_are_legible_and_cover_no_panel(warehouses, tmp_path, monkeypatch):
    """Issue 25: Figure 6's legends were 7.5 pt inside the panels, one over the interquartile band. Now every
    legend is at least 9 pt and lies outside every panel."""
    from blens.publish import figures

    figs = _capture_figures(monkeypatch)
    con = connect_views(warehouses["plain"])
    figures.fig_target_rank(con, tmp_path / "target_rank_by_layer.png")
    fig = _drawn(figs["target_rank_by_layer.png"])
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    assert len(legends) == 3  # target_new, target_true, the bottom-k shares
    for legend in legends:
        assert min(t.get_fontsize() for t in legend.get_texts()) >= 9
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (legend.get_texts()[0].get_text(), ax.get_title())


def _drawn(fig):
    """A saved (closed) figure drawn again on an Agg canvas, laid out as in its PNG, for its pixel positions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig


def connect_views(warehouse: Path):
    from blens.store.connect import connect

    return connect(warehouse)


def test_figure3_shows_the_dips_below_n(tmp_path, monkeypatch):
    """Issue 25: Figure 3 hid the dips at layers 12-22 (0.5 % of prompts below n is 1 px on a 0-100 % axis). With
    rate 0.995 at those layers of a 30-layer model, some panel draws the dip at least 15 px away from the
    full-rank level, and the caption names the layers."""
    import duckdb

    from blens.publish import figures

    con = duckdb.connect()
    rows = []
    for matrix in ("ff1", "ff2"):
        for layer in range(30):
            rate = 0.0 if layer == 29 else 0.995 if 12 <= layer <= 22 else 1.0
            rows.append(("smollm2-135m", matrix, layer, layer / 29, rate, 1000, "s1"))
    con.execute("CREATE TABLE rank_equals_length (model VARCHAR, matrix VARCHAR, layer INTEGER, layer_frac DOUBLE, "
                "rate DOUBLE, n BIGINT, settings VARCHAR)")
    con.executemany("INSERT INTO rank_equals_length VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    con.execute("CREATE TABLE main_settings AS SELECT 'smollm2-135m' AS model, 's1' AS settings")
    figs = _capture_figures(monkeypatch)
    fig3 = figures.fig_rank_equals_length(con, tmp_path / "rank_equals_length.png")
    assert "some prompts below n at layers 12–22 (at most 0.5% of prompts)" in fig3.caption
    fig = _drawn(figs["rank_equals_length.png"])
    dip, flat = 15 / 29, 5 / 29  # a dip layer and a full-rank one
    best = 0.0
    for ax in fig.axes:
        for line in ax.get_lines():
            xs, ys = (list(map(float, v)) for v in line.get_data())
            if dip in xs and flat in xs:
                (_, y_dip), (_, y_flat) = ax.transData.transform([(dip, ys[xs.index(dip)]), (flat, ys[xs.index(flat)])])
                best = max(best, abs(y_dip - y_flat))
    assert best >= 15, best


def test_runs_table_names_data_and_models_without_the_machines_folders(report, warehouses):
    """The report names a run's data file and a local model as the dataset card does (publish/markdown.py): by
    their last part. It used to print the extracting machine's full path to the data file."""
    from blens.store.connect import connect

    con = connect(warehouses["edits"])
    runs = con.sql("SELECT dataset, model FROM runs").fetchall()
    con.close()
    page = report.index.read_text()
    runs_table = re.search(r'<table class="runs"><tr><th>run</th>.*?</table>', page, flags=re.S).group(0)
    for dataset, model in runs:
        for value in (dataset, model):
            if "/" in value:
                assert value not in page, value
        assert f"<td>{Path(dataset).stem if '/' in dataset else dataset}</td>" in runs_table
