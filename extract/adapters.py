"""One table that maps model families onto the Backward Lens vocabulary: matrices and sites.

Every other module speaks in *matrices* and *sites*, never in module paths: ``ff1`` is the first MLP
matrix of a block whatever the family calls it (GPT-2 ``mlp.c_fc``, Llama ``mlp.up_proj``), the way
TransformerLens names hook points. Adding a family is one entry in :data:`FAMILIES`; no code path
changes.

Matrix names (the ``matrix`` column of the warehouse):

* ``ff1``       the first MLP matrix (GPT-2 ``c_fc``, Llama/Gemma ``up_proj``); its input is the "imprint" site.
* ``ff1_gate``  Llama's and Gemma's ``gate_proj``: same input as ``ff1``, its own VJP (absent on GPT-2).
* ``ff2``       the second MLP matrix (GPT-2 ``c_proj``, Llama/Gemma ``down_proj``); its VJP is the "shift" site.
* ``attn_q``, ``attn_k``, ``attn_v``  the attention's query, key and value projections (Llama/Gemma
  ``q_proj``/``k_proj``/``v_proj``; GPT-2's fused ``attn.c_attn`` cut into its three output thirds, see
  :class:`Part`). They share one input (the normed residual stream), as ff1 and ff1_gate do.
* ``attn_o``    the attention's output projection (GPT-2 ``attn.c_proj``, Llama/Gemma ``o_proj``); its VJP is
  the ``attn_vjp`` site, the attention counterpart of the "shift" (paper Figure 16).

Lemma 4.1 holds for every linear map applied per token, so the attention projections' gradients have rank
<= n exactly as the MLP's do, and ``gradient_ranks`` covers them all.

A :class:`Site` is one kind of spanning vector of one matrix (its input x_i or its VJP delta_i), plus one
residual-stream site for families whose FF2 output is normalised before it joins the residual stream
(Gemma). It is the ``site`` column of the warehouse and means the same thing for every family.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from blens.errors import UserError

if TYPE_CHECKING:  # only annotations use torch: the table is read without it (the CLI's no-op rerun, resume.py)
    import torch
    from torch import nn


class UnsupportedModelError(UserError, ValueError):
    """The model's architecture has no entry in :data:`FAMILIES`."""


class Site(StrEnum):
    """A spanning vector of an MLP matrix: ``<matrix>_input`` (x_i) or ``<matrix>_vjp`` (delta_i = dL/dz_i).

    dL/dW of a matrix = sum_i outer(x_i, delta_i) (Lemma 4.1), so a matrix's two sites rebuild its gradient.

    ``ff2_vjp`` is always the VJP at FF2's *output* (the gradient's spanning set, as the paper defines the
    "shift"), in every family. In GPT-2 and Llama FF2's output is added to the residual stream as it is,
    so ``ff2_vjp`` is also the gradient at the residual stream after the block. In Gemma it first goes
    through ``post_feedforward_layernorm`` (h_out = h_mid + norm(FF2(...))), so the two differ
    (ff2_vjp = J_norm^T resid_post_vjp). For such families (:attr:`Family.post_mlp_norm` set) the
    residual-stream gradient is a site of its own:

    * ``resid_post_vjp``  dL/dh_out, the gradient at the block's output (the residual stream right after the
      normalised MLP output joins it; TransformerLens' ``hook_resid_post``). Not a spanning vector of any
      matrix (``matrix`` is None); captured and lens-projected only where it differs from ``ff2_vjp``.
    """

    FF1_INPUT = "ff1_input"  # x_i entering FF1: the paper's "imprint" (shared by ff1_gate)
    FF2_VJP = "ff2_vjp"  # delta_i at FF2's output: the paper's "shift"
    FF1_VJP = "ff1_vjp"
    FF1_GATE_VJP = "ff1_gate_vjp"
    FF2_INPUT = "ff2_input"
    RESID_POST_VJP = "resid_post_vjp"  # dL/d(block output); differs from ff2_vjp only behind a post-MLP norm
    # delta_i at the attention's output projection (attn_o): the attention's "shift" (paper Figure 16). Like
    # ff2_vjp it is d_model wide, so the logit lens reads it; named for the sublayer, not the matrix.
    ATTN_VJP = "attn_vjp"

    @property
    def matrix(self) -> str | None:
        """The matrix whose spanning set this site is part of; None for the residual-stream site."""
        if self is Site.RESID_POST_VJP:
            return None
        if self is Site.ATTN_VJP:
            return "attn_o"
        return self.value.rsplit("_", 1)[0]

    @property
    def is_vjp(self) -> bool:
        return self.value.endswith("_vjp")

    @classmethod
    def of(cls, matrix: str, vjp: bool) -> "Site":
        if matrix == "attn_o" and vjp:
            return cls.ATTN_VJP
        return cls(f"{matrix}_{'vjp' if vjp else 'input'}")


# The sites read through the logit lens (projections table) for every family: the paper's two MLP sites
# (imprint and shift) and the attention output's VJP (Figure 16).
LENS_SITES: tuple[Site, ...] = (Site.FF1_INPUT, Site.FF2_VJP, Site.ATTN_VJP)

# The VJP sites whose last-position vectors are compared across layers (Appendix G, vjp_layer_similarity).
SIMILARITY_SITES: tuple[Site, ...] = (Site.FF2_VJP, Site.ATTN_VJP, Site.RESID_POST_VJP)


def lens_sites(family: "Family") -> tuple[Site, ...]:
    """The sites projected through the logit lens for a family: :data:`LENS_SITES`, plus the residual-stream
    VJP where FF2's output is normalised before the residual add (there it is not ``ff2_vjp``)."""
    return LENS_SITES + ((Site.RESID_POST_VJP,) if family.post_mlp_norm else ())


def similarity_sites(family: "Family") -> tuple[Site, ...]:
    """The VJP sites of :data:`SIMILARITY_SITES` this family has."""
    return tuple(s for s in SIMILARITY_SITES if s in lens_sites(family))


def vector_sites(matrix_names: list[str], everything: bool) -> list[Site]:
    """Sites stored by ``--vectors spanning`` (the lens sites) or ``all`` (every matrix's gradient rebuildable)."""
    sites = [Site.FF1_INPUT, Site.FF2_VJP]
    if everything:
        sites += [Site.of(m, vjp=True) for m in matrix_names if m != "ff2" and not m.startswith("attn_")]
        sites += [Site.FF2_INPUT]
    return sites


@dataclass(frozen=True)
class Part:
    """One of ``parts`` equal slices of a fused matrix's output (GPT-2's ``c_attn`` holds W_q | W_k | W_v).

    Its input is the module's input; its VJP is the matching slice of the VJP at the module's output; its
    weight is the matching column block (of the (d_in, d_out) orientation). So it is an ordinary matrix to
    everything downstream: dL/dW_q = sum_i x_i^T delta_i^q."""

    path: str
    index: int
    parts: int

    def cut(self, t: "torch.Tensor") -> "torch.Tensor":
        """This part of a tensor whose last dimension is the fused output."""
        width = t.shape[-1] // self.parts
        return t[..., self.index * width : (self.index + 1) * width]


@dataclass(frozen=True)
class Family:
    """Where one model family keeps the modules the method needs (paths relative to the model root)."""

    name: str
    model_types: tuple[str, ...]
    base: str  # the headless transformer (its output is already through the final norm)
    blocks: str  # the ModuleList of transformer blocks
    matrices: dict[str, "str | Part"]  # matrix name -> path inside a block (or a part of a fused matrix)
    final_norm: str
    unembedding: str  # module whose .weight is the (V, d) unembedding matrix
    embedding: str  # module that maps ids to the first residual stream (scaling included)
    # GPT-2's Conv1D stores W as (in, out) and computes x @ W; nn.Linear stores (out, in), x @ W.T.
    weight_is_in_by_out: bool = False
    # Path inside a block of a norm applied to FF2's output before it joins the residual stream (Gemma's
    # post_feedforward_layernorm); None where FF2's output is added as it is (GPT-2, Llama). When set, the
    # residual-stream VJP is captured as Site.RESID_POST_VJP (its output's VJP = the block output's).
    post_mlp_norm: str | None = None


# Where Llama-style decoders (Llama, Mistral, Qwen2, Gemma 3) keep the modules: a gated MLP, up/gate/down.
_GATED_MLP_LAYOUT = dict(
    base="model",
    blocks="model.layers",
    matrices={"ff1": "mlp.up_proj", "ff1_gate": "mlp.gate_proj", "ff2": "mlp.down_proj",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_o": "self_attn.o_proj"},
    final_norm="model.norm",
    unembedding="lm_head",
    embedding="model.embed_tokens",
)

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        name="gpt2",
        model_types=("gpt2",),
        base="transformer",
        blocks="transformer.h",
        matrices={"ff1": "mlp.c_fc", "ff2": "mlp.c_proj", "attn_q": Part("attn.c_attn", 0, 3),
                  "attn_k": Part("attn.c_attn", 1, 3), "attn_v": Part("attn.c_attn", 2, 3), "attn_o": "attn.c_proj"},
        final_norm="transformer.ln_f",
        unembedding="lm_head",
        embedding="transformer.wte",
        weight_is_in_by_out=True,
    ),
    "llama": Family(name="llama", model_types=("llama", "mistral", "qwen2"), **_GATED_MLP_LAYOUT),
    # Gemma 3 (text): a GeGLU MLP (gate/up/down) between pre- and post-feedforward RMSNorms, scale (1 + w).
    # The embedding module multiplies by sqrt(d_model) itself, so inputs_embeds=embedding(ids) is exact.
    "gemma3": Family(name="gemma3", model_types=("gemma3_text",), post_mlp_norm="post_feedforward_layernorm",
                     **_GATED_MLP_LAYOUT),
}


def supported_model_types() -> list[str]:
    return sorted(t for fam in FAMILIES.values() for t in fam.model_types)


def family_for(model_or_config) -> Family:
    """The adapter for a model (or its config); a clear error naming what is supported otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r}: supported model_types are "
        f"{', '.join(supported_model_types())} (families: {', '.join(FAMILIES)})"
    )


@dataclass
class ModelView:
    """A loaded model seen through its :class:`Family`: the modules, not their paths."""

    model: nn.Module
    family: Family

    @classmethod
    def of(cls, model: nn.Module) -> "ModelView":
        return cls(model=model, family=family_for(model))

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.family.blocks)

    @property
    def matrix_names(self) -> list[str]:
        return list(self.family.matrices)

    def part(self, name: str) -> Part | None:
        """The :class:`Part` a matrix is of a fused module, or None for a module of its own."""
        loc = self.family.matrices[name]
        return loc if isinstance(loc, Part) else None

    def matrix(self, layer: int, name: str) -> nn.Module:
        """The module that applies the matrix (for a :class:`Part`: the fused module)."""
        loc = self.family.matrices[name]
        return self.blocks[layer].get_submodule(loc.path if isinstance(loc, Part) else loc)

    def post_mlp_norm(self, layer: int) -> nn.Module | None:
        """The norm between FF2's output and the residual stream, or None where there is none."""
        path = self.family.post_mlp_norm
        return None if path is None else self.blocks[layer].get_submodule(path)

    @property
    def lens_sites(self) -> tuple[Site, ...]:
        return lens_sites(self.family)

    def weight(self, layer: int, name: str) -> torch.Tensor:
        """The matrix as (d_in, d_out): the orientation in which dL/dW = sum_i x_i^T delta_i (a view of the
        stored weight, so writing into it edits the model; a :class:`Part` is its column block)."""
        return self.as_in_by_out(self.matrix(layer, name).weight, name)

    def as_in_by_out(self, grad: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """A gradient of the stored ``.weight`` tensor in the (d_in, d_out) orientation of :meth:`weight`
        (``name``: the matrix, to cut a :class:`Part` out of a fused module's gradient)."""
        g = grad if self.family.weight_is_in_by_out else grad.T
        part = self.part(name) if name is not None else None
        return part.cut(g) if part is not None else g

    @property
    def base(self) -> nn.Module:
        return self.model.get_submodule(self.family.base)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.family.final_norm)

    @property
    def unembedding(self) -> torch.Tensor:
        """(V, d) unembedding matrix."""
        return self.model.get_submodule(self.family.unembedding).weight

    @property
    def unembedding_bias(self) -> torch.Tensor | None:
        return getattr(self.model.get_submodule(self.family.unembedding), "bias", None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final-normed hidden states (R, d) -> (R, V) float32 logits: the one place it is applied."""
        out = hidden @ self.unembedding.T
        bias = self.unembedding_bias
        if bias is not None:
            out = out + bias
        return out.float()

    @property
    def embedding(self) -> nn.Module:
        return self.model.get_submodule(self.family.embedding)

    @property
    def vocab_size(self) -> int:
        return self.unembedding.shape[0]

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
