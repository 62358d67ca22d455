"""What the notebook API returns (:mod:`blens.api`): one prompt's :class:`Result` and a list of them,
:class:`Results`. Kept apart from the code that computes them: these hold tables and vectors, nothing else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Iterable

import pyarrow as pa
import torch

from blens.extract.adapters import Site
from blens.extract.prepare import PreparedPrompt
from blens.extract.records import EditRecord, RecordError

_INPUT_OF = {"ff1": Site.FF1_INPUT, "ff1_gate": Site.FF1_INPUT, "ff2": Site.FF2_INPUT}  # ff1, ff1_gate share x_i


def _frame(table: str) -> functools.cached_property:
    """A Result's ``table`` as a pandas DataFrame, built once."""
    return functools.cached_property(lambda self: self.tables[table].to_pandas())


@dataclass(eq=False)
class Result:
    """One record's extraction: the warehouse's rows (as Arrow, shown as pandas) and its spanning vectors.

    ``prompts``, ``tokens``, ``gradient_ranks``, ``projections``: DataFrames with the warehouse's columns;
    ``loss``; ``vectors[(site, layer)]``: (n_tokens, d) tensors; ``gradient(layer, matrix)``: dL/dW.

    Our sites and matrices in TransformerLens hook names (``run_with_cache(..., incl_bwd=True)`` stores a
    hook's gradient as ``<hook>_grad``) and nnsight module paths (Llama/SmolLM2/Gemma ``model.model.layers[l]``;
    GPT-2 ``model.transformer.h[l]``); a site named ``*_vjp`` is the gradient of the loss there:

    ==================  =============================================  ================================================
    site                TransformerLens                                nnsight (Llama-style; GPT-2)
    ==================  =============================================  ================================================
    ff1_input           blocks.{l}.ln2.hook_normalized (MLP input)     layers[l].mlp.up_proj.input; h[l].mlp.c_fc.input
    ff1_vjp             grad of blocks.{l}.mlp.hook_pre_linear         layers[l].mlp.up_proj.output.grad;
                        (GPT-2: blocks.{l}.mlp.hook_pre)               h[l].mlp.c_fc.output.grad
    ff1_gate_vjp        grad of blocks.{l}.mlp.hook_pre (gated MLP)    layers[l].mlp.gate_proj.output.grad
    ff2_input           blocks.{l}.mlp.hook_post                       layers[l].mlp.down_proj.input; h[l].mlp.c_proj.input
    ff2_vjp             grad of blocks.{l}.hook_mlp_out                layers[l].mlp.down_proj.output.grad;
                                                                       h[l].mlp.c_proj.output.grad
    attn_vjp            grad of blocks.{l}.hook_attn_out               layers[l].self_attn.o_proj.output.grad;
                                                                       h[l].attn.c_proj.output.grad
    resid_post_vjp      grad of blocks.{l}.hook_resid_post (Gemma 3)   layers[l].post_feedforward_layernorm.output.grad
    ==================  =============================================  ================================================

    Matrices (``gradient_ranks.matrix``, ``gradient(layer, matrix)``): ff1 = ``W_in`` (up_proj; GPT-2 c_fc),
    ff1_gate = ``W_gate`` (gate_proj), ff2 = ``W_out`` (down_proj; GPT-2 mlp.c_proj), attn_q / attn_k / attn_v =
    ``W_Q`` / ``W_K`` / ``W_V`` (q_proj / k_proj / v_proj; GPT-2: thirds of attn.c_attn), attn_o = ``W_O``
    (o_proj; GPT-2 attn.c_proj). TransformerLens splits these per head and may fold layer norms into them
    (``from_pretrained``'s default ``fold_ln=True``); ours are the model's own, unfolded, as (d_in, d_out). On
    Gemma 3 TransformerLens's hook_mlp_out / hook_attn_out follow the post-sublayer norms (ln2_post / ln1_post):
    hook_mlp_out's gradient is resid_post_vjp there, and ff2_vjp / attn_vjp are the gradients at down_proj /
    o_proj's outputs, before those norms.
    More in docs/notebook.md.
    """

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
        """The loss whose gradient this is: NLL of target_new's first token at the last position, or the value
        of ``metric`` where one was given."""
        return float(self.tables["prompts"]["loss"][0].as_py())

    # One pandas DataFrame per table (built on first use): the warehouse's columns for this prompt.
    projections = _frame("projections")
    gradient_ranks = _frame("gradient_ranks")
    tokens = _frame("tokens")
    prompts = _frame("prompts")

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
        rows = self.tables["projections"].to_pylist()
        if rec.target_true is None:  # no true answer: its rank shows as -1 in the hover text
            rows = [dict(r, target_true_rank=-1) for r in rows]
        grid = case_grid(rows, tokens, site, p.target_new_id, p.target_true_id, self.vocab_size)
        if grid is None:
            raise ValueError(f"no projections for site {site!r} (lens sites: "
                             f"{', '.join(self.tables['projections']['site'].unique().to_pylist())})")
        case_id = rec.case_id if rec.case_id is not None else "(no case_id)"
        true = rec.target_true if rec.target_true is not None else "(not given)"
        case = Case(case_id, self.model, rec.prompt, rec.subject or "", rec.target_new, true, tokens)
        return render_grid(grid, case, self.loss, grid_caption(grid, case_id, self.model, rec.target_new, true))

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

    # Each table over all results, as one pandas DataFrame (built on every access: a list may change).
    projections = property(lambda self: self._concat("projections"))
    gradient_ranks = property(lambda self: self._concat("gradient_ranks"))
    tokens = property(lambda self: self._concat("tokens"))
    prompts = property(lambda self: self._concat("prompts"))
