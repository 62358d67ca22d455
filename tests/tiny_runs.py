"""Runs of the tiny random Llama compared row for row (a helper module, not a test module): CounterFact-like
records, the ExtractConfig of such a run, and the warehouse's rows without batch-dependent columns. Used by
tests/flows/test_run_resilience.py (in-process flows) and tests/e2e/test_scale.py (kill -9, shards, Dask);
the reference run they compare with is the session fixture ``reference`` (conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

from blens.extract.config import ExtractConfig
from blens.store.connect import connect

N_LAYERS, N_MATRICES, N_SITES = 3, 7, 3  # tiny Llama: MLP ff1, ff1_gate, ff2 + attn_q, _k, _v, _o; lens ff1_input, ff2_vjp, attn_vjp
SUBJECTS = [
    ("Danielle Darrieux", "English", "French"), ("Paris", "Italy", "France"), ("the Eiffel Tower", "Rome", "Paris"),
    ("Toko Yasuda", "piano", "guitar"), ("Madrid", "Sweden", "Spain"), ("Berlin", "Japan", "Germany"),
    ("Lionel Messi", "tennis", "football"), ("the Danube", "Asia", "Europe"), ("Marie Curie", "poetry", "physics"),
    ("Mount Fuji", "Chile", "Japan"), ("the Amazon river", "Africa", "America"), ("Ludwig van Beethoven",
                                                                                  "jazz", "classical"),
    ("Oslo", "Peru", "Norway"), ("Angela Merkel", "Canada", "Germany"),
]
TEMPLATES = ["{} is located in", "The home of {} is in", "People say that {} belongs to the country of"]


def make_records(n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        s, t, g = SUBJECTS[i % len(SUBJECTS)]
        out.append({"case_id": i, "prompt": TEMPLATES[i % len(TEMPLATES)].format(s), "subject": s,
                    "target_new": t, "ground_truth": g})
    return out


def write_records(path: Path, recs: list[dict]) -> Path:
    path.write_text(json.dumps(recs))
    return path


def cfg_for(model_dir, data, wh, **kw) -> ExtractConfig:
    base = dict(model=str(model_dir), data=str(data), warehouse=str(wh), batch_size=1, top_k=5,
                threads=1)
    return ExtractConfig(**{**base, **kw})


def snapshot(wh) -> dict[str, list]:
    """Sorted view rows without batch-dependent columns (batch_id, committed_at)."""
    con = connect(wh)
    q = {
        "prompts": "SELECT run_id, case_id, prompt, subject, target_new, target_true, n_tokens, round(loss, 5), "
                   "target_new_id, target_true_id FROM prompts ORDER BY ALL",
        "tokens": "SELECT run_id, case_id, position, token_id, token, segment FROM tokens ORDER BY ALL",
        "gradient_ranks": "SELECT run_id, case_id, layer, matrix, rank, n_tokens FROM gradient_ranks ORDER BY ALL",
        "projections": "SELECT run_id, case_id, layer, site, position, segment, round(norm, 4), top_ids, bottom_ids, "
                       "target_new_rank, target_true_rank FROM projections "
                       "ORDER BY run_id, case_id, layer, site, position",
    }
    out = {k: con.execute(v).fetchall() for k, v in q.items()}
    con.close()
    return out


def assert_complete(wh) -> int:
    """Every visible prompt has all its rows (tokens, ranks, projections); no (run, case) twice."""
    con = connect(wh)
    bad = con.execute(f"""
        SELECT p.case_id, p.n_tokens,
               (SELECT count(*) FROM tokens t WHERE t.run_id = p.run_id AND t.case_id = p.case_id) AS nt,
               (SELECT count(*) FROM gradient_ranks g WHERE g.run_id = p.run_id AND g.case_id = p.case_id) AS ng,
               (SELECT count(*) FROM projections x WHERE x.run_id = p.run_id AND x.case_id = p.case_id) AS nx
        FROM prompts p
        WHERE nt != p.n_tokens OR ng != {N_LAYERS * N_MATRICES} OR nx != p.n_tokens * {N_LAYERS * N_SITES}
    """).fetchall()
    assert bad == [], f"incomplete prompts visible: {bad}"
    dup = con.execute("SELECT run_id, case_id, count(*) FROM prompts GROUP BY ALL HAVING count(*) > 1").fetchall()
    assert dup == []
    n = con.execute("SELECT count(*) FROM prompts").fetchone()[0]
    con.close()
    return n


def extract_writers(wh: Path) -> int:
    """Processes that have committed extract batches to ``wh`` so far; 0 while the lake is being created (a
    read-only look beside running writers: poll it at most every half second, an attach costs ~0.1 s of CPU)."""
    if not (Path(wh) / "catalog.sqlite").exists():
        return 0
    try:
        con = connect(wh)
    except Exception:  # noqa: BLE001 - the lake is still being created
        return 0
    try:
        return con.execute("SELECT count(DISTINCT writer) FROM commits WHERE kind = 'extract' AND n_keys > 0"
                           ).fetchone()[0]
    except Exception:  # noqa: BLE001 - tables not created yet
        return 0
    finally:
        con.close()
