"""One table that maps model families onto the Backward Lens vocabulary.

Every other module speaks in *sites*, never in module paths: ``blocks.{i}.mlp.ff1`` is the first MLP
matrix of block ``i`` whatever the family calls it (GPT-2 ``mlp.c_fc``, Llama ``mlp.up_proj``), the way
TransformerLens names hook points. Adding a family is one entry in :data:`FAMILIES`; no code path
changes.

Matrix names (the ``matrix`` column of the warehouse):

* ``ff1``       the first MLP matrix (GPT-2 ``c_fc``, Llama ``up_proj``); its input is the "imprint" site.
* ``ff1_gate``  Llama's ``gate_proj``: same input as ``ff1``, its own VJP (absent on GPT-2).
* ``ff2``       the second MLP matrix (GPT-2 ``c_proj``, Llama ``down_proj``); its VJP is the "shift" site.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture has no entry in :data:`FAMILIES`."""


@dataclass(frozen=True)
class Family:
    """Where one model family keeps the modules the method needs (paths relative to the model root)."""

    name: str
    model_types: tuple[str, ...]
    base: str  # the headless transformer (its output is already through the final norm)
    blocks: str  # the ModuleList of transformer blocks
    matrices: dict[str, str]  # matrix name -> path inside a block
    attention: str  # path inside a block
    final_norm: str
    unembedding: str  # module whose .weight is the (V, d) unembedding matrix
    embedding: str  # module whose .weight is the (V, d) input embedding
    # GPT-2's Conv1D stores W as (in, out) and computes x @ W; nn.Linear stores (out, in), x @ W.T.
    weight_is_in_by_out: bool = False
    lens_note: str = field(default="", compare=False)


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        name="gpt2",
        model_types=("gpt2",),
        base="transformer",
        blocks="transformer.h",
        matrices={"ff1": "mlp.c_fc", "ff2": "mlp.c_proj"},
        attention="attn",
        final_norm="transformer.ln_f",
        unembedding="lm_head",
        embedding="transformer.wte",
        weight_is_in_by_out=True,
    ),
    "llama": Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        base="model",
        blocks="model.layers",
        matrices={"ff1": "mlp.up_proj", "ff1_gate": "mlp.gate_proj", "ff2": "mlp.down_proj"},
        attention="self_attn",
        final_norm="model.norm",
        unembedding="lm_head",
        embedding="model.embed_tokens",
    ),
}

# Families whose whole stack we have verified against autograd in tests; others share the Llama layout
# and are accepted because the adapter entry matches them, but say so in `blens extract --help`.
VERIFIED_FAMILIES = ("gpt2", "llama")


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


def site_name(layer: int, matrix: str, point: str | None = None) -> str:
    """TransformerLens-style hook-point name, e.g. ``blocks.3.mlp.ff2`` or ``blocks.3.mlp.ff2.vjp``."""
    base = f"blocks.{layer}.mlp.{matrix}"
    return f"{base}.{point}" if point else base


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

    def matrix(self, layer: int, name: str) -> nn.Module:
        return self.blocks[layer].get_submodule(self.family.matrices[name])

    def weight(self, layer: int, name: str) -> torch.Tensor:
        """The matrix as (d_in, d_out): the orientation in which dL/dW = sum_i x_i^T delta_i."""
        w = self.matrix(layer, name).weight
        return w if self.family.weight_is_in_by_out else w.T

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
    def embedding(self) -> nn.Module:
        return self.model.get_submodule(self.family.embedding)

    @property
    def vocab_size(self) -> int:
        return self.unembedding.shape[0]

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config
        return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
