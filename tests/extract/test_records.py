"""Tests for extract.records: layouts, file forms, validation rows, fingerprints, hub fallback."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from blens.extract.records import (
    DataSourceError,
    EditRecord,
    RecordError,
    fingerprint_records,
    record_from_dict,
)
from blens.extract.sources import load_records

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared/data/counterfact"


def easyedit(case_id: Any = 0, **overrides: Any) -> dict[str, Any]:
    raw = {
        "case_id": case_id,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "English",
        "ground_truth": "French",
        "rephrase_prompt": "Danielle Darrieux was born and raised speaking",
        "locality_prompt": "The mother tongue of Léon Blum is",
        "locality_ground_truth": "French",
    }
    raw.update(overrides)
    return raw


def rome(case_id: Any = 0) -> dict[str, Any]:
    return {
        "case_id": case_id,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": ["Danielle Darrieux was born and raised speaking"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
        "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }


def write_json(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- layouts ---------------------------------------------------------------------------------------


def test_both_layouts_give_identical_records() -> None:
    a = record_from_dict(easyedit(0), "a.json#0")
    b = record_from_dict(rome(0), "b.json#0")
    assert isinstance(a, EditRecord) and isinstance(b, EditRecord)
    assert dataclasses.replace(a, source="") == dataclasses.replace(b, source="")
    assert a == EditRecord(
        case_id=0,
        prompt="The mother tongue of Danielle Darrieux is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        rephrase_prompts=("Danielle Darrieux was born and raised speaking",),
        locality_prompts=("The mother tongue of Léon Blum is",),
        locality_ground_truths=("French",),
        source="a.json#0",
    )
    assert fingerprint_records([a]) == fingerprint_records([b])


def test_rome_placeholder_is_filled_and_whitespace_normalised() -> None:
    raw = rome(3)
    raw["requested_rewrite"]["prompt"] = "{}, whose mother tongue is  "
    raw["requested_rewrite"]["target_new"]["str"] = " English "
    raw["neighborhood_prompts"] = ["A is", "B is"]
    rec = record_from_dict(raw, "x")
    assert isinstance(rec, EditRecord)
    assert rec.prompt == "Danielle Darrieux, whose mother tongue is"
    assert rec.target_new == "English"
    assert rec.locality_prompts == ("A is", "B is")
    assert rec.locality_ground_truths == ("French", "French")  # neighbours share the true object


def test_rome_prompt_without_placeholder_but_with_subject_is_accepted() -> None:
    raw = rome(1)
    raw["requested_rewrite"]["prompt"] = "Danielle Darrieux speaks"
    rec = record_from_dict(raw, "x")
    assert isinstance(rec, EditRecord) and rec.prompt == "Danielle Darrieux speaks"


def test_easyedit_list_fields_and_shared_ground_truth() -> None:
    rec = record_from_dict(
        easyedit(5, rephrase_prompt=["r1", "r2 "], locality_prompt=["l1", "l2"], locality_ground_truth="French"),
        "x",
    )
    assert isinstance(rec, EditRecord)
    assert rec.rephrase_prompts == ("r1", "r2")
    assert rec.locality_prompts == ("l1", "l2")
    assert rec.locality_ground_truths == ("French", "French")


def test_optional_fields_may_be_absent_or_null() -> None:
    raw = easyedit(2, rephrase_prompt=None)
    del raw["locality_prompt"], raw["locality_ground_truth"]
    rec = record_from_dict(raw, "x")
    assert isinstance(rec, EditRecord)
    assert rec.rephrase_prompts == rec.locality_prompts == rec.locality_ground_truths == ()


def test_int_valued_string_case_id_is_accepted() -> None:
    rec = record_from_dict(easyedit("12"), "x")
    assert isinstance(rec, EditRecord) and rec.case_id == 12


def test_unusual_but_valid_unicode_and_long_prompts_load(tmp_path: Path) -> None:
    rtl = "\u200fمرحبا\u200e"
    long_prompt = "Danielle Darrieux " + "x" * 10_000
    path = write_json(tmp_path / "u.json", [
        easyedit(0, subject=rtl, prompt=f"The language of {rtl} is"),
        easyedit(1, target_new="Français 🇫🇷", ground_truth="e\u0301"),
        easyedit(2, prompt=long_prompt),
    ])
    result = load_records(path)
    assert result.errors == []
    assert [r.subject for r in result.records][0] == rtl
    assert result.records[1].target_new == "Français 🇫🇷"
    assert result.records[2].prompt == long_prompt


# --- file forms ------------------------------------------------------------------------------------


def test_json_list(tmp_path: Path) -> None:
    result = load_records(write_json(tmp_path / "cf.json", [easyedit(0), rome(1)]))
    assert [r.case_id for r in result.records] == [0, 1]
    assert [r.source for r in result.records] == ["cf.json#0", "cf.json#1"]
    assert result.errors == []
    assert result.source == str(tmp_path / "cf.json")


@pytest.mark.parametrize("key", ["data", "records"])
def test_dict_wrapped_list(tmp_path: Path, key: str) -> None:
    result = load_records(write_json(tmp_path / "cf.json", {"version": 1, key: [easyedit(0), easyedit(1)]}))
    assert [r.case_id for r in result.records] == [0, 1] and result.errors == []


def test_json_without_a_record_list_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="cf.json"):
        load_records(write_json(tmp_path / "cf.json", {"rows": []}))


def test_jsonl_bad_line_is_an_error_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "cf.jsonl", [
        json.dumps(easyedit(0)),
        '{"case_id": 1, "prompt": ',
        "",
        json.dumps(rome(2)),
    ])
    result = load_records(path)
    assert [r.case_id for r in result.records] == [0, 2]
    assert [r.source for r in result.records] == ["cf.jsonl:1", "cf.jsonl:4"]
    assert len(result.errors) == 1
    err = result.errors[0]
    assert (err.field, err.source, err.case_id) == ("json", "cf.jsonl:2", None)


def test_directory_reads_json_and_jsonl_sorted_by_name(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "b.jsonl", [json.dumps(easyedit(2))])
    write_json(tmp_path / "a.json", [easyedit(0), easyedit(1)])
    (tmp_path / "notes.txt").write_text("ignored")
    result = load_records(tmp_path)
    assert [r.source for r in result.records] == ["a.json#0", "a.json#1", "b.jsonl:1"]


def test_empty_directory_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="no .json or .jsonl"):
        load_records(tmp_path)


def test_unsupported_file_type_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "cf.csv"
    path.write_text("case_id,prompt\n")
    with pytest.raises(DataSourceError, match="unsupported"):
        load_records(path)


def test_limit_keeps_first_valid_records_and_stops_scanning(tmp_path: Path) -> None:
    rows = [easyedit(0), easyedit(1, target_new=""), easyedit(2), easyedit(3), easyedit(4, target_new="")]
    path = write_json(tmp_path / "cf.json", rows)
    result = load_records(path, limit=2)
    assert [r.case_id for r in result.records] == [0, 2]
    assert [e.source for e in result.errors] == ["cf.json#1"]  # #4 was never scanned
    assert load_records(path, limit=0).records == []
    assert len(load_records(path, limit=100).records) == 3
    with pytest.raises(ValueError):
        load_records(path, limit=-1)


# --- validation ------------------------------------------------------------------------------------


def _rome_without_placeholder() -> dict[str, Any]:
    raw = rome(1)
    raw["requested_rewrite"]["prompt"] = "The mother tongue of this actress is"
    return raw


def _rome_target_without_str() -> dict[str, Any]:
    raw = rome(1)
    raw["requested_rewrite"]["target_new"] = {"id": "Q1860"}
    return raw


def _without(key: str) -> dict[str, Any]:
    raw = easyedit(1)
    del raw[key]
    return raw


BAD_RECORDS: dict[str, tuple[Any, str, int | None, str]] = {
    # name: (raw record placed at index 1 of a file, expected field, expected case_id, message part)
    "list_not_object": ([1, 2], "record", None, "record must be a JSON object"),
    "string_not_object": ("hello", "record", None, "record must be a JSON object"),
    "missing_case_id": (_without("case_id"), "case_id", None, "case_id is missing"),
    "text_case_id": (easyedit("twelve"), "case_id", None, "case_id must be an integer"),
    "bool_case_id": (easyedit(True), "case_id", None, "case_id must be an integer"),
    "float_case_id": (easyedit(1.5), "case_id", None, "case_id must be an integer"),
    "missing_prompt": (_without("prompt"), "prompt", 1, "prompt is missing"),
    "int_prompt": (easyedit(1, prompt=42), "prompt", 1, "prompt must be a string"),
    "empty_prompt": (easyedit(1, prompt=""), "prompt", 1, "prompt is empty"),
    "blank_subject": (easyedit(1, subject="  \t"), "subject", 1, "subject is empty"),
    "missing_subject": (_without("subject"), "subject", 1, "subject is missing"),
    "empty_target_new": (easyedit(1, target_new=""), "target_new", 1, "target_new is empty"),
    "blank_target_new": (easyedit(1, target_new="   "), "target_new", 1, "target_new is empty"),
    "null_target_new": (easyedit(1, target_new=None), "target_new", 1, "target_new is missing"),
    "missing_ground_truth": (_without("ground_truth"), "target_true", 1, "ground_truth is missing"),
    "list_ground_truth": (easyedit(1, ground_truth=["French"]), "target_true", 1, "ground_truth must be a"),
    "nul_in_prompt": (
        easyedit(1, prompt="The mother\x00 tongue of Danielle Darrieux is"), "prompt", 1, "prompt contains a NUL"),
    "lone_surrogate": (easyedit(1, target_new="Eng\ud800lish"), "target_new", 1, "target_new contains a lone"),
    "rephrase_dict": (easyedit(1, rephrase_prompt={"a": 1}), "rephrase_prompts", 1, "rephrase_prompt must be"),
    "locality_int_item": (easyedit(1, locality_prompt=["ok", 3]), "locality_prompts", 1, "locality_prompt[1] must"),
    "locality_length_mismatch": (
        easyedit(1, locality_prompt=["a", "b"], locality_ground_truth=["x"]),
        "locality_ground_truths", 1, "differ in length (1 vs 2)"),
    "rome_no_placeholder": (_rome_without_placeholder(), "prompt", 1, "has no {} placeholder"),
    "rome_target_without_str": (
        _rome_target_without_str(), "target_new", 1, "requested_rewrite.target_new.str is missing"),
    "rome_rewrite_not_object": (
        {"case_id": 1, "requested_rewrite": "x"}, "requested_rewrite", 1, "requested_rewrite must be a JSON object"),
    "rome_paraphrases_not_list": (
        {**rome(1), "paraphrase_prompts": 7}, "rephrase_prompts", 1, "paraphrase_prompts must be"),
}


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_each_bad_record_is_one_error_and_the_rest_load(tmp_path: Path, name: str) -> None:
    bad, field, case_id, message_part = copy.deepcopy(BAD_RECORDS[name])
    # json.dumps escapes a lone surrogate as "\ud800", which json.loads turns back into one.
    path = write_json(tmp_path / "cf.json", [easyedit(0), bad, rome(2)])
    result = load_records(path)
    assert [r.case_id for r in result.records] == [0, 2]
    assert len(result.errors) == 1
    err = result.errors[0]
    assert isinstance(err, RecordError)
    assert (err.field, err.case_id, err.source) == (field, case_id, "cf.json#1")
    assert err.message and "\n" not in err.message and "\x00" not in err.message
    err.message.encode("utf-8")  # messages stay printable even for NUL/surrogate input
    assert message_part in err.message


def test_duplicate_case_ids_keep_first_occurrence(tmp_path: Path) -> None:
    path = write_json(tmp_path / "counterfact.json", [
        easyedit(5), easyedit(17, target_new="A"), easyedit(6), easyedit(17, target_new="B"), rome(17),
    ])
    result = load_records(path)
    assert [r.case_id for r in result.records] == [5, 17, 6]
    assert result.records[1].target_new == "A"
    assert [(e.field, e.case_id, e.source) for e in result.errors] == [
        ("case_id", 17, "counterfact.json#3"), ("case_id", 17, "counterfact.json#4"),
    ]
    assert result.errors[0].message == "case_id 17 appears twice (first at counterfact.json#1)"


def test_duplicates_across_files_in_a_directory(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", [easyedit(1)])
    write_jsonl(tmp_path / "b.jsonl", [json.dumps(easyedit(1))])
    result = load_records(tmp_path)
    assert len(result.records) == 1
    assert [e.source for e in result.errors] == ["b.jsonl:1"]
    assert "a.json#0" in result.errors[0].message


# --- whole-source failures -------------------------------------------------------------------------


def test_truncated_json_raises_with_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([easyedit(0), easyedit(1)], indent=2)[:-40], encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"broken\.json.*line \d+, column \d+"):
        load_records(path)


def test_non_utf8_json_raises(tmp_path: Path) -> None:
    path = tmp_path / "latin.json"
    path.write_bytes(b'[{"case_id": 0, "prompt": "caf\xe9"}]')
    with pytest.raises(DataSourceError, match="latin.json"):
        load_records(path)


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to use the hub fail the test."""
    fake = types.ModuleType("datasets")

    def load_dataset(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the hub must not be touched for a path")

    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)


@pytest.mark.parametrize("given", ["missing.json", "nowhere/deeper/cf", "./cf", "data.jsonl"])
def test_missing_path_raises_without_touching_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hub: None, given: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataSourceError, match="data path not found"):
        load_records(given)
    with pytest.raises(DataSourceError, match="data path not found"):
        load_records(tmp_path / given)  # a PathLike is always a local path
    with pytest.raises(DataSourceError, match="data path not found"):
        load_records(str(tmp_path / given), limit=0)


def test_hub_id_and_split_are_passed_to_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    fake = types.ModuleType("datasets")

    def load_dataset(name: str, split: str) -> list[dict[str, Any]]:
        calls.append((name, split))
        return [easyedit(0), rome(1), easyedit(2, target_new="")]

    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    result = load_records("someone/counterfact:validation")
    assert calls == [("someone/counterfact", "validation")]
    assert [r.source for r in result.records] == ["someone/counterfact:validation#0", "someone/counterfact:validation#1"]
    assert [e.field for e in result.errors] == ["target_new"]
    assert result.source == "someone/counterfact:validation"
    load_records("counterfact")
    assert calls[-1] == ("counterfact", "train")


def test_hub_id_offline_raises_data_source_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so the id cannot resolve to a local folder
    # The flags are read at import time; patch them too in case another test imported datasets first.
    try:
        import datasets.config
        import huggingface_hub.constants

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass  # without datasets the loader still has to fail with DataSourceError
    with pytest.raises(DataSourceError) as info:
        load_records("blens-no-such-owner/no-such-counterfact-xyz:train")
    message = str(info.value)
    assert "\n" not in message
    assert "not found locally" in message and "hub" in message
    assert "blens-no-such-owner/no-such-counterfact-xyz" in message


# --- fingerprint -----------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_order_and_content_sensitive(tmp_path: Path) -> None:
    rows = [easyedit(0), easyedit(1, target_new="German"), easyedit(2)]
    first = load_records(write_json(tmp_path / "a.json", rows))
    again = load_records(write_json(tmp_path / "b.json", rows))  # other name: source is not identity
    lines = load_records(write_jsonl(tmp_path / "c.jsonl", [json.dumps(r) for r in rows]))
    assert len(first.fingerprint) == 64 and int(first.fingerprint, 16) >= 0
    assert first.fingerprint == again.fingerprint == lines.fingerprint
    assert first.fingerprint == fingerprint_records(first.records)

    reordered = load_records(write_json(tmp_path / "d.json", [rows[1], rows[0], rows[2]]))
    assert reordered.fingerprint != first.fingerprint

    changed = copy.deepcopy(rows)
    changed[2]["locality_ground_truth"] = "Spanish"
    assert load_records(write_json(tmp_path / "e.json", changed)).fingerprint != first.fingerprint

    rec = first.records[0]
    assert fingerprint_records([dataclasses.replace(rec, target_new="English ")]) != fingerprint_records([rec])
    assert fingerprint_records([]) == fingerprint_records([])


# --- the real data ---------------------------------------------------------------------------------


def test_real_counterfact_edit_1k_loads_cleanly() -> None:
    path = DATA_DIR / "counterfact-edit-1k.json"
    if not path.is_file():
        pytest.skip(f"real CounterFact data not present at {path}")
    result = load_records(path)
    assert len(result.records) == 1000
    assert result.errors == []
    assert len({r.case_id for r in result.records}) == 1000
    assert load_records(path).fingerprint == result.fingerprint
