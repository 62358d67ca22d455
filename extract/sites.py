"""The warehouse's ``site`` vocabulary: which spanning vector of which MLP matrix a row is about.

Kept apart from the adapter table (``adapters.py``, which needs torch) so that a result's identity
(``identity.py``) can be computed without importing torch: the CLI's no-op rerun decides from content
hashes alone (``resume.py``).
"""

from __future__ import annotations

from enum import StrEnum


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

    @property
    def matrix(self) -> str | None:
        """The MLP matrix whose spanning set this site is part of; None for the residual-stream site."""
        if self is Site.RESID_POST_VJP:
            return None
        return self.value.rsplit("_", 1)[0]

    @property
    def is_vjp(self) -> bool:
        return self.value.endswith("_vjp")

    @classmethod
    def of(cls, matrix: str, vjp: bool) -> "Site":
        return cls(f"{matrix}_{'vjp' if vjp else 'input'}")


# The two sites the paper reads through the logit lens (projections table), for every family.
LENS_SITES: tuple[Site, ...] = (Site.FF1_INPUT, Site.FF2_VJP)
