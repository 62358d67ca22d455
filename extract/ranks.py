"""Exact gradient rank from the spanning sets, without materialising the d_in x d_out gradient.

G = X^T D with X (n, d_in) the inputs and D (n, d_out) the VJPs. The n x n Gram matrices Gx = X X^T and
Gd = D D^T carry everything about G's singular values: with Gx = U diag(w) U^T and S = U diag(sqrt w)
(so S S^T = Gx), the eigenvalues of the symmetric n x n core S^T Gd S are those of Gd Gx, which are the
squared singular values of G. Rank is then counted with torch.linalg.matrix_rank's own convention for
G: singular values above sigma_max * max(d_in, d_out) * eps(float32).

Why Gram matrices and not thin QRs of X^T and D^T (the first version): a batched QR of tall d x n
matrices is a loop of one solver call per prompt on CUDA, and it set the pace of the whole extraction on
an H200 (8 of 12 s for 1024 SmolLM2 prompts, bench/results.md). Gram matrices are batched matrix
products, and the two eigen-decompositions run once per batch over every (layer, matrix, prompt) at once
on n x n matrices (cuSOLVER's batched Jacobi solver for n <= 32). In float64 the squaring costs nothing
that matters: an eigenvalue's rounding is ~n * eps64 * sigma_max^2, i.e. a singular value error of
~1e-7 * sigma_max at worst, where the rank tolerance is max(d_in, d_out) * 1.2e-7 * sigma_max, and a
singular value near that tolerance moves by ~eps64 / tolerance * sigma_max (1e-12 relative).

Nothing here reads back to the host: the ranks stay on the model's device until the batch's one copy.
"""

from __future__ import annotations

import torch


def matrix_rank_tolerance(shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> float:
    """torch.linalg.matrix_rank's default relative tolerance for a matrix of this shape and dtype."""
    return max(shape) * torch.finfo(dtype).eps


def gram(a: torch.Tensor) -> torch.Tensor:
    """a a^T per batch row in float64: (B, n, d) -> (B, n, n)."""
    a = a.double()
    return a @ a.transpose(-1, -2)


# Matrices per eigen-solver call. cuSOLVER's batched solvers take workspace per matrix: one call over a
# whole SmolLM2 batch (23,040 16 x 16 float64 cores) peaked ~10 GB above the rest of the batch on an H200
# (bench/results.md); in chunks the workspace is bounded and the extra calls cost a few launches.
EIGEN_CHUNK = 2048


def _square_root_factor(gx: torch.Tensor) -> torch.Tensor:
    """S with S S^T = gx for a batch of PSD matrices (eigenvalues below zero are rounding: set to 0)."""
    parts = []
    for chunk in gx.split(EIGEN_CHUNK):
        w, u = torch.linalg.eigh(chunk)
        parts.append(u * w.clamp_min(0).sqrt().unsqueeze(-2))
    return torch.cat(parts)


def _eigvalsh(core: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.linalg.eigvalsh(chunk) for chunk in core.split(EIGEN_CHUNK)])


def singular_values_from_grams(gx: torch.Tensor, gd: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of X^T D per batch row, given Gx = X X^T and Gd = D D^T."""
    s = _square_root_factor(gx)
    core = s.transpose(-1, -2) @ gd @ s
    core = (core + core.transpose(-1, -2)) / 2  # exactly symmetric for eigvalsh
    return _eigvalsh(core).clamp_min(0).sqrt().flip(-1)


def ranks_from_singular_values(sv: torch.Tensor, shape: tuple[int, int],
                               gradient_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if sv.shape[-1] == 0:
        return torch.zeros(sv.shape[:-1], dtype=torch.long, device=sv.device)
    tol = sv[..., :1] * matrix_rank_tolerance(shape, gradient_dtype)
    return (sv > tol).sum(-1)


def gradient_ranks(x: torch.Tensor, d: torch.Tensor, *, gradient_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """rank(x_b^T d_b) for every batch row b, matching torch.linalg.matrix_rank on the fp32 gradient."""
    sv = singular_values_from_grams(gram(x), gram(d))
    return ranks_from_singular_values(sv, (x.shape[-1], d.shape[-1]), gradient_dtype)


def ranks_for_batch(spans, matrix_names: list[str], n_layers: int) -> dict[tuple[int, str], torch.Tensor]:
    """Ranks of every (layer, matrix) gradient, as (B,) tensors on the spans' device.

    The Gram matrix of a shared input (ff1 / ff1_gate) is computed once; all square-root factors come
    from batched eigh calls, all cores from batched eigvalsh calls (the matrices of one batch share n).
    """
    keys = [(layer, name) for layer in range(n_layers) for name in matrix_names]
    if not keys:
        return {}
    input_grams: dict[int, int] = {}  # id(input tensor) -> index into gx_list
    gx_list, gd_list, which, shapes = [], [], [], []
    for key in keys:
        x, d = spans.inputs[key], spans.vjps[key]
        if id(x) not in input_grams:
            input_grams[id(x)] = len(gx_list)
            gx_list.append(gram(x))
        which.append(input_grams[id(x)])
        gd_list.append(gram(d))
        shapes.append((x.shape[-1], d.shape[-1]))
    B = gd_list[0].shape[0]
    s = _square_root_factor(torch.cat(gx_list))  # (n_inputs * B, n, n)
    s = s.view(len(gx_list), B, *s.shape[1:])[torch.tensor(which, device=s.device)]  # (K, B, n, n)
    gd = torch.stack(gd_list)  # (K, B, n, n)
    core = s.transpose(-1, -2) @ gd @ s
    core = (core + core.transpose(-1, -2)) / 2
    sv = _eigvalsh(core.flatten(0, 1)).clamp_min(0).sqrt().flip(-1).view(len(keys), B, -1)
    return {key: ranks_from_singular_values(sv[i], shapes[i]) for i, key in enumerate(keys)}
