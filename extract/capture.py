"""One batched backward pass that captures the spanning sets of every MLP and attention matrix; the one hook helper.

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
from .batching import CPU_BATCH_TOKENS
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
          resid_layers: Sequence[int] = (), metric: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Trace:
    """Forward over a right-padded batch recording the inputs and outputs of ``keys``; then one backward
    of sum over ``loss_rows`` (default: all) of NLL(target | row) at each row's last position.

    ``resid_layers`` (families with a post-MLP norm only): also return dL/dh_out of those blocks, taken at
    the post-MLP norm's output, in the same ``autograd.grad`` call. ``metric``: the per-row loss from the
    (B, V) last-position logits instead of the NLL of ``targets``."""
    device = ids.device
    lengths = mask.sum(1)
    inputs: dict[Key, torch.Tensor] = {}
    outputs: dict = {}  # module -> its output; ("resid", layer) -> post-MLP norm output

    by_module: dict[nn.Module, list[Key]] = {}  # a fused module (GPT-2 c_attn) serves several keys
    for layer, name in keys:
        by_module.setdefault(view.matrix(layer, name), []).append((layer, name))

    def recorder(module: nn.Module):
        def hook(_mod, args, out):
            for key in by_module[module]:
                inputs[key] = args[0]
            outputs[module] = out
        return hook

    def resid_recorder(layer: int):
        def hook(_mod, _args, out):
            outputs[("resid", layer)] = out
        return hook

    forward = [(module, recorder(module)) for module in by_module]
    if resid_layers:
        if view.family.post_mlp_norm is None:
            raise ValueError(f"family {view.family.name!r} has no post-MLP norm: its residual VJP is ff2_vjp")
        forward += [(view.post_mlp_norm(layer), resid_recorder(layer)) for layer in resid_layers]
    with hooks(forward, pre_block_hooks), torch.enable_grad():
        embeds = view.embedding(ids).detach().requires_grad_(True)
        hidden = view.base(inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False).last_hidden_state
        logits = view.logits(hidden[torch.arange(len(ids), device=device), lengths - 1])  # already final-normed
        loss = metric(logits) if metric is not None else \
            torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        if loss_rows is not None:
            loss = loss * loss_rows
        outs = list(outputs)
        grads = torch.autograd.grad(loss.sum(), [outputs[k] for k in outs], allow_unused=True) if outs else ()

    fmask = mask.unsqueeze(-1).to(embeds.dtype)
    # Zero at padded positions, in place: the gradients are this call's own fresh tensors, and the inputs below
    # are activations whose graph was freed by the backward pass (no copy of ~20 MB per layer and batch).
    by_output = {k: torch.zeros_like(outputs[k]) if g is None else g.detach().mul_(fmask) for k, g in zip(outs, grads)}
    vjps: dict[Key, torch.Tensor] = {}
    for module, module_keys in by_module.items():
        for key in module_keys:
            part = view.part(key[1])
            vjps[key] = by_output[module] if part is None else part.cut(by_output[module])
    resid = {k[1]: v for k, v in by_output.items() if isinstance(k, tuple) and k[0] == "resid"}
    ins: dict[Key, torch.Tensor] = {}
    for key, x in inputs.items():  # a shared input (ff1 / ff1_gate, attn_q / _k / _v) is one tensor: mask it once
        same = next((k for k in ins if inputs[k] is x), None)
        ins[key] = ins[same] if same is not None else x.detach().mul_(fmask)
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
    # (B,) the model's own answer: argmax of the unedited next-token logits at the last position (the same
    # forward pass as the loss), for the paper's "model's prediction" readings (Figures 19-20)
    answer_ids: torch.Tensor | None = None

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


def capture(view: ModelView, prompts: list[PreparedPrompt], pad_id: int,
            metric: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SpanningSets:
    """Forward + one backward of sum_b NLL_b(target_new | prompt_b) at each prompt's last position
    (``metric``: :func:`trace`'s per-row loss from the (B, V) last-position logits instead; notebook API)."""
    device = view.unembedding.device
    ids, mask = pad_batch([p.input_ids for p in prompts], pad_id, device)
    target = torch.tensor([p.target_new_id for p in prompts], device=device)
    resid_layers = range(view.n_layers) if view.family.post_mlp_norm else ()
    t = trace(view, ids, mask, all_matrices(view), target, resid_layers=resid_layers, metric=metric)
    return SpanningSets(input_ids=ids, mask=mask, lengths=mask.sum(1), loss=t.loss, inputs=t.inputs, vjps=t.vjps,
                        resid_vjps=t.resid_vjps, answer_ids=t.logits.argmax(-1))


# ---- batch size from free memory (CUDA) ---------------------------------------------------------------

DEVICE_MEMORY_FRACTION = 0.6  # share of the free GPU memory a batch's activations may take
PEAK_FACTOR = 1.5  # backward transients (a layer's gradients) on top of what is saved for it


def activation_bytes_per_token(view: ModelView, probe_tokens: int = 64, pad_id: int = 0) -> float:
    """Device bytes one token of a batch keeps alive, measured on a probe batch of random ids.

    Counted: every tensor autograd saves for the backward pass (weights excluded) plus the captured
    spanning sets, plus the lens input copy (two sites, every layer, d floats). Measured through
    ``torch.autograd.graph.saved_tensors_hooks``, so it is the same count on CPU and CUDA and needs no
    allocator statistics; unique storages are counted once.
    """
    device = view.unembedding.device
    d = view.unembedding.shape[1]
    width = max(1, min(16, probe_tokens))
    rows = max(1, probe_tokens // width)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, view.vocab_size, (rows, width), generator=g).to(device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    params = {p.untyped_storage().data_ptr() for p in view.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        t = trace(view, ids, mask, all_matrices(view), ids[:, -1])
    captured = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes()
                for x in (*t.inputs.values(), *t.vjps.values())}
    lens_input = len(view.lens_sites) * view.n_layers * d * 4 * rows * width
    return (sum(seen.values()) + sum(captured.values()) + lens_input) / (rows * width)


def batch_tokens_for_memory(free_bytes: int, bytes_per_token: float, reserve_bytes: int = 0, *,
                            fraction: float = DEVICE_MEMORY_FRACTION, peak_factor: float = PEAK_FACTOR,
                            lo: int = 64, hi: int = 65536) -> int:
    """The token budget whose activations fit: fraction x (free - reserve) / (peak_factor x bytes/token),
    clamped to [lo, hi] and rounded down to a multiple of 64."""
    usable = fraction * max(0, free_bytes - reserve_bytes)
    tokens = int(usable // (peak_factor * bytes_per_token))
    return max(lo, min(hi, tokens // 64 * 64))


def auto_batch_tokens(view: ModelView, device: torch.device | str | None = None, *, free_bytes: int | None = None,
                      bytes_per_token: float | None = None) -> int:
    """``batch_tokens`` for this model on this device: 512 on CPU; on CUDA from free memory.

    On CUDA the lens block (:func:`blens.extract.lens.lens_block_rows`) is reserved first, then the rest
    is shared out by the measured per-token cost (:func:`activation_bytes_per_token`). Call it after the
    model is on the device and before the first batch (the probe is one small traced pass).
    """
    from .lens import LENS_BYTES_PER_LOGIT, lens_block_rows

    device = torch.device(device) if device is not None else view.unembedding.device
    if device.type != "cuda":
        return CPU_BATCH_TOKENS
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if bytes_per_token is None:
        bytes_per_token = activation_bytes_per_token(view)
    V = view.vocab_size
    reserve = lens_block_rows(V, device, free_bytes) * V * LENS_BYTES_PER_LOGIT
    return batch_tokens_for_memory(free_bytes, bytes_per_token, reserve)
