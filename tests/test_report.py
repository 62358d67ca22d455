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

from builders import TRICKY, add_edits, make_warehouse

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
    assert len(secs) == 5  # rank, cases, norms, target rank, edits
    for sec in secs:
        imgs = re.findall(r'<img src="([^"]+)"', sec)
        assert imgs, sec[:200]
        assert len(re.findall(r"<figcaption>[^<]{60,}</figcaption>", sec)) == len(imgs)
        for src in imgs:
            assert not src.startswith(("/", "http", "file:")), src  # relative: opens from disk
            w, h = png_size(report.out / src)
            assert w > 300 and h > 150 and (report.out / src).stat().st_size > 8000, src
    assert len(report.figure_files) == 1 + 2 + 1 + 1 + 2
    assert all(p.exists() for p in report.figure_files)
    assert "efficacy" in page and "update_grad_cosine" in page


def test_without_edits_four_sections_and_default_cases(warehouses, tmp_path):
    from blens.store.connect import connect
    from blens.publish.report import build_report

    res = build_report(warehouses["plain"], tmp_path / "r")
    page = res.index.read_text()
    assert len(sections(page)) == 4
    con = connect(warehouses["plain"])
    first_two = [r[0] for r in con.sql(
        "SELECT DISTINCT case_id FROM prompts ORDER BY 1 LIMIT 2").fetchall()]
    assert res.cases == first_two
    for c in first_two:
        assert f"Case {c} " in page
        assert (tmp_path / "r" / "figures" / f"case-{c}-run-tiny-ff2_vjp.png").exists()
        assert (tmp_path / "r" / "figures" / f"case-{c}-run-tiny-ff1_input.png").exists()


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
    assert display_token("漢字") == "□□"  # not in DejaVu Sans: a visible box, not a missing-glyph warning
    assert display_token("漢字", font_safe=False) == "漢字"


def test_unknown_case_is_one_clear_error(warehouses, tmp_path):
    from blens.publish.report import ReportError, build_report

    with pytest.raises(ReportError, match=r"--case 424242: not in the warehouse"):
        build_report(warehouses["plain"], tmp_path / "r", cases=[424242])
    assert not (tmp_path / "r").exists()


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
    assert state["total"] == len(report.figure_files) == state["captions"]
    assert all(w > 0 for w in state["widths"]), state
    assert state["ok"] == "true" and state["figures"] == 5
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
