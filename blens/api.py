"""The notebook API: the engine of ``blens extract``, one record (or a list) at a time, results as pandas.

    import blens
    lens = blens.load("smollm2-135m")          # any supported name or path; device="auto" | "cpu" | "cuda"
    res = lens.run(record)                     # a CounterFact record (dict), EasyEdit or ROME layout
    res.projections, res.gradient_ranks        # pandas DataFrames, the warehouse's columns
    res.vectors[("ff2_vjp", 24)]               # tensor (n_tokens, d)
    res.gradient(24, "ff2")                    # dL/dW rebuilt from the spanning set
    lens.run_many(records)                     # batched, with a progress bar

Why there is no second implementation: a batch goes through exactly the functions a ``blens extract``
batch task calls (``records.record_from_dict``, ``prepare.prepare``, ``batching.token_budget_batches``,
``tables.compute_batch`` then ``tables.build_tables``, which together are ``tables.extract_batch``), with the
model from ``models.cached_model`` and the lens from ``job.make_lens``. So a result's rows are the
warehouse's rows for the same record and settings, ``key`` included; only ``run_id`` differs
(:data:`RUN_ID`), and the warehouse's ``batch_id`` is not there (it names a commit). Records batched as
``blens extract`` batched them (the same records, sorted and cut the same way) give bit-identical rows;
in another batch (``run`` is a batch of one) padding changes the floating-point summation order, which
moves norms and logits by ~1e-6 relative and, where another token ties the target, a rank by 1 or 2.

``run_many`` returns a :class:`Results`: a list of :class:`Result` in input order (a record given twice is
computed once and both entries are the same object, as the warehouse stores each key once) whose
``projections``/``gradient_ranks``/``tokens``/``prompts`` are the results' frames concatenated.

Memory: ``res.vectors`` holds every spanning vector of the prompt, x_i and delta_i of every matrix at every
layer, about 5.5 MB per 8-token prompt on SmolLM2-135M. For thousands of records pass ``vectors=False``
(the frames alone are ~0.1 MB per prompt).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from blens.extract.adapters import Site
from blens.extract.config import ExtractConfig
from blens.extract.identity import result_key
from blens.extract.batching import batch_limits, token_budget_batches
from blens.extract.job import make_lens
from blens.extract.models import EMBEDDED_NAME, LoadedModel, cached_model, resolve_device
from blens.extract.prepare import DEFAULT_MAX_PROMPT_TOKENS, PreparedPrompt, prepare
from blens.extract.records import EditRecord, RecordError, record_from_dict
from blens.extract.tables import HostBatch, build_tables, compute_batch

RUN_ID = "notebook"  # the run_id of every row a notebook computes (provenance: no run registered it)
_INPUT_OF = {"ff1": Site.FF1_INPUT, "ff1_gate": Site.FF1_INPUT, "ff2": Site.FF2_INPUT}  # ff1, ff1_gate share x_i


class RecordInvalid(ValueError):
    """A record the pipeline would put in ``errors``; ``.error`` is that row (case_id, field, message)."""

    def __init__(self, error: RecordError, n_more: int = 0):
        who = f"case_id {error.case_id}" if error.case_id is not None else f"record {error.source}"
        more = f" (and {n_more} more invalid record(s); run_many(..., skip_invalid=True) skips them)" if n_more else ""
        super().__init__(f"{who}: field {error.field!r}: {error.message}{more}")
        self.error = error


@dataclass(eq=False)
class Result:
    """One record's extraction: the warehouse's rows (as Arrow, shown as pandas) and its spanning vectors."""

    record: EditRecord
    prepared: PreparedPrompt
    model: str
    vocab_size: int
    tables: dict[str, pa.Table]  # prompts, tokens, gradient_ranks, projections: the warehouse's columns
    vectors: dict[tuple[str, int], torch.Tensor] = field(repr=False)  # (site, layer) -> (n_tokens, d)

    @property
    def key(self) -> str:
        return self.tables["prompts"]["key"][0].as_py()

    @property
    def loss(self) -> float:
        """NLL of target_new's first token at the last position: the loss whose gradient this is."""
        return float(self.tables["prompts"]["loss"][0].as_py())

    @functools.cached_property
    def projections(self):
        return self.tables["projections"].to_pandas()

    @functools.cached_property
    def gradient_ranks(self):
        return self.tables["gradient_ranks"].to_pandas()

    @functools.cached_property
    def tokens(self):
        return self.tables["tokens"].to_pandas()

    @functools.cached_property
    def prompts(self):
        return self.tables["prompts"].to_pandas()

    def gradient(self, layer: int, matrix: str) -> torch.Tensor:
        """dL/dW of one MLP matrix, (d_in, d_out), rebuilt from its spanning set: sum_i outer(x_i, delta_i).

        The (d_in, d_out) orientation is ``ModelView.weight``'s for every family (GPT-2 stores W that way,
        nn.Linear as its transpose)."""
        if matrix not in _INPUT_OF:
            raise ValueError(f"matrix must be one of {', '.join(_INPUT_OF)}, not {matrix!r}")
        x_key, d_key = (str(_INPUT_OF[matrix]), layer), (str(Site.of(matrix, vjp=True)), layer)
        if not self.vectors:
            raise ValueError("this result has no vectors (it was computed with vectors=False)")
        if x_key not in self.vectors or d_key not in self.vectors:
            layers = sorted({key[1] for key in self.vectors})
            raise ValueError(f"no spanning set for layer {layer} {matrix} (layers {layers[0]}..{layers[-1]}; "
                             f"this model's matrices: {', '.join(self.matrices)})")
        return self.vectors[x_key].T @ self.vectors[d_key]

    @property
    def matrices(self) -> list[str]:
        """The model's MLP matrices whose gradient :meth:`gradient` rebuilds (``ff1``, ``ff1_gate`` where the family
        has one, ``ff2``); the attention's ranks are in ``gradient_ranks`` (their spanning sets are not kept)."""
        return sorted(m for m in self.tables["gradient_ranks"]["matrix"].unique().to_pylist() if m in _INPUT_OF)

    def grid_html(self, site: str = "ff2_vjp") -> str:
        """The prompt's logit-lens table as HTML: the report's table for this record (``ff2_vjp``: the paper's
        shift, least probable tokens; ``ff1_input``: the imprint, most probable tokens)."""
        from blens.publish.report import Case, render_grid
        from blens.publish.tokens import case_grid, grid_caption

        rec, p = self.record, self.prepared
        tokens = [(r["position"], r["token"], r["segment"]) for r in self.tables["tokens"].to_pylist()]
        grid = case_grid(self.tables["projections"].to_pylist(), tokens, site, p.target_new_id, p.target_true_id,
                         self.vocab_size)
        if grid is None:
            raise ValueError(f"no projections for site {site!r} (lens sites: "
                             f"{', '.join(self.tables['projections']['site'].unique().to_pylist())})")
        case = Case(rec.case_id, self.model, rec.prompt, rec.subject, rec.target_new, rec.target_true, tokens)
        return render_grid(grid, case, self.loss, grid_caption(grid, rec.case_id, self.model, rec.target_new,
                                                                rec.target_true))

    def _repr_html_(self) -> str:
        return self.grid_html("ff2_vjp")

    def __repr__(self) -> str:
        return (f"Result(case_id={self.record.case_id}, model={self.model!r}, n_tokens={self.prepared.n_tokens}, "
                f"loss={self.loss:.4f}, vectors={len(self.vectors)})")


class Results(list):
    """``run_many``'s answer: the results in input order, plus their frames concatenated and the records
    skipped as invalid (``errors``, only with ``skip_invalid=True``)."""

    def __init__(self, results: Iterable[Result], errors: list[RecordError]):
        super().__init__(results)
        self.errors = errors

    def _concat(self, name: str):
        unique = list({id(r): r for r in self}.values())  # a record given twice is one result
        if not unique:
            raise ValueError("no results (every record was invalid)")
        return pa.concat_tables([r.tables[name] for r in unique]).to_pandas()

    @property
    def projections(self):
        return self._concat("projections")

    @property
    def gradient_ranks(self):
        return self._concat("gradient_ranks")

    @property
    def tokens(self):
        return self._concat("tokens")

    @property
    def prompts(self):
        return self._concat("prompts")


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
    """A loaded model with the extraction settings (``top_k``, lens dtype, prompt length bound)."""

    def __init__(self, lm: LoadedModel, cfg: ExtractConfig):
        self.lm = lm
        self.cfg = cfg
        self._lens = make_lens(lm, cfg.lens_dtype)

    @property
    def model(self) -> str:
        return self.lm.name

    def __repr__(self) -> str:
        v = self.lm.view
        return (f"Lens(model={self.lm.name!r}, family={v.family.name!r}, n_layers={v.n_layers}, "
                f"vocab_size={v.vocab_size}, device={str(self.lm.device)!r}, top_k={self.cfg.top_k})")

    def _prepare(self, raw, source: str) -> PreparedPrompt | RecordError:
        record = raw if isinstance(raw, EditRecord) else record_from_dict(raw, source)
        if isinstance(record, RecordError):
            return record
        return prepare(record, self.lm.tokenizer, self.lm.view.max_positions, self.cfg.max_prompt_tokens)

    def run(self, record, *, vectors: bool = True) -> Result:
        """Extract one record (a dict in the EasyEdit or ROME layout, or an ``EditRecord``); a record the
        pipeline would reject raises :class:`RecordInvalid` (a ValueError naming case_id and field)."""
        return self.run_many([record], vectors=vectors, progress=False)[0]

    def run_many(self, records: Iterable, *, vectors: bool = True, progress: bool = True,
                 skip_invalid: bool = False) -> Results:
        """Extract many records in token-budget batches (``batch_size`` prompts, ``batch_tokens`` padded
        tokens, as ``blens extract``), with a progress bar. Invalid records raise :class:`RecordInvalid`
        before anything is computed, or with ``skip_invalid=True`` are left out and listed in ``.errors``."""
        prepared: list[PreparedPrompt | None] = []
        errors: list[RecordError] = []
        for i, raw in enumerate(records):
            p = self._prepare(raw, f"records[{i}]")
            prepared.append(None if isinstance(p, RecordError) else p)
            if isinstance(p, RecordError):
                errors.append(p)
        if errors and not skip_invalid:
            raise RecordInvalid(errors[0], len(errors) - 1)
        settings = self.cfg.result_settings(self.lm.view.lens_sites)
        keys = [None if p is None else result_key(self.lm.name, self.lm.revision, settings, p.record)
                for p in prepared]
        todo = list({k: p for k, p in zip(keys, prepared) if p is not None}.values())
        todo.sort(key=lambda p: (p.n_tokens, p.record.case_id))  # plan_run's order: the same records batch alike
        done: dict[str, Result] = {}
        batches = token_budget_batches(todo, *batch_limits(self.lm, self.cfg.batch_size, self.cfg.batch_tokens))
        with _progress(progress and len(todo) > 1, len(todo), self.lm.name) as advance:
            for batch in batches:
                done.update(self._batch(batch, vectors))
                advance(len(batch))
        return Results([done[k] for k in keys if k is not None], errors)

    def _batch(self, batch: list[PreparedPrompt], vectors: bool) -> dict[str, Result]:
        lm, top_k = self.lm, self.cfg.top_k
        keep = _KeepLensInput(self._lens) if vectors else None  # without vectors, hold no batch-sized copy
        host = compute_batch(lm, batch, top_k=top_k, vectors="all" if vectors else "none", lens=keep or self._lens)
        tables = build_tables(lm, host, RUN_ID, top_k=top_k)
        out = {}
        for b, (p, key) in enumerate(zip(batch, host.keys)):
            mine = {name: t.filter(pc.equal(t["key"], key)) for name, t in tables.items() if "key" in t.column_names}
            vecs = _vectors_of(lm, host, keep.vectors, b) if vectors else {}
            out[key] = Result(p.record, p, lm.name, lm.view.vocab_size, mine, vecs)
        return out


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


def load(model: str = EMBEDDED_NAME, device: str = "auto", *, top_k: int = 10, lens_dtype: str = "fp32",
         max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS, batch_size: int | None = None,
         batch_tokens: int | None = None) -> Lens:
    """A model ready to run records: an embedded name (``smollm2-135m``, ``gemma3-270m``), a local directory
    or a hub name of a supported family; ``device`` "auto" (CUDA when present), "cpu" or "cuda".

    The settings are ``blens extract``'s, checked by the same ``ExtractConfig``; with the defaults a result
    equals the warehouse's rows of a default ``blens extract`` of the same model. The model is loaded once
    per process (``models.cached_model``), so calling ``load`` again is free."""
    cfg = ExtractConfig(model=model, data="<notebook>", device=device, top_k=top_k, lens_dtype=lens_dtype,
                        max_prompt_tokens=max_prompt_tokens, batch_size=batch_size, batch_tokens=batch_tokens)
    return Lens(cached_model(model, str(resolve_device(device))), cfg)
