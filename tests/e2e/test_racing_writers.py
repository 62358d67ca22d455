"""Racing writer processes: six processes opening a new warehouse at once make one schema; three `blens extract`
processes at once on the same keys leave one row per key on a warehouse with its SQLite catalog, and two do on
one whose DuckLake catalog is a real PostgreSQL server (the multi-machine setting). The Postgres test starts its
own server on a loopback port (Debian's `postgresql` package; .ci/run installs it) and stops it afterwards; where
the binaries are absent it skips and says so."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from builders import ROOT, blens_in_process
from blens.store.connect import connect

# Subjects, wrong and true objects of the SQLite race's records.
SUBJECTS = [("Danielle Darrieux", "English", "French"), ("Paris", "Italy", "France"), ("Toko Yasuda", "piano", "guitar"),
            ("Madrid", "Sweden", "Spain"), ("Berlin", "Japan", "Germany"), ("Oslo", "Peru", "Norway")]
BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def race(args: list[str], env: dict[str, str] | None = None, n: int = 3) -> None:
    """``n`` real `blens ARGS` processes started at once; every one must exit 0."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    procs = [subprocess.Popen([sys.executable, "-m", "blens.cli", *args], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [e[-4000:] for e in errs]


def test_racing_writers_on_the_same_keys_leave_one_row_per_key(tmp_path, tiny_model_dir):
    recs = [{"case_id": i, "prompt": f"{s} is located in the country of", "subject": s, "target_new": t,
             "ground_truth": g} for i, (s, t, g) in enumerate(SUBJECTS + SUBJECTS[:2])]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(recs))
    wh = tmp_path / "wh"
    args = ["extract", "--model", str(tiny_model_dir), "--data", str(data), "--warehouse", str(wh), "--top-k", "5",
            "--threads", "1", "--batch-size", "2"]
    first = blens_in_process(*args, "--limit", "1", cwd=ROOT)  # the lake exists before the race (as in production)
    assert first.returncode == 0, first.stderr
    race(args)
    con = connect(wh)
    assert con.execute("SELECT count(*), count(DISTINCT key) FROM prompts").fetchone() == (8, 8)
    assert con.execute("SELECT max(n) FROM rank_equals_length").fetchone()[0] == 8
    assert con.execute("SELECT count(*) FROM (SELECT key, layer, site, position FROM projections "
                       "GROUP BY ALL HAVING count(*) > 1)").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM (SELECT key FROM tokens GROUP BY key, position HAVING count(*) > 1)"
                       ).fetchone()[0] == 0
    con.close()


OPEN_AND_READ = """
import sys
from blens.store.writer import commit_batch, writer_connection
from blens.store.runs import errors_table
con = writer_connection(sys.argv[1])
assert dict(con.execute("SELECT name, value FROM blens_meta").fetchall())["schema_version"]
commit_batch(sys.argv[1], {"errors": errors_table("r" + sys.argv[2], [], "load")}, kind="meta")
print(con.execute("SELECT count(*) FROM commit_lock").fetchone()[0])
"""


def test_writers_opening_a_new_warehouse_at_once_make_one_schema(tmp_path):
    """Shards start together: each one's first open of a warehouse that does not exist yet races the others'.
    DuckLake 1.4.4 crashed (an internal assertion that kills the DuckDB instance) when one process read the
    catalog while another created its tables; local writers now open one at a time (the commit queue)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for round_ in range(3):
        wh = tmp_path / f"wh{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AND_READ, str(wh), str(i)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(6)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, [err[-2000:] for _, err in outs]
        assert [out.strip() for out, _ in outs] == ["1"] * 6  # commit_lock made once, its row inserted once
        con = connect(wh)
        tables = con.execute("SELECT table_name, count(*) FROM __ducklake_metadata_lake.ducklake_table "
                             "WHERE end_snapshot IS NULL GROUP BY ALL HAVING count(*) > 1").fetchall()
        assert tables == []
        assert con.execute("SELECT count(*) FROM commits WHERE kind = 'meta'").fetchone()[0] == 6
        con.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    if not BIN or not Path(BIN[-1], "initdb").exists():
        pytest.skip("PostgreSQL server binaries not installed (Debian package `postgresql`; .ci/run installs it)")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no `postgres` OS user to run the server as (installed with Debian's postgresql package)")
    bindir = BIN[-1]
    # Not under pytest's tmp dir: that is private to root, and the server runs as `postgres`.
    base = Path(tempfile.mkdtemp(prefix="blens-pg-"))
    data, sock = base / "data", base / "sock"
    for d in (data, sock):
        d.mkdir()
        shutil.chown(d, "postgres", "postgres")
    os.chmod(base, 0o755)
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*as_pg, f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "--auth=trust"], check=True,
                   capture_output=True)
    port = _free_port()
    subprocess.run([*as_pg, f"{bindir}/pg_ctl", "-D", str(data), "-l", str(sock / "server.log"), "-w", "-o",
                    f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        for _ in range(50):
            if subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c",
                               "CREATE DATABASE blens"], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        yield f"postgres:dbname=blens host=127.0.0.1 port={port} user=postgres", base / "lake-data"
    finally:
        subprocess.run([*as_pg, f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_racing_writers_on_a_postgres_catalog(postgres, tmp_path, tiny_model_dir):
    uri, data_path = postgres
    recs = [{"case_id": i, "prompt": f"City number {i} is located in", "subject": f"City number {i}",
             "target_new": "Spain", "ground_truth": "France"} for i in range(8)]
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(recs))
    env = {"BLENS_DATA_PATH": str(data_path)}
    args = ["extract", "--model", str(tiny_model_dir), "--data", str(data), "--warehouse", uri, "--top-k", "5",
            "--threads", "1", "--batch-size", "2"]
    first = blens_in_process(*args, "--limit", "1", cwd=ROOT, env=env)
    assert first.returncode == 0, first.stderr
    race(args, env, n=2)  # two machines' writers: the catalog's own concurrency is what is new here
    os.environ["BLENS_DATA_PATH"] = str(data_path)
    try:
        con = connect(uri)
        assert con.execute("SELECT count(*), count(DISTINCT key) FROM prompts").fetchone() == (8, 8)
        assert con.execute("SELECT count(*) FROM (SELECT key, layer, site, position FROM projections "
                           "GROUP BY ALL HAVING count(*) > 1)").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM rank_equals_length").fetchone()[0] == 3 * 7  # catalog views too
        con.close()
    finally:
        del os.environ["BLENS_DATA_PATH"]
