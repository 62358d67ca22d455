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


# The batch limits for the device, used where ExtractConfig.batch_size / batch_tokens are None (their
# defaults): declared here only, and read by the CLI's --help (this module imports neither torch nor the store).
CPU_BATCH_SIZE = 32  # prompts per batch on CPU: 32 x 16 tokens = the 512-token CPU budget
CUDA_BATCH_SIZE = 256  # on a GPU: enough rows that the lens GEMMs and the capture fill the device
# Padded tokens per batch on CPU: bounds a batch's RSS (see token_budget_batches). 32 prompts of 16 tokens,
# CounterFact's 99th-percentile length under SmolLM2's tokenizer. On CUDA: capture.auto_batch_tokens.
CPU_BATCH_TOKENS = 512


def batch_limits(lm, batch_size: int | None, batch_tokens: int | None) -> tuple[int, int]:
    """(batch_size, batch_tokens) for this loaded model, a ``None`` meaning "for its device".

    On CPU 32 prompts and 512 padded tokens (the budget that keeps peak RSS flat); on CUDA 256 prompts and
    a token budget from the device's free memory (:func:`blens.extract.capture.auto_batch_tokens`, a small
    probe pass), so one command line suits both without tuning. Explicit values are kept as given.
    """
    from .capture import auto_batch_tokens

    on_gpu = lm.device.type == "cuda"
    if batch_size is None:
        batch_size = CUDA_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE
    if batch_tokens is None:
        batch_tokens = auto_batch_tokens(lm.view, lm.device)
    return batch_size, batch_tokens
