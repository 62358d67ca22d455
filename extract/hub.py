"""Before a hub model name is loaded: is the Hugging Face hub reachable at all?

Without a network, huggingface_hub retries every request five times with backoff, so `--model gpt2`
printed ten retry lines over 25 s before the one line saying the hub could not be reached. One TCP
connect to the hub (or to the proxy that reaches it), bounded by a timeout, answers the same question in
well under a second: unreachable and not in the local Hugging Face cache is one clear error at once;
unreachable but cached loads from the cache without a retry (HF_HUB_OFFLINE for this process).

Stdlib only, so the CLI asks before it imports torch or transformers.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from .registry import EMBEDDED, ModelLoadError

PROBE_TIMEOUT_S = 1.5
_TRUE = ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _offline_requested() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache() -> Path:
    """huggingface_hub's cache directory, by its own environment variables."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def in_hub_cache(repo_id: str) -> bool:
    """Some snapshot of this model repository is in the local cache (transformers can load it offline)."""
    snapshots = hub_cache() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.glob("*/config.json"))


def _proxy_for(url: str) -> str | None:
    scheme = urlsplit(url).scheme
    for var in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if os.environ.get(var):
            return os.environ[var]
    return None


@functools.lru_cache(maxsize=4)
def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``url``'s host (or the proxy for it) cannot be reached, or None if a TCP connection opens.

    Name resolution has no timeout of its own, so the probe runs in a daemon thread bounded by ``timeout``."""
    target = urlsplit(_proxy_for(url) or url)
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    answer: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(None)
        except OSError as exc:
            answer.append(str(exc) or type(exc).__name__)

    thread = threading.Thread(target=probe, name="blens-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not answer:
        return f"no answer from {host} within {timeout:g} s"
    return answer[0]


_REACHABLE: set[tuple[str, str]] = set()  # (endpoint, name) already found loadable in this process


def check_hub_model(name: str) -> None:
    """Raise :class:`ModelLoadError` (one line) when ``name`` can only come from the hub and the hub cannot be
    reached. Embedded names, local paths and an explicit offline mode are left to the loader. The hub is asked
    once per process and name: the CLI asks before importing torch, the loader asks again for free."""
    if name in EMBEDDED or Path(name).exists() or _offline_requested():
        return
    url = hub_endpoint()
    if (url, name) in _REACHABLE:
        return
    why = unreachable(url)
    if why is None:
        _REACHABLE.add((url, name))
        return
    if in_hub_cache(name):
        if "huggingface_hub" not in sys.modules:  # read once, at import: from here on load from the cache only
            os.environ["HF_HUB_OFFLINE"] = "1"
        return
    host = urlsplit(url).hostname
    raise ModelLoadError(f"cannot load model {name!r}: it is not an embedded model, a local directory or in the "
                         f"Hugging Face cache, and the hub ({host}) cannot be reached ({why}); offline, pass a local "
                         f"directory or an embedded name ({' or '.join(EMBEDDED)})")
