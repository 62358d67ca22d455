"""One batched backward pass that captures the spanning sets of every MLP matrix.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import ModelView
from .prepare import PreparedPrompt


@dataclass
class SpanningSets:
    """Per-batch capture. Tensors are (B, T, d), zero at padded positions.

    ``inputs[(layer, matrix)]`` and ``vjps[(layer, matrix)]``: ff1 and ff1_gate share one input tensor.
    """

    input_ids: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) bool, True at real tokens
    lengths: torch.Tensor  # (B,)
    loss: torch.Tensor  # (B,)
    inputs: dict[tuple[int, str], torch.Tensor]
    vjps: dict[tuple[int, str], torch.Tensor]

    def gradient(self, layer: int, matrix: str, row: int) -> torch.Tensor:
        """dL/dW for one prompt, (d_in, d_out): only for tests and the reference; the pipeline never builds it."""
        x = self.inputs[(layer, matrix)][row]
        d = self.vjps[(layer, matrix)][row]
        return x.T @ d


def pad_batch(prompts: list[PreparedPrompt], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(p.n_tokens for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, : p.n_tokens] = torch.tensor(p.input_ids)
        mask[b, : p.n_tokens] = True
    return ids.to(device), mask.to(device)


def capture(view: ModelView, prompts: list[PreparedPrompt], pad_id: int, *, targets: str = "target_new") -> SpanningSets:
    """Forward + one backward of sum_b NLL_b(target | prompt_b) at each prompt's last position."""
    device = view.unembedding.device
    ids, mask = pad_batch(prompts, pad_id, device)
    lengths = mask.sum(1)
    target = torch.tensor([getattr(p, f"{targets}_id") for p in prompts], device=device)

    inputs: dict[tuple[int, str], torch.Tensor] = {}
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for layer in range(view.n_layers):
        for name in view.matrix_names:
            def hook(_mod, args, out, key=(layer, name)):
                inputs[key] = args[0]
                outputs[key] = out
            handles.append(view.matrix(layer, name).register_forward_hook(hook))
    try:
        with torch.enable_grad():
            embeds = view.embedding(ids).detach().requires_grad_(True)
            hidden = view.base(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state
            last = hidden[torch.arange(len(prompts), device=device), lengths - 1]  # already final-normed
            logits = last @ view.unembedding.T
            bias = getattr(view.model.get_submodule(view.family.unembedding), "bias", None)
            if bias is not None:
                logits = logits + bias
            loss = torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")
            keys = list(outputs)
            grads = torch.autograd.grad(loss.sum(), [outputs[k] for k in keys], allow_unused=True)
    finally:
        for h in handles:
            h.remove()

    fmask = mask.unsqueeze(-1).to(embeds.dtype)
    vjps = {}
    for k, g in zip(keys, grads):
        g = torch.zeros_like(outputs[k]) if g is None else g
        vjps[k] = g.detach() * fmask
    ins = {}
    for key, x in inputs.items():
        if key[1] != "ff1_gate":
            ins[key] = x.detach() * fmask
    for layer, name in inputs:
        if name == "ff1_gate":  # the same tensor as ff1's input: store (and later factor) it once
            ins[(layer, name)] = ins[(layer, "ff1")]
    return SpanningSets(input_ids=ids, mask=mask, lengths=lengths, loss=loss.detach(), inputs=ins, vjps=vjps)
