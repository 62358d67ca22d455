"""The warehouse's table semantics (issue 12), with `blens` run in-process on the tiny random Llama:
every result once across runs (--limit growth, a moved file, a changed record; racing writer processes:
tests/e2e/test_racing_writers.py), plain DuckDB
without project code, compaction that changes no answer, time travel to a superseded result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from builders import ROOT, blens_in_process
from blens.store.connect import connect

SUBJECTS = [("Danielle Darrieux", "English", "French"), ("Paris", "Italy", "France"), ("Toko Yasuda", "piano", "guitar"),
            ("Madrid", "Sweden", "Spain"), ("Berlin", "Japan", "Germany"), ("Oslo", "Peru", "Norway")]


def records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        s, t, g = SUBJECTS[i % len(SUBJECTS)]
        out.append({"case_id": i, "prompt": f"{s} is located in the country of", "subject": s, "target_new": t,
                    "ground_truth": g})
    return out


def blens(*args, check: bool = True) -> subprocess.CompletedProcess:
    r = blens_in_process(*args, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def extract(model_dir, data, wh, *extra):
    return blens("extract", "--model", str(model_dir), "--data", str(data), "--warehouse", str(wh), "--top-k", "5",
                 "--threads", "1", *extra)


def counts(wh) -> dict:
    con = connect(wh)
    try:
        return {
            "prompts": con.execute("SELECT count(*) FROM prompts").fetchone()[0],
            "keys": con.execute("SELECT count(DISTINCT key) FROM prompts").fetchone()[0],
            "rank_n": con.execute("SELECT max(n) FROM rank_equals_length").fetchone()[0],
            "projection_dups": con.execute("SELECT count(*) FROM (SELECT key, layer, site, position FROM projections "
                                           "GROUP BY ALL HAVING count(*) > 1)").fetchone()[0],
        }
    finally:
        con.close()


def test_limit_growth_moved_file_and_rerun_never_double_count(tmp_path, tiny_model_dir):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records(6)))
    wh = tmp_path / "wh"
    extract(tiny_model_dir, data, wh, "--limit", "3")
    r = extract(tiny_model_dir, data, wh, "--limit", "5")
    assert "3 record(s) already in the warehouse" in r.stderr
    assert counts(wh) == {"prompts": 5, "keys": 5, "rank_n": 5, "projection_dups": 0}
    moved = tmp_path / "elsewhere" / "renamed.json"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    r = extract(tiny_model_dir, moved, wh)  # same records from another path: only the 6th is new
    assert "5 record(s) already in the warehouse" in r.stderr
    extract(tiny_model_dir, moved, wh)  # a plain rerun adds nothing
    assert counts(wh) == {"prompts": 6, "keys": 6, "rank_n": 6, "projection_dups": 0}
    con = connect(wh)
    assert con.execute("SELECT count(DISTINCT run_id) FROM prompts").fetchone()[0] == 3  # provenance kept
    con.close()


def test_changed_record_supersedes_and_time_travel_keeps_the_old(tmp_path, tiny_model_dir):
    data = tmp_path / "cf.json"
    recs = records(3)
    data.write_text(json.dumps(recs))
    wh = tmp_path / "wh"
    extract(tiny_model_dir, data, wh)
    con = connect(wh)
    old_key = con.execute("SELECT key FROM prompts WHERE case_id = 1").fetchone()[0]
    before = con.execute("SELECT max(snapshot_id) FROM ducklake_snapshots('lake')").fetchone()[0]
    con.close()
    recs[1]["target_new"] = "Moscow"
    data.write_text(json.dumps(recs))
    extract(tiny_model_dir, data, wh)
    con = connect(wh)
    assert con.execute("SELECT case_id, target_new FROM prompts ORDER BY case_id").fetchall() == [
        (0, "English"), (1, "Moscow"), (2, "piano")]
    assert con.execute("SELECT count(*) FROM projections WHERE key = ?", [old_key]).fetchone()[0] == 0
    assert con.execute("SELECT old_key FROM supersessions").fetchall() == [(old_key,)]
    con.close()
    r = blens("sql", "SELECT target_new FROM prompts WHERE case_id = 1", "--warehouse", str(wh),
              "--as-of", str(before), "--format", "csv")
    assert r.stdout.splitlines() == ["target_new", "Italy"]


PLAIN = """
import duckdb, pathlib, sys
sql = open(sys.argv[1]).read()
db = duckdb.connect(sys.argv[2])
mine = pathlib.Path(sys.argv[2]).stem  # the persisted database's own catalog
db.execute(sql)
if sys.argv[3] == "create":
    db.execute(f"CREATE OR REPLACE VIEW {mine}.main.my_ranks AS SELECT layer, rate FROM lake.rank_equals_length")
print(db.execute("SELECT count(*) FROM prompts").fetchone()[0],
      db.execute(f"SELECT count(*) FROM {mine}.main.my_ranks").fetchone()[0])
"""


def test_plain_duckdb_without_project_code(tmp_path, tiny_model_dir):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records(3)))
    wh = tmp_path / "wh"
    extract(tiny_model_dir, data, wh)
    init = tmp_path / "init.sql"
    init.write_text(blens("init-sql", "--warehouse", str(wh)).stdout)
    script = tmp_path / "plain.py"
    script.write_text(PLAIN)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for step in ("create", "reopen"):  # a persisted DuckDB file, then the next session
        r = subprocess.run([sys.executable, "-I", str(script), str(init), str(tmp_path / "mine.duckdb"), step],
                           cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["3", "21"]  # 3 prompts; 3 layers x 7 matrices (MLP + attention) in the catalog view


def test_compaction_keeps_every_answer_and_merges_files(tmp_path, tiny_model_dir):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records(6)))
    wh = tmp_path / "wh"
    for limit in ("2", "4", "6"):
        extract(tiny_model_dir, data, wh, "--limit", limit, "--batch-size", "1")
    queries = ["SELECT * EXCLUDE (batch_id) FROM prompts ORDER BY key",
               "SELECT * EXCLUDE (batch_id) FROM projections ORDER BY key, layer, site, position",
               "SELECT * FROM rank_equals_length ORDER BY ALL", "SELECT * FROM target_rank_by_layer ORDER BY ALL"]
    con = connect(wh)
    before = [con.execute(q).fetchall() for q in queries]
    con.close()
    r = blens("compact", "--warehouse", str(wh))
    lines = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[2:]}
    files_before, files_after = (int(x) for x in lines["projections"])
    assert files_before == 6 and files_after == 1, r.stdout
    con = connect(wh)
    assert [con.execute(q).fetchall() for q in queries] == before
    con.close()


def test_overlapping_shards_with_different_limits_warn_and_store_once(tmp_path, tiny_model_dir):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(records(8)))
    wh = tmp_path / "wh"
    first = extract(tiny_model_dir, data, wh, "--shard", "0/2", "--limit", "4")
    assert "warning" not in first.stderr
    second = extract(tiny_model_dir, data, wh, "--shard", "0/2", "--limit", "8")
    assert "warning: 2 of shard 0/2's records were already extracted by run" in second.stderr
    assert "limit 4" in second.stderr
    assert counts(wh) == {"prompts": 4, "keys": 4, "rank_n": 4, "projection_dups": 0}


MEMBERSHIP = ("target_new_in_top_k", "target_new_in_bottom_k", "target_true_in_top_k", "target_true_in_bottom_k")


def membership(wh, stored: bool) -> list[tuple]:
    """Each projection's four target-in-top/bottom-k flags: as stored, or recomputed from the id lists."""
    cols = ", ".join(f"x.{c}" for c in MEMBERSHIP) if stored else (
        "list_contains(x.top_ids, p.target_new_id), list_contains(x.bottom_ids, p.target_new_id), "
        "list_contains(x.top_ids, p.target_true_id), list_contains(x.bottom_ids, p.target_true_id)")
    con = connect(wh)
    try:
        return con.execute(f"SELECT x.key, x.site, x.layer, x.position, {cols} FROM projections AS x "
                           "JOIN prompts AS p USING (key) ORDER BY ALL").fetchall()
    finally:
        con.close()


# What schema 4 added (issue 21): dropped to make a warehouse look like schema 2 wrote it.
SCHEMA4_COLUMNS = {"prompts": ("settings", "model_answer_id", "model_answer_token", "model_answer_is_true"),
                   "tokens": ("settings", "role"), "gradient_ranks": ("settings",),
                   "projections": ("settings", "role", "model_answer_rank", "model_answer_in_top_k",
                                   "model_answer_in_bottom_k")}


def test_a_warehouse_from_before_the_membership_flags_is_upgraded_in_place(tmp_path, tiny_model_dir):
    """Schema 2 had no target_*_in_top_k / _in_bottom_k columns, and none of schema 4's (settings, roles, the
    model's answer, the settings and vjp_similarity tables); the next writer adds and fills them, then new
    batches insert into the upgraded tables by name (their new columns sit after batch_id) and every view works.
    Old rows get the settings id their keys were made with (from their run's top-k and the family's sites then)
    and their roles derived from the stored segments; the model's answer, never stored then, stays NULL."""
    from blens.store.lake import attach
    from blens.store.migrations import legacy_settings
    from blens.store.schema import SCHEMA_VERSION

    data, wh = tmp_path / "cf.json", tmp_path / "wh"
    data.write_text(json.dumps(records(4)))
    extract(tiny_model_dir, data, wh, "--limit", "2")
    expected = membership(wh, stored=False)
    assert membership(wh, stored=True) == expected and any(any(r[4:]) for r in expected)
    con = connect(wh)
    roles = con.execute("SELECT key, position, role FROM tokens ORDER BY ALL").fetchall()
    proj_roles = con.execute("SELECT key, site, layer, position, role FROM projections ORDER BY ALL").fetchall()
    old_keys = {r[0] for r in roles}
    con.close()
    assert {r[2] for r in roles} >= {"last_subject", "last", "first_subsequent"}
    con = attach(wh, read_only=False)  # make it what schema 2 wrote: no flags, its views and version
    for c in MEMBERSHIP:
        con.execute(f"ALTER TABLE projections DROP COLUMN {c}")
    for table, cols in SCHEMA4_COLUMNS.items():
        for c in cols:
            con.execute(f"ALTER TABLE {table} DROP COLUMN {c}")
    con.execute("DROP TABLE settings")
    con.execute("DROP TABLE vjp_similarity")
    con.execute("UPDATE blens_meta SET value = '2' WHERE name = 'schema_version'")
    con.execute("UPDATE blens_meta SET value = 'older views' WHERE name = 'views'")
    con.close()

    r = extract(tiny_model_dir, data, wh)  # the upgrade, then 2 new prompts into the upgraded table
    assert "upgrading warehouse table projections: adding target_new_in_top_k" in r.stderr, r.stderr[-2000:]
    assert "upgrading warehouse table tokens: adding settings, role" in r.stderr, r.stderr[-2000:]
    got = membership(wh, stored=True)
    assert got == membership(wh, stored=False) and len(got) > len(expected)
    assert [row for row in got if row[0] in {e[0] for e in expected}] == expected  # old rows filled exactly
    con = connect(wh)
    try:
        assert con.execute("SELECT value FROM blens_meta WHERE name = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        assert con.execute("SELECT count(*) FROM prompts").fetchone()[0] == 4
        assert con.execute("SELECT count(*) FROM target_rank_by_layer WHERE target_new_in_bottom_k IS NULL").fetchone()[0] == 0
        legacy = legacy_settings(5, "llama")[0]
        for table in SCHEMA4_COLUMNS:
            got_ids = dict(con.execute(f"SELECT key IN ({', '.join(repr(k) for k in old_keys)}), list(DISTINCT settings) "
                                       f"FROM {table} GROUP BY ALL").fetchall())
            assert got_ids[True] == [legacy] and got_ids[False] != [legacy], table
        assert con.execute("SELECT count(*) FROM settings WHERE settings = ?", [legacy]).fetchone()[0] == 1
        assert con.execute("SELECT key, position, role FROM tokens WHERE key IN (SELECT unnest(?)) ORDER BY ALL",
                           [sorted(old_keys)]).fetchall() == roles
        assert con.execute("SELECT key, site, layer, position, role FROM projections WHERE key IN (SELECT unnest(?)) "
                           "ORDER BY ALL", [sorted(old_keys)]).fetchall() == proj_roles
        assert con.execute("SELECT count(*) FROM prompts WHERE model_answer_id IS NULL").fetchone()[0] == 2
        assert con.execute("SELECT count(DISTINCT settings) FROM rank_equals_length").fetchone()[0] == 2
    finally:
        con.close()
    assert "upgrading" not in extract(tiny_model_dir, data, wh).stderr  # once
