"""Identity by content: which warehouse rows a result is, whatever run, file or schedule produced it.

* ``key``  = hash(model, revision, result settings, the record's content). Two extractions of the same
  record with the same model and settings are the same result: the store keeps one, so ``--limit``
  growth, a moved file, a schedule or a rerun never add a second copy.
* ``slot`` = hash(model, revision, result settings, case_id). The place a record's result fills: a
  changed record (same case_id, new content) gets a new key in the same slot, and its result
  supersedes the old one (which stays reachable through the store's time travel).

* ``run`` = :func:`run_id_for`: hash(model, revision, the dataset's fingerprint, the run's settings). Runs
  are provenance, not identity of results: the same command on the same data always gets the same run id,
  which is what makes a rerun resume.

* ``settings`` = :func:`settings_id` of the result settings: a short id carried by every result row, so
  that every view groups by it and results computed under different settings are never averaged together
  (the ``settings`` table maps each id to its JSON).

Result settings are those that change the rows (:func:`result_settings`): top-k, the loss, the lens
and its sites, and the result format (what a result holds). Batching, device, sharding, the GEMM routine
of the lens (oneDNN or torch's, the same fp32 products summed in another order: tests/extract/test_lens.py) and whether
raw vectors are stored do not.
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

from .adapters import LENS_SITES
from .records import EditRecord


# What one result holds. 4: roles, the model's own answer and its lens ranks, attention ranks and the attn_vjp
# site, last-position VJP similarity across layers. Results of an older format hold less: they get other keys
# (and another settings id), so a new extraction never mixes with them and a rerun recomputes them.
RESULT_FORMAT = 4


def result_settings(top_k: int, sites: Sequence[str] = LENS_SITES) -> dict:
    """The settings that change a result's rows: how many lens tokens are kept, the loss, the lens, the sites,
    the result format.

    ``sites``: the model's lens sites (``ModelView.lens_sites``); families with a post-MLP norm (Gemma 3) add
    ``resid_post_vjp``, so their runs say so."""
    return {"top_k": top_k, "loss": "nll_first_target_token_last_position", "lens": "final_norm+unembedding",
            "sites": [str(s) for s in sites], "format": RESULT_FORMAT}


def _digest(payload: object) -> str:
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:32]


def settings_id(settings: dict) -> str:
    """The short stable id of a settings dict (12 hex digits of its canonical JSON's sha256): the ``settings``
    column of every result row."""
    return _digest(settings)[:12]


def settings_json(settings: dict) -> str:
    """The canonical JSON of a settings dict, as the ``settings`` table stores it."""
    return json.dumps(settings, ensure_ascii=True, separators=(",", ":"), sort_keys=True)


def record_content(record: EditRecord) -> dict:
    """The fields of a record that determine its extraction result."""
    return {"case_id": record.case_id, "prompt": record.prompt, "subject": record.subject,
            "target_new": record.target_new, "target_true": record.target_true}


def result_key(model: str, revision: str, settings: dict, record: EditRecord) -> str:
    return _digest({"model": model, "revision": revision, "settings": settings, "record": record_content(record)})


def result_slot(model: str, revision: str, settings: dict, case_id: int) -> str:
    return _digest({"model": model, "revision": revision, "settings": settings, "case_id": case_id})


def result_identity(model: str, revision: str, settings: dict, record: EditRecord) -> tuple[str, str]:
    """(key, slot) of one record's result: what every caller that keys results asks for."""
    return result_key(model, revision, settings, record), result_slot(model, revision, settings, record.case_id)


def run_id_for(model: str, revision: str, dataset_fingerprint: str, settings: dict) -> str:
    """A run's identity: the same model, data and settings always give the same run id (resume)."""
    blob = json.dumps({"model": model, "revision": revision, "data": dataset_fingerprint, "settings": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
