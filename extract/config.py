"""Extraction settings: one validated object shared by the CLI, the flows and the run identity.

Prefect builds a flow's parameter schema from this model, so a deployment stores it as plain JSON.
"""

from __future__ import annotations

import os
import warnings
from typing import Literal, Sequence

from pydantic import BaseModel, Field, field_validator, model_validator

from .identity import result_settings
from .prepare import DEFAULT_MAX_PROMPT_TOKENS
from .registry import EMBEDDED_NAME


# Where a run writes and every command reads, relative to the current directory (every command's --warehouse).
DEFAULT_WAREHOUSE = "warehouse"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class ExtractConfig(BaseModel):
    model: str = EMBEDDED_NAME
    data: str
    limit: int | None = Field(default=None, ge=1)
    warehouse: str = DEFAULT_WAREHOUSE
    # None: for the device (batching.batch_limits: CPU_BATCH_SIZE on CPU, CUDA_BATCH_SIZE on CUDA).
    batch_size: int | None = Field(default=None, ge=1)
    # prompts x padded length per batch: bounds a batch's memory (see batching.token_budget_batches).
    # None: batching.CPU_BATCH_TOKENS on CPU; on CUDA from the device's free memory.
    batch_tokens: int | None = Field(default=None, ge=1)
    top_k: int = Field(default=10, ge=1, le=1000)
    device: str = "auto"  # a GPU when one is present (cuda), else the CPU
    vectors: Literal["none", "spanning", "all"] = "none"
    shard: str | None = None  # "I/N"
    threads: int | None = Field(default=None, ge=1)
    workers: int = Field(default=1, ge=1)  # >1: Dask worker processes (prefect-dask)
    # tcp://HOST:PORT of a Dask scheduler someone else started: batches run on its workers (prefect-dask). Every
    # worker needs blens installed and the same data, model and warehouse paths (docs/scale.md).
    dask_scheduler: str | None = None
    # Per-prompt memory bound: a longer prompt becomes an errors row instead of an out-of-memory kill.
    max_prompt_tokens: int | None = Field(default=DEFAULT_MAX_PROMPT_TOKENS, ge=1)
    # Commit batch k (Arrow building, Parquet writing) while the device computes batch k+1. None: on for
    # CUDA, off on CPU, where the host stage is 3 % of a batch and the overlap measured within noise
    # (bench/results.md, "Overlap on CPU"). Never with workers > 1 (each worker commits its own batches).
    overlap: bool | None = None
    force: bool = False  # recompute results already in the warehouse (they are replaced, not duplicated)
    # Run as a Prefect flow (True) or as the plain run layer in this process (False). None: Prefect when
    # PREFECT_API_URL names a server or Dask workers run the batches (blens.lifecycle.prefect.wants_prefect). The rows are the same.
    prefect: bool | None = None

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int | None) -> int | None:
        """More torch threads than cores only adds contention (threads=1000 started 1,000 threads: load 200 on
        2 cores). The CLI refuses ``--threads`` above the cores; a config built in Python is capped, with one
        warning line saying so."""
        cores = usable_cores()
        if v is not None and v > cores:
            warnings.warn(f"threads={v} is more than the {cores} usable CPU core(s); using {cores}", stacklevel=2)
            return cores
        return v

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            i, n = (int(x) for x in v.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {v!r}") from None
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"--shard {v!r}: need 0 <= I < N")
        return v

    @model_validator(mode="after")
    def _workers_need_prefect(self) -> "ExtractConfig":
        if self.workers > 1 and self.dask_scheduler:
            raise ValueError("--workers N starts a local Dask cluster and --dask-scheduler uses a running one: give one")
        if (self.workers > 1 or self.dask_scheduler) and self.prefect is False:
            raise ValueError("Dask workers run batches through Prefect (prefect=False asks for none)")
        return self

    def fans_out(self) -> bool:
        """Batches run in other processes (Dask workers), each of which commits its own."""
        return self.workers > 1 or bool(self.dask_scheduler)

    def shard_index(self) -> tuple[int, int]:
        if self.shard is None:
            return 0, 1
        i, n = (int(x) for x in self.shard.split("/"))
        return i, n

    def in_shard(self, case_id: int) -> bool:
        """This run's share of the records: case_id mod N == I (every record without --shard)."""
        i, n = self.shard_index()
        return case_id % n == i

    def result_settings(self, sites: Sequence[str] | None = None) -> dict:
        """Settings that change a result's rows (batching, device, sharding and stored vectors do not);
        ``sites``: the loaded model's lens sites (``ModelView.lens_sites``), default the two every family has."""
        return result_settings(self.top_k) if sites is None else result_settings(self.top_k, sites)
