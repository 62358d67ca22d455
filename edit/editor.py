"""Knowledge editing with a forward pass only (Backward Lens, Section 7): apply one edit, score it, undo it.

In the (d_in, d_out) orientation of :meth:`ModelView.weight` the paper's shift is::

    W_io += eta * outer(x_n, E[t])          (Llama nn.Linear weight (d, d_ff): W += eta * outer(E[t], x_n))

so the matrix's output at any position x becomes x W + eta (x . x_n) E[t]: the edit prompt's last
position gets eta * |x_n|^2 * E[t] added to the residual stream, other inputs in proportion to their
overlap with x_n. The sgd baseline's dL/dW is rebuilt from the same spanning sets extraction stores
(:func:`blens.extract.capture.trace`: sum_i outer(x_i, delta_i)); no weight ever gets a gradient.

Every edit is undone exactly: the one matrix's original tensor is saved, the update added in place,
and the original copied back in a ``finally`` block; restoration is asserted bit-exact.

Evaluation is cheap because an edit at layer L leaves everything below L untouched: one pre-edit
forward over the edit, rephrase and locality prompts (right-padded, batched) records block L's input
and the keyword arguments (mask, rotary embeddings) of every block from L up; the edited model then
only re-runs blocks L..N-1, each with its own keyword arguments (Gemma alternates sliding-window and
full-attention blocks with different masks and rotary tables), and the LM head at the last positions.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from blens.extract.adapters import ModelView
from blens.extract.capture import pad_batch, trace
from blens.extract.failures import is_record_failure, describe
from blens.extract.models import LoadedModel
from blens.extract.records import EditRecord

from .cases import EditCase
from .fluency import fluency
from .metrics import METRIC_COLUMNS, metrics
from .rome import ROME_DEFAULTS, KeyStatistics, RomeHparams, context_prefixes, rome_update
from .spec import MATRIX, EditSpec

MINIMAL_START_C = 128.0  # minimal-step search starts at eta = c / (|x_n|^2 |E[t]|^2) with this c


class EditError(RuntimeError):
    """One edit failed (non-finite update, non-finite logits); the run records it and goes on."""


class RestoreError(AssertionError):
    """The edited matrix did not come back bit-exactly: never silently continue on a modified model."""


def shift_update(x_n: torch.Tensor, e_t: torch.Tensor, eta: float) -> torch.Tensor:
    """The paper's update in (d_in, d_out) orientation: eta * x_n^T E[t]."""
    return eta * torch.outer(x_n, e_t)


def update_grad_cosine(update: torch.Tensor, grad: torch.Tensor) -> float:
    """cosine(update, -grad) (Frobenius) of the update a method actually applies: 1 for sgd (its update is
    -lr * grad), step-size-free for the shift (its direction is x_n^T E[t] whatever eta)."""
    u, g = update.double(), grad.double()
    denom = u.norm() * g.norm()
    if denom == 0:
        return float("nan")
    return float(-(u * g).sum() / denom)


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
    block_in: dict[int, tuple] = field(default_factory=dict)  # layer -> (args, kwargs) of block `layer`, every
    # block from the lowest probed layer up (replay needs each block's own kwargs)
    loss: float = float("nan")


class Editor:
    """Edits one loaded model, one case at a time, and scores each edit."""

    def __init__(self, lm: LoadedModel, matrix: str = MATRIX, *, fluency_tokens: int = 0,
                 rome_stats: KeyStatistics | None = None, rome_hparams: RomeHparams = ROME_DEFAULTS):
        self.lm = lm
        self.view = lm.view
        self.matrix = matrix
        self.pad_id = lm.tokenizer.pad_token_id
        self.device = self.view.unembedding.device
        self.fluency_tokens = fluency_tokens
        self.rome_stats = rome_stats
        self.rome_hparams = rome_hparams
        self._prefixes: list[str] | None = None

    # -- the pre-edit pass ------------------------------------------------------------------------
    def probe(self, case: EditCase, layers: Iterable[int], *, grad: bool = True) -> Probe:
        """One forward over all of the case's prompts (row 0 = edit prompt) recording, per layer, block
        inputs (for replay) and x_n; with ``grad``, also one backward of the edit prompt's NLL(target_new)
        whose spanning sets rebuild dL/dW of each layer's matrix: sum_i outer(x_i, delta_i) over row 0."""
        layers = sorted(set(layers))
        ids, mask = pad_batch(case.sequences, self.pad_id, self.device)
        probe = Probe(case=case, logits=torch.empty(0), last_pos=mask.sum(1) - 1)

        def recorder(layer: int):
            def pre(_m, args, kwargs):
                probe.block_in[layer] = (
                    tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                    {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()},
                )
            return pre

        keys = [(layer, self.matrix) for layer in layers]
        targets = torch.full((ids.shape[0],), case.target_new_id, device=self.device)
        only_edit_prompt = torch.zeros(ids.shape[0], device=self.device)
        only_edit_prompt[0] = 1.0
        t = trace(self.view, ids, mask, keys, targets, only_edit_prompt,
                  pre_block_hooks=[(self.view.blocks[i], recorder(i))
                                   for i in range(min(layers, default=self.view.n_layers), self.view.n_layers)])
        n0 = len(case.prompt_ids) - 1
        for key in keys:
            x, d = t.inputs[key][0], t.vjps[key][0]  # the edit prompt's spanning set, (T, d_in) and (T, d_out)
            probe.x_n[key[0]] = x[n0].clone()
            if grad:
                probe.grad[key[0]] = x.T @ d
        probe.loss = float(t.loss[0])
        probe.logits = t.logits
        return probe

    # -- the edited passes ----------------------------------------------------------------------
    def replay(self, probe: Probe, layer: int, rows: slice | None = None) -> torch.Tensor:
        """Next-token logits of the (currently edited) model for the case's prompts, re-running only
        blocks ``layer``..N-1 from the recorded pre-edit input of block ``layer``."""
        last_pos = probe.last_pos
        n = len(last_pos)

        def block_inputs(i: int):
            args, kwargs = probe.block_in[i]
            if rows is not None:
                args, kwargs = _take_rows(args, n, rows), _take_rows(kwargs, n, rows)
            return args, kwargs

        if rows is not None:
            last_pos = last_pos[rows]
        h = block_inputs(layer)[0][0]
        with torch.no_grad():
            for i in range(layer, self.view.n_layers):
                args, kwargs = block_inputs(i)
                h = _block_out(self.view.blocks[i](h, *args[1:], **kwargs))
            h = self.view.final_norm(h)
            last = h[torch.arange(h.shape[0], device=self.device), last_pos]
            logits = self.view.logits(last)
        if not bool(torch.isfinite(logits).all()):
            raise EditError(f"the edited model produced non-finite logits (layer {layer})")
        return logits

    def e_t(self, case: EditCase) -> torch.Tensor:
        return self.view.unembedding[case.target_new_id].detach()

    def update_for(self, spec: EditSpec, probe: Probe) -> tuple[torch.Tensor, float | None, bool | None]:
        """The (d_in, d_out) update of a spec for a probed case, the effective step size, and whether a
        search converged (None for methods without a search: fixed/normalized shift, sgd, rome)."""
        layer = spec.layer
        if spec.method == "sgd":
            return -spec.lr * probe.grad[layer], spec.lr, None
        if spec.method == "rome":
            return self.rome_update(probe.case, layer), None, None
        x, e = probe.x_n[layer], self.e_t(probe.case)
        scale = float(x.double().norm() ** 2 * e.double().norm() ** 2)
        converged = None
        if spec.step == "fixed":
            eta = spec.lr
        elif spec.step == "normalized":
            eta = spec.lr / scale
        else:
            eta, converged = self.minimal_eta(probe, layer, start=MINIMAL_START_C / scale)
            eta = spec.lr * eta
        return shift_update(x, e, eta), eta, converged

    def rome_update(self, case: EditCase, layer: int) -> torch.Tensor:
        """ROME's rank-one update for the case (``blens.edit.rome``); C^-1 from :attr:`rome_stats`."""
        hp = self.rome_hparams
        if self._prefixes is None:
            self._prefixes = context_prefixes(self.lm.model, self.lm.tokenizer, self.device, hp)
        c_inv = None
        if hp.mom2_adjustment:
            if self.rome_stats is None:
                raise ValueError("ROME needs key statistics (rome_stats) when mom2_adjustment is on")
            c_inv = self.rome_stats.inverse(layer)
        r = case.record
        return rome_update(self.view, self.lm.tokenizer, prompt=r.prompt, subject=r.subject, target_new=r.target_new,
                           layer=layer, c_inv=c_inv, prefixes=self._prefixes, device=self.device, hp=hp).update

    def minimal_eta(self, probe: Probe, layer: int, *, start: float, doublings: int = 16,
                    bisections: int = 5) -> tuple[float, bool]:
        """Smallest eta (to ~3%) for which target_new is the argmax after the edit prompt: doubling from
        ``start`` (or halving, when ``start`` already works), then bisection; only the edit prompt is run.
        Returns (eta, converged): (the cap, False) if no step up to the cap makes target_new the argmax.

        Halving matters where a small step is enough: Gemma normalises FF2's output before the residual add,
        so its threshold is c ~ 1-10 in normalised units, far below ``start`` (c = 128); bisecting [0, start]
        alone would stop at c >= 4 (start / 2^5), several times the smallest step."""
        case = probe.case
        x, e = probe.x_n[layer], self.e_t(case)

        def works(eta: float) -> bool:
            with applied(self.view, layer, shift_update(x, e, eta), self.matrix):
                logits = self.replay(probe, layer, rows=slice(0, 1))
            return int(logits[0].argmax()) == case.target_new_id

        if int(probe.logits[0].argmax()) == case.target_new_id:
            return 0.0, True
        lo, hi = 0.0, start
        if works(hi):
            for _ in range(doublings):  # the same number of halvings: down to start / 2^16, then lo = 0
                if not works(hi / 2):
                    lo = hi / 2
                    break
                hi = hi / 2
        else:  # as before halving existed: start * 2^k for k < doublings, else the cap start * 2^doublings
            for _ in range(doublings - 1):
                lo, hi = hi, hi * 2
                if works(hi):
                    break
            else:
                if not works(hi * 2):
                    return hi * 2, False
                lo, hi = hi, hi * 2
        for _ in range(bisections):
            mid = (lo + hi) / 2
            if works(mid):
                hi = mid
            else:
                lo = mid
        return hi, True

    # -- one case, several specs ---------------------------------------------------------------
    def run_case(self, case: EditCase, specs: Sequence[EditSpec]) -> list[dict]:
        """Every spec applied to this case one at a time (each on the original weights). One row per
        spec; a failing spec gives a row with ``error`` set, never an exception (except RestoreError)."""
        layers = {s.layer for s in specs if s.method != "none"}
        need_grad = bool(layers)
        rows = []
        try:
            probe = self.probe(case, layers, grad=need_grad)
        except Exception as exc:  # noqa: BLE001 - the policy decides: one bad case never sinks a run
            if not is_record_failure(exc):
                raise
            return [self._row(case, s, error=f"pre-edit pass failed: {describe(exc)}") for s in specs]
        for spec in specs:
            t0 = time.perf_counter()
            if spec.method == "none":
                rows.append(self._row(case, spec, metrics=metrics(case, probe.logits, probe.logits),
                                      fluency=self.fluency(case), seconds=time.perf_counter() - t0))
                continue
            cosine = None
            try:
                update, eta, converged = self.update_for(spec, probe)
                if not bool(torch.isfinite(update).all()):
                    raise EditError(f"the {spec.label} update is not finite (NaN/inf)")
                cosine = update_grad_cosine(update, probe.grad[spec.layer])
                with applied(self.view, spec.layer, update, self.matrix):
                    logits = self.replay(probe, spec.layer)
                    flu = self.fluency(case)
                m = metrics(case, logits, probe.logits)
                rows.append(self._row(case, spec, metrics=m, cosine=cosine, norm=float(update.double().norm()),
                                      eta=eta, converged=converged, fluency=flu, seconds=time.perf_counter() - t0))
            except Exception as exc:  # noqa: BLE001 - the policy decides
                if not is_record_failure(exc):
                    raise
                rows.append(self._row(case, spec, cosine=cosine, error=describe(exc)))
        return rows

    def fluency(self, case: EditCase) -> float | None:
        """ROME's generation entropy of the model as it is now, on the edit prompt and its paraphrases
        (``blens.edit.fluency``); None when ``fluency_tokens`` is 0. Continuations are cut to the context."""
        if not self.fluency_tokens:
            return None
        prompts = [case.prompt_ids, *case.rephrase_ids]
        limit = self.view.max_positions
        n = self.fluency_tokens
        if limit is not None:
            n = min(n, limit - max(len(p) for p in prompts))
        if n < 3:
            return None
        return fluency(self.lm.model, self.lm.tokenizer, prompts, n, self.device)

    def _row(self, case: EditCase | EditRecord, spec: EditSpec, *, metrics: dict | None = None,
             cosine: float | None = None, norm: float | None = None, eta: float | None = None,
             converged: bool | None = None, fluency: float | None = None, seconds: float | None = None,
             error: str | None = None) -> dict:
        record = case.record if isinstance(case, EditCase) else case
        row = {"case_id": record.case_id, "method": spec.label, "layer": spec.layer, "lr": spec.lr,
               "update_grad_cosine": cosine, "update_norm": norm, "error": error,
               "converged": converged, "fluency": fluency,
               "_eta": eta, "_seconds": seconds, "_source": record.source}
        row.update({k: None for k in METRIC_COLUMNS})
        if metrics:
            row.update(metrics)
        return row
