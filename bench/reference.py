"""A faithful per-vector reference (the paper's public-demo style), used only to measure speed-ups.

Per prompt: every parameter requires grad, ``loss.backward()`` materialises each MLP weight gradient,
forward hooks collect each matrix's input and (via ``retain_grad``) the gradient of its output, the rank
of each weight gradient is ``torch.linalg.matrix_rank``, and every lens vector goes through
``final_norm`` + ``lm_head`` on its own with a full sort for top/bottom-k and the target ranks.
"""

from __future__ import annotations

import torch

SITES = ("ff1_input", "ff2_vjp")


def reference_prompt(lm, prompt, k: int = 10) -> dict:
    model, view = lm.model, lm.view
    lm_head = model.get_output_embeddings()
    params = list(model.parameters())
    old = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    store: dict = {}
    handles = []
    for layer in range(view.n_layers):
        for name in view.matrix_names:
            def hook(_m, args, out, key=(layer, name)):
                out.retain_grad()
                store[key] = (args[0], out)
            handles.append(view.matrix(layer, name).register_forward_hook(hook))
    try:
        with torch.enable_grad():
            ids = torch.tensor([prompt.input_ids])
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[0, -1:].float(), torch.tensor([prompt.target_new_id]))
            model.zero_grad(set_to_none=True)
            loss.backward()
        ranks = {key: int(torch.linalg.matrix_rank(view.matrix(*key).weight.grad.float()))
                 for key in store}
        targets = (prompt.target_new_id, prompt.target_true_id)
        lens = []
        with torch.no_grad():
            for layer in range(view.n_layers):
                for site in SITES:
                    x, out = store[(layer, "ff1")] if site == "ff1_input" else store[(layer, "ff2")]
                    vecs = x[0] if site == "ff1_input" else out.grad[0]
                    for pos in range(vecs.shape[0]):
                        lg = lm_head(view.final_norm(vecs[pos]))
                        order = lg.argsort(descending=True)
                        lens.append((order[:k], lg[order[:k]], order.flip(0)[:k],
                                     [int((lg > lg[t]).sum()) for t in targets]))
    finally:
        for h in handles:
            h.remove()
        for p, o in zip(params, old):
            p.requires_grad_(o)
            p.grad = None
    return {"loss": float(loss.detach()), "ranks": ranks, "lens": lens}
