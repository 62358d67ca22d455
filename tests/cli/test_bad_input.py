"""Bad input on purpose: every malformed record gets a clear error row, the good ones all land, nothing
crashes; a truncated JSON file stops the CLI with one line; half-written files never reach the views."""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pyarrow.parquet as pq

from builders import FACTS, ROOT, blens_in_process
from blens.extract.config import ExtractConfig
from blens.store.connect import connect

GOOD = [{"case_id": c, "prompt": p, "subject": s, "target_new": t, "ground_truth": g} for c, p, s, t, g in FACTS]
ODD_BUT_VALID = [  # unicode oddities that are still fine records: they must land, not error
    {"case_id": 20, "prompt": "Ünïcödé 🤖 e\u0301 مرحبا is located in", "subject": "Ünïcödé 🤖", "target_new": "日本",
     "ground_truth": "Österreich"},
    {"case_id": 21, "prompt": "Zero\u200bwidth\ufeff and \u202eRTL-override\u202c live in", "subject": "Zero\u200bwidth",
     "target_new": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ground_truth": "ascii"},
    {"case_id": "22", "prompt": "A string case id is in", "subject": "A string", "target_new": "Lyon",  # "22" -> 22
     "ground_truth": "Nice"},
]
BAD = [  # (record, expected (case_id, stage, field), words the message must contain)
    ({"case_id": 100, "prompt": "No target here", "subject": "No", "ground_truth": "x"},
     (100, "load", "target_new"), "missing"),
    ({"case_id": 101, "prompt": 12345, "subject": "x", "target_new": "a", "ground_truth": "b"},
     (101, "load", "prompt"), "must be a string"),
    ({"case_id": 102, "prompt": "List target", "subject": "List", "target_new": ["a"], "ground_truth": "b"},
     (102, "load", "target_new"), "must be a string"),
    ({"case_id": 103, "prompt": "Empty subject", "subject": "", "target_new": "a", "ground_truth": "b"},
     (103, "load", "subject"), "empty"),
    ({"case_id": 104, "prompt": "   ", "subject": "x", "target_new": "a", "ground_truth": "b"},
     (104, "load", "prompt"), "empty"),
    ({"case_id": 105, "prompt": "Paris " * 100 + "is in", "subject": "Paris", "target_new": "a", "ground_truth": "b"},
     (105, "prepare", "prompt"), "longer than the model's context of 64"),
    ({"case_id": 106, "prompt": "Lone \ud800 surrogate", "subject": "Lone", "target_new": "a", "ground_truth": "b"},
     (106, "load", "prompt"), "lone surrogate"),
    ({"case_id": 107, "prompt": "NUL \x00 inside", "subject": "NUL", "target_new": "a", "ground_truth": "b"},
     (107, "load", "prompt"), "NUL"),
    ({"case_id": 1, "prompt": "A duplicate of case 1", "subject": "A", "target_new": "a", "ground_truth": "b"},
     (1, "load", "case_id"), "appears twice"),
    ({"case_id": 3.5, "prompt": "Float id", "subject": "Float", "target_new": "a", "ground_truth": "b"},
     (None, "load", "case_id"), "must be an integer"),
    ({"case_id": True, "prompt": "Bool id", "subject": "Bool", "target_new": "a", "ground_truth": "b"},
     (None, "load", "case_id"), "must be an integer"),
    ({"prompt": "No id", "subject": "No", "target_new": "a", "ground_truth": "b"},
     (None, "load", "case_id"), "missing"),
    ("just a string", (None, "load", "record"), "JSON object"),
    (None, (None, "load", "record"), "JSON object"),
]


def run_flow(data, wh, model_dir, **kw):
    from blens.flows.extract_flow import extract_flow

    cfg = ExtractConfig(model=str(model_dir), data=str(data), warehouse=str(wh), batch_size=2, top_k=3, threads=1,
                        **kw)
    return extract_flow(cfg)


def test_malformed_records_get_error_rows_and_good_ones_all_land(tmp_path, tiny_model_dir):
    data = tmp_path / "cf.json"
    # ensure_ascii (the default) writes the lone surrogate as the escape "\ud800", as real broken exports do.
    data.write_text(json.dumps(GOOD + ODD_BUT_VALID + [r for r, _, _ in BAD]))
    wh = tmp_path / "wh"
    summary = run_flow(data, wh, tiny_model_dir)
    good_ids = sorted([r["case_id"] for r in GOOD] + [20, 21, 22])
    assert (summary.n_extracted, summary.n_failed, summary.n_skipped) == (len(good_ids), 0, len(BAD))

    con = connect(wh)
    assert [r[0] for r in con.execute("SELECT case_id FROM prompts ORDER BY 1").fetchall()] == good_ids
    assert con.execute("SELECT prompt FROM prompts WHERE case_id = 1").fetchone()[0] == FACTS[1][1]  # first wins
    assert con.execute("SELECT prompt FROM prompts WHERE case_id = 21").fetchone()[0] == ODD_BUT_VALID[1]["prompt"]
    errors = con.execute("SELECT case_id, stage, field, message, source FROM errors").fetchall()
    assert len(errors) == len(BAD)
    for _, (case_id, stage, field), words in BAD:
        hits = [e for e in errors if (e[0], e[1], e[2]) == (case_id, stage, field) and words in e[3]]
        assert hits, f"no error row ({case_id}, {stage}, {field}, ~{words!r}) in {errors}"
    assert all(e[4].startswith("cf.json#") for e in errors)  # every row says where the record is
    assert all(len(e[3]) < 200 for e in errors)  # messages stay short even for a 10,000-character prompt


def test_jsonl_with_broken_and_truncated_lines(tmp_path, tiny_model_dir):
    data = tmp_path / "cf.jsonl"
    lines = [json.dumps(r) for r in GOOD[:3]]
    lines.insert(1, "{not json at all")
    lines.append(json.dumps(GOOD[3])[:-7])  # the writer died mid-line
    data.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe garbage bytes\n")
    summary = run_flow(data, tmp_path / "wh", tiny_model_dir)
    assert summary.n_extracted == 3 and summary.n_skipped == 3
    con = connect(tmp_path / "wh")
    errors = sorted(con.execute("SELECT source, field, message FROM errors").fetchall())
    assert [e[0] for e in errors] == ["cf.jsonl:2", "cf.jsonl:5", "cf.jsonl:6"]
    assert all(e[1] == "json" for e in errors) and "not UTF-8" in errors[2][2]


def test_empty_dataset_is_a_run_with_nothing_to_do(tmp_path, tiny_model_dir):
    data = tmp_path / "cf.json"
    data.write_text("[]")
    summary = run_flow(data, tmp_path / "wh", tiny_model_dir)
    assert (summary.n_records, summary.n_extracted, summary.n_skipped) == (0, 0, 0)


def test_truncated_json_file_one_line_nonzero_nothing_written(tmp_path, tiny_model_dir):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(GOOD)[:-40])
    wh = tmp_path / "wh"
    r = blens_in_process("extract", "--model", str(tiny_model_dir), "--data", str(data), "--warehouse", str(wh),
                         cwd=ROOT)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "is not valid JSON" in lines[0], r.stderr
    assert not wh.exists()


def test_views_never_read_uncommitted_or_foreign_files(tmp_path, tiny_model_dir):
    wh = tmp_path / "wh"
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(GOOD[:2]))
    run_flow(data, wh, tiny_model_dir)
    con = connect(wh)

    def state():
        return {v: con.execute(f"SELECT * EXCLUDE (run_id, batch_id) FROM {v} ORDER BY ALL").fetchall()
                for v in ("prompts", "tokens", "gradient_ranks", "projections", "errors", "runs")}

    before = state()
    committed = sorted((wh / "data" / "main" / "prompts").glob("*.parquet"))[0]
    # 1) A complete copy of committed rows with other case ids, as a writer killed before its catalog commit
    #    leaves it (Parquet written, never registered), in every table's data folder.
    for table in ("prompts", "tokens", "gradient_ranks", "projections"):
        src = sorted((wh / "data" / "main" / table).glob("*.parquet"))[0]
        t = pq.read_table(src)
        t = t.set_column(t.column_names.index("case_id"), "case_id",
                         pc.add(t.column("case_id"), 1000).cast(t.schema.field("case_id").type))
        pq.write_table(t, src.parent / "ducklake-uncommitted-0000.parquet")
    # 2) Half-written and foreign files.
    full = committed.read_bytes()
    (committed.parent / "ducklake-half-written.parquet").write_bytes(full[: len(full) // 2])
    (wh / "data" / "notes.txt").write_text("not ours")
    assert state() == before
    # They are on disk (a raw glob sees them); only the catalog decides what a table holds.
    assert con.execute("SELECT count(*) FROM read_parquet(? || '/data/main/prompts/ducklake-uncommitted-*.parquet')",
                       [str(wh)]).fetchone()[0] == len(before["prompts"])
