"""First use under company (issue 24): the embedded model's conversion runs once across processes, under a
lock, and lands by an atomic rename; a complete conversion is never replaced under a loader, and the partial
folders of a killed conversion are removed by the next one. Real processes, a temporary cache, and a tiny
model standing in for the GGUF conversion (the locking and renaming are what is tested, not transformers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from builders import ROOT

# Each process: build_once with a slow fake conversion (copies the tiny model, counts itself), then load
# the model from the cache folder, as `blens extract` does right after.
SCRIPT = """
import shutil, sys, time
from pathlib import Path
from blens.extract.convert import build_once
target, src, count, hold = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
def build(out):
    with open(count, "a") as f:
        f.write("built\\n")
    out.mkdir()
    for p in src.iterdir():
        shutil.copy(p, out / p.name)
        time.sleep(hold / 10)
    time.sleep(hold)
    (out / "blens.json").write_text('{"source": "test", "gguf_sha256": "0"}')
got = build_once(target, build)
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(got)
print("loaded", got)
"""


def _start(target, src, count, hold):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(target), str(src), str(count), str(hold)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_first_uses_together_convert_once_and_all_load(tmp_path, tiny_model_dir):
    target = tmp_path / "cache" / "tiny"
    count = tmp_path / "count"
    procs = [_start(target, tiny_model_dir, count, 1.0) for _ in range(2)]  # a second waits on the first's lock
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert count.read_text().count("built") == 1
    assert sorted(x.name for x in target.parent.iterdir()) == [".tiny.lock", "tiny"]


def test_a_killed_conversion_leaves_nothing_that_the_next_does_not_remove(tmp_path, tiny_model_dir):
    target = tmp_path / "cache" / "tiny"
    count = tmp_path / "count"
    p = _start(target, tiny_model_dir, count, 600.0)  # converts "forever"
    deadline = time.time() + 120
    while not list(target.parent.glob(".tiny.partial-*/converted/*")) and time.time() < deadline:
        time.sleep(0.2)
    assert list(target.parent.glob(".tiny.partial-*")), "the conversion never started"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert not target.exists()
    q = _start(target, tiny_model_dir, count, 0.0)  # the lock died with its holder
    out, err = q.communicate(timeout=300)
    assert q.returncode == 0, err[-2000:]
    assert sorted(x.name for x in target.parent.iterdir()) == [".tiny.lock", "tiny"]
