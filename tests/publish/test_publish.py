"""Tests for `blens publish`: the Parquet round trip through the card's configs, explicit features, the dataset
card (every column's meaning, how it was made, limitations), one on-disk form, and the push path failing with
one clear line when the Hub cannot be used."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from builders import DATA, ROOT, TRICKY, blens_in_process, make_warehouse


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory) -> Path:
    return make_warehouse(tmp_path_factory.mktemp("wh") / "warehouse", edits=True)


@pytest.fixture(scope="module")
def published(warehouse, tmp_path_factory):
    from blens.publish.dataset import publish

    return publish(warehouse, tmp_path_factory.mktemp("pub") / "dataset")


def _view_rows(warehouse: Path, table: str) -> tuple[list[str], list[tuple]]:
    from blens.store.connect import connect
    from blens.publish.dataset import ORDER_BY

    con = connect(warehouse)
    rel = con.sql(f"SELECT * EXCLUDE (batch_id) FROM {table} ORDER BY {ORDER_BY[table]}")  # batch_id: bookkeeping
    return rel.columns, rel.fetchall()


def load_table(out: Path, name: str, cache: Path):
    """A published table as a user loads the folder: ``load_dataset(folder, config)``, through the card's configs."""
    from datasets import load_dataset

    return load_dataset(str(out), name, split="train", cache_dir=str(cache))


def test_round_trip_equals_view_rows(warehouse, published, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert list(published.splits) == ["prompts", "tokens", "gradient_ranks", "projections", "vectors",
                                      "vjp_similarity", "settings", "edit_results", "runs", "models"]  # errors: none
    for name in published.splits:
        ds = load_table(published.out, name, tmp_path / "cache")
        cols, rows = _view_rows(warehouse, name)
        assert ds.column_names == cols, name
        assert len(rows) > 0 and ds.num_rows == len(rows) == published.splits[name].num_rows, name
        got = ds.to_dict()
        assert [tuple(got[c][i] for c in cols) for i in range(ds.num_rows)] == rows, name
        if name == "prompts":
            assert TRICKY["prompt"] in got["prompt"]


def test_batch_ranges_group_consecutive_commits_up_to_a_row_budget():
    from blens.publish.dataset import batch_ranges

    counts = [("a", 3), ("b", 3), ("c", 5), ("d", 1), ("e", 9)]
    assert batch_ranges(counts, 6) == [("a", "b"), ("c", "d"), ("e", "e")]  # e alone is over budget: its own range
    assert batch_ranges(counts, 100) == [("a", "e")]
    assert batch_ranges(counts, 1) == [(b, b) for b, _ in counts]
    assert batch_ranges([], 10) == []


def test_big_tables_read_a_range_of_commits_at_a_time_in_one_order(extracted, monkeypatch, tmp_path):
    """projections and vectors are never sorted whole (memory would grow with the warehouse): one query per range
    of commits gives the same rows in the same order as one query sorted by ORDER_BY."""
    import pyarrow as pa

    from blens.publish import dataset
    from blens.store.connect import connect

    con = connect(extracted.path)
    schema = dataset.arrow_schema(con, "projections")
    whole = con.sql(f"SELECT {', '.join(schema.names)} FROM projections ORDER BY {dataset.ORDER_BY['projections']}"
                    ).fetch_arrow_table().cast(schema)
    monkeypatch.setitem(dataset.CHUNK_ROWS, "projections", 1)  # each of the warehouse's 2 commits its own query
    queries = list(dataset._queries(con, "projections", "key"))
    assert len(queries) == 2 and all("BETWEEN" in q for q, _ in queries)
    chunked = pa.Table.from_batches(list(dataset.stream_batches(con, "projections", schema)), schema=schema)
    assert chunked.num_rows == whole.num_rows > 0
    assert chunked.equals(whole)


def test_one_on_disk_form(published):
    """Issue 25: Parquet only (an Arrow save_to_disk copy beside it doubled the output and was never pushed)."""
    files = sorted(p.relative_to(published.out).as_posix() for p in published.out.rglob("*") if p.is_file())
    assert files == ["README.md"] + [f"data/{name}/train-00000-of-00001.parquet" for name in sorted(published.splits)]


def test_features_are_explicit_types(published, tmp_path):
    from datasets import List, Value

    f = load_table(published.out, "projections", tmp_path / "cache").features
    assert f == published.splits["projections"].features
    assert f["top_ids"] == List(Value("int32"))
    assert f["bottom_tokens"] == List(Value("string"))
    assert f["top_logits"] == List(Value("float32"))
    assert f["norm"] == Value("float32") and f["case_id"] == Value("int64") and f["layer"] == Value("int32")
    vectors = load_table(published.out, "vectors", tmp_path / "cache")
    assert vectors.features["vector"] == List(Value("float32"))
    assert load_table(published.out, "edit_results", tmp_path / "cache").features["lr"] == Value("float32")
    assert len(vectors[0]["vector"]) == 32  # n_embd of the tiny model


def test_floats_are_written_without_a_dictionary_and_strings_with_one(published):
    """Floats never repeat enough for a dictionary: trying one in every row group made `blens publish` ~1.5x
    slower and its files 28 % bigger (``publish.dataset.dictionary_columns``). Strings, in lists too, keep theirs."""
    import pyarrow.parquet as pq

    def encodings(table: str) -> dict[str, set[str]]:
        meta = pq.ParquetFile(published.out / "data" / table / "train-00000-of-00001.parquet").metadata
        found: dict[str, set[str]] = {}
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                found.setdefault(col.path_in_schema.split(".")[0], set()).update(col.encodings)
        return found

    dictionary = {"PLAIN_DICTIONARY", "RLE_DICTIONARY"}
    vectors, projections = encodings("vectors"), encodings("projections")
    assert not vectors["vector"] & dictionary, vectors["vector"]
    assert not projections["top_logits"] & dictionary and not projections["norm"] & dictionary
    assert vectors["key"] & dictionary and projections["site"] & dictionary and projections["top_tokens"] & dictionary


def test_float16_vectors(warehouse, tmp_path):
    import numpy as np
    from datasets import List, Value

    from blens.publish.dataset import publish

    res = publish(warehouse, tmp_path / "f16", vector_dtype="float16")
    ds = load_table(res.out, "vectors", tmp_path / "cache")
    assert ds.features["vector"] == List(Value("float16"))
    cols, rows = _view_rows(warehouse, "vectors")
    got = np.array(ds[0]["vector"], dtype=np.float32)
    want = np.array(rows[0][cols.index("vector")], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4)


def test_card_yaml_lists_every_split_and_real_files(published):
    from blens.publish.card import read_card_metadata

    meta = read_card_metadata(published.card)
    assert meta["license"] == "other"  # tiny-gpt2: not a registry model (tests/publish/test_card_license.py)
    assert meta["task_categories"] and meta["size_categories"]
    names = [c["config_name"] for c in meta["configs"]]
    assert names == list(published.splits)
    for cfg in meta["configs"]:
        (entry,) = cfg["data_files"]
        files = list(published.out.glob(entry["path"]))
        assert files, entry
    infos = {i["config_name"]: i for i in meta["dataset_info"]}
    assert set(infos) == set(names)
    assert infos["projections"]["splits"][0]["num_examples"] == published.splits["projections"].num_rows
    feats = {f["name"]: f for f in infos["projections"]["features"]}
    assert feats["top_ids"] == {"name": "top_ids", "list": "int32"}

    text = published.card.read_text()
    body = text.split("\n---\n", 1)[1]
    # issue 12: the source is named by its dataset name, never by a path on the machine that extracted it
    assert str(DATA) not in body and str(DATA.parent) not in body
    for needle in ("tiny-gpt2", "random-init", DATA.stem, "Meng, Kevin", '"top_k": 10', "rank_equals_length",
                   "target_rank_by_layer", 'load_dataset("PATH/TO/THIS/FOLDER", "projections"', 'load_dataset("parquet"',
                   "duckdb",
                   "Katz, Shahar and Belinkov, Yonatan and Geva, Mor and Wolf, Lior",
                   "Backward Lens: Projecting Language Model Gradients into the Vocabulary Space", "EMNLP",
                   "`bottom_tokens`", "`update_grad_cosine`"):
        assert needle.lower() in body.lower(), needle
    # headline statistics: one row per layer of the tiny model in the rank table
    assert "| 3 | 0% (1.0 /" in body  # last layer: rank 1, never = n


def test_load_dataset_parquet_offline(published, tmp_path, monkeypatch):
    from datasets import load_dataset

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for name in ("prompts", "projections", "edit_results"):
        ds = load_dataset("parquet", data_files={"train": str(published.out / "data" / name / "*.parquet")},
                          split="train", cache_dir=str(tmp_path / "cache"))
        via_card = load_table(published.out, name, tmp_path / "cache")
        assert ds.num_rows == via_card.num_rows == published.splits[name].num_rows
        assert ds.features == via_card.features == published.splits[name].features
        assert ds[0] == via_card[0]


def _column_tables(card: str) -> dict[str, list[list[str]]]:
    """The card's column tables: table name -> rows of (column, type, meaning) cells, as written."""
    out = {}
    for name, block in re.findall(r"^### `(\w+)` — [\d,]+ rows?\n(.*?)(?=^#|\Z)", card, flags=re.S | re.M):
        rows = [line for line in block.splitlines() if line.startswith("| `")]
        out[name] = [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows]
    return out


def test_every_column_of_every_table_has_a_meaning(published):
    """Issue 25: the runs columns and models.registered_at had empty meanings. Every column of every table the
    schema declares has one (store/schema.py: column_doc), and every column table of the card shows it."""
    from blens.publish.dataset import INTERNAL_COLUMNS, SPLITS
    from blens.store.schema import TABLES, column_doc

    missing = [(t, f.name) for t, schema in TABLES.items() for f in schema if not column_doc(t, f.name).strip()]
    assert missing == []
    assert set(SPLITS) <= set(TABLES)
    tables = _column_tables(published.card.read_text())
    assert list(tables) == list(published.splits)
    for name, rows in tables.items():
        want = [f.name for f in TABLES[name] if f.name not in INTERNAL_COLUMNS]
        assert [r[0].strip("`") for r in rows] == want, name
        assert all(len(r) == 3 and r[2] for r in rows), (name, [r for r in rows if len(r) != 3 or not r[2]])
    runs = {r[0].strip("`"): r[2] for r in tables["runs"]}
    assert "settings" in runs["config_json"] and "UTC" in runs["created_at"]
    assert "first run" in {r[0].strip("`"): r[2] for r in tables["models"]}["registered_at"]


def test_card_says_how_it_was_made_and_its_limits(published):
    """Issue 25: the command that makes the rows again, from the runs table's settings with the local data path
    replaced by a placeholder; a limitations section; where counterfact-edit-1k comes from."""
    text = published.card.read_text()
    body = text.split("\n---\n", 1)[1]
    made = body[body.index("## How this was made"):body.index("## Limitations")]
    assert ("blens extract --model tiny-gpt2 --data PATH/TO/counterfact-edit-1k.json --warehouse warehouse "
            "--top-k 10 --vectors spanning --limit 3") in made
    assert "blens publish --warehouse warehouse --out dataset" in made
    assert "blens edit" not in made  # add_edits writes rows without a run of its own
    assert str(DATA.parent) not in body and str(ROOT) not in body and "/home/" not in body
    limits = body[body.index("## Limitations"):body.index("## Tables")]
    for needle in ("GPT-2 XL", "dequantised to fp32", "SmolLM2-135M-Instruct Q4_1", "Gemma 3 270M Q4_K_M",
                   "Batch-padding noise", "first token", "CounterFact subset", "`tiny-gpt2`: a model blens does not embed"):
        assert needle in limits, needle
    source = body[body.index("## Source"):body.index("## How this was made")]
    assert "`counterfact-edit-1k` is a fixed 1,000-record subset of `counterfact-edit`" in source
    assert "EasyEdit's CounterFact split" in source


def test_run_commands_from_stored_settings():
    """Each kind of run as a command line; a path becomes a placeholder, a hostile name is never shown."""
    import json

    from blens.publish.card_provenance import run_commands

    cfg = {"model": "smollm2-135m", "data": "/home/alice/cf/counterfact-edit-1k.json", "warehouse": "/home/alice/wh",
           "top_k": 20, "vectors": "none", "limit": 200, "shard": None, "threads": 2, "device": "cuda",
           "max_prompt_tokens": 2048}
    assert run_commands("extract", "smollm2-135m", cfg["data"], json.dumps(cfg)) == [
        "blens extract --model smollm2-135m --data PATH/TO/counterfact-edit-1k.json --warehouse warehouse "
        "--top-k 20 --vectors none --limit 200 --max-prompt-tokens 2048"]
    edit = {"data": "azhx/counterfact", "limit": 500, "fluency_tokens": 30,
            "specs": [{"method": "shift", "layer": 24, "lr": 0.5, "step": "fixed"}, {"method": "rome", "layer": 9,
                                                                                      "lr": None, "step": None}]}
    assert run_commands("edit", "/opt/models/gemma3", "azhx/counterfact", json.dumps(edit)) == [
        "blens edit --model PATH/TO/gemma3 --data azhx/counterfact --warehouse warehouse --method shift --layer 24 "
        "--lr 0.5 --step fixed --limit 500 --fluency-tokens 30",
        "blens edit --model PATH/TO/gemma3 --data azhx/counterfact --warehouse warehouse --method rome --layer 9 "
        "--limit 500 --fluency-tokens 30"]
    (line,) = run_commands("extract", "/x/`rm -rf`$HOME", "d.json", "not json")
    assert line == "blens extract --model PATH/TO/MODEL --data PATH/TO/d.json --warehouse warehouse"


def test_republish_replaces_and_refuses_foreign_dir(warehouse, published, tmp_path):
    from blens.publish.dataset import PublishError, publish

    again = publish(warehouse, published.out)
    assert (again.out / "data" / "prompts" / "train-00000-of-00001.parquet").exists()
    assert not (again.out / "dataset_dict.json").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(PublishError, match="not empty"):
        publish(warehouse, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_push_offline_fails_with_one_clear_line(warehouse, tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake_token_for_tests"}
    out = tmp_path / "pushed"
    proc = blens_in_process("publish", "--warehouse", str(warehouse), "--out", str(out), "--push",
                            "someone/backward-lens-test", cwd=ROOT, env=env)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "offline" in errors[0].lower(), proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "README.md").exists()  # the local artefact is complete


def test_push_unreachable_hub_fails_before_writing(published, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from blens.publish.dataset import PublishError, push

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: calls.append(a))
    with pytest.raises(PublishError, match="unreachable") as info:
        push(published, "someone/backward-lens-test", token="hf_fake_token_for_tests")
    assert "\n" not in str(info.value)
    assert calls == []  # nothing was created remotely

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PublishError, match="no Hugging Face token"):
        push(published, "someone/backward-lens-test")
