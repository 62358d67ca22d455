"""One batched backward pass that captures the spanning sets of MLP matrices; the one hook helper.

For a linear map z = x W applied at n positions, dL/dW = sum_i x_i^T delta_i (Lemma 4.1). So the
gradient of every MLP matrix is fully described by two n-row factors: the inputs x_i and the VJPs
delta_i = dL/dz_i. We capture exactly those and never form a weight gradient:

* no parameter requires grad, only the input embeddings do, so autograd builds the graph but skips
  every weight-gradient GEMM;
* forward hooks record each matrix's input and output; one ``torch.autograd.grad`` call returns the
  VJPs at all outputs at once;
* the LM head runs only at each prompt's last position (the loss needs nothing else);
* prompts are right-padded: under a causal mask a pad token after the last real token cannot affect
  any real position, and pad rows are zeroed before anything downstream sees them.

Extraction (:func:`capture`) and editing (``blens.edit.editor``) both go through :func:`trace`, so the
editor's dL/dW is rebuilt from the same spanning sets the warehouse stores.

Where a family normalises FF2's output before the residual add (Gemma's ``post_feedforward_layernorm``),
the same backward also returns the residual-stream VJP dL/dh_out of each block (``Site.RESID_POST_VJP``),
taken at that norm's output: h_out = h_mid + norm(FF2 out), so the two gradients are the same tensor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .adapters import ModelView, Site
from .prepare import PreparedPrompt

Key = tuple[int, str]  # (layer, matrix name)


@contextlib.contextmanager
def hooks(forward: Iterable[tuple[nn.Module, Callable]] = (),
          pre_with_kwargs: Iterable[tuple[nn.Module, Callable]] = ()) -> Iterator[None]:
    """Register forward hooks (``fn(module, args, out)``) and forward pre-hooks with keyword arguments
    (``fn(module, args, kwargs)``); every one is removed on exit, whatever happens inside."""
    handles = []
    try:
        for module, fn in forward:
            handles.append(module.register_forward_hook(fn))
        for module, fn in pre_with_kwargs:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and a (B, T) bool mask of real tokens: the one padding of the project."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.bool)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[b, : len(s)] = True
    return ids.to(device), mask.to(device)


@dataclass
class Trace:
    """What :func:`trace` leaves behind: next-token logits at each row's last position, the per-row loss,
    and the inputs and VJPs of the traced matrices ((B, T, d), zero at padded positions)."""

    logits: torch.Tensor  # (B, V) float32
    loss: torch.Tensor  # (B,) NLL of each row's target (0 for rows without one)
    inputs: dict[Key, torch.Tensor]
    vjps: dict[Key, torch.Tensor]
    resid_vjps: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> dL/dh_out (resid_layers only)


def trace(view: ModelView, ids: torch.Tensor, mask: torch.Tensor, keys: Sequence[Key], targets: torch.Tensor,
          loss_rows: torch.Tensor | None = None, *, pre_block_hooks: Iterable[tuple[nn.Module, Callable]] = (),
          resid_layers: Sequence[int] = ()) -> Trace:
    """Forward over a right-padded batch recording the inputs and outputs of ``keys``; then one backward
    of sum over ``loss_rows`` (default: all) of NLL(target | row) at each row's last position.

    ``resid_layers`` (families with a post-MLP norm only): also return dL/dh_out of those blocks, taken at
    the post-MLP norm's output, in the same ``autograd.grad`` call."""
    device = ids.device
    lengths = mask.sum(1)
    inputs: dict[Key, torch.Tensor] = {}
    outputs: dict = {}  # Key -> matrix output; ("resid", layer) -> post-MLP norm output

    def recorder(key: Key):
        def hook(_mod, args, out):
            inputs[key] = args[0]
            outputs[key] = out
        return hook

    def resid_recorder(layer: int):
        def hook(_mod, _args, out):
            outputs[("resid", layer)] = out
        return hook

    forward = [(view.matrix(layer, name), recorder((layer, name))) for layer, name in keys]
    if resid_layers:
        if view.family.post_mlp_norm is None:
            raise ValueError(f"family {view.family.name!r} has no post-MLP norm: its residual VJP is ff2_vjp")
        forward += [(view.post_mlp_norm(layer), resid_recorder(layer)) for layer in resid_layers]
    with hooks(forward, pre_block_hooks), torch.enable_grad():
        embeds = view.embedding(ids).detach().requires_grad_(True)
        hidden = view.base(inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False).last_hidden_state
        logits = view.logits(hidden[torch.arange(len(ids), device=device), lengths - 1])  # already final-normed
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        if loss_rows is not None:
            loss = loss * loss_rows
        keys = list(outputs)
        grads = torch.autograd.grad(loss.sum(), [outputs[k] for k in keys], allow_unused=True) if keys else ()

    fmask = mask.unsqueeze(-1).to(embeds.dtype)
    all_vjps = {k: (torch.zeros_like(outputs[k]) if g is None else g.detach()) * fmask for k, g in zip(keys, grads)}
    vjps = {k: v for k, v in all_vjps.items() if k[0] != "resid"}
    resid = {k[1]: v for k, v in all_vjps.items() if k[0] == "resid"}
    ins: dict[Key, torch.Tensor] = {}
    for key, x in inputs.items():  # a shared input (ff1 / ff1_gate) is one tensor: mask and store it once
        same = next((k for k in ins if inputs[k] is x), None)
        ins[key] = ins[same] if same is not None else x.detach() * fmask
    return Trace(logits=logits.detach(), loss=loss.detach(), inputs=ins, vjps=vjps, resid_vjps=resid)


@dataclass
class SpanningSets:
    """Per-batch capture. Tensors are (B, T, d), zero at padded positions.

    ``inputs[(layer, matrix)]`` and ``vjps[(layer, matrix)]``: ff1 and ff1_gate share one input tensor.
    ``resid_vjps[layer]``: dL/dh_out of each block, only for families with a post-MLP norm (else empty).
    """

    input_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) bool, True at real tokens
    lengths: torch.Tensor  # (B,)
    loss: torch.Tensor  # (B,)
    inputs: dict[Key, torch.Tensor]
    vjps: dict[Key, torch.Tensor]
    resid_vjps: dict[int, torch.Tensor] = field(default_factory=dict)

    def site(self, layer: int, site: Site) -> torch.Tensor:
        """(B, T, d) vectors of one site at one layer."""
        if site is Site.RESID_POST_VJP:
            return self.resid_vjps[layer]
        return (self.vjps if site.is_vjp else self.inputs)[(layer, site.matrix)]

    def gradient(self, layer: int, matrix: str, row: int) -> torch.Tensor:
        """dL/dW of one prompt, (d_in, d_out), rebuilt from the spanning set: sum_i outer(x_i, delta_i)."""
        return self.inputs[(layer, matrix)][row].T @ self.vjps[(layer, matrix)][row]


def all_matrices(view: ModelView) -> list[Key]:
    return [(layer, name) for layer in range(view.n_layers) for name in view.matrix_names]


def capture(view: ModelView, prompts: list[PreparedPrompt], pad_id: int) -> SpanningSets:
    """Forward + one backward of sum_b NLL_b(target_new | prompt_b) at each prompt's last position."""
    device = view.unembedding.device
    ids, mask = pad_batch([p.input_ids for p in prompts], pad_id, device)
    target = torch.tensor([p.target_new_id for p in prompts], device=device)
    resid_layers = range(view.n_layers) if view.family.post_mlp_norm else ()
    t = trace(view, ids, mask, all_matrices(view), target, resid_layers=resid_layers)
    return SpanningSets(input_ids=ids, mask=mask, lengths=mask.sum(1), loss=t.loss, inputs=t.inputs, vjps=t.vjps,
                        resid_vjps=t.resid_vjps)
