"""`blens sql` cannot write, load or reach outside the warehouse (issues 13 and 24), whatever the query says.

Every hostile query runs through the real CLI and must end in one `error:` line, with every file under the
warehouse and under the outside folder it aims at unchanged (content hashes, file names: no -wal/-shm).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys

import pytest

from builders import ROOT, blens_in_process


def blens(*args, timeout=300) -> subprocess.CompletedProcess:
    return blens_in_process(*args, cwd=ROOT)


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model_dir):
    """A one-prompt warehouse, an outside folder with a secret CSV and a WAL-mode SQLite database, and a
    symlink planted inside ``data/`` that points at the outside folder."""
    tmp = tmp_path_factory.mktemp("sandbox")
    data = tmp / "cf.json"
    data.write_text(json.dumps([{"case_id": 0, "prompt": "Paris is the capital of", "subject": "Paris",
                                 "target_new": "Italy", "ground_truth": "France"}]))
    wh = tmp / "wh"
    r = blens("extract", "--model", str(tiny_model_dir), "--data", str(data), "--warehouse", str(wh), "--top-k", "5",
              "--threads", "1")
    assert r.returncode == 0, r.stderr
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("secret\nhunter2\n")
    db = sqlite3.connect(outside / "other.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE s(x)")
    db.execute("INSERT INTO s VALUES ('hunter2')")
    db.commit()
    db.close()
    os.symlink(outside, wh / "data" / "link")
    return wh, outside


def fingerprint(*roots) -> dict[str, str]:
    """sha256 of every file under ``roots`` (symlinks not followed), by path: a new, changed or removed file
    (a -wal/-shm beside a database, a merged Parquet copy, a deleted data file) changes it."""
    out = {}
    for root in roots:
        for d, _dirs, names in os.walk(root):
            for n in names:
                p = os.path.join(d, n)
                out[p] = "link" if os.path.islink(p) else hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


HOSTILE = [
    # statements that are not queries (round one)
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{data}/main/prompts/x.parquet'",
    "COPY prompts TO '{data}/main/prompts/evil.parquet'",
    "SELECT 1; COPY (SELECT 2) TO '{data}/y.parquet'",
    "INSTALL httpfs", "LOAD httpfs", "SET threads = 1", "ATTACH '{wh}/other.duckdb'", "DELETE FROM prompts",
    "PRAGMA enable_profiling",
    # readers that ignore enable_external_access or reach another database
    "SELECT * FROM sqlite_scan('{out}/other.db', 's')",
    "FROM sqlite_query('{out}/other.db', 'SELECT * FROM s')",
    "CALL sqlite_attach('{out}/other.db')",
    "SELECT * FROM query_table('prompts')",
    "SELECT * FROM query('SELECT * FROM sqlite_scan(''{out}/other.db'', ''s'')')",
    # file readers, directly, through the planted symlink, through glob, as a replacement scan
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_csv('{data}/link/secret.csv')",
    "SELECT * FROM read_text('{data}/link/secret.csv')",
    "SELECT * FROM glob('{data}/link/*')",
    "SELECT * FROM glob('{data}/**')",
    "SELECT * FROM '{data}/link/secret.csv'",
    "SELECT * FROM 'https://example.com/data.parquet'",
    "SELECT * FROM read_parquet('.tmp/../../../{out}/x.parquet')",
    "SELECT * FROM '.tmp/x.csv'",
    "SELECT p.prompt, t.* FROM prompts p, LATERAL (SELECT * FROM read_text(p.prompt)) t",
    "WITH x AS (SELECT * FROM read_blob('{out}/secret.csv')) SELECT * FROM x",
    # DuckLake maintenance, as CALL and as a table function
    "CALL ducklake_merge_adjacent_files('lake')",
    "SELECT * FROM ducklake_merge_adjacent_files('lake')",
    "SELECT * FROM ducklake_cleanup_old_files('lake', cleanup_all => true)",
    "SELECT * FROM ducklake_delete_orphaned_files('lake', cleanup_all => true)",
    "SELECT * FROM ducklake_expire_snapshots('lake', older_than => now())",
    "SELECT * FROM ducklake_rewrite_data_files('lake', delete_threshold => 0.0)",
    "SELECT * FROM ducklake_flush_inlined_data('lake')",
    "SELECT * FROM ducklake_add_data_files('lake', 'prompts', '{out}/x.parquet')",
    "SELECT * FROM ducklake_set_option('lake', 'parquet_compression', 'zstd')",
    "SELECT * FROM checkpoint()",
]


@pytest.fixture
def sandboxed(site, tmp_path):
    """The session `blens sql` runs in (same connect, lock-down and checks), in-process: ~2 s less per case."""
    from blens.store.connect import connect

    wh, _ = site
    con = connect(wh, sandbox=True, temp_dir=str(tmp_path / "spill"))
    yield con
    con.close()


@pytest.mark.parametrize("query", HOSTILE)
def test_nothing_a_query_says_writes_loads_or_reaches_out(site, sandboxed, query):
    import duckdb

    from blens.store.sandbox import QueryRefused, run_query

    wh, outside = site
    before = fingerprint(wh, outside)
    with pytest.raises((QueryRefused, duckdb.Error)) as exc:
        run_query(sandboxed, query.format(data=wh / "data", wh=wh, out=outside)).fetchall()
    assert "hunter2" not in str(exc.value)
    assert fingerprint(wh, outside) == before
    assert not (wh / "other.duckdb").exists()


# One case per class through the real CLI: exit 2 and exactly one `error:` line, nothing changed.
CLI_CASES = ["COPY prompts TO '{data}/main/prompts/evil.parquet'", "SELECT * FROM sqlite_scan('{out}/other.db', 's')",
             "SELECT * FROM glob('{data}/link/*')", "SELECT * FROM '{data}/link/secret.csv'",
             "CALL ducklake_merge_adjacent_files('lake')", "SELECT * FROM ducklake_cleanup_old_files('lake')",
             "PRAGMA enable_profiling"]


@pytest.mark.parametrize("query", CLI_CASES)
def test_cli_refuses_in_one_line_and_changes_nothing(site, query):
    wh, outside = site
    before = fingerprint(wh, outside)
    r = blens("sql", query.format(data=wh / "data", wh=wh, out=outside), "--warehouse", str(wh))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "hunter2" not in r.stdout + r.stderr
    assert fingerprint(wh, outside) == before


def test_the_file_wall_holds_without_the_allow_list(site, sandboxed):
    """Second wall: even a reader the allow-list let through could open only the catalog's files, and a
    symlink planted in data/ or the relative .tmp/ reaches nothing (allowed_paths, no directory)."""
    import duckdb

    wh, outside = site
    for path in (wh / "data" / "link" / "secret.csv", ".tmp/../" + str(outside / "secret.csv"), wh / "data"):
        with pytest.raises(duckdb.Error, match="Permission|disabled"):
            sandboxed.execute(f"SELECT * FROM read_text('{path}')").fetchall()
    with pytest.raises(duckdb.Error, match="Permission|disabled"):
        sandboxed.execute(f"SELECT * FROM glob('{wh / 'data' / 'link'}/*')").fetchall()
    # (sqlite_scan opens files through SQLite's own I/O and ignores this wall: only the allow-list stops it.)


def test_a_symlinked_data_file_is_not_opened(site, tmp_path):
    """A file the catalog lists but whose real location is outside the warehouse is refused (allowed_paths
    holds only files that resolve inside data/), and the query says which file."""
    wh, outside = site
    victim = sorted((wh / "data" / "main" / "models").glob("*.parquet"))[0]
    saved = tmp_path / "saved.parquet"
    os.replace(victim, saved)
    (outside / "models.parquet").write_bytes(saved.read_bytes())
    os.symlink(outside / "models.parquet", victim)
    try:
        r = blens("sql", "SELECT count(*) FROM models", "--warehouse", str(wh))
        assert r.returncode == 2 and r.stderr.startswith("error:") and victim.name in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        os.unlink(victim)
        os.replace(saved, victim)
        (outside / "models.parquet").unlink()


def test_a_view_is_checked_like_the_query(site):
    """A view's body goes through the same allow-list (a catalog written by someone else)."""
    from blens.store.connect import connect
    from blens.store.sandbox import QueryRefused, check_query

    wh, outside = site
    con = connect(wh)
    try:
        views = {"evil": f"SELECT * FROM sqlite_scan('{outside}/other.db', 's')", "fine": "SELECT 1 AS x"}
        with pytest.raises(QueryRefused, match="sqlite_scan.*inside the view evil"):
            check_query(con, "SELECT * FROM (SELECT * FROM fine), evil", views)
        assert check_query(con, "SELECT * FROM fine", views) == ["SELECT * FROM fine"]
    finally:
        con.close()


def test_time_and_memory_limits_are_one_line_and_can_be_raised(site):
    wh, _ = site
    r = blens("sql", "SELECT count(*) FROM range(1000000000000) a", "--timeout", "1", "--warehouse", str(wh))
    assert r.returncode == 2 and "--timeout" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    big = "SELECT count(DISTINCT x) FROM (SELECT range::VARCHAR || 'padding-padding' AS x FROM range(1000000))"
    r = blens("sql", big, "--memory-limit", "8MB", "--warehouse", str(wh))
    assert r.returncode == 2 and "--memory-limit" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = blens("sql", big, "--memory-limit", "1GB", "--warehouse", str(wh), "--format", "csv")
    assert r.returncode == 0 and r.stdout.splitlines()[1] == "1000000", r.stderr
    r = blens("sql", "SELECT 1", "--memory-limit", "lots", "--warehouse", str(wh))
    assert r.returncode == 2 and "--memory-limit" in r.stderr and "Traceback" not in r.stderr


ODD_AS_OF = ["²", "-1", "1e99", "99999999999999999999999", "'; DROP TABLE prompts; --", "yesterday-ish", "", " ",
             "3.5", "999999", "2026-13-45 99:00:00"]


@pytest.mark.parametrize("as_of", ODD_AS_OF)
def test_odd_as_of_values_are_one_warehouse_error(site, as_of):
    from blens.store.connect import connect
    from blens.store.lake import WarehouseError

    wh, _ = site
    before = fingerprint(wh)
    with pytest.raises(WarehouseError) as exc:
        connect(wh, snapshot=as_of, sandbox=True).close()
    assert "\n" not in str(exc.value)
    assert fingerprint(wh) == before


@pytest.mark.parametrize("as_of", ["²", "99999999999999999999999", "999999"])
def test_odd_as_of_values_are_one_line_in_the_cli(site, as_of):
    wh, _ = site
    r = blens("sql", "SELECT count(*) FROM prompts", "--as-of", as_of, "--warehouse", str(wh))
    assert r.returncode == 2 and r.stderr.startswith("error:"), r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_as_of_without_results_says_which_snapshots_hold_them(site):
    """Issue 25: `--as-of 3` on a fresh warehouse returned 0 rows, unexplained. A snapshot before the first results
    gets one note on stderr naming the first snapshot with results and the newest; a snapshot with results gets
    none; snapshot 0 (no tables yet) and a version past the newest say the same in their one error line."""
    from blens.store.connect import connect
    from blens.store.snapshots import results_snapshots

    wh, _ = site
    con = connect(wh)
    first, newest = results_snapshots(con)
    assert con.execute(f"SELECT count(*) FROM prompts AT (VERSION => {first - 1})").fetchone()[0] == 0
    con.close()
    assert 0 < first <= newest
    r = blens("sql", "SELECT count(*) AS n FROM prompts", "--as-of", str(first - 1), "--warehouse", str(wh),
              "--format", "csv")
    assert r.returncode == 0 and r.stdout.splitlines() == ["n", "0"], r.stderr
    (note,) = r.stderr.strip().splitlines()
    assert note.startswith(f"note: snapshot {first - 1} is before the first results (snapshot {first}; the newest is "
                           f"{newest})") and "ducklake_snapshots('lake')" in note, note
    r = blens("sql", "SELECT count(*) AS n FROM prompts", "--as-of", str(first), "--warehouse", str(wh),
              "--format", "csv")
    assert r.returncode == 0 and r.stdout.splitlines() == ["n", "1"] and r.stderr == "", r.stderr
    r = blens("sql", "SELECT count(*) AS n FROM prompts", "--as-of", "0", "--warehouse", str(wh))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "does not exist" in r.stderr and f"first results (snapshot {first}" in r.stderr
    r = blens("sql", "SELECT 1", "--as-of", str(newest + 1000), "--warehouse", str(wh))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"there is no snapshot {newest + 1000}: the newest is {newest}, the first with results {first}" in r.stderr


def test_queries_still_work_and_errors_keep_duckdb_hints(site):
    wh, _ = site
    r = blens("sql", "FROM prompts SELECT count(*) AS n", "--warehouse", str(wh), "--format", "csv")
    assert r.returncode == 0 and r.stdout.splitlines() == ["n", "1"]
    r = blens("sql", "SELECT count(*) AS n FROM prompts AT (VERSION => 1)", "--warehouse", str(wh), "--format", "csv")
    assert r.returncode == 0, r.stderr
    r = blens("sql", "SELECT count(*) AS n FROM ducklake_snapshots('lake')", "--warehouse", str(wh), "--as-of", "2",
              "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["n"] >= 2, r.stderr
    r = blens("sql", "SELECT * FROM promts", "--warehouse", str(wh))
    assert r.returncode == 2 and 'Did you mean "prompts"' in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_empty_query_and_bad_max_rows_are_one_line_errors(site):
    wh, _ = site
    r = blens("sql", "", "--warehouse", str(wh))
    assert r.returncode == 2 and "the query is empty" in r.stderr and "Traceback" not in r.stderr
    r = blens("sql", "SELECT 1", "--max-rows", "-1", "--warehouse", str(wh))
    assert r.returncode == 2 and "--max-rows" in r.stderr and "Traceback" not in r.stderr


def test_sigint_of_sql_promises_no_resume(site):
    """Ctrl-C of a query stops it at once and says the query was cancelled; "rerun to resume" is the extract's
    line."""
    import signal
    import time

    wh, _ = site
    p = subprocess.Popen([sys.executable, "-m", "blens.cli", "sql", "SELECT count(*) FROM range(1000000000000) a",
                          "--warehouse", str(wh)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as at a shell, whatever
    # the test runner set (a SIGINT the parent ignores stays ignored in the CLI, like a background job's)
    # signal once the session is open (its spill folder exists), not after a fixed sleep: on a loaded machine the
    # imports alone can take longer than any sleep, and a Ctrl-C during them is another test's subject
    import tempfile
    from pathlib import Path

    deadline = time.monotonic() + 120
    while not list(Path(tempfile.gettempdir()).glob(f"blens-sql-{p.pid}-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)  # into the query
    p.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=60)
    took = time.monotonic() - t0
    assert p.returncode == 130, err
    assert "interrupted" in err and "resume" not in err and "Traceback" not in err and "ignored" not in err, err
    # the query stops at the signal (lifecycle.signals.interrupting interrupts it), not when the exit watchdog ends the
    # process 20 s later (what a Ctrl-C of a long query did while DuckDB kept Python's handler waiting)
    assert took < 10, f"took {took:.1f} s to stop"
