"""One batch of prompts in, warehouse-shaped Arrow tables out. Plain functions, no orchestration.

The Arrow tables are built column-wise from tensors (numpy views, ``repeat``/``tile`` for keys, list
columns from flat values + offsets, token strings by ``take`` from a vocabulary array), never row by
row in Python: a batch of 32 prompts is ~17,000 projection rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from .adapters import LENS_SITES, vector_sites
from .capture import SpanningSets, capture
from .identity import result_key, result_settings, result_slot
from .lens import LogitLens
from .models import LoadedModel
from .prepare import PreparedPrompt
from .ranks import ranks_for_batch


@functools.lru_cache(maxsize=4)
def _vocab_cached(tokenizer_id: int, tokenizer) -> pa.Array:
    n = len(tokenizer)
    return pa.array(tokenizer.batch_decode([[i] for i in range(n)]), pa.string())


def vocabulary(tokenizer) -> pa.Array:
    """Decoded text of every token id (e.g. ' English'), used to label ids without Python loops."""
    return _vocab_cached(id(tokenizer), tokenizer)


def _list_column(values: np.ndarray, width: int, item: pa.DataType) -> pa.Array:
    flat = pa.array(values.reshape(-1), item)
    offsets = pa.array(np.arange(0, flat.__len__() + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def _label_column(ids: np.ndarray, vocab: pa.Array) -> pa.Array:
    k = ids.shape[1]
    flat = vocab.take(pa.array(ids.reshape(-1).astype(np.int64)))
    offsets = pa.array(np.arange(0, ids.size + 1, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


@dataclass
class _Rows:
    """Index of the (prompt, position) rows kept in a batch: real tokens only."""

    b: np.ndarray
    pos: np.ndarray
    case_id: np.ndarray
    key: np.ndarray
    segment: np.ndarray

    @classmethod
    def of(cls, prompts: list[PreparedPrompt], keys: list[str], mask: torch.Tensor) -> "_Rows":
        b, pos = (t.cpu().numpy() for t in mask.nonzero(as_tuple=True))
        cases = np.array([p.record.case_id for p in prompts], dtype=np.int64)
        segs = np.array([s for p in prompts for s in p.segments], dtype=object)
        return cls(b=b, pos=pos.astype(np.int32), case_id=cases[b], key=np.array(keys, dtype=object)[b], segment=segs)


def extract_batch(lm: LoadedModel, prompts: list[PreparedPrompt], run_id: str, *, top_k: int = 10,
                  vectors: str = "none", lens: LogitLens | None = None,
                  identity: list[tuple[str, str]] | None = None) -> dict[str, pa.Table]:
    """Backward pass, ranks, lens and (optionally) vectors for one batch; returns Arrow tables by name.

    ``identity``: (key, slot) per prompt (``blens.extract.identity``); by default computed for this
    model with ``top_k`` and the standard loss and lens.
    """
    view = lm.view
    tok = lm.tokenizer
    if identity is None:
        settings = result_settings(top_k)
        identity = [(result_key(lm.name, lm.revision, settings, p.record),
                     result_slot(lm.name, lm.revision, settings, p.record.case_id)) for p in prompts]
    keys = [k for k, _ in identity]
    spans = capture(view, prompts, tok.pad_token_id)
    lens = lens or LogitLens.of(view)
    rows = _Rows.of(prompts, keys, spans.mask)
    n_rows = len(rows.b)
    L = view.n_layers
    vocab = vocabulary(tok)

    prompts_t = pa.table({
        "key": pa.array(keys, pa.string()),
        "run_id": [run_id] * len(prompts),
        "case_id": pa.array([p.record.case_id for p in prompts], pa.int64()),
        "slot": pa.array([s for _, s in identity], pa.string()),
        "model": [lm.name] * len(prompts),
        "model_revision": [lm.revision] * len(prompts),
        "prompt": [p.record.prompt for p in prompts],
        "subject": [p.record.subject for p in prompts],
        "target_new": [p.record.target_new for p in prompts],
        "target_true": [p.record.target_true for p in prompts],
        "target_new_id": pa.array([p.target_new_id for p in prompts], pa.int32()),
        "target_true_id": pa.array([p.target_true_id for p in prompts], pa.int32()),
        "n_tokens": pa.array([p.n_tokens for p in prompts], pa.int32()),
        "loss": pa.array(spans.loss.float().cpu().numpy(), pa.float32()),
        "vectors": [vectors] * len(prompts),
    })

    token_ids = spans.input_ids[spans.mask].cpu().numpy().astype(np.int32)
    tokens_t = pa.table({
        "key": rows.key, "run_id": [run_id] * n_rows, "case_id": rows.case_id, "position": rows.pos,
        "token_id": token_ids, "token": vocab.take(pa.array(token_ids.astype(np.int64))),
        "segment": pa.array(rows.segment, pa.string()),
    })

    ranks = ranks_for_batch(spans, view.matrix_names, L)
    sites = list(ranks)  # (layer, matrix) pairs
    rank_vals = torch.stack([ranks[k] for k in sites], dim=1).numpy()  # (B, K)
    B = len(prompts)
    lengths = spans.lengths.cpu().numpy().astype(np.int32)
    ranks_t = pa.table({
        "key": np.repeat(np.array(keys, dtype=object), len(sites)),
        "run_id": [run_id] * (B * len(sites)),
        "case_id": np.repeat([p.record.case_id for p in prompts], len(sites)).astype(np.int64),
        "model": [lm.name] * (B * len(sites)),
        "layer": np.tile([k[0] for k in sites], B).astype(np.int32),
        "matrix": np.tile(np.array([k[1] for k in sites], dtype=object), B),
        "rank": rank_vals.reshape(-1).astype(np.int32),
        "n_tokens": np.repeat(lengths, len(sites)),
    })

    # Lens: all (site, layer, real position) vectors of the batch in one matrix -> chunked GEMMs.
    per_site = [torch.stack([spans.site(layer, s) for layer in range(L)])[:, spans.mask] for s in LENS_SITES]
    stacked = torch.stack(per_site)  # (S, L, n_rows, d)
    S = len(LENS_SITES)
    flat = stacked.reshape(S * L * n_rows, -1)
    tgt = torch.tensor([[p.target_new_id, p.target_true_id] for p in prompts], device=flat.device)[
        torch.as_tensor(rows.b, device=flat.device)].repeat(S * L, 1)
    res = lens.project(flat, tgt, top_k)
    norms = flat.norm(dim=-1).cpu().numpy().astype(np.float32)
    N = flat.shape[0]
    top_ids = res.top_ids.cpu().numpy().astype(np.int32)
    bot_ids = res.bottom_ids.cpu().numpy().astype(np.int32)
    proj_t = pa.table({
        "key": np.tile(rows.key, S * L),
        "run_id": [run_id] * N,
        "case_id": np.tile(rows.case_id, S * L),
        "model": [lm.name] * N,
        "layer": np.tile(np.repeat(np.arange(L, dtype=np.int32), n_rows), S),
        "site": np.repeat(np.array([str(s) for s in LENS_SITES], dtype=object), L * n_rows),
        "position": np.tile(rows.pos, S * L),
        "segment": pa.array(np.tile(rows.segment, S * L), pa.string()),
        "norm": norms,
        "zero_vector": norms == 0,
        "top_ids": _list_column(top_ids, top_k, pa.int32()),
        "top_tokens": _label_column(top_ids, vocab),
        "top_logits": _list_column(res.top_logits.float().cpu().numpy(), top_k, pa.float32()),
        "bottom_ids": _list_column(bot_ids, top_k, pa.int32()),
        "bottom_tokens": _label_column(bot_ids, vocab),
        "bottom_logits": _list_column(res.bottom_logits.float().cpu().numpy(), top_k, pa.float32()),
        "target_new_rank": res.target_ranks[:, 0].cpu().numpy().astype(np.int32),
        "target_true_rank": res.target_ranks[:, 1].cpu().numpy().astype(np.int32),
    })
    out = {"prompts": prompts_t, "tokens": tokens_t, "gradient_ranks": ranks_t, "projections": proj_t}
    if vectors != "none":
        out["vectors"] = vectors_table(spans, rows, run_id, L, view.matrix_names, everything=vectors == "all")
    return out


def vectors_table(spans: SpanningSets, rows: _Rows, run_id: str, L: int, matrix_names: list[str],
                  everything: bool) -> pa.Table:
    parts = []
    for site in vector_sites(matrix_names, everything):
        vecs = torch.stack([spans.site(layer, site) for layer in range(L)])[:, spans.mask]  # (L, n, d)
        n, d = vecs.shape[1], vecs.shape[2]
        parts.append(pa.table({
            "key": np.tile(rows.key, L),
            "run_id": [run_id] * (L * n),
            "case_id": np.tile(rows.case_id, L),
            "layer": np.repeat(np.arange(L, dtype=np.int32), n),
            "site": [str(site)] * (L * n),
            "position": np.tile(rows.pos, L),
            "vector": _list_column(vecs.float().cpu().numpy(), d, pa.float32()),
        }))
    return pa.concat_tables(parts)
