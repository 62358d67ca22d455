"""Cutting length-sorted prompts into batches bounded by a token budget (no torch, no store: the device
check imports it on machines that have neither duckdb nor prefect)."""

from __future__ import annotations

from .prepare import PreparedPrompt


def token_budget_batches(prompts: list[PreparedPrompt], batch_size: int,
                         batch_tokens: int) -> list[list[PreparedPrompt]]:
    """Cut length-sorted prompts into batches of at most ``batch_size`` prompts and ``batch_tokens`` padded
    tokens (prompts x longest prompt); a prompt longer than the budget runs alone.

    Why a token budget and not only a prompt count: a batch's memory (activations kept for the backward
    pass, the captured x_i and delta_i, lens blocks) grows with its padded token count. Runs are sorted by
    length, so with a prompt count alone the longest prompts of a large run (the tail of the length
    distribution, absent from a small run) form its largest batches, and peak RSS grows with the size of the
    run. With the budget, the largest batch, and so the peak, is set by ``batch_tokens`` whatever the run size.
    """
    batches: list[list[PreparedPrompt]] = []
    current: list[PreparedPrompt] = []
    width = 0
    for p in prompts:
        new_width = max(width, p.n_tokens)
        if current and (len(current) >= batch_size or (len(current) + 1) * new_width > batch_tokens):
            batches.append(current)
            current, new_width = [], p.n_tokens
        current.append(p)
        width = new_width
    if current:
        batches.append(current)
    return batches
