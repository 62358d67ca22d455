"""Knowledge editing with a forward pass only (Backward Lens, Section 7), and its CounterFact evaluation.

Plain functions and one small class, no orchestration: ``flows/edit_flow.py`` wraps them in Prefect
tasks, ``tests/test_editing.py`` calls them directly.

The paper's edit ("shift"): for an edit (prompt, target) take x_n, the input of one FF2 matrix at the
last prompt position, and add eta * x_n^T E[t] to the matrix, E[t] the (un)embedding row of the
target's first token. In the (d_in, d_out) orientation of :meth:`ModelView.weight`::

    W_io += eta * outer(x_n, E[t])          (Llama nn.Linear weight (d, d_ff): W += eta * outer(E[t], x_n))

so the matrix's output at any position x becomes x W + eta (x . x_n) E[t]: the edit prompt's last
position gets eta * |x_n|^2 * E[t] added to the residual stream, other inputs in proportion to their
overlap with x_n. The baseline "sgd" takes one true gradient step on the same matrix,
W -= lr * dL/dW with L the NLL of target_new's first token at the last position (the exact update whose
spanning sets ``blens extract`` stores). Both are scored with the same metrics.

Step-size variants of the shift (``step``):

* ``fixed``       eta as given (the paper's recipe; lr column = eta).
* ``normalized``  eta = c / (|x_n|^2 |E[t]|^2): the edit prompt's residual gets c * E[t]/|E[t]|^2, so the
                  target's logit moves by ~c (times the final norm's gain) whatever the layer's
                  activation scale (lr column = c).
* ``minimal``     the smallest eta (doubling, then bisection on the edit prompt alone) that makes
                  target_new the argmax, times a margin factor (lr column = the margin).

Every edit is undone exactly: the one matrix's original tensor is saved, the update added in place,
and the original copied back in a ``finally`` block; restoration is asserted bit-exact.

Evaluation is cheap because an edit at layer L leaves everything below L untouched: one pre-edit
forward over the edit, rephrase and locality prompts (right-padded, batched) records block L's input
and its keyword arguments (mask, rotary embeddings); the edited model then only re-runs blocks L..N-1
and the LM head at the last positions.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import torch

from .adapters import ModelView
from .models import LoadedModel
from .prepare import target_id, target_ids
from .records import EditRecord, RecordError

METHODS = ("none", "shift", "sgd")
STEPS = ("fixed", "normalized", "minimal")
MATRIX = "ff2"
MINIMAL_START_C = 128.0  # minimal-step search starts at eta = c / (|x_n|^2 |E[t]|^2) with this c


class EditError(RuntimeError):
    """One edit failed (non-finite update, non-finite logits); the run records it and goes on."""


class RestoreError(AssertionError):
    """The edited matrix did not come back bit-exactly: never silently continue on a modified model."""


# ---------------------------------------------------------------------------------------------------
# Specs and prepared cases


@dataclass(frozen=True)
class EditSpec:
    """One editing configuration: which method, where, how big a step."""

    method: str  # none | shift | sgd
    layer: int | None = None
    lr: float | None = None  # shift: eta (fixed) / c (normalized) / margin (minimal); sgd: learning rate
    step: str = "fixed"  # shift only

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.step not in STEPS:
            raise ValueError(f"step must be one of {', '.join(STEPS)}, got {self.step!r}")
        if self.method != "none" and (self.layer is None or self.lr is None):
            raise ValueError(f"method {self.method!r} needs a layer and a learning rate")
        if self.method != "none" and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.lr!r}")

    @property
    def label(self) -> str:
        """The ``method`` column: the paper's shift is 'shift'; variants are 'shift-normalized' etc."""
        if self.method == "shift" and self.step != "fixed":
            return f"shift-{self.step}"
        return self.method

    def as_dict(self) -> dict:
        return {"method": self.method, "layer": self.layer, "lr": self.lr, "step": self.step}


def check_layer(view: ModelView, layer: int | None) -> None:
    """Up-front check for the CLI: a clear error naming the valid range."""
    if layer is not None and not (0 <= layer < view.n_layers):
        raise ValueError(f"layer {layer} is out of range: the model has {view.n_layers} layers (0..{view.n_layers - 1})")


@dataclass(frozen=True)
class EditCase:
    """A record tokenized for editing and evaluation."""

    record: EditRecord
    prompt_ids: tuple[int, ...]
    rephrase_ids: tuple[tuple[int, ...], ...]
    locality_ids: tuple[tuple[int, ...], ...]
    target_new_id: int
    target_true_id: int
    locality_gt_ids: tuple[int, ...]

    @property
    def sequences(self) -> list[tuple[int, ...]]:
        """Row order of every evaluation batch: edit prompt, rephrases, locality prompts."""
        return [self.prompt_ids, *self.rephrase_ids, *self.locality_ids]


def prepare_case(record: EditRecord, tokenizer, max_tokens: int | None = None) -> EditCase | RecordError:
    """Tokenize one record; a target or prompt the tokenizer cannot handle becomes a RecordError."""

    def error(field_: str, message: str) -> RecordError:
        return RecordError(case_id=record.case_id, field=field_, message=message, source=record.source)

    def ids_of(text: str, field_: str) -> tuple[int, ...] | RecordError:
        ids = tuple(tokenizer(text)["input_ids"])
        if not ids:
            return error(field_, f"{field_} tokenizes to no tokens")
        if max_tokens is not None and len(ids) > max_tokens:
            return error(field_, f"{field_} is {len(ids)} tokens, longer than the model's context of {max_tokens}")
        return ids

    prompt = ids_of(record.prompt, "prompt")
    if isinstance(prompt, RecordError):
        return prompt
    targets = target_ids(record, tokenizer)
    if isinstance(targets, RecordError):
        return targets
    new_id, true_id = targets
    rephrase = []
    for text in record.rephrase_prompts:
        ids = ids_of(text, "rephrase_prompts")
        if isinstance(ids, RecordError):
            return ids
        rephrase.append(ids)
    locality, gts = [], []
    for text, gt in zip(record.locality_prompts, record.locality_ground_truths):
        ids = ids_of(text, "locality_prompts")
        if isinstance(ids, RecordError):
            return ids
        gt_id = target_id(tokenizer, gt)
        if gt_id is None:
            return error("locality_ground_truths", f"locality ground truth {gt!r} cannot be produced by the tokenizer")
        locality.append(ids)
        gts.append(gt_id)
    return EditCase(record=record, prompt_ids=prompt, rephrase_ids=tuple(rephrase), locality_ids=tuple(locality),
                    target_new_id=new_id, target_true_id=true_id, locality_gt_ids=tuple(gts))


# ---------------------------------------------------------------------------------------------------
# Updates and their exact undo


def shift_update(x_n: torch.Tensor, e_t: torch.Tensor, eta: float) -> torch.Tensor:
    """The paper's update in (d_in, d_out) orientation: eta * x_n^T E[t]."""
    return eta * torch.outer(x_n, e_t)


def update_grad_cosine(x_n: torch.Tensor, e_t: torch.Tensor, grad: torch.Tensor) -> float:
    """cosine(outer(x_n, E[t]), -grad) (Frobenius), without forming the outer product; eta-free."""
    x, e, g = x_n.double(), e_t.double(), grad.double()
    denom = x.norm() * e.norm() * g.norm()
    if denom == 0:
        return float("nan")
    return float(-(x @ g @ e) / denom)


@contextlib.contextmanager
def applied(view: ModelView, layer: int, update: torch.Tensor, matrix: str = MATRIX) -> Iterator[torch.Tensor]:
    """Add ``update`` (d_in, d_out) to one matrix in place; always restore it bit-exactly on exit.

    Raises :class:`EditError` when the edited matrix is not finite (the matrix is still restored).
    """
    w = view.weight(layer, matrix)
    if update.shape != w.shape:
        raise ValueError(f"update shape {tuple(update.shape)} does not match the matrix {tuple(w.shape)} (d_in, d_out)")
    original = w.detach().clone()
    try:
        with torch.no_grad():
            w.add_(update.to(w.dtype))
        if not bool(torch.isfinite(w).all()):
            raise EditError(f"the update made layer {layer} {matrix} non-finite (NaN/inf)")
        yield w
    finally:
        with torch.no_grad():
            w.copy_(original)
        if not torch.equal(w, original):
            raise RestoreError(f"layer {layer} {matrix} was not restored bit-exactly")


# ---------------------------------------------------------------------------------------------------
# Forward passes


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _head(view: ModelView, last_hidden: torch.Tensor) -> torch.Tensor:
    """LM head on already-final-normed hidden states (R, d) -> (R, V) float logits."""
    logits = last_hidden @ view.unembedding.T
    bias = getattr(view.model.get_submodule(view.family.unembedding), "bias", None)
    if bias is not None:
        logits = logits + bias
    return logits.float()


def last_logits(view: ModelView, seqs: Sequence[Sequence[int]], pad_id: int, chunk: int = 64) -> torch.Tensor:
    """Next-token logits after each sequence, (R, V): right-padded batches, last-position gather."""
    device = view.unembedding.device
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), chunk):
            part = seqs[i: i + chunk]
            ids, mask = _pad(part, pad_id, device)
            hidden = view.base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            last = hidden[torch.arange(len(part), device=device), mask.sum(1) - 1]
            out.append(_head(view, last))
    return torch.cat(out)


def _block_out(out):
    return out[0] if isinstance(out, tuple) else out


def _take_rows(obj, n_rows: int, rows: slice):
    """Slice every batch-shaped tensor inside block kwargs (masks, rotary tables) to ``rows``."""
    if isinstance(obj, torch.Tensor):
        return obj[rows] if obj.dim() > 1 and obj.shape[0] == n_rows and n_rows > 1 else obj
    if isinstance(obj, tuple):
        return tuple(_take_rows(o, n_rows, rows) for o in obj)
    if isinstance(obj, list):
        return [_take_rows(o, n_rows, rows) for o in obj]
    if isinstance(obj, dict):
        return {k: _take_rows(v, n_rows, rows) for k, v in obj.items()}
    return obj


@dataclass
class Probe:
    """What one pre-edit forward (+ backward) over a case's prompts leaves behind."""

    case: EditCase
    logits: torch.Tensor  # (R, V) pre-edit next-token logits, rows = case.sequences
    last_pos: torch.Tensor  # (R,)
    x_n: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (d_in,) FF2 input, edit prompt, last pos
    grad: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (d_in, d_out) dL/dW
    block_in: dict[int, tuple] = field(default_factory=dict)  # layer -> (args, kwargs) of block `layer`
    loss: float = float("nan")


class Editor:
    """Edits one loaded model, one case at a time, and scores each edit."""

    def __init__(self, lm: LoadedModel, matrix: str = MATRIX):
        self.lm = lm
        self.view = lm.view
        self.matrix = matrix
        self.pad_id = lm.tokenizer.pad_token_id
        self.device = self.view.unembedding.device

    # -- the pre-edit pass ------------------------------------------------------------------------
    def probe(self, case: EditCase, layers: Iterable[int], *, grad: bool = True) -> Probe:
        """One forward over all of the case's prompts (row 0 = edit prompt) recording, per layer, block
        inputs (for replay) and x_n; with ``grad``, dL/dW of each layer's matrix from one backward of the
        edit prompt's NLL(target_new) (autograd on those matrices only)."""
        view = self.view
        layers = sorted(set(layers))
        seqs = case.sequences
        ids, mask = _pad(seqs, self.pad_id, self.device)
        last_pos = mask.sum(1) - 1
        n0 = len(case.prompt_ids) - 1
        probe = Probe(case=case, logits=torch.empty(0), last_pos=last_pos)
        handles = []
        params = [self.view.matrix(layer, self.matrix).weight for layer in layers] if grad else []

        for layer in layers:
            def pre(_m, args, kwargs, layer=layer):
                probe.block_in[layer] = (
                    tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                    {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()},
                )
            handles.append(view.blocks[layer].register_forward_pre_hook(pre, with_kwargs=True))

            def ff2_in(_m, args, layer=layer):
                probe.x_n[layer] = args[0][0, n0].detach().clone()
            handles.append(view.matrix(layer, self.matrix).register_forward_pre_hook(ff2_in))
        try:
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad() if grad else torch.no_grad():
                hidden = view.base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                last = hidden[torch.arange(len(seqs), device=self.device), last_pos]
                logits = _head(view, last)
                if grad:
                    loss = torch.nn.functional.cross_entropy(
                        logits[:1], torch.tensor([case.target_new_id], device=self.device))
                    grads = torch.autograd.grad(loss, params)
                    probe.loss = float(loss.detach())
                    for layer, g in zip(layers, grads):
                        probe.grad[layer] = g if view.family.weight_is_in_by_out else g.T
        finally:
            for p in params:
                p.requires_grad_(False)
            for h in handles:
                h.remove()
        probe.logits = logits.detach()
        return probe

    # -- the edited passes ----------------------------------------------------------------------
    def replay(self, probe: Probe, layer: int, rows: slice | None = None) -> torch.Tensor:
        """Next-token logits of the (currently edited) model for the case's prompts, re-running only
        blocks ``layer``..N-1 from the recorded pre-edit input of block ``layer``."""
        args, kwargs = probe.block_in[layer]
        last_pos = probe.last_pos
        if rows is not None:
            n = len(last_pos)
            args, kwargs = _take_rows(args, n, rows), _take_rows(kwargs, n, rows)
            last_pos = last_pos[rows]
        h = args[0]
        with torch.no_grad():
            for blk in self.view.blocks[layer:]:
                h = _block_out(blk(h, *args[1:], **kwargs))
            h = self.view.final_norm(h)
            last = h[torch.arange(h.shape[0], device=self.device), last_pos]
            logits = _head(self.view, last)
        if not bool(torch.isfinite(logits).all()):
            raise EditError(f"the edited model produced non-finite logits (layer {layer})")
        return logits

    def e_t(self, case: EditCase) -> torch.Tensor:
        return self.view.unembedding[case.target_new_id].detach()

    def update_for(self, spec: EditSpec, probe: Probe) -> tuple[torch.Tensor, float]:
        """The (d_in, d_out) update of a spec for a probed case, and the effective step size."""
        layer = spec.layer
        if spec.method == "sgd":
            return -spec.lr * probe.grad[layer], spec.lr
        x, e = probe.x_n[layer], self.e_t(probe.case)
        scale = float(x.double().norm() ** 2 * e.double().norm() ** 2)
        if spec.step == "fixed":
            eta = spec.lr
        elif spec.step == "normalized":
            eta = spec.lr / scale
        else:
            eta = spec.lr * self.minimal_eta(probe, layer, start=MINIMAL_START_C / scale)
        return shift_update(x, e, eta), eta

    def minimal_eta(self, probe: Probe, layer: int, *, start: float, doublings: int = 16, bisections: int = 5) -> float:
        """Smallest eta (to ~3%) for which target_new is the argmax after the edit prompt: doubling from
        ``start``, then bisection; only the edit prompt is run. Returns the cap if never reached."""
        case = probe.case
        x, e = probe.x_n[layer], self.e_t(case)

        def works(eta: float) -> bool:
            with applied(self.view, layer, shift_update(x, e, eta), self.matrix):
                logits = self.replay(probe, layer, rows=slice(0, 1))
            return int(logits[0].argmax()) == case.target_new_id

        if int(probe.logits[0].argmax()) == case.target_new_id:
            return 0.0
        lo, hi = 0.0, start
        for _ in range(doublings):
            if works(hi):
                break
            lo, hi = hi, hi * 2
        else:
            return hi
        for _ in range(bisections):
            mid = (lo + hi) / 2
            if works(mid):
                hi = mid
            else:
                lo = mid
        return hi

    # -- metrics --------------------------------------------------------------------------------
    def metrics(self, case: EditCase, logits: torch.Tensor, pre_logits: torch.Tensor) -> dict:
        """Top-1 metrics of one (edited or not) model on a case's prompts, in [0, 1]."""
        n_r, n_l = len(case.rephrase_ids), len(case.locality_ids)
        top = logits.argmax(-1)
        pre_top = pre_logits.argmax(-1)
        probs = torch.softmax(logits[0].double(), -1)
        new, true = case.target_new_id, case.target_true_id
        out = {
            "efficacy": float(top[0] == new),
            "target_new_prob": float(probs[new]),
            "target_true_prob": float(probs[true]),
            "new_gt_true": float(logits[0, new] > logits[0, true]),
            "generalization": None, "rephrase_new_gt_true": None, "locality": None, "locality_unchanged": None,
        }
        if n_r:
            r = slice(1, 1 + n_r)
            out["generalization"] = float((top[r] == new).float().mean())
            out["rephrase_new_gt_true"] = float((logits[r, new] > logits[r, true]).float().mean())
        if n_l:
            loc = slice(1 + n_r, 1 + n_r + n_l)
            gts = torch.tensor(case.locality_gt_ids, device=top.device)
            out["locality"] = float((top[loc] == gts).float().mean())
            out["locality_unchanged"] = float((top[loc] == pre_top[loc]).float().mean())
        return out

    # -- one case, several specs ---------------------------------------------------------------
    def run_case(self, case: EditCase, specs: Sequence[EditSpec]) -> list[dict]:
        """Every spec applied to this case one at a time (each on the original weights). One row per
        spec; a failing spec gives a row with ``error`` set, never an exception (except RestoreError)."""
        layers = {s.layer for s in specs if s.method != "none"}
        need_grad = bool(layers)
        rows = []
        try:
            probe = self.probe(case, layers, grad=need_grad)
        except RestoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad case never sinks a run
            return [self._row(case, s, error=f"pre-edit pass failed: {type(exc).__name__}: {exc}") for s in specs]
        for spec in specs:
            t0 = time.perf_counter()
            if spec.method == "none":
                rows.append(self._row(case, spec, metrics=self.metrics(case, probe.logits, probe.logits),
                                      seconds=time.perf_counter() - t0))
                continue
            cosine = update_grad_cosine(probe.x_n[spec.layer], self.e_t(case), probe.grad[spec.layer])
            try:
                update, eta = self.update_for(spec, probe)
                if not bool(torch.isfinite(update).all()):
                    raise EditError(f"the {spec.label} update is not finite (NaN/inf)")
                with applied(self.view, spec.layer, update, self.matrix):
                    logits = self.replay(probe, spec.layer)
                m = self.metrics(case, logits, probe.logits)
                rows.append(self._row(case, spec, metrics=m, cosine=cosine, norm=float(update.double().norm()),
                                      eta=eta, seconds=time.perf_counter() - t0))
            except RestoreError:
                raise
            except Exception as exc:  # noqa: BLE001
                rows.append(self._row(case, spec, cosine=cosine, error=f"{type(exc).__name__}: {exc}"))
        return rows

    def _row(self, case: EditCase | EditRecord, spec: EditSpec, *, metrics: dict | None = None,
             cosine: float | None = None, norm: float | None = None, eta: float | None = None,
             seconds: float | None = None, error: str | None = None) -> dict:
        record = case.record if isinstance(case, EditCase) else case
        row = {"case_id": record.case_id, "method": spec.label, "layer": spec.layer, "lr": spec.lr,
               "update_grad_cosine": cosine, "update_norm": norm, "error": error,
               "_eta": eta, "_seconds": seconds, "_source": record.source}
        row.update({k: None for k in METRIC_COLUMNS})
        if metrics:
            row.update(metrics)
        return row


METRIC_COLUMNS = ("efficacy", "generalization", "locality", "locality_unchanged", "target_new_prob",
                  "target_true_prob", "new_gt_true", "rephrase_new_gt_true")


# ---------------------------------------------------------------------------------------------------
# A batch of records -> warehouse tables


def edit_records(lm: LoadedModel, records: Sequence[EditRecord], specs: Sequence[EditSpec],
                 progress=None) -> tuple[list[dict], list[dict]]:
    """Run every spec on every record; returns (result rows, error rows). ``progress(n)`` after each case."""
    editor = Editor(lm)
    for spec in specs:
        check_layer(editor.view, spec.layer)
    max_tokens = editor.view.max_positions
    rows: list[dict] = []
    errors: list[dict] = []
    for record in records:
        case = prepare_case(record, lm.tokenizer, max_tokens)
        if isinstance(case, RecordError):
            for spec in specs:
                rows.append(editor._row(record, spec, error=f"{case.field}: {case.message}"))
            errors.append({"case_id": record.case_id, "stage": "edit", "field": case.field,
                           "message": case.message, "source": record.source})
        else:
            case_rows = editor.run_case(case, specs)
            rows.extend(case_rows)
            for r in case_rows:
                if r["error"]:
                    errors.append({"case_id": record.case_id, "stage": "edit", "field": f"{r['method']}@{r['layer']}",
                                   "message": r["error"], "source": record.source})
        if progress is not None:
            progress(1)
    return rows, errors


def results_table(rows: Sequence[dict], run_id: str, model: str) -> pa.Table:
    """edit_results rows (without batch_id; commit_batch adds it)."""
    f32 = pa.float32()
    cols = {
        "run_id": pa.array([run_id] * len(rows), pa.string()),
        "case_id": pa.array([r["case_id"] for r in rows], pa.int64()),
        "model": pa.array([model] * len(rows), pa.string()),
        "method": pa.array([r["method"] for r in rows], pa.string()),
        "layer": pa.array([r["layer"] for r in rows], pa.int32()),
        "lr": pa.array([r["lr"] for r in rows], f32),
    }
    for c in (*METRIC_COLUMNS, "update_grad_cosine", "update_norm"):
        vals = [r[c] for r in rows]
        cols[c] = pa.array([None if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in vals], f32)
    cols["error"] = pa.array([r["error"] for r in rows], pa.string())
    return pa.table(cols)


def errors_table(errors: Sequence[dict], run_id: str) -> pa.Table:
    return pa.table({
        "run_id": pa.array([run_id] * len(errors), pa.string()),
        "case_id": pa.array([e["case_id"] for e in errors], pa.int64()),
        "stage": pa.array([e["stage"] for e in errors], pa.string()),
        "field": pa.array([e["field"] for e in errors], pa.string()),
        "message": pa.array([e["message"] for e in errors], pa.string()),
        "source": pa.array([e["source"] or "" for e in errors], pa.string()),
    })


def load_errors(errors: Sequence[RecordError]) -> list[dict]:
    """Records rejected by load_records, as error rows (stage 'load')."""
    return [{"case_id": e.case_id, "stage": "load", "field": e.field, "message": e.message, "source": e.source}
            for e in errors]


# ---------------------------------------------------------------------------------------------------
# The job: plan a run, process one batch (what the Prefect tasks call), choose defaults from a sweep


@dataclass
class EditPlan:
    run_id: str
    model_name: str
    records: list[EditRecord]
    n_load_errors: int


@dataclass
class EditBatchResult:
    n_cases: int
    n_rows: int
    n_errors: int
    seconds: float


def edit_run_id(lm: LoadedModel, fingerprint: str, specs: Sequence[EditSpec], kind: str) -> str:
    from .config import run_id_for

    settings = {"kind": kind, "matrix": MATRIX, "specs": [s.as_dict() for s in specs],
                "metrics": "top1_last_position+rome_prob_tests", "loss": "nll_first_target_token_last_position"}
    return run_id_for(lm.name, lm.revision, fingerprint, settings)


def plan_edit_run(lm: LoadedModel, data: str, specs: Sequence[EditSpec], warehouse: str, *,
                  limit: int | None = None, kind: str = "edit") -> EditPlan:
    """Load records, fix the run identity, and commit the run row plus records rejected on load."""
    import json
    from datetime import datetime, timezone

    from store.schema import SCHEMA_VERSION
    from store.writer import commit_batch, init_warehouse

    from .job import code_version
    from .records import load_records

    for spec in specs:
        check_layer(lm.view, spec.layer)
    root = init_warehouse(warehouse)
    loaded = load_records(data, limit=limit)
    run_id = edit_run_id(lm, loaded.fingerprint, specs, kind)
    config = {"data": str(data), "limit": limit, "kind": kind, "matrix": MATRIX,
              "specs": [s.as_dict() for s in specs]}
    run_row = pa.table({
        "run_id": [run_id], "model": [lm.name], "model_revision": [lm.revision], "dataset": [str(data)],
        "dataset_fingerprint": [loaded.fingerprint], "config_json": [json.dumps(config, sort_keys=True)],
        "created_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
        "code_version": [code_version()], "schema_version": pa.array([SCHEMA_VERSION], pa.int32()),
        "kind": [kind],
    })
    commit_batch(root, run_id, {"runs": run_row, "errors": errors_table(load_errors(loaded.errors), run_id)})
    return EditPlan(run_id=run_id, model_name=lm.name, records=list(loaded.records), n_load_errors=len(loaded.errors))


def process_edit_batch(lm: LoadedModel, run_id: str, records: Sequence[EditRecord], specs: Sequence[EditSpec],
                       warehouse: str) -> EditBatchResult:
    """Edit and score a batch of records under every spec; commit edit_results + errors atomically."""
    from store.writer import commit_batch

    t0 = time.perf_counter()
    rows, errors = edit_records(lm, records, specs)
    commit_batch(warehouse, run_id, {"edit_results": results_table(rows, run_id, lm.name),
                                     "errors": errors_table(errors, run_id)}, n_prompts=len(records))
    return EditBatchResult(n_cases=len(records), n_rows=len(rows), n_errors=len(errors),
                           seconds=time.perf_counter() - t0)


def sweep_specs(layers: Sequence[int], shift_lrs: Sequence[float], sgd_lrs: Sequence[float],
                variants: Sequence[tuple[str, Sequence[float]]] = ()) -> list[EditSpec]:
    """The sweep grid: none once, shift and sgd at every (layer, lr), plus shift step variants."""
    specs = [EditSpec("none")]
    for layer in layers:
        specs += [EditSpec("shift", layer, lr) for lr in shift_lrs]
        specs += [EditSpec("sgd", layer, lr) for lr in sgd_lrs]
        for step, lrs in variants:
            specs += [EditSpec("shift", layer, lr, step) for lr in lrs]
    return specs


def choose_defaults(warehouse: str, run_id: str, *, min_efficacy: float = 0.95) -> dict[str, dict]:
    """Per method label, the sweep config to use by default.

    Rule (the efficacy-vs-locality trade-off): among configs whose efficacy >= ``min_efficacy``, the one
    that leaves the most neighbourhood predictions unchanged (locality_unchanged; ties: efficacy, then
    generalization); if no config reaches ``min_efficacy``, the most efficacious one (ties: the same).
    Generalization is not rewarded on its own: an edit that makes the model say the target everywhere
    scores 100% paraphrase and 0% locality.
    """
    from queries import connect

    con = connect(warehouse)
    try:
        rows = con.execute("""
            SELECT method, layer, lr, n, efficacy, generalization, locality, locality_unchanged
            FROM edit_summary WHERE run_id = ? AND method <> 'none'""", [run_id]).fetchall()
    finally:
        con.close()
    best: dict[str, dict] = {}
    for method, layer, lr, n, eff, gen, loc, unch in rows:
        ok = eff >= min_efficacy
        key = (ok, (unch or 0.0) if ok else eff, eff if ok else (unch or 0.0), gen or 0.0)
        cand = {"method": method, "layer": layer, "lr": lr, "n": n, "efficacy": eff, "generalization": gen,
                "locality": loc, "locality_unchanged": unch, "_key": key}
        if method not in best or key > best[method]["_key"]:
            best[method] = cand
    for v in best.values():
        v.pop("_key")
    return best
