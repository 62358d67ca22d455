"""`blens --help` and every command's help: clean text, real choices, no install paths, cheap to render.

Issue 15: help showed ``<bool>`` beside flags, broke sentences where the source line ended, listed no
choices, took a default from the install location; `--version` did not exist.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from builders import ROOT, blens_in_process

COMMANDS = ["extract", "sql", "init-sql", "compact", "check", "edit", "sweep", "publish", "report", "serve"]

# Render every help page in a fresh process, at a width where no paragraph needs wrapping (so a line break
# in the output is one the text itself has) and at a common narrow one, and list the heavy modules loaded.
RENDER = r"""
import contextlib, io, json, os, sys
from blens.cli import app
out = {}
for width in (1000, 100):
    os.environ["COLUMNS"] = str(width)  # rich reads it for every help page
    for cmd in [[]] + [[c] for c in sys.argv[1:]]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                app(cmd + ["--help"], prog_name="blens")
            except SystemExit:
                pass
        out[f"{width} {' '.join(cmd)}"] = buf.getvalue()
heavy = sorted(m for m in ("torch", "transformers", "prefect", "pandas", "duckdb", "pyarrow") if m in sys.modules)
print(json.dumps({"help": out, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def rendered() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.run([sys.executable, "-c", RENDER, *COMMANDS], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_every_command_has_help(rendered):
    for cmd in COMMANDS:
        text = rendered["help"][f"100 {cmd}"]
        assert f"Usage: blens {cmd}" in text, cmd
    listing = rendered["help"]["100 "]
    for cmd in COMMANDS:
        assert re.search(rf"│ {re.escape(cmd)}\s", listing), f"{cmd} missing from `blens --help`"


def test_help_has_no_artefacts(rendered):
    install = str(ROOT)
    for key, text in rendered["help"].items():
        assert "%%" not in text, key
        assert not re.search(r"<(bool|str|int|float|path|int range|float range|file|text)>", text), (key, text)
        assert "…" not in text, f"{key}: a value was cut"
        assert install not in text, f"{key}: a default depends on where blens is installed"
        assert "PNG tables" not in text and "as PNGs" not in text, key


def test_help_lists_the_choices(rendered):
    h = rendered["help"]
    assert re.search(r"--vectors\s+none\|spanning\|all\s", h["100 extract"])
    assert re.search(r"--vectors\s+none\|spanning\|all\s", h["100 serve"])
    assert re.search(r"--format\s+table\|csv\|json\|markdown\s", h["100 sql"])
    assert re.search(r"--method\s+none\|shift\|sgd\|rome\s", h["100 edit"])
    assert re.search(r"--step\s+fixed\|normalized\|minimal\s", h["100 edit"])
    assert re.search(r"--vector-dtype\s+float32\|float16\s", h["100 publish"])
    assert re.search(r"--force\s{2,}Recompute", h["100 extract"]), "a flag shows no type"


def test_paragraphs_are_not_broken_mid_sentence(rendered):
    """At a width where nothing needs wrapping, every paragraph of a command's docstring is one line."""
    from blens.cli import app
    from blens.commands._help import reflow

    callbacks = {c.name: c.callback for c in app.registered_commands}
    for cmd in COMMANDS:
        text = rendered["help"][f"1000 {cmd}"]
        lines = [" ".join(line.strip(" │").split()) for line in text.splitlines()]
        for paragraph in reflow(inspect.getdoc(callbacks[cmd])).split("\n\n"):
            assert paragraph in lines, f"blens {cmd} --help breaks the paragraph {paragraph[:60]!r}"


def test_help_imports_nothing_heavy(rendered):
    assert rendered["heavy"] == [], "rendering help must stay cheap: no torch, prefect or DuckDB at import time"


# Every default is declared once, in the config model or its domain module, and the CLI is built from it (issue
# 22): change one there, before the CLI is imported, and --help shows the new value.
CHANGED = r"""
import contextlib, io, sys
from blens.extract import batching
from blens.extract.config import ExtractConfig
from blens.edit import tuned
from blens.edit.spec import EditConfig, SweepConfig

ExtractConfig.model_fields["top_k"].default = 37
ExtractConfig.model_fields["max_prompt_tokens"].default = 555
batching.CPU_BATCH_SIZE = 48
EditConfig.model_fields["fluency_tokens"].default = 41
SweepConfig.model_fields["limit"].default = 77
tuned.GRIDS[tuned.SMOLLM2]["layers"] = "3,5"
from blens.cli import app

for cmd in ("extract", "edit", "sweep"):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            app([cmd, "--help"], prog_name="blens")
        except SystemExit:
            pass
    print(f"=== {cmd}")
    print(" ".join(buf.getvalue().replace("│", " ").split()))
"""


def test_a_changed_config_default_shows_up_in_help():
    env = {**os.environ, "COLUMNS": "1000"}
    proc = subprocess.run([sys.executable, "-c", CHANGED], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    pages = dict(part.split("\n", 1) for part in proc.stdout.split("=== ")[1:])
    assert re.search(r"--top-k K \[1<=x<=1000\] .*?\[default: 37\]", pages["extract"])
    assert re.search(r"--max-prompt-tokens N \[x>=1\] .*?\[default: 555\]", pages["extract"])
    assert "[default: (48 on CPU, 256 on CUDA)]" in pages["extract"]
    assert re.search(r"--fluency-tokens N \[x>=0\] .*?\[default: 41\]", pages["edit"])
    assert re.search(r"--limit N \[x>=1\] Train edits to use. \[default: 77\]", pages["sweep"])
    assert "smollm2-135m 3,5;" in pages["sweep"]


def test_choices_are_the_configs():
    """The choices --help lists are the Literal types of the configs themselves (no copy in the CLI)."""
    from typing import get_args

    from blens.commands import edit
    from blens.edit.spec import METHODS, STEPS, Method, Step
    from blens.extract.config import ExtractConfig

    assert edit.Method is Method and edit.Step is Step
    assert get_args(Method) == METHODS and get_args(Step) == STEPS
    assert get_args(ExtractConfig.model_fields["vectors"].annotation) == ("none", "spanning", "all")


def test_version():
    import blens

    proc = subprocess.run([str(Path(sys.executable).parent / "blens"), "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"blens {blens.__version__}"
    assert re.fullmatch(r"blens \d+\.\d+\.\d+\S*", proc.stdout.strip())


def test_a_bad_choice_is_one_clear_error():
    proc = blens_in_process("extract", "--data", "x.json", "--vectors", "some", cwd=ROOT)
    assert proc.returncode == 2
    message = " ".join(proc.stderr.replace("│", " ").split())  # rich boxes and wraps it
    assert "'some' is not one of 'none', 'spanning', 'all'" in message


def test_sweep_data_default_is_relative_to_the_current_directory(tmp_path):
    """No default built from the install location: the train split is looked up from where the user is, and
    a missing one is named with that directory, before any model loads."""
    proc = blens_in_process("sweep", "--warehouse", str(tmp_path / "wh"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "../shared/data/counterfact/counterfact-train.json" in proc.stderr
    assert str(tmp_path) in proc.stderr
    assert not (tmp_path / "wh").exists()
