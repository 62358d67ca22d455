"""`blens sql` cannot write, load or reach outside the warehouse (issue 13), whatever the query says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def blens(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blens.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("sandbox")
    data = tmp / "cf.json"
    data.write_text(json.dumps([{"case_id": 0, "prompt": "Paris is the capital of", "subject": "Paris",
                                 "target_new": "Italy", "ground_truth": "France"}]))
    wh = tmp / "wh"
    r = blens("extract", "--model", str(tiny_model_dir), "--data", str(data), "--warehouse", str(wh), "--top-k", "5")
    assert r.returncode == 0, r.stderr
    return wh


def files(wh) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in wh.rglob("*") if p.is_file() and "catalog.sqlite" not in p.name}


@pytest.mark.parametrize("query", [
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{data}/main/prompts/x.parquet'",
    "COPY prompts TO '{data}/main/prompts/evil.parquet'",
    "SELECT 1; COPY (SELECT 2) TO '{data}/y.parquet'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM 'https://example.com/data.parquet'",
    "EXPLAIN ANALYZE INSTALL httpfs",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET threads = 1",
    "ATTACH '{wh}/other.duckdb'",
    "DELETE FROM prompts",
    "CALL ducklake_merge_adjacent_files('lake')",
])
def test_nothing_a_query_says_writes_loads_or_reaches_out(warehouse, query):
    before = files(warehouse)
    r = blens("sql", query.format(data=warehouse / "data", wh=warehouse), "--warehouse", str(warehouse))
    assert r.returncode != 0 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert files(warehouse) == before
    assert not (warehouse / "other.duckdb").exists()


def test_queries_still_work_and_errors_keep_duckdb_hints(warehouse):
    r = blens("sql", "FROM prompts SELECT count(*) AS n", "--warehouse", str(warehouse), "--format", "csv")
    assert r.returncode == 0 and r.stdout.splitlines() == ["n", "1"]
    r = blens("sql", "SELECT * FROM promts", "--warehouse", str(warehouse))
    assert r.returncode != 0 and 'Did you mean "prompts"' in r.stderr


def test_empty_query_and_bad_max_rows_are_one_line_errors(warehouse):
    r = blens("sql", "", "--warehouse", str(warehouse))
    assert r.returncode == 2 and "the query is empty" in r.stderr and "Traceback" not in r.stderr
    r = blens("sql", "SELECT 1", "--max-rows", "-1", "--warehouse", str(warehouse))
    assert r.returncode == 2 and "--max-rows" in r.stderr and "Traceback" not in r.stderr
