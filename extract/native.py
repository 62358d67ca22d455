"""The lens's one piece of compiled code (``lens_pass.c``): built once per machine, loaded through ctypes.

Why compiled code at all: the CPU lens's GEMM runs at the machine's peak only with the vocabulary as the
GEMM's long side (``W @ h.T``, extract/lens_fused.py), and in that layout the answers it needs (group maxima
and minima, a count per target) cost torch four to six separate passes over a 50 MB buffer: as much time
as the faster GEMM saves (bench/results.md, issue 26). One fused pass in C reads each logit once.

Why this way: ``torch.utils.cpp_extension`` and ``torch.compile`` need torch's headers or inductor, tens of
seconds to build and seconds of import in every process (the extraction's fixed cost is ~5 s in all). A
60-line C file against ``immintrin.h`` builds with the system's ``cc`` in under a second and loads in a
millisecond. The library is cached under ``$BLENS_CACHE/native/`` (default ``~/.cache/blens``), named by a
hash of the source, the flags and the compiler, and written by an atomic rename, so concurrent processes
(Dask workers) never load a half-written file.

Where it cannot be built (no C compiler, a CPU without AVX2, not x86-64, or ``BLENS_NATIVE=0``) the lens
uses its torch-only path, which gives the same answers (tests/extract/test_lens_fused.py); :func:`status`
says which and why (``blens extract`` logs it once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("lens_pass.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-shared", "-fPIC")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@dataclass(frozen=True)
class NativeStatus:
    available: bool
    detail: str  # the library's path, or why there is none


def _cache_dir() -> Path:
    root = os.environ.get("BLENS_CACHE") or Path.home() / ".cache" / "blens"
    return Path(root) / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc") or shutil.which("clang")


def _why_not() -> str | None:
    if os.environ.get("BLENS_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        return "disabled by BLENS_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not built for {platform.machine()} (the kernel is AVX2)"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"this CPU has no AVX2 (torch reports {capability})"
    if _compiler() is None:
        return "no C compiler (cc, gcc or clang) on PATH"
    return None


def _build() -> Path:
    """The compiled library for this source, flags and compiler, built now if the cache lacks it."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, version)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"lens_pass-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: another process sees the old name missing or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    why = _why_not()
    if why is not None:
        return None, why
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
    except Exception as exc:  # a broken toolchain must not stop an extraction: the torch path remains
        return None, f"could not build {SOURCE.name}: {exc}"
    lib.lens_pass.restype = None
    lib.lens_pass.argtypes = [_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR]
    return lib, str(path)


def status() -> NativeStatus:
    """Whether the fused lens pass is available here, with the library's path or the reason it is not."""
    lib, detail = _library()
    return NativeStatus(lib is not None, detail)


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="blens-lens-pass")


def lens_pass(buf: torch.Tensor, t: torch.Tensor, gmax: torch.Tensor, gmin: torch.Tensor, counts: torch.Tensor,
              group: int) -> None:
    """Fill ``gmax``/``gmin`` (V // group, R) with each full group's max / min of the (V, R) fp32 logits
    ``buf`` and add to ``counts`` (n_targets, R) int32 the number of logits above each target logit
    ``t`` (n_targets, R), on as many threads as torch uses (rows split in multiples of eight)."""
    lib, detail = _library()
    if lib is None:
        raise RuntimeError(f"the native lens pass is not available: {detail}")
    V, R = buf.shape
    for x, dtype in ((buf, torch.float32), (t, torch.float32), (gmax, torch.float32), (gmin, torch.float32),
                     (counts, torch.int32)):
        if x.dtype != dtype or not x.is_contiguous() or x.device.type != "cpu":
            raise ValueError(f"lens_pass needs contiguous CPU {dtype} tensors")
    if gmax.shape != (V // group, R) or gmin.shape != gmax.shape or t.shape != counts.shape or t.shape[1] != R:
        raise ValueError(f"lens_pass: shapes buf {tuple(buf.shape)}, t {tuple(t.shape)}, gmax {tuple(gmax.shape)}, "
                         f"counts {tuple(counts.shape)} do not fit")
    ptrs = (buf.data_ptr(), t.data_ptr(), gmax.data_ptr(), gmin.data_ptr(), counts.data_ptr())

    def run(r0: int, r1: int) -> None:
        lib.lens_pass(ptrs[0], V, R, r0, r1, group, ptrs[1], t.shape[0], ptrs[2], ptrs[3], ptrs[4])

    parts = max(1, min(torch.get_num_threads(), R // 8))
    if parts == 1:
        run(0, R)
        return
    step = ((R + parts - 1) // parts + 7) // 8 * 8  # rows per thread, a multiple of eight
    bounds = [(a, min(a + step, R)) for a in range(0, R, step)]
    for f in [_pool().submit(run, a, b) for a, b in bounds]:
        f.result()
