"""Tests for `blens publish`: DatasetDict round trip, explicit features, the dataset card, Parquet copies,
and the push path failing with one clear line when the Hub cannot be used."""

from __future__ import annotations

import os
import subprocess
import sys
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


def test_round_trip_equals_view_rows(warehouse, published):
    from datasets import DatasetDict, load_from_disk

    dd = load_from_disk(str(published.out))
    assert isinstance(dd, DatasetDict)
    assert list(dd) == ["prompts", "tokens", "gradient_ranks", "projections", "vectors", "vjp_similarity", "settings",
                        "edit_results", "runs", "models"]  # issue 12: runs and models too (errors: none here)
    for name, ds in dd.items():
        cols, rows = _view_rows(warehouse, name)
        assert ds.column_names == cols, name
        assert len(rows) > 0 and ds.num_rows == len(rows), name
        got = ds.to_dict()
        assert [tuple(got[c][i] for c in cols) for i in range(ds.num_rows)] == rows, name
    assert TRICKY["prompt"] in dd["prompts"]["prompt"]


def test_features_are_explicit_types(published):
    from datasets import List, Value, load_from_disk

    dd = load_from_disk(str(published.out))
    f = dd["projections"].features
    assert f["top_ids"] == List(Value("int32"))
    assert f["bottom_tokens"] == List(Value("string"))
    assert f["top_logits"] == List(Value("float32"))
    assert f["norm"] == Value("float32") and f["case_id"] == Value("int64") and f["layer"] == Value("int32")
    assert dd["vectors"].features["vector"] == List(Value("float32"))
    assert dd["edit_results"].features["lr"] == Value("float32")
    assert len(dd["vectors"][0]["vector"]) == 32  # n_embd of the tiny model


def test_float16_vectors(warehouse, tmp_path):
    import numpy as np
    from datasets import List, Value, load_from_disk

    from blens.publish.dataset import publish

    res = publish(warehouse, tmp_path / "f16", vector_dtype="float16")
    ds = load_from_disk(str(res.out))["vectors"]
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
                   "target_rank_by_layer", "load_from_disk", 'load_dataset("parquet"', "duckdb",
                   "Katz, Shahar and Belinkov, Yonatan and Geva, Mor and Wolf, Lior",
                   "Backward Lens: Projecting Language Model Gradients into the Vocabulary Space", "EMNLP",
                   "`bottom_tokens`", "`update_grad_cosine`"):
        assert needle.lower() in body.lower(), needle
    # headline statistics: one row per layer of the tiny model in the rank table
    assert "| 3 | 0% (1.0 /" in body  # last layer: rank 1, never = n


def test_load_dataset_parquet_offline(published, tmp_path, monkeypatch):
    from datasets import load_dataset, load_from_disk

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dd = load_from_disk(str(published.out))
    for name in ("prompts", "projections", "edit_results"):
        ds = load_dataset("parquet", data_files={"train": str(published.out / "data" / name / "*.parquet")},
                          split="train", cache_dir=str(tmp_path / "cache"))
        assert ds.num_rows == dd[name].num_rows
        assert ds.features == dd[name].features
        assert ds[0] == dd[name][0]


def test_republish_replaces_and_refuses_foreign_dir(warehouse, published, tmp_path):
    from blens.publish.dataset import PublishError, publish

    again = publish(warehouse, published.out)
    assert (again.out / "dataset_dict.json").exists()
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
