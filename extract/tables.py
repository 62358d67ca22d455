"""One batch of prompts in, warehouse-shaped Arrow tables out. Plain functions, no orchestration.

Two stages, so that a caller can overlap them (``blens.run.overlap``): :func:`compute_batch` runs
everything that touches the model's device (capture, lens, ranks) and ends in *one* device-to-host copy
(:func:`to_host`) into a :class:`HostBatch` of numpy arrays; :func:`build_tables` turns that into Arrow
tables on the host alone. :func:`extract_batch` is the two in a row.

The Arrow tables are built column-wise from numpy arrays (``repeat``/``tile`` for keys, list columns from
flat values + offsets, token strings by ``take`` from a vocabulary array), never row by row in Python: a
batch of 32 prompts is ~17,000 projection rows. Row indices come from the prompts' lengths on the host,
never from the device mask, so the device stage reads nothing back before its final copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from .adapters import Site, similarity_sites, vector_sites
from .capture import SpanningSets, capture
from .identity import result_identity, result_settings, settings_id, settings_json
from .lens import LogitLens, fp32_exact
from .models import LoadedModel
from .prepare import PreparedPrompt
from .ranks import ranks_for_batch
from .vocabulary import vocabulary


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
    role: np.ndarray
    token_ids: np.ndarray

    @classmethod
    def of(cls, prompts: list[PreparedPrompt], keys: list[str]) -> "_Rows":
        lengths = np.array([p.n_tokens for p in prompts], dtype=np.int64)
        b = np.repeat(np.arange(len(prompts), dtype=np.int64), lengths)
        pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]) if len(prompts) else np.zeros(0, np.int32)
        cases = np.array([p.record.case_id for p in prompts], dtype=np.int64)
        segs = np.array([s for p in prompts for s in p.segments], dtype=object)
        roles = np.array([r for p in prompts for r in (p.roles or (None,) * p.n_tokens)], dtype=object)
        ids = np.array([i for p in prompts for i in p.input_ids], dtype=np.int32)
        return cls(b=b, pos=pos, case_id=cases[b], key=np.array(keys, dtype=object)[b], segment=segs, role=roles,
                   token_ids=ids)

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
    target_ranks: np.ndarray  # (N, 3) int32: target_new, target_true, the model's answer
    answer_ids: np.ndarray  # (B,) int32: argmax of the unedited next-token logits at the last position
    similarity: np.ndarray  # (n_similarity_sites, B, L, L) float32: cosines of the last position's VJPs
    settings: dict = field(default_factory=dict)  # the result settings every row of this batch was made under
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


def layer_cosines(last: torch.Tensor) -> torch.Tensor:
    """(B, L, L) cosine similarity between the layers' vectors of each row of ``last`` (B, L, d), in float64.

    The diagonal is exactly 1 for a non-zero vector (it is 1 by definition; computed, it would be 1 +- an ulp),
    and a pair with a zero vector has no direction: NaN (stored as NULL)."""
    v = last.double()
    norms = v.norm(dim=-1)  # (B, L)
    unit = v / norms.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-1)
    cos = (unit @ unit.transpose(-1, -2)).clamp(-1.0, 1.0)
    eye = torch.eye(v.shape[1], dtype=torch.bool, device=v.device)
    cos = torch.where(eye, torch.ones_like(cos), cos)
    zero = (norms == 0)
    return cos.masked_fill(zero.unsqueeze(-1) | zero.unsqueeze(-2), float("nan"))


def compute_batch(lm: LoadedModel, prompts: list[PreparedPrompt], *, top_k: int = 10, vectors: str = "none",
                  lens: LogitLens | None = None, identity: list[tuple[str, str]] | None = None,
                  mark: Callable[[str], None] | None = None, host_pack: bool | None = None,
                  settings: dict | None = None, metric: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> HostBatch:
    """The device stage of one batch: capture, lens, ranks, then one copy of everything to the host.

    Everything the device needs from the host (ids, mask, row index, target ids) is copied before the
    capture starts; after that nothing is read back until :func:`to_host` (the gradient ranks too: they
    stay on the device until that copy). ``mark(stage)``, if given, is called after each stage
    ("capture", "lens", "ranks", "copy"); a timing harness can synchronise the device there.
    ``host_pack``: passed to :func:`to_host` (``True`` runs the packed copy on CPU too, for tests).
    ``metric``: the per-row loss from the (B, V) last-position logits instead of the NLL of target_new (the
    notebook API's ``metric=``; pass ``settings`` that say so, since the loss is part of a result's identity).
    """
    view = lm.view
    device = view.unembedding.device
    settings = settings or result_settings(top_k, view.lens_sites)
    if identity is None:
        identity = [result_identity(lm.name, lm.revision, settings, p.record) for p in prompts]
    keys = [k for k, _ in identity]
    rows = _Rows.of(prompts, keys)
    width = max(p.n_tokens for p in prompts)
    L = view.n_layers
    S = len(view.lens_sites)
    row_targets = np.array([[p.target_new_id, p.target_true_id] for p in prompts], dtype=np.int64)[rows.b]
    index = torch.from_numpy(rows.flat_index(width)).to(device)
    row_b = torch.from_numpy(rows.b).to(device)
    last_pos = torch.tensor([p.n_tokens - 1 for p in prompts], device=device)
    tgt_rows = torch.from_numpy(row_targets).to(device)
    lens = lens or LogitLens.of(view)
    note = mark or (lambda _stage: None)
    with fp32_exact():
        spans = capture(view, prompts, lm.tokenizer.pad_token_id, metric=metric)
        note("capture")
        # the model's own answer is the lens's third target (its rank at every site, layer and position)
        tgt_rows = torch.cat([tgt_rows, spans.answer_ids[row_b].unsqueeze(1)], dim=1)
        # Lens: all (site, layer, real position) vectors of the batch in one matrix -> blocked GEMMs.
        flat = _gather_rows(spans, view.lens_sites, L, index).reshape(S * L * len(rows.b), -1)
        res = lens.project(flat, tgt_rows.repeat(S * L, 1), top_k)
        norms = flat.norm(dim=-1)
        del flat
        # Appendix G: the last position's VJP of each layer against every other layer's
        batch_rows = torch.arange(len(prompts), device=device)
        sim = [layer_cosines(torch.stack([spans.site(layer, s)[batch_rows, last_pos] for layer in range(L)], 1))
               for s in similarity_sites(view.family)]
        similarity = torch.stack(sim) if sim else torch.zeros((0, len(prompts), L, L), device=device)
        vecs = {s: _gather_rows(spans, [s], L, index)[0] for s in vector_sites(view.matrix_names, vectors == "all")} \
            if vectors != "none" else {}
        note("lens")
        ranks = ranks_for_batch(spans, view.matrix_names, L)
        rank_keys = list(ranks)
        rank_vals = torch.stack([ranks[k] for k in rank_keys], dim=1).int()  # (B, K), on the device
        note("ranks")
    host = to_host([spans.loss.float(), norms.float(), res.top_ids.int(), res.top_logits.float(), res.bottom_ids.int(),
                    res.bottom_logits.float(), res.target_ranks.int(), rank_vals, spans.answer_ids.int(),
                    similarity.float(), *(v.float() for v in vecs.values())],
                   pack=host_pack)
    note("copy")
    loss, norms_h, top_ids, top_logits, bot_ids, bot_logits, t_ranks, rank_h, answer_h, sim_h, *vec_h = host
    return HostBatch(prompts=prompts, keys=keys, slots=[s for _, s in identity], rows=rows, loss=loss,
                     rank_keys=rank_keys, ranks=rank_h, norms=norms_h, top_ids=top_ids, top_logits=top_logits,
                     bottom_ids=bot_ids, bottom_logits=bot_logits, target_ranks=t_ranks, answer_ids=answer_h,
                     similarity=sim_h, settings=settings, vectors=dict(zip(vecs, vec_h)))


# ---- the host stage ----------------------------------------------------------------------------------


def build_tables(lm: LoadedModel, batch: HostBatch, run_id: str, *, top_k: int = 10,
                 vectors: str = "none") -> dict[str, pa.Table]:
    """Arrow tables of one computed batch; touches no device, so it may run beside the next batch."""
    prompts, keys, rows = batch.prompts, batch.keys, batch.rows
    n_rows = len(rows.b)
    L = lm.view.n_layers
    vocab = vocabulary(lm.tokenizer)
    sid = settings_id(batch.settings)
    answers = batch.answer_ids.astype(np.int32)
    true_ids = np.array([p.target_true_id for p in prompts], dtype=np.int32)

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
        "settings": [sid] * len(prompts),
        "model_answer_id": pa.array(answers, pa.int32()),
        "model_answer_token": vocab.take(pa.array(answers.astype(np.int64))),
        "model_answer_is_true": pa.array(answers == true_ids, pa.bool_()),
    })

    token_ids = rows.token_ids
    tokens_t = pa.table({
        "key": rows.key, "run_id": [run_id] * n_rows, "case_id": rows.case_id, "position": rows.pos,
        "token_id": token_ids, "token": vocab.take(pa.array(token_ids.astype(np.int64))),
        "segment": pa.array(rows.segment, pa.string()),
        "settings": [sid] * n_rows,
        "role": pa.array(rows.role, pa.string()),
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
        "settings": [sid] * (B * len(sites)),
    })

    # The family's lens sites: ff1_input and ff2_vjp, plus resid_post_vjp behind a post-MLP norm (Gemma).
    lens_sites = lm.view.lens_sites
    S = len(lens_sites)
    N = S * L * n_rows
    norms = batch.norms
    # target ids per projection row (site-major, then layer, then row), for the membership flags
    row_targets = np.column_stack([np.array([[p.target_new_id, p.target_true_id] for p in prompts], np.int32),
                                   answers])[rows.b]
    targets = np.tile(row_targets, (S * L, 1)) if n_rows else np.zeros((0, 3), np.int32)
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
        "target_true_in_top_k": (batch.top_ids == targets[:, 1:2]).any(axis=1),
        "target_true_in_bottom_k": (batch.bottom_ids == targets[:, 1:2]).any(axis=1),
        "settings": [sid] * N,
        "role": pa.array(np.tile(rows.role, S * L), pa.string()),
        "model_answer_rank": np.ascontiguousarray(batch.target_ranks[:, 2]),
        "model_answer_in_top_k": (batch.top_ids == targets[:, 2:3]).any(axis=1),
        "model_answer_in_bottom_k": (batch.bottom_ids == targets[:, 2:3]).any(axis=1),
    })
    out = {"prompts": prompts_t, "tokens": tokens_t, "gradient_ranks": ranks_t, "projections": proj_t,
           "vjp_similarity": similarity_table(lm, batch, run_id, sid),
           "settings": pa.table({"settings": [sid], "settings_json": [settings_json(batch.settings)]})}
    if vectors != "none":
        out["vectors"] = vectors_table(batch, run_id, L, sid)
    return out


def similarity_table(lm: LoadedModel, batch: HostBatch, run_id: str, sid: str) -> pa.Table:
    """``vjp_similarity`` rows: per prompt, site and layer, the cosines of the last position's VJP at that layer
    with the one at every layer (list index = the other layer); Appendix G's view averages them."""
    sites = similarity_sites(lm.view.family)
    n_sites, B, L = len(sites), len(batch.prompts), lm.view.n_layers
    n = n_sites * B * L
    cos = batch.similarity.reshape(n, L)  # site-major, then prompt, then layer
    flat = pa.array(cos.reshape(-1), pa.float32(), mask=np.isnan(cos.reshape(-1)))
    return pa.table({
        "key": np.tile(np.repeat(np.array(batch.keys, dtype=object), L), n_sites),
        "run_id": [run_id] * n,
        "case_id": np.tile(np.repeat(np.array([p.record.case_id for p in batch.prompts], np.int64), L), n_sites),
        "model": [lm.name] * n,
        "settings": [sid] * n,
        "site": np.repeat(np.array([str(s) for s in sites], dtype=object), B * L),
        "layer": np.tile(np.arange(L, dtype=np.int32), n_sites * B),
        "cosines": pa.ListArray.from_arrays(pa.array(np.arange(0, n * L + 1, L, dtype=np.int32)), flat),
    })


def extract_batch(lm: LoadedModel, prompts: list[PreparedPrompt], run_id: str, *, top_k: int = 10,
                  vectors: str = "none", lens: LogitLens | None = None,
                  identity: list[tuple[str, str]] | None = None, settings: dict | None = None) -> dict[str, pa.Table]:
    """Backward pass, ranks, lens and (optionally) vectors for one batch; returns Arrow tables by name.

    ``identity``: (key, slot) per prompt (``blens.extract.identity``); by default computed for this
    model with ``top_k`` and the standard loss and lens.
    """
    batch = compute_batch(lm, prompts, top_k=top_k, vectors=vectors, lens=lens, identity=identity, settings=settings)
    return build_tables(lm, batch, run_id, top_k=top_k, vectors=vectors)


def vectors_table(batch: HostBatch, run_id: str, L: int, sid: str) -> pa.Table:
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
            "settings": [sid] * (L * n),
        }))
    return pa.concat_tables(parts)
