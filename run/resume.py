"""Whether a rerun has anything left to do at all, decided before the model loads.

Results are identified by content (``blens.extract.identity``), so "done" is a lookup of keys in the
warehouse. The plan of a run (``extract.plan_extract``) asks it per record; :func:`nothing_to_do` asks it for a whole run before
anything expensive happens: when the model's revision and family are known from its files
(``registry.local_model_dir``), every record of the source (in this shard) has its result
stored with at least the vectors asked for, the run is registered and its rejected records are recorded,
then the plan would be empty and the flow would only register what is already there. The CLI then answers
from here, without importing torch, loading the model or starting Prefect (issue 15: 12-15 s -> ~1 s).

Anything it cannot decide exactly (a hub model name, a model not yet converted, ``--force``, a changed
record, model files that say another revision or family, a new rejected record) returns None, and the
normal path runs. Like the normal path, it cannot see changed weights in a directory whose revision is
"local" (no blens.json, no hub commit): both treat it as the same model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from types import SimpleNamespace

from blens.extract.adapters import family_for, lens_sites
from blens.extract.config import ExtractConfig
from blens.extract.identity import result_key, run_id_for
from blens.extract.registry import local_model_dir, model_type_of, revision_of_files
from blens.extract.sources import LoadResult
from blens.store.lake import is_warehouse
from blens.store.reads import VECTOR_LEVELS, existing_results, run_registered, runs_holding
from blens.store.runs import error_key
from blens.store.writer import init_warehouse



@dataclass
class ExtractSummary:
    run_id: str
    n_records: int
    n_done_before: int
    n_extracted: int
    n_failed: int
    n_skipped: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.n_extracted / self.seconds if self.seconds else 0.0


def needs_work(force: bool, vectors: str, stored: dict[str, str], key: str) -> bool:
    """A key is done when stored with at least the vectors this run asks for (and not --force)."""
    if force or key not in stored:
        return True
    return VECTOR_LEVELS[stored[key]] < VECTOR_LEVELS[vectors]


def overlap_notes(shard: str | None, limit: int | None, run_id: str, holders: list[tuple[str, str, int]]) -> list[str]:
    """Say when this shard's records were already extracted by a run with another shard or limit: they are
    skipped (each result is stored once), so this run alone is not the whole of that shard. ``holders``:
    (run_id, its config JSON, how many of the skipped results it stored)."""
    if shard is None:
        return []
    notes = []
    for other, config, n in holders:
        if other == run_id:
            continue
        try:
            theirs = json.loads(config or "{}")
        except ValueError:
            theirs = {}
        if (theirs.get("shard"), theirs.get("limit")) != (shard, limit):
            notes.append(f"warning: {n} of shard {shard}'s records were already extracted by run {other} "
                         f"(shard {theirs.get('shard')}, limit {theirs.get('limit')}); they are skipped, not "
                         "recomputed (each result is stored once)")
    return notes


def what_is_left(cfg: ExtractConfig, run_id: str, keys: dict[int, str], held: dict[str, tuple[str, str, str | None]]
                 ) -> tuple[set[int], list[str]]:
    """(the case_ids whose result still needs work, notes for the user) from the results the warehouse holds
    (``blens.store.reads.results_held``); ``keys``: case_id -> result key."""
    todo = {c for c, k in keys.items() if needs_work(cfg.force, cfg.vectors, {k: held[k][0]} if k in held else {}, k)}
    holders: dict[tuple[str, str | None], int] = {}
    for c, k in keys.items():
        if c not in todo and k in held:
            holders[held[k][1:]] = holders.get(held[k][1:], 0) + 1
    return todo, overlap_notes(cfg.shard, cfg.limit, run_id, sorted((r, cf, n) for (r, cf), n in holders.items()))


def nothing_to_do(cfg: ExtractConfig, loaded: LoadResult) -> tuple[ExtractSummary, list[str]] | None:
    """The summary (and notes) of a run of ``cfg`` over ``loaded`` that would extract nothing, as the flow
    would report it; None when that cannot be decided from the files and the warehouse alone."""
    t0 = time.perf_counter()
    if cfg.force or not is_warehouse(cfg.warehouse):
        return None
    path = local_model_dir(cfg.model)
    if path is None:
        return None
    try:  # what loading would report: the revision, and the family, whose lens sites are part of the settings
        revision = revision_of_files(path)
        family = family_for(SimpleNamespace(model_type=model_type_of(path)))
    except (OSError, ValueError, KeyError, TypeError):  # unreadable or unsupported: the normal path says why
        return None
    records = [r for r in loaded.records if cfg.in_shard(r.case_id)]
    load_errors = [e for e in loaded.errors if e.case_id is None or cfg.in_shard(e.case_id)]
    if not records:
        return None
    settings = cfg.result_settings(lens_sites(family))
    keys = [result_key(cfg.model, revision, settings, r) for r in records]
    run_id = run_id_for(cfg.model, revision, loaded.fingerprint, {**settings, "vectors": cfg.vectors})
    init_warehouse(cfg.warehouse)
    if not run_registered(cfg.warehouse, run_id):
        return None
    stored = existing_results(cfg.warehouse, keys)
    if any(needs_work(cfg.force, cfg.vectors, stored, k) for k in keys):
        return None
    error_keys = [error_key("load", e) for e in load_errors]
    if error_keys and len(existing_results(cfg.warehouse, error_keys, table="errors")) < len(set(error_keys)):
        return None  # a rejected record the warehouse has not recorded yet: the run registers it
    summary = ExtractSummary(run_id=run_id, n_records=len(records), n_done_before=len(records), n_extracted=0,
                             n_failed=0, n_skipped=len(load_errors), seconds=time.perf_counter() - t0)
    holders = runs_holding(cfg.warehouse, keys) if cfg.shard is not None else []
    return summary, overlap_notes(cfg.shard, cfg.limit, run_id, holders)
