"""Issue 15: commands answer without paying for what they do not use.

* A rerun with nothing left to do is answered from the files and the warehouse: no torch, no model, no
  Prefect. It must never skip work wrongly: a changed record, a changed model file, --force, more vectors
  or another top-k all go the normal way (the decision is ``blens.run.resume.nothing_to_do``).
* `blens sql` imports neither torch nor Prefect nor pandas.
* Offline, a hub model name is one line at once, not the hub client's retries.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "prefect", "pandas")

# Runs the CLI like the `blens` script and reports which heavy modules the process imported (at exit: once torch
# is loaded the CLI ends through os._exit after the atexit handlers, blens.lifecycle.ending).
TRACED = r"""
import atexit, json, runpy, sys
sys.argv = ["blens"] + sys.argv[1:]
atexit.register(lambda: sys.stderr.write("LOADED=" + json.dumps(sorted(m for m in %r if m in sys.modules)) + "\n"))
runpy.run_module("blens.cli", run_name="__main__")
""" % (HEAVY,)


def blens(*args: str, env: dict | None = None, timeout: int = 600) -> tuple[subprocess.CompletedProcess, list[str]]:
    proc = subprocess.run([sys.executable, "-c", TRACED, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)
    loaded = [json.loads(line[len("LOADED="):]) for line in proc.stderr.splitlines() if line.startswith("LOADED=")]
    assert loaded, proc.stderr
    return proc, loaded[-1]


def summary_row(stdout: str) -> dict[str, str]:
    """The run summary the extract command prints (plain aligned text when stdout is not a terminal)."""
    lines = stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.split()[:2] == ["records", "done"])
    head = [c.strip() for c in lines[i].split("  ") if c.strip()]
    return dict(zip(head, lines[i + 1].split()))


def write_source(path: Path, facts: list[dict], extra: tuple[dict, ...] = ()) -> None:
    path.write_text(json.dumps(facts + list(extra)))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """A finished extraction: a tiny model directory with a blens.json (so its revision comes from its files,
    as an embedded model's does), 5 records and one rejected record, extracted by the CLI (in-process: what
    the reruns below import is the subject, not what this run imports)."""
    from builders import FACTS, blens_in_process

    root = tmp_path_factory.mktemp("finished")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "blens.json").write_text(json.dumps({"source": "tiny.gguf", "gguf_sha256": "a" * 64}))
    facts = [{"case_id": c, "prompt": p, "subject": s, "target_new": t, "ground_truth": g}
             for c, p, s, t, g in FACTS]
    data = root / "facts.json"
    write_source(data, facts, extra=({"case_id": 99, "prompt": "no subject here"},))
    wh = root / "wh"
    proc = blens_in_process("extract", "--model", str(model), "--data", str(data), "--warehouse", str(wh), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    row = summary_row(proc.stdout)
    assert (row["extracted"], row["skipped (errors)"]) == ("5", "1"), proc.stdout
    return dict(model=model, data=data, wh=wh, facts=facts, stdout=proc.stdout)


def test_noop_rerun_needs_no_torch_no_model_no_prefect(finished):
    t0 = time.perf_counter()
    proc, loaded = blens("extract", "--model", str(finished["model"]), "--data", str(finished["data"]),
                         "--warehouse", str(finished["wh"]))
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert loaded == [], f"a rerun with nothing to do imported {loaded}"
    row = summary_row(proc.stdout)
    assert (row["records"], row["done before"], row["extracted"], row["skipped (errors)"]) == ("5", "5", "0", "1")
    assert "5 record(s) already in the warehouse (skipped), 0 to go" in proc.stderr
    run_line = next(line for line in proc.stdout.splitlines() if line.startswith("run "))
    assert run_line in finished["stdout"], "the same run as the one that extracted them"
    assert "rank_equals_length" in proc.stdout
    assert seconds < 30, seconds  # it was 12-20 s with the model and Prefect; ~1 s now (slack: busy CI)


def test_a_changed_record_is_still_extracted(finished, tmp_path):
    facts = [dict(f) for f in finished["facts"]]
    facts[2]["target_new"] = "Berlin"
    data = tmp_path / "changed.json"
    write_source(data, facts)
    wh = tmp_path / "wh"
    shutil.copytree(finished["wh"], wh)
    proc, loaded = blens("extract", "--model", str(finished["model"]), "--data", str(data), "--warehouse", str(wh))
    assert proc.returncode == 0, proc.stderr
    assert "torch" in loaded and "prefect" not in loaded  # a plain local run: the run layer without Prefect
    row = summary_row(proc.stdout)
    assert (row["done before"], row["extracted"]) == ("4", "1")


def _decide(finished, **changes):
    from blens.extract.config import ExtractConfig
    from blens.run.resume import nothing_to_do
    from blens.extract.sources import load_records

    cfg = ExtractConfig(**{"model": str(finished["model"]), "data": str(finished["data"]),
                           "warehouse": str(finished["wh"]), **changes})
    return nothing_to_do(cfg, load_records(cfg.data, limit=cfg.limit))


def test_nothing_to_do_only_when_exact(finished, tmp_path):
    done = _decide(finished)
    assert done is not None and done[0].n_done_before == 5
    assert _decide(finished, limit=3) is None, "a run with other data (fingerprint) was never registered"
    assert _decide(finished, force=True) is None
    assert _decide(finished, vectors="spanning") is None, "stored without vectors: spanning needs work"
    assert _decide(finished, top_k=5) is None, "another top-k is another result"
    assert _decide(finished, shard="0/2") is not None, "a shard of finished records is finished"
    assert _decide(finished, warehouse=str(tmp_path / "none")) is None
    assert not (tmp_path / "none").exists(), "deciding never creates a warehouse"

    new_reject = tmp_path / "more-rejects.json"
    write_source(new_reject, finished["facts"], extra=({"case_id": 99, "prompt": "no subject here"},
                                                       {"case_id": 98, "subject": "x"}))
    assert _decide(finished, data=str(new_reject)) is None, "a rejected record not yet in errors gets registered"


def test_a_changed_model_file_is_not_nothing_to_do(finished):
    meta = finished["model"] / "blens.json"
    original = meta.read_text()
    try:
        meta.write_text(json.dumps({"source": "tiny.gguf", "gguf_sha256": "b" * 64}))
        assert _decide(finished) is None
    finally:
        meta.write_text(original)
    assert _decide(finished) is not None


def test_what_the_files_say_is_what_the_loader_reports(finished, tiny_model_dir, tokenizer, tmp_path):
    """The fast path's revision and lens sites (part of every key) must be the ones load_model reports, or keys
    would differ: for a Llama directory with and without blens.json, and a Gemma 3 one (a third lens site)."""
    from types import SimpleNamespace

    from builders import tiny_gemma

    from blens.extract.adapters import family_for, lens_sites
    from blens.extract.models import load_model
    from blens.extract.registry import local_model_dir, model_type_of, revision_without_loading

    gemma_dir = tmp_path / "tiny-gemma"
    tiny_gemma(len(tokenizer), tokenizer.pad_token_id).save_pretrained(gemma_dir)
    tokenizer.save_pretrained(gemma_dir)
    for path in (finished["model"], tiny_model_dir, gemma_dir):
        lm = load_model(str(path))
        assert revision_without_loading(str(path)) == lm.revision
        family = family_for(SimpleNamespace(model_type=model_type_of(local_model_dir(str(path)))))
        assert lens_sites(family) == lm.view.lens_sites
    assert "resid_post_vjp" in lens_sites(family)
    assert revision_without_loading(str(finished["model"])) == "tiny.gguf@sha256:" + "a" * 16
    assert revision_without_loading("some-org/some-model") is None  # a hub name: only the hub knows
    inside_snapshot = tmp_path / "hub" / "models--x--y" / "snapshots" / ("c" * 40)
    shutil.copytree(tiny_model_dir, inside_snapshot)
    assert revision_without_loading(str(inside_snapshot)) is None  # transformers may read a commit from the path


def test_another_family_in_the_same_place_is_not_nothing_to_do(finished):
    """Same path, same blens.json, but config.json now says Gemma 3: its results have other keys."""
    config = finished["model"] / "config.json"
    original = config.read_text()
    try:
        config.write_text(original.replace('"model_type": "llama"', '"model_type": "gemma3_text"'))
        assert '"gemma3_text"' in config.read_text()
        assert _decide(finished) is None
    finally:
        config.write_text(original)
    assert _decide(finished) is not None


def test_sql_imports_nothing_heavy(finished):
    proc, loaded = blens("sql", "SELECT count(*) AS n FROM prompts", "--warehouse", str(finished["wh"]),
                         "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["n", "5"]
    assert loaded == [], f"blens sql imported {loaded}"


def test_extensions_cannot_be_loaded_unsigned_after_attach(finished):
    from blens.store.connect import connect

    con = connect(finished["wh"])
    try:
        assert con.execute("SELECT current_setting('allow_unsigned_extensions')").fetchone()[0] is False
        with pytest.raises(Exception, match="allow_unsigned_extensions"):
            con.execute("SET allow_unsigned_extensions = true")
    finally:
        con.close()


def _offline_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: unreachable, with or without a network
    env["HF_HUB_CACHE"] = str(tmp_path / "empty-hub-cache")
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(proxy, None)
    return env


def test_offline_hub_name_is_one_line_at_once(tmp_path, records_file):
    t0 = time.perf_counter()
    proc, loaded = blens("extract", "--model", "gpt2", "--data", str(records_file), "--warehouse",
                         str(tmp_path / "wh"), env=_offline_env(tmp_path), timeout=120)
    seconds = time.perf_counter() - t0
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("LOADED=")]
    assert proc.returncode == 2
    assert len(lines) == 1 and "cannot load model 'gpt2'" in lines[0] and "cannot be reached" in lines[0], lines
    assert "torch" not in loaded, "the hub is asked before torch is imported"
    assert not (tmp_path / "wh").exists()
    assert seconds < 10, seconds  # the hub client's retries took 25 s; the probe answers in about 1 s


def test_offline_hub_name_in_the_cache_loads_from_it(tmp_path, monkeypatch):
    from blens.extract import hub

    env = _offline_env(tmp_path)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", env["HF_ENDPOINT"])
    monkeypatch.setenv("HF_HUB_CACHE", env["HF_HUB_CACHE"])
    snapshot = Path(env["HF_HUB_CACHE"]) / "models--some-org--cached" / "snapshots" / ("d" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    hub.check_hub_model("some-org/cached")  # no error: transformers can load it from the cache
    with pytest.raises(hub.ModelLoadError, match="cannot be reached"):
        hub.check_hub_model("some-org/not-cached")


def test_hub_probe_goes_through_the_proxy(monkeypatch):
    from blens.extract import hub

    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    assert hub.unreachable("https://example.invalid") is not None  # the proxy refuses: no DNS lookup of the host
