"""Hostile input (issue 13): nothing lost to one bad record, no silent acceptance, no traceback for a user error.

Each case is a record or a file a real export can contain. Record-level problems must become ``errors`` rows
naming the field while the good records are saved; whole-source problems must be found before a model is
loaded and reported in one line. CLI cases run ``blens`` in-process (through the same guard) on the tiny random Llama.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from builders import FACTS, ROOT, blens_in_process
from blens.extract.records import DataSourceError, EditRecord, RecordError, record_from_dict
from blens.extract.sources import load_records

GOOD = [{"case_id": c, "prompt": p, "subject": s, "target_new": t, "ground_truth": g} for c, p, s, t, g in FACTS]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
NO_MODEL = "/nonexistent/blens-model-that-must-never-be-loaded"  # a check that runs first never reaches it


def blens(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return blens_in_process(*args, cwd=ROOT)  # the guard's real-process exits: test_user_error_escaping_..., below


def sql(wh: Path, query: str) -> list[str]:
    r = blens("sql", query, "--warehouse", str(wh), "--format", "csv", timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[1:]  # without the header


def write_json(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def good(case_id: int = 0, **overrides: Any) -> dict[str, Any]:
    return {**GOOD[0], "case_id": case_id, **overrides}


def only_error(path: Path, n_good: int) -> RecordError:
    result = load_records(path)
    assert len(result.records) == n_good, result.errors
    assert len(result.errors) == 1, result.errors
    err = result.errors[0]
    assert "\n" not in err.message and len(err.message) < 200
    return err


# --- 1. case_id outside int64 -------------------------------------------------------------------------

@pytest.mark.parametrize("case_id", [2**63, -(2**63) - 1, 2**70, "99999999999999999999", "-9223372036854775809"])
def test_case_id_outside_int64_is_an_error_row(tmp_path: Path, case_id: Any) -> None:
    path = write_json(tmp_path / "cf.json", [good(0), good(case_id), good(2)])
    err = only_error(path, 2)
    assert (err.field, err.case_id, err.source) == ("case_id", None, "cf.json#1")  # NULL: int64 cannot hold it
    assert str(case_id).strip() in err.message and "64-bit" in err.message


def test_int64_bounds_themselves_are_valid_case_ids() -> None:
    for case_id in (2**63 - 1, -(2**63), "9223372036854775807"):
        rec = record_from_dict(good(case_id), "x")
        assert isinstance(rec, EditRecord) and rec.case_id == int(case_id)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_integer_literal_longer_than_python_parses_is_one_error_row(tmp_path: Path, suffix: str) -> None:
    """json.loads raises ValueError (not JSONDecodeError) on an integer of more than 4,300 digits: it used to
    take the whole file down with a traceback. Now: the record's case_id error, shown shortened."""
    huge = "7" * 5000
    rows = [json.dumps(good(0)), json.dumps(good(1)).replace('"case_id": 1', f'"case_id": {huge}'),
            json.dumps(good(2, prompt=None)).replace('"prompt": null', f'"prompt": {huge}')]
    path = tmp_path / f"cf{suffix}"
    path.write_text("[" + ",".join(rows) + "]" if suffix == ".json" else "\n".join(rows) + "\n")
    result = load_records(path)
    assert [r.case_id for r in result.records] == [0]
    (e1, e2) = result.errors
    assert (e1.field, e1.case_id) == ("case_id", None) and "(5000 digits)" in e1.message
    assert (e2.field, e2.case_id) == ("prompt", 2) and "must be a string, got int" in e2.message
    assert all(len(e.message) < 200 for e in result.errors)


def test_json_nested_too_deeply_to_parse_is_an_error_row_or_one_source_error(tmp_path: Path) -> None:
    """json.loads raises RecursionError (not a JSONDecodeError) on deep nesting: a line of it in a .jsonl file
    used to end the whole run with a traceback; a .json file of it is unusable as a whole."""
    deep = "[" * 100_000 + "]" * 100_000
    lines = tmp_path / "cf.jsonl"
    lines.write_text("\n".join([json.dumps(good(0)), deep, json.dumps(good(2))]) + "\n")
    result = load_records(lines)
    assert [r.case_id for r in result.records] == [0, 2]
    assert [(e.field, e.source) for e in result.errors] == [("json", "cf.jsonl:2")]
    assert "too deeply" in result.errors[0].message
    whole = tmp_path / "deep.json"
    whole.write_text(deep)
    with pytest.raises(DataSourceError, match=r"deep\.json nests JSON .* too deeply"):
        load_records(whole)


def test_cli_saves_the_good_records_next_to_a_huge_case_id(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = write_json(tmp_path / "cf.json", GOOD + [{**GOOD[0], "case_id": 2**70}])
    wh = tmp_path / "wh"
    r = blens("extract", "--model", str(tiny_model_dir), "--data", str(data), "--warehouse", str(wh),
              "--threads", "1", "--top-k", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert sql(wh, "SELECT count(*) FROM prompts") == ["5"]
    rows = sql(wh, "SELECT coalesce(CAST(case_id AS VARCHAR), 'NULL'), stage, field, message FROM errors")
    assert len(rows) == 1 and rows[0].startswith("NULL,load,case_id,") and str(2**70) in rows[0], rows


# --- 4. a subject that does not occur in its prompt ---------------------------------------------------

def test_easyedit_subject_missing_from_prompt_is_an_error_row(tmp_path: Path) -> None:
    path = write_json(tmp_path / "cf.json", [good(0), good(1, subject="Marie Curie"), good(2)])
    err = only_error(path, 2)
    assert (err.field, err.case_id) == ("subject", 1)
    assert "'Marie Curie'" in err.message and "does not occur in the prompt" in err.message


def test_subject_match_is_the_one_prepare_uses() -> None:
    from blens.extract import prepare, records

    assert prepare.subject_span is records.subject_span
    rec = record_from_dict(good(0, subject="danielle DARRIEUX"), "x")  # case-insensitive, like the segments
    assert isinstance(rec, EditRecord)
    assert records.subject_span(rec.prompt, rec.subject) is not None


# --- 5. text with no visible character ----------------------------------------------------------------

@pytest.mark.parametrize("text", ["\u200b", "\u200b\u200c\u200d", "\ufeff", "\u2060 \u200b", "\u3164", "\ufe0f",
                                  "\u00ad", "\u202e\u202c", "\x07"])
def test_target_of_only_invisible_characters_is_an_error_row(tmp_path: Path, text: str) -> None:
    path = write_json(tmp_path / "cf.json", [good(0), good(1, target_new=text), good(2)])
    err = only_error(path, 2)
    assert (err.field, err.case_id) == ("target_new", 1)
    assert "target_new has no visible characters" in err.message and "U+" in err.message


@pytest.mark.parametrize("field,key", [("prompt", "prompt"), ("subject", "subject"), ("target_true", "ground_truth"),
                                       ("rephrase_prompts", "rephrase_prompt")])
def test_every_text_field_needs_a_visible_character(tmp_path: Path, field: str, key: str) -> None:
    path = write_json(tmp_path / "cf.json", [good(0), good(1, **{key: "\u200b\u2060"})])
    err = only_error(path, 1)
    assert (err.field, err.case_id) == (field, 1) and "no visible characters" in err.message


def test_invisible_characters_next_to_visible_ones_are_fine() -> None:
    rec = record_from_dict(good(0, target_new="\u200bEnglish", prompt="The mother tongue of Danielle Darrieux\u200e is"),
                           "x")
    assert isinstance(rec, EditRecord) and rec.target_new == "\u200bEnglish"


# --- 3. a prompt too long for one prompt's memory -----------------------------------------------------

def test_prompt_over_the_memory_limit_is_an_error_row_naming_count_limit_and_option(tokenizer) -> None:
    from blens.extract.prepare import DEFAULT_MAX_PROMPT_TOKENS, PreparedPrompt, prepare

    prompt = "Danielle Darrieux " + "and so on " * 1500 + "is"
    rec = EditRecord(case_id=7, prompt=prompt, subject="Danielle Darrieux", target_new="English",
                     target_true="French", source="cf.json#7")
    n = len(tokenizer(prompt)["input_ids"])
    assert n > DEFAULT_MAX_PROMPT_TOKENS == 1024
    err = prepare(rec, tokenizer, None)  # no context limit: the memory bound alone refuses it, by default
    assert isinstance(err, RecordError)
    assert (err.field, err.case_id, err.source) == ("prompt", 7, "cf.json#7")
    assert f"{n} tokens" in err.message and "1024" in err.message and "--max-prompt-tokens" in err.message
    assert isinstance(prepare(rec, tokenizer, None, max_prompt_tokens=n), PreparedPrompt)  # the limit is inclusive
    assert isinstance(prepare(rec, tokenizer, None, max_prompt_tokens=None), PreparedPrompt)
    short = prepare(rec, tokenizer, None, max_prompt_tokens=n - 1)
    assert isinstance(short, RecordError) and f"limit of {n - 1} tokens" in short.message


def test_the_model_context_is_still_checked_first(tokenizer) -> None:
    from blens.extract.prepare import prepare

    rec = EditRecord(case_id=1, prompt="Paris " * 100 + "is", subject="Paris", target_new="Rome", target_true="France")
    err = prepare(rec, tokenizer, 64, max_prompt_tokens=80)
    assert isinstance(err, RecordError) and "longer than the model's context of 64" in err.message


# --- 6. an empty or wholly rejected source ------------------------------------------------------------

def test_describe_source_counts_an_empty_source(tmp_path: Path) -> None:
    from blens.extract.sources import describe_source

    for path in (write_json(tmp_path / "empty.json", []), tmp_path / "empty.jsonl"):
        path.touch()
        s = describe_source(path)
        assert (s.n_records, s.n_errors, s.empty, s.all_rejected) == (0, 0, True, False)
        assert s.message() == f"0 records in {path} (the source holds no records)"


def test_describe_source_says_every_line_was_rejected(tmp_path: Path) -> None:
    from blens.extract.sources import describe_source

    path = tmp_path / "binary.jsonl"
    path.write_bytes(b"\xff\xfe\x00\x01\n\x89PNG\r\n\x1a\n\xde\xad\xbe\xef\n")
    s = describe_source(path)
    assert (s.n_records, s.empty, s.all_rejected) == (0, True, True) and s.n_errors == 4
    assert s.message().startswith(f"0 records in {path} (4 rejected, first: binary.jsonl:1 json: line is not UTF-8")
    assert "\n" not in s.message()


def test_describe_source_with_good_records_and_limit(tmp_path: Path) -> None:
    from blens.extract.sources import describe_source

    path = write_json(tmp_path / "cf.json", GOOD + [good(99, target_new="")])
    s = describe_source(path)
    assert (s.n_records, s.n_errors, s.empty) == (5, 1, False)
    assert s.first_errors[0].field == "target_new" and s.message().startswith(f"5 records in {path} (1 rejected")
    assert describe_source(path, limit=2).n_records == 2


@pytest.mark.parametrize("content", [b"[]", b"", b"\xff\xfe\n\x89PNG\r\n"])
def test_cli_says_0_records_before_loading_a_model(tmp_path: Path, content: bytes) -> None:
    data = tmp_path / ("cf.json" if content == b"[]" else "cf.jsonl")
    data.write_bytes(content)
    r = blens("extract", "--model", NO_MODEL, "--data", str(data), "--warehouse", str(tmp_path / "wh"), timeout=120)
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert any(f"0 records in {data}" in line for line in lines), lines
    assert "Traceback" not in r.stderr and NO_MODEL not in r.stderr
    assert r.returncode == (2 if content.startswith(b"\xff") else 0)  # every line rejected: a user error


# --- 7. one invalid file in a directory ----------------------------------------------------------------

def broken_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cf"
    folder.mkdir()
    write_json(folder / "a.json", GOOD)
    (folder / "b.json").write_text(json.dumps(GOOD)[:-30])
    return folder


def test_invalid_file_in_a_directory_is_found_before_the_first_record(tmp_path: Path) -> None:
    folder = broken_dir(tmp_path)
    with pytest.raises(DataSourceError, match=r"b\.json is not valid JSON"):
        load_records(folder, limit=1)  # the CLI's pre-model check: a.json alone is fine, the directory is not


def test_cli_rejects_a_directory_with_one_invalid_file_in_one_line_before_loading_the_model(tmp_path: Path) -> None:
    folder = broken_dir(tmp_path)
    wh = tmp_path / "wh"
    r = blens("extract", "--model", NO_MODEL, "--data", str(folder), "--warehouse", str(wh), timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and "b.json is not valid JSON" in lines[0], lines
    assert not wh.exists()


# --- the top-level guard: a user error never shows a traceback, a bug always does -------------------------

GUARDED = """
import sys
from blens.cli import app
from blens.extract.records import DataSourceError

@app.command("user-error")
def user_error():
    raise DataSourceError("data path vanished:\\n  /tmp/gone.json")

@app.command("bug")
def bug():
    raise KeyError("not a user error")

sys.argv[0] = "blens"
app()
"""


def test_user_error_escaping_any_command_is_one_red_line_and_exit_2() -> None:
    r = subprocess.run([sys.executable, "-c", GUARDED, "user-error"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert [line for line in r.stderr.splitlines() if line.strip()] == ["error: data path vanished: /tmp/gone.json"]


def test_a_bug_keeps_its_traceback() -> None:
    r = subprocess.run([sys.executable, "-c", GUARDED, "bug"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "KeyError: 'not a user error'" in r.stderr


def test_edit_flow_saves_the_good_records_next_to_a_huge_case_id(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The same record rules hold for editing (its flow loads records through the same load_records)."""
    from blens.edit.spec import EditConfig, EditSpec
    from blens.flows.edit_flow import edit_flow
    from blens.store.connect import connect

    data = write_json(tmp_path / "cf.json", GOOD + [{**GOOD[1], "case_id": -(2**64)}])
    wh = tmp_path / "wh"
    s = edit_flow(EditConfig(model=str(tiny_model_dir), data=str(data), specs=[EditSpec("none")], warehouse=str(wh),
                             batch_size=8))
    assert (s.n_records, s.n_load_errors) == (5, 1)
    con = connect(wh)
    errors = con.execute("SELECT case_id, stage, field, message FROM errors").fetchall()
    con.close()
    assert len(errors) == 1 and errors[0][:3] == (None, "load", "case_id") and str(-(2**64)) in errors[0][3]
