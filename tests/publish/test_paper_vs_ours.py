"""The report's "paper vs ours" section (issue 21): every claim for every model in the warehouse, each verdict one of
four words, numbers read from the views at each model's main settings, and the same table as Markdown."""

from __future__ import annotations

import pytest

from builders import make_warehouse

VERDICTS = {"holds", "holds partly", "fails", "not measured"}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper") / "wh"
    make_warehouse(root, n=4, model_name="tiny-gpt2")
    make_warehouse(root, n=4, model_name="tiny-gpt2-b", run_id="run-b")
    return root


def test_every_claim_for_every_model(two_models):
    from blens.publish.paper import CLAIMS, paper_vs_ours
    from blens.store.connect import connect

    con = connect(two_models)
    try:
        readings = paper_vs_ours(con)
        main = dict(con.execute("SELECT model, settings FROM main_settings").fetchall())
    finally:
        con.close()
    assert {(r.claim.key, r.model) for r in readings} == {(c.key, m) for c in CLAIMS for m in ("tiny-gpt2", "tiny-gpt2-b")}
    assert {r.verdict for r in readings} <= VERDICTS
    for r in readings:
        assert r.ours, r
        if r.claim.key != "table1":
            assert r.settings == main[r.model]
    fig3 = next(r for r in readings if r.claim.key == "fig3" and r.model == "tiny-gpt2")
    assert fig3.verdict == "holds"  # a random tiny GPT-2 has rank = n below the last layer and 1 at it
    appg = next(r for r in readings if r.claim.key == "appg" and r.model == "tiny-gpt2")
    assert "adjacent" in appg.ours
    table1 = next(r for r in readings if r.claim.key == "table1")
    assert table1.verdict == "not measured"  # no edits in this warehouse: never a made-up number


def test_report_has_the_section_and_its_markdown(two_models, tmp_path):
    from blens.publish.report import build_report

    res = build_report(two_models, tmp_path / "report")
    page = res.index.read_text()
    assert 'id="paper"' in page and "Paper vs ours" in page
    assert page.count("verdict-") >= 2 * 7
    md = (res.out / "paper_vs_ours.md").read_text()
    assert md.startswith("| paper (EMNLP 2024) |") and "Figure 5" in md and "Appendix G" in md and "Table 1" in md
    assert (res.out / "figures" / "vjp_norm_by_role.png").stat().st_size > 0


def test_shares_never_round_up_to_a_whole():
    from blens.publish.paper import _layers, _pct

    assert _pct(0.995) == "99.5 %" and _pct(1.0) == "100 %" and _pct(0.5) == "50 %" and _pct(None) == "n/a"
    assert _layers([0, 1, 2, 12, 13, 20]) == "0-2, 12-13, 20" and _layers([]) == "none"
