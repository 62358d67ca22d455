"""CounterFact editing metrics of one (edited or not) model on one case, in the paper's terms."""

from __future__ import annotations

import torch

from .cases import EditCase

METRIC_COLUMNS = ("efficacy", "generalization", "locality", "locality_unchanged", "target_new_prob",
                  "target_true_prob", "new_gt_true", "rephrase_new_gt_true")


def metrics(case: EditCase, logits: torch.Tensor, pre_logits: torch.Tensor) -> dict:
    """Top-1 metrics on a case's prompts (rows = ``case.sequences``), in [0, 1].

    efficacy: target_new is the argmax after the edit prompt; generalization: the same on rephrases;
    locality: a neighbouring prompt's true answer is the argmax; locality_unchanged: its argmax is the
    one before the edit; *_new_gt_true: ROME's probability tests P(target_new) > P(target_true).
    """
    n_r, n_l = len(case.rephrase_ids), len(case.locality_ids)
    top = logits.argmax(-1)
    pre_top = pre_logits.argmax(-1)
    probs = torch.softmax(logits[0].double(), -1)
    new, true = case.target_new_id, case.target_true_id
    out = {
        "efficacy": float(top[0] == new),
        "target_new_prob": float(probs[new]),
        "target_true_prob": float(probs[true]),
        "new_gt_true": float(logits[0, new] > logits[0, true]),
        "generalization": None, "rephrase_new_gt_true": None, "locality": None, "locality_unchanged": None,
    }
    if n_r:
        r = slice(1, 1 + n_r)
        out["generalization"] = float((top[r] == new).float().mean())
        out["rephrase_new_gt_true"] = float((logits[r, new] > logits[r, true]).float().mean())
    if n_l:
        loc = slice(1 + n_r, 1 + n_r + n_l)
        gts = torch.tensor(case.locality_gt_ids, device=top.device)
        out["locality"] = float((top[loc] == gts).float().mean())
        out["locality_unchanged"] = float((top[loc] == pre_top[loc]).float().mean())
    return out
