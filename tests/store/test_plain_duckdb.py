"""Issue 25: plain DuckDB anywhere. `blens init-sql` prints SQL naming no path inside the checkout's .venv, and it
works in a separate Python process that imports only duckdb, with DuckDB's standard extension directory, once
the bundled extensions are installed there the way scripts/setup.sh does it (scripts/install_duckdb_extensions.py,
here into a temporary $HOME so the test touches nothing of the machine's)."""

from __future__ import annotations

import os
import subprocess
import sys

from builders import ROOT, make_warehouse

PLAIN = """
import sys, duckdb
con = duckdb.connect()
con.execute(open(sys.argv[1]).read())
print(con.execute("SELECT count(*) FROM prompts").fetchone()[0])
print(con.execute("SELECT count(*) FROM rank_equals_length").fetchone()[0])
print(con.execute("SELECT list(install_path) FROM duckdb_extensions() WHERE extension_name = 'ducklake'").fetchone()[0][0])
print(",".join(sorted(m for m in sys.modules if m.split(".")[0] in ("blens", "duckdb_ext"))))
"""


def test_setup_installs_the_extensions_also_with_install_only():
    script = (ROOT / "scripts" / "setup.sh").read_text()
    install = script.index(".venv/bin/python scripts/install_duckdb_extensions.py")
    assert install < script.index('[ "${1:-}" = "--install-only" ] && exit 0')


def test_init_sql_runs_in_plain_duckdb_with_the_standard_extension_directory(tmp_path):
    wh = make_warehouse(tmp_path / "warehouse", n=2)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BLENS_DUCKDB_EXTENSIONS")}
    sql = subprocess.run([sys.executable, "-m", "blens.cli", "init-sql", "--warehouse", str(wh)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert ".venv" not in sql and "extension_directory" not in sql and str(ROOT) not in sql
    assert "LOAD ducklake;" in sql
    (tmp_path / "init.sql").write_text(sql)

    home = tmp_path / "home"
    home.mkdir()
    env["HOME"] = str(home)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "install_duckdb_extensions.py")], env=env, check=True,
                   capture_output=True, timeout=120)
    (tmp_path / "plain.py").write_text(PLAIN)
    r = subprocess.run([sys.executable, "-I", str(tmp_path / "plain.py"), str(tmp_path / "init.sql")], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    prompts, ranks, path, project = r.stdout.splitlines()
    assert int(prompts) == 3 and int(ranks) > 0  # 2 CounterFact prompts + the builder's tricky one; a view answers
    assert path.startswith(str(home / ".duckdb" / "extensions" / "v1.4.4")), path
    assert project == ""  # no blens module, no duckdb_ext package in the process
