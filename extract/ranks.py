"""Exact gradient rank from the spanning sets, without materialising the d_in x d_out gradient.

G = X^T D with X (n, d_in) the inputs and D (n, d_out) the VJPs. With thin QRs X^T = Q_x R_x and
D^T = Q_d R_d, G = Q_x (R_x^T R_d) Q_d^T, and Q_x, Q_d have orthonormal columns, so G and the n x n core
R_x^T R_d have the same singular values. Rank is then counted with torch.linalg.matrix_rank's own
convention for G: singular values above sigma_max * max(d_in, d_out) * eps(float32).

The QRs and the core SVD run in float64 (they are tiny), so the only rounding that matters is the
one already in the captured fp32 factors, the same as in an fp32 autograd gradient.
"""

from __future__ import annotations

import torch


def matrix_rank_tolerance(shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> float:
    """torch.linalg.matrix_rank's default relative tolerance for a matrix of this shape and dtype."""
    return max(shape) * torch.finfo(dtype).eps


def _r_factor(a: torch.Tensor) -> torch.Tensor:
    """R of the QR of a^T for a batch (B, n, d) -> (B, min(n, d), n)."""
    return torch.linalg.qr(a.transpose(1, 2).double(), mode="r").R


def core_singular_values(x: torch.Tensor, d: torch.Tensor, rx: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of x^T d per batch row, from the small core. x: (B, n, d_in), d: (B, n, d_out)."""
    rx = _r_factor(x) if rx is None else rx
    rd = _r_factor(d)
    core = rx @ rd.transpose(1, 2)  # R_x R_d^T: the transpose of R_x^T R_d, same singular values
    return torch.linalg.svdvals(core)


def gradient_ranks(x: torch.Tensor, d: torch.Tensor, *, gradient_dtype: torch.dtype = torch.float32,
                   rx: torch.Tensor | None = None) -> torch.Tensor:
    """rank(x_b^T d_b) for every batch row b, matching torch.linalg.matrix_rank on the fp32 gradient."""
    sv = core_singular_values(x, d, rx)
    if sv.shape[-1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.long)
    tol = sv[:, :1] * matrix_rank_tolerance((x.shape[-1], d.shape[-1]), gradient_dtype)
    return (sv > tol).sum(-1)


def ranks_for_batch(spans, matrix_names: list[str], n_layers: int) -> dict[tuple[int, str], torch.Tensor]:
    """Ranks of every (layer, matrix) gradient; the R factor of a shared input (ff1 / ff1_gate) is reused."""
    out = {}
    for layer in range(n_layers):
        cache: dict[int, torch.Tensor] = {}
        for name in matrix_names:
            x = spans.inputs[(layer, name)]
            rx = cache.get(id(x))
            if rx is None:
                rx = cache[id(x)] = _r_factor(x)
            out[(layer, name)] = gradient_ranks(x, spans.vjps[(layer, name)], rx=rx).cpu()
    return out
