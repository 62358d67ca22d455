"""Products under company and hostile names (issue 24): `publish` and `report` read every table at one
DuckLake snapshot, named in the card and the page, even when a commit lands while they read; a model named
like math, HTML, Markdown or a local path neither crashes the report nor reaches the card unescaped."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from builders import make_warehouse

# A model "name" that is a local path whose last part is math, HTML and a code span at once.
HOSTILE_MODEL = "/home/alice/secret-models/$\\alpha$<img src=x onerror=alert(1)>`rm -rf`*bold*|cell"


def _keys(path: Path, table: str) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_table(path / "data" / table).column("key").to_pylist())


def test_publish_reads_every_table_at_one_snapshot_while_a_commit_lands(tmp_path, monkeypatch):
    """A second run commits after `prompts` is written and before the other tables are: every published
    table still has exactly the first snapshot's keys, and the card names that snapshot."""
    import blens.publish.dataset as dataset
    from blens.store.connect import connect, current_snapshot

    root = make_warehouse(tmp_path / "wh", n=2)
    con = connect(root)
    first = current_snapshot(con)
    con.close()
    real = dataset.write_split_parquet
    calls = []

    def write_then_commit(con, table, schema, path):
        n = real(con, table, schema, path)
        if not calls:
            make_warehouse(root, n=3, model_name="tiny-gpt2-b", run_id="run-b")  # another writer commits
        calls.append(table)
        return n

    monkeypatch.setattr(dataset, "write_split_parquet", write_then_commit)
    res = dataset.publish(root, tmp_path / "pub")
    assert res.snapshot == first and calls[0] == "prompts"
    keys = _keys(res.out, "prompts")
    for table in ("tokens", "gradient_ranks", "projections", "vectors"):
        assert _keys(res.out, table) == keys, table
    assert f"one DuckLake snapshot (version {first})" in res.card.read_text()
    con = connect(root)
    assert current_snapshot(con) > first  # the commit did land
    con.close()


def test_report_reads_one_snapshot_while_a_commit_lands(tmp_path, monkeypatch):
    import blens.publish.figures as figures
    from blens.publish.report import build_report
    from blens.store.connect import connect, current_snapshot

    root = make_warehouse(tmp_path / "wh", n=2)
    con = connect(root)
    first = current_snapshot(con)
    con.close()
    real = figures.fig_rank_equals_length

    def commit_then_draw(con, path):
        make_warehouse(root, n=2, model_name="tiny-gpt2-b", run_id="run-b")
        return real(con, path)

    monkeypatch.setattr(figures, "fig_rank_equals_length", commit_then_draw)
    res = build_report(root, tmp_path / "report")
    html = res.index.read_text()
    assert res.snapshot == first and f"from warehouse snapshot {first}" in html
    assert "run-b" not in html and "tiny-gpt2-b" not in html  # the runs table is read after the commit


@pytest.fixture(scope="module")
def hostile_warehouse(tmp_path_factory) -> Path:
    return make_warehouse(tmp_path_factory.mktemp("hostile") / "wh", n=2, model_name=HOSTILE_MODEL)


def test_card_escapes_names_and_publishes_no_local_path(hostile_warehouse, tmp_path):
    from blens.publish.dataset import publish

    card = publish(hostile_warehouse, tmp_path / "pub").card.read_text()
    assert "/home/alice" not in card and "secret-models" not in card
    body = card.split("\n---\n", 1)[1]  # the Markdown after the YAML header
    for raw in ("<img", "$\\alpha", "`rm", "*bold", "|cell"):
        assert re.search(r"(?<!\\)" + re.escape(raw), body) is None, raw
    assert "\\$\\\\alpha\\$\\<img src=x onerror=alert(1)\\>\\`rm -rf\\`\\*bold\\*\\|cell" in body


def test_report_survives_a_math_model_name(hostile_warehouse, tmp_path):
    """matplotlib parsed `$...$` in a title as mathtext and `blens report` crashed; HTML stays escaped."""
    from blens.publish.report import build_report

    res = build_report(hostile_warehouse, tmp_path / "report")
    html = res.index.read_text()
    assert all(f.exists() for f in res.figure_files)
    assert "<img src=x" not in html


def test_public_name_keeps_hub_ids_and_drops_folders():
    from blens.publish.card import public_name

    assert public_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert public_name("smollm2-135m") == "smollm2-135m"
    assert public_name("/home/u/models/tiny/") == "tiny"
    assert public_name("~/m/x") == "x" and public_name("./m/x") == "x" and public_name("C:\\m\\x") == "x"


def test_stages_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    """kill -9 during publish/report left `.<out>.partial-*` folders that nothing removed; the next run
    removes those whose process is gone (and an older blens's, without a pid), never a running one's."""
    import subprocess
    import sys

    from blens.publish.output import stage_dir

    out = tmp_path / "dataset"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".dataset.partial-{dead.pid}-abcd1234", tmp_path / ".dataset.partial-0a1b2c3d",
             tmp_path / f".dataset.old-{dead.pid}-abcd1234"]
    live = tmp_path / f".dataset.partial-{os.getpid()}-live0000"
    for d in stale + [live]:
        (d / "data").mkdir(parents=True)
    stage = stage_dir(out)
    assert not any(d.exists() for d in stale) and live.exists() and stage.is_dir()


def test_sql_spill_folders_of_killed_runs_are_removed(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from blens.store.sandbox import private_temp_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"blens-sql-{dead.pid}-x1").mkdir()
    (tmp_path / f"blens-sql-{os.getpid()}-x2").mkdir()
    with private_temp_dir() as mine:
        assert os.path.isdir(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"blens-sql-{os.getpid()}-x2"]
