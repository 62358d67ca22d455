"""Store faults (issue 13), with real processes and files: a truncated, junk or hand-deleted data file gives a
clear error naming the file, `blens check` finds it, `--repair` quarantines it and the next extract
recomputes exactly the lost prompts; a full disk fails the run (non-zero, one line) and is never recorded
as bad records; a non-empty foreign directory is refused as a warehouse."""

from __future__ import annotations

import errno
import json
import subprocess

import pytest

from builders import ROOT, SESSION_RECORDS, blens_in_process
from blens.store.connect import connect

RECS = SESSION_RECORDS  # the 4 records of the session's extracted warehouse


def blens(*args, env=None) -> subprocess.CompletedProcess:
    return blens_in_process(*args, cwd=ROOT, env=env)


@pytest.fixture
def warehouse(extracted_copy):
    """A copy of the session's extracted warehouse (conftest.py: RECS, 2 batches) and its extract command."""
    return extracted_copy


def n_prompts(wh) -> int:
    con = connect(wh)
    try:
        return con.execute("SELECT count(*) FROM prompts").fetchone()[0]
    finally:
        con.close()


@pytest.mark.parametrize("damage", ["truncate", "junk", "delete"])
def test_damaged_file_is_named_checked_repaired_and_recomputed(warehouse, damage):
    wh, args = warehouse
    victim = sorted((wh / "data" / "main" / "projections").glob("*.parquet"))[0]
    if damage == "truncate":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "junk":
        victim.write_bytes(b"not a parquet file at all" * 100)
    else:
        victim.unlink()
    r = blens("sql", "SELECT count(*) FROM projections", "--warehouse", str(wh))
    assert r.returncode != 0 and victim.name in r.stderr and "Traceback" not in r.stderr
    r = blens("check", "--warehouse", str(wh))
    assert r.returncode == 1 and victim.name in r.stdout and "--repair" in r.stdout
    r = blens("check", "--repair", "--warehouse", str(wh))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rerun the extraction command" in r.stdout
    lost = 4 - n_prompts(wh)
    assert lost > 0
    if damage != "delete":
        assert (wh / "quarantine" / victim.name).exists()
    r = blens(*args)  # the same command recomputes exactly the lost prompts
    assert r.returncode == 0, r.stderr
    assert f"{4 - lost} record(s) already in the warehouse (skipped), {lost} to go" in r.stderr
    assert blens("check", "--warehouse", str(wh)).returncode == 0
    con = connect(wh)
    assert con.execute("SELECT count(*), count(DISTINCT key) FROM prompts").fetchone() == (4, 4)
    assert con.execute("SELECT count(*) FROM errors").fetchone()[0] == 0
    con.close()


def test_full_disk_fails_the_run_and_records_no_bad_records(tmp_path, tiny_model_dir, monkeypatch):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(RECS))
    wh = tmp_path / "wh"
    args = ["extract", "--model", str(tiny_model_dir), "--data", str(data), "--warehouse", str(wh), "--top-k", "5",
            "--threads", "1"]
    import blens.store.writer as writer

    insert = writer._insert

    def full(con, table, *a, **k):  # the disk fills up when the largest table is written
        if table == "projections":
            raise OSError(errno.ENOSPC, "No space left on device", "/wh/data/main/projections")
        return insert(con, table, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(writer, "_insert", full)
        r = blens(*args)
    assert r.returncode == 1, r.stderr
    assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
    assert "skipped" not in r.stderr
    con = connect(wh)
    assert con.execute("SELECT count(*) FROM errors").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM prompts").fetchone()[0] == 0
    con.close()
    r = blens(*args)  # after recovery the same command completes, with no stale error rows or orphans
    assert r.returncode == 0, r.stderr
    assert n_prompts(wh) == 4
    assert blens("check", "--warehouse", str(wh)).returncode == 0


def test_foreign_directory_is_refused_as_a_warehouse(tmp_path, tiny_model_dir):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(RECS))
    r = blens("extract", "--model", str(tiny_model_dir), "--data", str(data), "--warehouse", str(foreign))
    assert r.returncode == 2 and "is not empty and is not a warehouse" in r.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]


@pytest.mark.parametrize("command, marker", [("publish", "README.md"), ("report", "index.html")])
def test_product_output_inside_the_warehouse_is_refused(warehouse, command, marker):
    wh, _ = warehouse
    for out in (wh / "published", wh, wh.parent):
        r = blens(command, "--warehouse", str(wh), "--out", str(out))
        assert r.returncode != 0 and "overlaps the warehouse" in r.stderr, (out, r.stderr)
    assert not (wh / "published").exists() and not (wh / marker).exists()
    assert blens("check", "--warehouse", str(wh)).returncode == 0


def test_a_sibling_writers_half_made_warehouse_is_not_foreign(tmp_path):
    """Shards started together race at creation: one has made wh/data/ but not yet the catalog when another
    looks. That is a warehouse being made, not an unrelated directory; a data/ with files in it still is."""
    from blens.store.writer import WarehouseError, init_warehouse

    wh = tmp_path / "wh"
    (wh / "data").mkdir(parents=True)
    init_warehouse(wh)
    assert (wh / "catalog.sqlite").is_file()
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    (other / "data" / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(WarehouseError, match="not empty and is not a warehouse"):
        init_warehouse(other)


def test_repair_after_a_damaged_prompts_file_leaves_no_orphans_and_the_rerun_counts_exactly(warehouse):
    """Issue 24: quarantining a `prompts` file used to leave its tokens/ranks/projections behind ("ok"), and
    the rerun added them again (rank_equals_length said n = 10 for 8 prompts). Now the repair removes every
    row whose key lost its prompts row, `check` is clean after it, and the rerun's counts are exact."""
    from blens.store.schema import RESULT_TABLES

    wh, args = warehouse
    victim = sorted((wh / "data" / "main" / "prompts").glob("*.parquet"))[0]
    victim.write_bytes(b"not a parquet file at all" * 100)
    r = blens("check", "--repair", "--warehouse", str(wh))
    assert r.returncode == 0, r.stdout + r.stderr
    r = blens("check", "--warehouse", str(wh))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout
    con = connect(wh)
    for t in RESULT_TABLES[1:]:
        assert con.execute(f"SELECT count(*) FROM {t} WHERE key NOT IN (SELECT key FROM prompts)").fetchone()[0] == 0, t
    lost = 4 - con.execute("SELECT count(*) FROM prompts").fetchone()[0]
    con.close()
    assert lost > 0
    r = blens(*args)
    assert r.returncode == 0, r.stderr
    assert f"{4 - lost} record(s) already in the warehouse (skipped), {lost} to go" in r.stderr
    assert blens("check", "--warehouse", str(wh)).returncode == 0
    con = connect(wh)
    assert {r[0] for r in con.execute("SELECT DISTINCT n FROM rank_equals_length").fetchall()} == {4}
    assert con.execute("SELECT (SELECT count(*) FROM tokens) = (SELECT sum(n_tokens) FROM prompts)").fetchone()[0]
    assert con.execute("SELECT count(*), count(DISTINCT key) FROM prompts").fetchone() == (4, 4)
    con.close()


def test_check_finds_orphan_and_duplicate_rows_in_every_result_table(warehouse):
    """The invariant is generic over `RESULT_TABLES`: a row of any result table whose key has no prompts row
    is found and repaired, and so is a key stored twice."""
    from blens.store.check import check
    from blens.store.lake import attach
    from blens.store.schema import RESULT_TABLES

    wh, _ = warehouse
    con = attach(wh, read_only=False)
    planted = []
    try:
        for t in RESULT_TABLES[1:]:
            if con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]:
                con.execute(f"INSERT INTO {t} SELECT * REPLACE ('orphan-{t}' AS key) FROM {t} LIMIT 1")
                planted.append(f"orphan-{t}")
        dup = con.execute("SELECT key FROM prompts LIMIT 1").fetchone()[0]
        con.execute(f"INSERT INTO prompts SELECT * FROM prompts WHERE key = '{dup}'")
    finally:
        con.close()
    assert len(planted) >= 3
    res = check(wh)
    assert set(res.incomplete) == set(planted) | {dup}
    res = check(wh, repair=True)
    assert res.incomplete == [] and check(wh).ok
