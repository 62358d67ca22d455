"""The glibc arena cap (extract/allocator.py): applied on import, inherited by child processes, and an
explicit MALLOC_ARENA_MAX wins. The arena count is read back from glibc's own malloc_info report."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc arenas are a glibc (Linux) matter")

# Four threads allocate at once, then glibc reports its arenas ("<heap nr=...>") as XML on stdout.
COUNT_ARENAS = r"""
import ctypes, os, subprocess, sys, threading
{imports}
barrier = threading.Barrier(4)
def work():
    barrier.wait()
    keep = [bytearray(100_000) for _ in range(200)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
libc = ctypes.CDLL("libc.so.6")
sys.stdout.flush()
libc.malloc_info(0, ctypes.c_void_p.in_dll(libc, "stdout"))
libc.fflush(None)
child = subprocess.run(["sh", "-c", "echo child=$MALLOC_ARENA_MAX"], capture_output=True, text=True).stdout
print(child.strip(), flush=True)
"""


def run(imports: str, **env_extra) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env.update(PYTHONPATH=str(ROOT), **env_extra)
    out = subprocess.run([sys.executable, "-c", COUNT_ARENAS.format(imports=imports)], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout
    return out.count("<heap nr="), out.strip().splitlines()[-1]


@glibc_only
def test_importing_blens_leaves_one_arena_for_all_threads_and_children():
    arenas, child = run("import blens")
    assert arenas == 1 and child == "child=1"


@glibc_only
def test_without_the_cap_threads_get_their_own_arenas():
    """The control: the same script without importing blens uses several arenas (so the check can fail)."""
    arenas, child = run("")
    assert arenas > 1 and child == "child="


@glibc_only
def test_an_explicit_malloc_arena_max_wins():
    arenas, child = run("import extract", MALLOC_ARENA_MAX="3")
    assert 1 < arenas <= 3 and child == "child=3"


def test_limit_is_a_no_op_when_the_environment_chose(monkeypatch):
    from extract.allocator import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert limit_malloc_arenas() is False and os.environ["MALLOC_ARENA_MAX"] == "2"
