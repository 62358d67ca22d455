"""Inputs checked by type and size before they are read (issue 24): a FIFO or device named *.json, a file
larger than the limit, an over-long JSONL line, a prompt longer (in characters) than its token limit can
hold, and `--threads` beyond the cores. Each is one line or one `errors` row; nothing blocks or aborts."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest

from builders import ROOT, blens_in_process


def blens(*args) -> subprocess.CompletedProcess:
    return blens_in_process(*args, cwd=ROOT)


def open_fifo_for_writing(path) -> None:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.mark.parametrize("where", ["file", "in-directory"])
def test_a_fifo_named_json_is_refused_without_blocking(tmp_path, where):
    """It blocked forever (opening a FIFO waits for a writer). The model path does not exist: a model load
    would fail the test, so the refusal comes first."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([{"case_id": 0, "prompt": "Paris is the capital of",
                                                "subject": "Paris", "target_new": "Italy", "ground_truth": "France"}]))
    os.mkfifo(folder / "b.json")
    data = folder / "b.json" if where == "file" else folder
    # In-process, a read that blocks would hang the suite: after 60 s a writer opens the FIFO (the read then
    # ends and the assertions fail) instead.
    unblock = threading.Timer(60, open_fifo_for_writing, (folder / "b.json",))
    unblock.daemon = True
    unblock.start()
    try:
        r = blens("extract", "--data", str(data), "--model", str(tmp_path / "no-model"), "--warehouse", str(tmp_path / "wh"))
    finally:
        unblock.cancel()
    assert r.returncode == 2 and "b.json is a FIFO" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "wh").exists()


def test_devices_and_files_over_the_size_limit_are_refused(tmp_path, monkeypatch):
    from blens.extract import sources
    from blens.extract.records import DataSourceError

    with pytest.raises(DataSourceError, match="character device"):
        sources.check_regular_file(sources.Path("/dev/zero"))
    big = tmp_path / "big.jsonl"
    big.write_bytes(b'{"case_id": 1}\n' * 100)
    monkeypatch.setattr(sources, "MAX_SOURCE_BYTES", 1000)
    with pytest.raises(DataSourceError, match="more than the 1,000-byte limit"):
        sources.load_records(big)


def test_an_over_long_jsonl_line_is_one_error_row_and_the_rest_load(tmp_path, monkeypatch):
    from blens.extract import sources

    ok = {"case_id": 1, "prompt": "Paris is the capital of", "subject": "Paris", "target_new": "Italy",
          "ground_truth": "France"}
    path = tmp_path / "cf.jsonl"
    path.write_text(json.dumps(ok) + "\n" + json.dumps(dict(ok, case_id=2, prompt="x" * 5000)) + "\n")
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 4096)
    res = sources.load_records(path)
    assert [r.case_id for r in res.records] == [1]
    assert [(e.field, e.source) for e in res.errors] == [("json", "cf.jsonl:2")]
    assert "more than the 4,096-byte limit" in res.errors[0].message


def test_a_prompt_too_long_in_characters_is_refused_before_tokenizing(tokenizer):
    """A 200 MB prompt aborted the process inside the tokenizer; now the character count alone refuses it."""
    from blens.extract.prepare import longest_token, prepare
    from blens.extract.records import EditRecord, RecordError

    class Guard:
        def __init__(self, tok):
            self.tok = tok

        def get_vocab(self):
            return self.tok.get_vocab()

        def __call__(self, text, **kw):
            if len(text) > 100_000:
                raise AssertionError("tokenized a prompt that the character count alone refuses")
            return self.tok(text, **kw)

        def __getattr__(self, name):
            return getattr(self.tok, name)

    guard = Guard(tokenizer)
    prompt = "Paris " * 1_000_000 + "is the capital of"
    rec = EditRecord(case_id=7, prompt=prompt, subject="Paris", target_new="Italy", target_true="France", source="t")
    err = prepare(rec, guard, 64, max_prompt_tokens=1024)
    assert isinstance(err, RecordError) and err.field == "prompt" and "before tokenizing" in err.message
    # the bound is exact: a prompt of just that many characters is still tokenized and judged by its tokens
    fits = EditRecord(case_id=8, prompt="Paris is the capital of", subject="Paris", target_new="Italy",
                      target_true="France", source="t")
    assert not isinstance(prepare(fits, guard, 64, max_prompt_tokens=1024), RecordError)
    assert longest_token(tokenizer) >= max(len(t) for t in tokenizer.get_vocab())


def test_threads_beyond_the_cores_is_refused():
    cores = len(os.sched_getaffinity(0))
    r = blens("extract", "--threads", str(cores + 1), "--data", "x.json")
    assert r.returncode == 2 and "--threads" in r.stderr and "Traceback" not in r.stderr
