"""The notebook API: the engine of ``blens extract``, one record (or a list) at a time, results as pandas.

    import blens
    lens = blens.load("smollm2-135m")          # any supported name or path; device="auto" | "cpu" | "cuda"
    res = lens.run(record)                     # a CounterFact record (dict), EasyEdit or ROME layout
    res = lens.run("The Eiffel Tower is located in the city of", target=" Rome")   # or any text
    res = lens.run(text, target=" Rome", metric=lambda logits: -logits[rome_id])  # your own loss
    res.projections, res.gradient_ranks        # pandas DataFrames, the warehouse's columns
    res.vectors[("ff2_vjp", 24)]               # tensor (n_tokens, d)
    res.gradient(24, "ff2")                    # dL/dW rebuilt from the spanning set
    lens.run_many(records)                     # batched, with a progress bar (records or strings + target=)

Why there is no second implementation: a batch goes through exactly the functions a ``blens extract``
batch task calls (``records.record_from_dict``, ``prepare.prepare``, ``batching.token_budget_batches``,
``tables.compute_batch`` then ``tables.build_tables``, which together are ``tables.extract_batch``), with the
model from ``models.cached_model`` and the lens from ``lens.lens_for``. So a result's rows are the
warehouse's rows for the same record and settings, ``key`` included; only ``run_id`` differs
(:data:`RUN_ID`), and the warehouse's ``batch_id`` is not there (it names a commit). Records batched as
``blens extract`` batched them (the same records, sorted and cut the same way) give bit-identical rows;
in another batch (``run`` is a batch of one) padding changes the floating-point summation order, which
moves norms and logits by ~1e-6 relative and, where another token ties the target, a rank by 1 or 2.

``run_many`` returns a :class:`Results`: a list of :class:`Result` in input order (a record given twice is
computed once and both entries are the same object, as the warehouse stores each key once) whose
``projections``/``gradient_ranks``/``tokens``/``prompts`` are the results' frames concatenated.

Any text: a record needs only a prompt and a target (``run(text, target=...)``, or a dict without case_id,
subject or ground_truth). What is not given is NULL in the frames: ``case_id``; without a subject there is
no 'subject' segment and the roles between ``bos`` and ``last`` are NULL; without a true answer every
target_true column (``target_true_id``, ``target_true_rank``, ``target_true_in_*``, ``model_answer_is_true``).
The computation is the pipeline's, with placeholders where a value is missing (they only feed the columns
that are then set to NULL), so a full dict record still gives the warehouse's rows.

``metric=``: your loss instead of the NLL of the target's first token. It gets one prompt's next-token logits
at its last position, a tensor of shape (vocab,), and returns a scalar tensor; it is called once per prompt
of a batch and its values are stacked into ``capture.trace``'s per-row loss, so the spanning sets, gradients,
ranks and VJP projections are those of your loss (``res.loss`` is its value). The target still names the
token whose lens ranks the frames report. Such results carry ``loss: "metric:<name>"`` in their settings,
so they never share a key with the default loss's.

Memory: ``res.vectors`` holds every spanning vector of the prompt, x_i and delta_i of every matrix at every
layer, about 5.5 MB per 8-token prompt on SmolLM2-135M. For thousands of records pass ``vectors=False``
(the frames alone are ~0.1 MB per prompt).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from blens.extract.config import ExtractConfig
from blens.extract.identity import result_identity
from blens.extract.batching import batch_limits, token_budget_batches
from blens.extract.lens import lens_for
from blens.extract.models import EMBEDDED_NAME, LoadedModel, cached_model, resolve_device
from blens.extract.prepare import DEFAULT_MAX_PROMPT_TOKENS, PreparedPrompt, prepare
from blens.extract.records import EditRecord, RecordError, record_from_dict, record_from_text
from blens.extract.tables import HostBatch, build_tables, compute_batch

from .results import Result, Results

RUN_ID = "notebook"  # the run_id of every row a notebook computes (provenance: no run registered it)
# The columns that say something about the record's case_id / true answer: NULL where the record has none.
_CASE_COLUMNS = ("case_id",)
_TRUE_COLUMNS = {"prompts": ("target_true_id", "model_answer_is_true"),
                 "projections": ("target_true_rank", "target_true_in_top_k", "target_true_in_bottom_k")}
Metric = Callable[[torch.Tensor], torch.Tensor]  # (vocab,) last-position logits -> scalar loss


class RecordInvalid(ValueError):
    """A record the pipeline would put in ``errors``; ``.error`` is that row (case_id, field, message)."""

    def __init__(self, error: RecordError, n_more: int = 0):
        who = f"case_id {error.case_id}" if error.case_id is not None else f"record {error.source}"
        more = f" (and {n_more} more invalid record(s); run_many(..., skip_invalid=True) skips them)" if n_more else ""
        super().__init__(f"{who}: field {error.field!r}: {error.message}{more}")
        self.error = error


class _KeepLensInput:
    """Stands in for the lens inside ``compute_batch`` and keeps what it is given.

    compute_batch hands ``lens.project`` every lens-site vector of the batch, raw, as one (sites x layers x
    real rows, d) matrix. Keeping it is how ``res.vectors`` gets the lens sites that ``vectors="all"`` does
    not store (Gemma's ``resid_post_vjp``) without a second backward pass."""

    def __init__(self, lens):
        self.lens = lens
        self.vectors: torch.Tensor | None = None

    def project(self, vectors: torch.Tensor, targets: torch.Tensor, k: int):
        self.vectors = vectors
        return self.lens.project(vectors, targets, k)


class Lens:
    """A loaded model with the extraction settings (``top_k``, prompt length bound)."""

    def __init__(self, lm: LoadedModel, cfg: ExtractConfig):
        self.lm = lm
        self.cfg = cfg
        self._lens = lens_for(lm)

    @property
    def model(self) -> str:
        return self.lm.name

    def __repr__(self) -> str:
        v = self.lm.view
        return (f"Lens(model={self.lm.name!r}, family={v.family.name!r}, n_layers={v.n_layers}, "
                f"vocab_size={v.vocab_size}, device={str(self.lm.device)!r}, top_k={self.cfg.top_k})")

    def _prepare(self, raw, source: str, target=None) -> PreparedPrompt | RecordError:
        if isinstance(raw, EditRecord):
            record = raw
        elif isinstance(raw, str):
            record = record_from_text(raw, target, source)
        else:
            record = record_from_dict(raw, source, optional=True)
        if isinstance(record, RecordError):
            return record
        return prepare(record, self.lm.tokenizer, self.lm.view.max_positions, self.cfg.max_prompt_tokens)

    def run(self, record, target: str | None = None, *, subject: str | None = None, target_true: str | None = None,
            case_id: int | None = None, metric: Metric | None = None, vectors: bool = True) -> Result:
        """Extract one prompt: any text with ``target`` (the token the loss is about; ``subject``,
        ``target_true`` and ``case_id`` are optional), or a record (a dict in the EasyEdit or ROME layout, where
        only prompt and target_new are required, or an ``EditRecord``). ``metric``: the loss from the
        last-position logits (vocab,) to a scalar, instead of the NLL of the target's first token. A record the
        pipeline would reject raises :class:`RecordInvalid` (a ValueError naming the record and the field)."""
        if isinstance(record, str):
            record = {"prompt": record, "target_new": target, "subject": subject, "ground_truth": target_true,
                      "case_id": case_id}
        elif target is not None or subject is not None or target_true is not None or case_id is not None:
            raise TypeError("target=, subject=, target_true= and case_id= go with a text prompt; a record carries "
                            "its own")
        return self.run_many([record], metric=metric, vectors=vectors, progress=False)[0]

    def run_many(self, records: Iterable, *, target: str | Sequence[str] | None = None, metric: Metric | None = None,
                 vectors: bool = True, progress: bool = True, skip_invalid: bool = False) -> Results:
        """Extract many prompts in token-budget batches (``batch_size`` prompts, ``batch_tokens`` padded
        tokens, as ``blens extract``), with a progress bar. ``records``: records (dicts, ``EditRecord``) or
        strings, whose targets come from ``target`` (one for all, or one per string, in order). ``metric``: as
        in :meth:`run`, applied to each prompt. Invalid records raise :class:`RecordInvalid` before anything is
        computed, or with ``skip_invalid=True`` are left out and listed in ``.errors``."""
        records = list(records)
        texts = [i for i, r in enumerate(records) if isinstance(r, str)]
        if isinstance(target, str) or target is None:
            targets = {i: target for i in texts}
        else:
            target = list(target)
            if len(target) != len(texts):
                raise ValueError(f"target has {len(target)} entries for {len(texts)} text prompt(s); give one "
                                 "per text prompt, or one string for all")
            targets = dict(zip(texts, target))
        prepared: list[PreparedPrompt | None] = []
        errors: list[RecordError] = []
        for i, raw in enumerate(records):
            p = self._prepare(raw, f"records[{i}]", targets.get(i))
            prepared.append(None if isinstance(p, RecordError) else p)
            if isinstance(p, RecordError):
                errors.append(p)
        if errors and not skip_invalid:
            raise RecordInvalid(errors[0], len(errors) - 1)
        if metric is not None and not callable(metric):
            raise TypeError(f"metric must be a callable (logits of shape (vocab,) -> scalar), got {metric!r}")
        settings = self.cfg.result_settings(self.lm.view.lens_sites)
        if metric is not None:  # another loss is another result: never the default loss's key
            settings = {**settings, "loss": f"metric:{getattr(metric, '__qualname__', type(metric).__name__)}"}
        identity = {id(p): result_identity(self.lm.name, self.lm.revision, settings, p.record)
                    for p in prepared if p is not None}
        keys = [None if p is None else identity[id(p)][0] for p in prepared]
        todo = list({k: p for k, p in zip(keys, prepared) if p is not None}.values())
        # the plan's order (run/extract.py) (the same records batch alike); records without a case_id after those with one
        todo.sort(key=lambda p: (p.n_tokens, p.record.case_id is None, p.record.case_id or 0))
        done: dict[str, Result] = {}
        batches = token_budget_batches(todo, *batch_limits(self.lm, self.cfg.batch_size, self.cfg.batch_tokens))
        with _progress(progress and len(todo) > 1, len(todo), self.lm.name) as advance:
            for batch in batches:
                done.update(self._batch(batch, [identity[id(p)] for p in batch], vectors, settings, metric))
                advance(len(batch))
        return Results([done[k] for k in keys if k is not None], errors)

    def _batch(self, batch: list[PreparedPrompt], identity: list[tuple[str, str]], vectors: bool, settings: dict,
               metric: Metric | None = None) -> dict[str, Result]:
        lm, top_k = self.lm, self.cfg.top_k
        keep = _KeepLensInput(self._lens) if vectors else None  # without vectors, hold no batch-sized copy
        host = compute_batch(lm, [_placeholders(p) for p in batch], top_k=top_k,
                             vectors="all" if vectors else "none", lens=keep or self._lens, identity=identity,
                             settings=settings, metric=None if metric is None else _per_row(metric, batch))
        tables = build_tables(lm, host, RUN_ID, top_k=top_k)
        if vectors:  # kept in res.vectors (every site and layer, as --vectors all stores), not in a vectors table
            prompts = tables["prompts"]
            i = prompts.schema.get_field_index("vectors")
            tables["prompts"] = prompts.set_column(i, prompts.schema.field(i),
                                                   pa.array(["all"] * len(prompts), pa.string()))
        out = {}
        for b, (p, key) in enumerate(zip(batch, host.keys)):
            mine = {name: t.filter(pc.equal(t["key"], key)) for name, t in tables.items() if "key" in t.column_names}
            vecs = _vectors_of(lm, host, keep.vectors, b) if vectors else {}
            out[key] = Result(p.record, p, lm.name, lm.view.vocab_size, _unknown_to_null(mine, p.record), vecs)
        return out


def _placeholders(p: PreparedPrompt) -> PreparedPrompt:
    """``p`` as the pipeline's functions take it: a missing case_id is 0 and a missing target_true's id is
    target_new's. They only feed columns that :func:`_unknown_to_null` then sets to NULL."""
    if p.record.case_id is not None and p.target_true_id is not None:
        return p
    record = p.record if p.record.case_id is not None else dataclasses.replace(p.record, case_id=0)
    true_id = p.target_true_id if p.target_true_id is not None else p.target_new_id
    return dataclasses.replace(p, record=record, target_true_id=true_id)


def _unknown_to_null(tables: dict[str, pa.Table], record: EditRecord) -> dict[str, pa.Table]:
    """The record's tables with NULL in the columns about what it does not give (case_id, target_true)."""
    out = {}
    for name, t in tables.items():
        cols = (_CASE_COLUMNS if record.case_id is None else ()) + \
            (_TRUE_COLUMNS.get(name, ()) if record.target_true is None else ())
        for col in cols:
            i = t.schema.get_field_index(col)
            if i >= 0:
                t = t.set_column(i, t.schema.field(i), pa.nulls(len(t), t.schema.field(i).type))
        out[name] = t
    return out


def _per_row(metric: Metric, batch: list[PreparedPrompt]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The user's one-prompt metric as ``capture.trace``'s per-row loss: called on each row of the (B, V)
    last-position logits, the scalars stacked to (B,). A value that is not a scalar tensor depending on the
    logits is refused, naming the record."""

    def loss(logits: torch.Tensor) -> torch.Tensor:
        values = []
        for b, row in enumerate(logits):
            v = metric(row)
            who = f"metric on {batch[b].record.source or 'the record'}"
            if not isinstance(v, torch.Tensor) or v.numel() != 1:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{who}: must return a scalar tensor, got {shape}")
            if not v.requires_grad:
                raise ValueError(f"{who}: its value does not depend on the logits (no gradient reaches them)")
            values.append(v.reshape(()).to(logits.dtype))
        return torch.stack(values)

    return loss


def _vectors_of(lm: LoadedModel, host: HostBatch, lens_input: torch.Tensor,
                b: int) -> dict[tuple[str, int], torch.Tensor]:
    """Prompt ``b``'s vectors of every site and layer, (n_tokens, d) each, from the batch's real-token rows:
    the sites ``vectors="all"`` stores, and the lens sites it does not (from the lens input)."""
    rows = np.flatnonzero(host.rows.b == b)
    per_site = {str(s): torch.from_numpy(np.ascontiguousarray(v[:, rows])) for s, v in host.vectors.items()}
    sites = lm.view.lens_sites
    flat = lens_input.detach().reshape(len(sites), lm.view.n_layers, len(host.rows.b), -1)
    for i, site in enumerate(sites):
        if str(site) not in per_site:
            per_site[str(site)] = flat[i][:, torch.from_numpy(rows).to(flat.device)].float().cpu()
    return {(site, layer): v[layer] for site, v in per_site.items() for layer in range(lm.view.n_layers)}


@contextlib.contextmanager
def _progress(enabled: bool, total: int, model: str):
    """A rich progress bar over prompts (Jupyter renders it as a live widget); yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(model), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
        task = bar.add_task("extract", total=total)
        yield lambda n: bar.advance(task, n)


def load(model: str = EMBEDDED_NAME, device: str = "auto", *, top_k: int = 10,
         max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS, batch_size: int | None = None,
         batch_tokens: int | None = None) -> Lens:
    """A model ready to run records: an embedded name (``smollm2-135m``, ``gemma3-270m``), a local directory
    or a hub name of a supported family; ``device`` "auto" (CUDA when present), "cpu" or "cuda".

    The settings are ``blens extract``'s, checked by the same ``ExtractConfig``; with the defaults a result
    equals the warehouse's rows of a default ``blens extract`` of the same model. The model is loaded once
    per process (``models.cached_model``), so calling ``load`` again is free."""
    cfg = ExtractConfig(model=model, data="<notebook>", device=device, top_k=top_k,
                        max_prompt_tokens=max_prompt_tokens, batch_size=batch_size, batch_tokens=batch_tokens)
    return Lens(cached_model(model, str(resolve_device(device))), cfg)
