"""One batch of prompts in, warehouse-shaped Arrow tables out. Plain functions, no orchestration.

Two stages, so that a caller can overlap them (``blens.extract.overlap``): :func:`compute_batch` runs
everything that touches the model's device (capture, lens, ranks) and ends in *one* device-to-host copy
(:func:`to_host`) into a :class:`HostBatch` of numpy arrays; :func:`build_tables` turns that into Arrow
tables on the host alone. :func:`extract_batch` is the two in a row.

The Arrow tables are built column-wise from numpy arrays (``repeat``/``tile`` for keys, list columns from
flat values + offsets, token strings by ``take`` from a vocabulary array), never row by row in Python: a
batch of 32 prompts is ~17,000 projection rows. Row indices come from the prompts' lengths on the host,
never from the device mask, so the device stage reads nothing back before its final copy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from .adapters import Site, vector_sites
from .capture import SpanningSets, capture
from .identity import result_key, result_settings, result_slot
from .lens import LogitLens, fp32_exact
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
    """Index of the (prompt, position) rows kept in a batch: real tokens only, prompt-major (the order of
    ``mask.nonzero()``), computed from the prompts' lengths on the host."""

    b: np.ndarray
    pos: np.ndarray
    case_id: np.ndarray
    key: np.ndarray
    segment: np.ndarray
    token_ids: np.ndarray

    @classmethod
    def of(cls, prompts: list[PreparedPrompt], keys: list[str]) -> "_Rows":
        lengths = np.array([p.n_tokens for p in prompts], dtype=np.int64)
        b = np.repeat(np.arange(len(prompts), dtype=np.int64), lengths)
        pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]) if len(prompts) else np.zeros(0, np.int32)
        cases = np.array([p.record.case_id for p in prompts], dtype=np.int64)
        segs = np.array([s for p in prompts for s in p.segments], dtype=object)
        ids = np.array([i for p in prompts for i in p.input_ids], dtype=np.int32)
        return cls(b=b, pos=pos, case_id=cases[b], key=np.array(keys, dtype=object)[b], segment=segs, token_ids=ids)

    def flat_index(self, width: int) -> np.ndarray:
        """Positions of the rows in a (B x width) flattening of a padded batch."""
        return self.b * width + self.pos


# ---- the device stage --------------------------------------------------------------------------------


def to_host(tensors: Sequence[torch.Tensor], *, pack: bool | None = None) -> list[np.ndarray]:
    """numpy arrays of ``tensors`` through one device-to-host copy and one synchronisation.

    Tensors already on the CPU are returned as views. The others (``pack``: default when they are not on
    the CPU) are laid end to end, as bytes, in one device buffer, copied with one ``copy_`` into pinned
    host memory (CUDA) and read back as views of that buffer after one stream synchronisation. The
    arrays keep the buffer alive. ``pack=True`` runs the same packing on CPU tensors (tests).
    """
    out: list[np.ndarray | None] = [None] * len(tensors)
    todo = []
    for i, t in enumerate(tensors):
        t = t.detach()
        if pack is False or (pack is None and t.device.type == "cpu"):
            out[i] = t.contiguous().numpy()
        else:
            todo.append((i, t))
    if todo:
        device = todo[0][1].device
        parts, layout, offset = [], [], 0
        for i, t in todo:
            raw = t.contiguous().reshape(-1).view(torch.uint8)
            pad = -raw.numel() % 8  # keep every array 8-byte aligned in the buffer
            parts.append(raw)
            if pad:
                parts.append(torch.zeros(pad, dtype=torch.uint8, device=device))
            layout.append((i, offset, raw.numel(), t.dtype, tuple(t.shape)))
            offset += raw.numel() + pad
        flat = torch.cat(parts)
        host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=device.type == "cuda")
        host.copy_(flat, non_blocking=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        buf = host.numpy()
        for i, off, n, dtype, shape in layout:
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            out[i] = buf[off : off + n].view(np_dtype).reshape(shape)
    return out  # type: ignore[return-value]


@dataclass
class HostBatch:
    """What the Arrow tables of one batch need, on the host: the result of :func:`compute_batch`."""

    prompts: list[PreparedPrompt]
    keys: list[str]
    slots: list[str]
    rows: _Rows
    loss: np.ndarray  # (B,) float32
    rank_keys: list[tuple[int, str]]  # (layer, matrix) per column of ``ranks``
    ranks: np.ndarray  # (B, K)
    norms: np.ndarray  # (N,) float32, N = sites x layers x rows
    top_ids: np.ndarray  # (N, k) int32
    top_logits: np.ndarray  # (N, k) float32
    bottom_ids: np.ndarray
    bottom_logits: np.ndarray
    target_ranks: np.ndarray  # (N, 2) int32: target_new, target_true
    vectors: dict[Site, np.ndarray] = field(default_factory=dict)  # (L, n_rows, d) per stored site


def _gather_rows(spans: SpanningSets, sites: Sequence[Site], L: int, index: torch.Tensor) -> torch.Tensor:
    """(len(sites), L, n_rows, d): the real-token rows of each site and layer, gathered with an integer
    index into one preallocated tensor (a boolean mask would make the device report its count)."""
    first = spans.site(0, sites[0])
    B, T, d = first.shape
    out = torch.empty((len(sites), L, index.numel(), d), dtype=first.dtype, device=first.device)
    for i, site in enumerate(sites):
        for layer in range(L):
            torch.index_select(spans.site(layer, site).reshape(B * T, d), 0, index, out=out[i, layer])
    return out


def compute_batch(lm: LoadedModel, prompts: list[PreparedPrompt], *, top_k: int = 10, vectors: str = "none",
                  lens: LogitLens | None = None, identity: list[tuple[str, str]] | None = None,
                  mark: Callable[[str], None] | None = None, host_pack: bool | None = None) -> HostBatch:
    """The device stage of one batch: capture, lens, ranks, then one copy of everything to the host.

    Everything the device needs from the host (ids, mask, row index, target ids) is copied before the
    capture starts; after that nothing is read back until :func:`to_host` (the gradient ranks too: they
    stay on the device until that copy). ``mark(stage)``, if given, is called after each stage
    ("capture", "lens", "ranks", "copy"); a timing harness can synchronise the device there.
    ``host_pack``: passed to :func:`to_host` (``True`` runs the packed copy on CPU too, for tests).
    """
    view = lm.view
    device = view.unembedding.device
    if identity is None:
        settings = result_settings(top_k, view.lens_sites)
        identity = [(result_key(lm.name, lm.revision, settings, p.record),
                     result_slot(lm.name, lm.revision, settings, p.record.case_id)) for p in prompts]
    keys = [k for k, _ in identity]
    rows = _Rows.of(prompts, keys)
    width = max(p.n_tokens for p in prompts)
    L = view.n_layers
    S = len(view.lens_sites)
    row_targets = np.array([[p.target_new_id, p.target_true_id] for p in prompts], dtype=np.int64)[rows.b]
    index = torch.from_numpy(rows.flat_index(width)).to(device)
    tgt_rows = torch.from_numpy(row_targets).to(device)
    lens = lens or LogitLens.of(view)
    note = mark or (lambda _stage: None)
    with fp32_exact():
        spans = capture(view, prompts, lm.tokenizer.pad_token_id)
        note("capture")
        # Lens: all (site, layer, real position) vectors of the batch in one matrix -> blocked GEMMs.
        flat = _gather_rows(spans, view.lens_sites, L, index).reshape(S * L * len(rows.b), -1)
        res = lens.project(flat, tgt_rows.repeat(S * L, 1), top_k)
        norms = flat.norm(dim=-1)
        del flat
        vecs = {s: _gather_rows(spans, [s], L, index)[0] for s in vector_sites(view.matrix_names, vectors == "all")} \
            if vectors != "none" else {}
        note("lens")
        ranks = ranks_for_batch(spans, view.matrix_names, L)
        rank_keys = list(ranks)
        rank_vals = torch.stack([ranks[k] for k in rank_keys], dim=1).int()  # (B, K), on the device
        note("ranks")
    host = to_host([spans.loss.float(), norms.float(), res.top_ids.int(), res.top_logits.float(), res.bottom_ids.int(),
                    res.bottom_logits.float(), res.target_ranks.int(), rank_vals, *(v.float() for v in vecs.values())],
                   pack=host_pack)
    note("copy")
    loss, norms_h, top_ids, top_logits, bot_ids, bot_logits, t_ranks, rank_h, *vec_h = host
    return HostBatch(prompts=prompts, keys=keys, slots=[s for _, s in identity], rows=rows, loss=loss,
                     rank_keys=rank_keys, ranks=rank_h, norms=norms_h, top_ids=top_ids, top_logits=top_logits,
                     bottom_ids=bot_ids, bottom_logits=bot_logits, target_ranks=t_ranks,
                     vectors=dict(zip(vecs, vec_h)))


# ---- the host stage ----------------------------------------------------------------------------------


def build_tables(lm: LoadedModel, batch: HostBatch, run_id: str, *, top_k: int = 10,
                 vectors: str = "none") -> dict[str, pa.Table]:
    """Arrow tables of one computed batch; touches no device, so it may run beside the next batch."""
    prompts, keys, rows = batch.prompts, batch.keys, batch.rows
    n_rows = len(rows.b)
    L = lm.view.n_layers
    vocab = vocabulary(lm.tokenizer)

    prompts_t = pa.table({
        "key": pa.array(keys, pa.string()),
        "run_id": [run_id] * len(prompts),
        "case_id": pa.array([p.record.case_id for p in prompts], pa.int64()),
        "slot": pa.array(batch.slots, pa.string()),
        "model": [lm.name] * len(prompts),
        "model_revision": [lm.revision] * len(prompts),
        "prompt": [p.record.prompt for p in prompts],
        "subject": [p.record.subject for p in prompts],
        "target_new": [p.record.target_new for p in prompts],
        "target_true": [p.record.target_true for p in prompts],
        "target_new_id": pa.array([p.target_new_id for p in prompts], pa.int32()),
        "target_true_id": pa.array([p.target_true_id for p in prompts], pa.int32()),
        "n_tokens": pa.array([p.n_tokens for p in prompts], pa.int32()),
        "loss": pa.array(batch.loss, pa.float32()),
        "vectors": [vectors] * len(prompts),
    })

    token_ids = rows.token_ids
    tokens_t = pa.table({
        "key": rows.key, "run_id": [run_id] * n_rows, "case_id": rows.case_id, "position": rows.pos,
        "token_id": token_ids, "token": vocab.take(pa.array(token_ids.astype(np.int64))),
        "segment": pa.array(rows.segment, pa.string()),
    })

    sites = batch.rank_keys
    B = len(prompts)
    lengths = np.array([p.n_tokens for p in prompts], dtype=np.int32)
    ranks_t = pa.table({
        "key": np.repeat(np.array(keys, dtype=object), len(sites)),
        "run_id": [run_id] * (B * len(sites)),
        "case_id": np.repeat([p.record.case_id for p in prompts], len(sites)).astype(np.int64),
        "model": [lm.name] * (B * len(sites)),
        "layer": np.tile([k[0] for k in sites], B).astype(np.int32),
        "matrix": np.tile(np.array([k[1] for k in sites], dtype=object), B),
        "rank": batch.ranks.reshape(-1).astype(np.int32),
        "n_tokens": np.repeat(lengths, len(sites)),
    })

    # The family's lens sites: ff1_input and ff2_vjp, plus resid_post_vjp behind a post-MLP norm (Gemma).
    lens_sites = lm.view.lens_sites
    S = len(lens_sites)
    N = S * L * n_rows
    norms = batch.norms
    # target ids per projection row (site-major, then layer, then row), for the membership flags
    row_targets = np.array([[p.target_new_id, p.target_true_id] for p in prompts], dtype=np.int32)[rows.b]
    targets = np.tile(row_targets, (S * L, 1)) if n_rows else np.zeros((0, 2), np.int32)
    proj_t = pa.table({
        "key": np.tile(rows.key, S * L),
        "run_id": [run_id] * N,
        "case_id": np.tile(rows.case_id, S * L),
        "model": [lm.name] * N,
        "layer": np.tile(np.repeat(np.arange(L, dtype=np.int32), n_rows), S),
        "site": np.repeat(np.array([str(s) for s in lens_sites], dtype=object), L * n_rows),
        "position": np.tile(rows.pos, S * L),
        "segment": pa.array(np.tile(rows.segment, S * L), pa.string()),
        "norm": norms,
        "zero_vector": norms == 0,
        "top_ids": _list_column(batch.top_ids, top_k, pa.int32()),
        "top_tokens": _label_column(batch.top_ids, vocab),
        "top_logits": _list_column(batch.top_logits, top_k, pa.float32()),
        "bottom_ids": _list_column(batch.bottom_ids, top_k, pa.int32()),
        "bottom_tokens": _label_column(batch.bottom_ids, vocab),
        "bottom_logits": _list_column(batch.bottom_logits, top_k, pa.float32()),
        "target_new_rank": np.ascontiguousarray(batch.target_ranks[:, 0]),
        "target_true_rank": np.ascontiguousarray(batch.target_ranks[:, 1]),
        "target_new_in_top_k": (batch.top_ids == targets[:, :1]).any(axis=1),
        "target_new_in_bottom_k": (batch.bottom_ids == targets[:, :1]).any(axis=1),
        "target_true_in_top_k": (batch.top_ids == targets[:, 1:]).any(axis=1),
        "target_true_in_bottom_k": (batch.bottom_ids == targets[:, 1:]).any(axis=1),
    })
    out = {"prompts": prompts_t, "tokens": tokens_t, "gradient_ranks": ranks_t, "projections": proj_t}
    if vectors != "none":
        out["vectors"] = vectors_table(batch, run_id, L)
    return out


def extract_batch(lm: LoadedModel, prompts: list[PreparedPrompt], run_id: str, *, top_k: int = 10,
                  vectors: str = "none", lens: LogitLens | None = None,
                  identity: list[tuple[str, str]] | None = None) -> dict[str, pa.Table]:
    """Backward pass, ranks, lens and (optionally) vectors for one batch; returns Arrow tables by name.

    ``identity``: (key, slot) per prompt (``blens.extract.identity``); by default computed for this
    model with ``top_k`` and the standard loss and lens.
    """
    batch = compute_batch(lm, prompts, top_k=top_k, vectors=vectors, lens=lens, identity=identity)
    return build_tables(lm, batch, run_id, top_k=top_k, vectors=vectors)


def vectors_table(batch: HostBatch, run_id: str, L: int) -> pa.Table:
    rows = batch.rows
    parts = []
    for site, vecs in batch.vectors.items():  # (L, n, d)
        n, d = vecs.shape[1], vecs.shape[2]
        parts.append(pa.table({
            "key": np.tile(rows.key, L),
            "run_id": [run_id] * (L * n),
            "case_id": np.tile(rows.case_id, L),
            "layer": np.repeat(np.arange(L, dtype=np.int32), n),
            "site": [str(site)] * (L * n),
            "position": np.tile(rows.pos, L),
            "vector": _list_column(vecs, d, pa.float32()),
        }))
    return pa.concat_tables(parts)
