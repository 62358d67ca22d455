"""The CUDA code paths, exercised on CPU: the same functions with the device's block sizes, the packed host
copy, the memory arithmetic, the absence of host synchronisation, the overlapped writer, and the device
check's own import isolation and equality measure (bench/gpu_check.py, bench/equality.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.equality import Verdict, compare_lens, compare_runs  # noqa: E402
from bench.gpu_check import (IdTokenizer, ParquetSink, build_model, extract_all, random_prompts,  # noqa: E402
                             token_budget_batches)
from blens.extract.capture import (CPU_BATCH_TOKENS, activation_bytes_per_token, auto_batch_tokens,  # noqa: E402
                                   batch_tokens_for_memory, capture)
from blens.extract.lens import LogitLens, fp32_exact, lens_block_rows  # noqa: E402
from blens.extract.models import wrap_model  # noqa: E402
from blens.run.overlap import BackgroundWriter, WriterClosedError, run_overlapped  # noqa: E402
from blens.extract.tables import build_tables, compute_batch, extract_batch, to_host  # noqa: E402

K = 10


# ---- host synchronisation, seen through the dispatcher --------------------------------------------------

# aten ops that make the host wait for the device (a value read back, or an output size that depends on data)
SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique_dim", "_unique2", "_unique",
            "unique_consecutive", "equal", "repeat_interleave"}
# tensor methods that copy to the host
HOST_METHODS = {"cpu", "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"}


@pytest.fixture
def visible_inference(monkeypatch):
    """Ops run under ``torch.inference_mode`` do not reach a TorchDispatchMode; the lens uses it, so for the
    spies it becomes ``no_grad`` (same computation, no autograd either way)."""
    monkeypatch.setattr(torch, "inference_mode", torch.no_grad)


def _from_mask_builder() -> bool:
    return "masking_utils" in "".join(f.filename for f in traceback.extract_stack(limit=14))


class SyncSpy(TorchDispatchMode):
    """Records the aten ops that would make the host wait for a CUDA device.

    One kind is tolerated and recorded apart (``allowed``): transformers' attention-mask builder asks
    whether the padding mask is all ones (``masking_utils._ignore_causal_mask_sdpa``) once per forward,
    before the first layer, when the device holds nothing but the batch's input copy."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.allowed: list[str] = []

    def _record(self, name: str) -> None:
        (self.allowed if _from_mask_builder() else self.ops).append(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            self._record(name)
        elif name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            self._record("index(bool mask)")  # on CUDA: a nonzero, whose size the host must read
        return func(*args, **(kwargs or {}))


class HostCallSpy(TorchFunctionMode):
    """Records calls of tensor methods that copy to the host or read a value (the mask builder's apart)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self.allowed: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_METHODS:
            (self.allowed if _from_mask_builder() else self.calls).append(name)
        return func(*args, **(kwargs or {}))


def test_sync_spy_sees_syncs():
    """The spies must be able to fail: each pattern the lens and capture avoid is caught."""
    x = torch.randn(8, 4)
    with SyncSpy() as spy, HostCallSpy() as calls:
        x.sum().item()
        x[x > 0]
        bool((x > 0).any())
        float(x[0, 0])
        torch.unique(x)
        x.cpu()
    assert {"_local_scalar_dense", "index(bool mask)", "_unique2"} <= set(spy.ops), spy.ops
    assert {"item", "cpu", "__bool__", "__float__"} <= set(calls.calls)
    with torch.inference_mode(), SyncSpy() as hidden:
        x.sum().item()
    assert hidden.ops == []  # why the lens tests swap inference_mode for no_grad (visible_inference)


def _lens_problem(n=300, d=96, V=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.RMSNorm(d)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
    return norm, torch.randn(V, d, generator=g), torch.randn(n, d, generator=g), torch.randint(0, V, (n, 2), generator=g)


@pytest.mark.parametrize("rows", [64, 4096])
@pytest.mark.parametrize("gemm", ["torch", "onednn"])
def test_fp32_lens_reads_nothing_back(rows, gemm, visible_inference):
    from blens.extract.lens import onednn_available

    if gemm == "onednn" and not onednn_available(torch.device("cpu")):
        pytest.skip("no oneDNN linear in this torch build")
    norm, w, v, t = _lens_problem()
    # the block lens, the one that also runs on CUDA (the fused lens is CPU-only and reads its input's max)
    lens = LogitLens(norm, w, chunk_rows=rows, gemm=gemm, fused=False)
    with SyncSpy() as spy, HostCallSpy() as calls:
        lens.project(v, t, K)
    assert spy.ops == [] and calls.calls == []


def test_capture_reads_nothing_back(visible_inference):
    model = build_model("tiny-llama", seed=3)
    lm = wrap_model(model, IdTokenizer(8192), name="tiny-llama")
    prompts = random_prompts(6, 8192, seed=4)
    with SyncSpy() as spy, HostCallSpy() as calls:
        capture(lm.view, prompts, 0)
    assert spy.ops == [] and calls.calls == []
    assert len(spy.allowed) <= 2 and len(calls.allowed) <= 2  # transformers' one padding-mask question per forward


def test_compute_batch_reads_nothing_back_before_the_final_copy(visible_inference):
    """Capture, lens and ranks read nothing back to the host: the gradient ranks stay on the device until
    the batch's one copy (on CUDA, the two batched eigen-solvers of ranks.py check their convergence flags,
    which are the only other synchronisations of a batch)."""
    model = build_model("tiny-gpt2", seed=3)
    lm = wrap_model(model, IdTokenizer(8192), name="tiny-gpt2")
    prompts = random_prompts(6, 8192, seed=4)
    view = lm.view
    lens = LogitLens(view.final_norm, view.unembedding, view.unembedding_bias, fused=False)  # the CUDA lens
    seen: dict[str, tuple[list, list]] = {}
    spy, calls = SyncSpy(), HostCallSpy()

    def mark(stage):
        seen[stage] = (list(spy.ops), list(calls.calls))
        spy.ops.clear()
        calls.calls.clear()

    with spy, calls:
        compute_batch(lm, prompts, lens=lens, mark=mark)
    assert seen["capture"] == ([], []) and seen["lens"] == ([], []) and seen["ranks"] == ([], [])


# ---- TF32 off, block and batch sizes --------------------------------------------------------------------


class PrecisionProbe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(torch.get_float32_matmul_precision())
        return x


def test_lens_and_capture_run_with_full_fp32_matmuls():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # what enables TF32 on CUDA
        probe = PrecisionProbe()
        LogitLens(probe, torch.randn(500, 8)).project(torch.randn(5, 8), torch.zeros(5, 2, dtype=torch.long), 3)
        assert probe.seen == ["highest"]
        assert torch.get_float32_matmul_precision() == "high"  # restored
        model = build_model("tiny-gpt2", seed=1)
        lm = wrap_model(model, IdTokenizer(8192), name="t")
        seen = []
        h = lm.view.blocks[0].register_forward_hook(lambda *_: seen.append(torch.get_float32_matmul_precision()))
        try:
            compute_batch(lm, random_prompts(2, 8192, seed=0))
        finally:
            h.remove()
        assert seen == ["highest"] and torch.get_float32_matmul_precision() == "high"
        with fp32_exact():
            assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)


def test_lens_block_rows():
    V = 50257
    assert lens_block_rows(V, "cpu") == 64
    assert lens_block_rows(V, "cuda", free_bytes=80 * 2**30) == 8192  # capped
    rows = lens_block_rows(V, "cuda", free_bytes=2 * 2**30)
    assert rows == int(0.25 * 2 * 2**30) // (12 * V) // 256 * 256 == 768
    assert lens_block_rows(V, "cuda", free_bytes=10**6) == 256  # floor
    assert LogitLens(torch.nn.Identity(), torch.randn(100, 4)).chunk_rows == 64


def test_batch_tokens_arithmetic():
    # 0.6 x (10 GiB - 1 GiB) / (1.5 x 1 MiB per token) = 3686.4 -> 3648 (multiple of 64)
    assert batch_tokens_for_memory(10 * 2**30, 2**20, 2**30) == 3648
    assert batch_tokens_for_memory(10**6, 2**20) == 64  # floor
    assert batch_tokens_for_memory(10**15, 100.0) == 65536  # cap
    model = build_model("tiny-llama", seed=0)
    lm = wrap_model(model, IdTokenizer(8192), name="t")
    assert auto_batch_tokens(lm.view) == CPU_BATCH_TOKENS  # CPU keeps the RSS-bounding default
    free, per_token = 40 * 2**30, 3 * 2**20
    reserve = lens_block_rows(8192, "cuda", free) * 8192 * 12
    assert auto_batch_tokens(lm.view, "cuda", free_bytes=free, bytes_per_token=per_token) == \
        batch_tokens_for_memory(free, per_token, reserve)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_activation_bytes_per_token_is_measured_per_token(name):
    model = build_model(name, seed=0)
    lm = wrap_model(model, IdTokenizer(8192), name=name)
    view = lm.view
    small, large = activation_bytes_per_token(view, 32), activation_bytes_per_token(view, 128)
    assert abs(small - large) / large < 0.1  # a per-token cost, not a per-batch one
    d = view.unembedding.shape[1]
    d_ff = view.matrix(0, "ff1").weight.numel() // d
    # at least the captured spanning sets: x and delta of every matrix (ff1/ff1_gate share x)
    vjp_cols = sum(d if m == "ff2" else d_ff for m in view.matrix_names)
    assert large >= view.n_layers * 4 * (d + d_ff + vjp_cols)


# ---- the one host copy ----------------------------------------------------------------------------------


def test_to_host_packs_everything_into_one_buffer():
    tensors = [torch.randn(3, 5), torch.arange(7, dtype=torch.int32), torch.arange(6).reshape(2, 3),
               torch.tensor([True, False, True]), torch.empty(0, 4), torch.randn(4, 6)[:, ::2],
               torch.tensor(2.5, dtype=torch.float64)]
    out = to_host(tensors, pack=True)
    for t, a in zip(tensors, out):
        assert a.shape == tuple(t.shape) and a.dtype == t.numpy().dtype
        np.testing.assert_array_equal(a, t.numpy())

    def root(a):
        while isinstance(a.base, np.ndarray):
            a = a.base
        return a

    buffers = {id(root(a)) for a in out if a.size}
    assert len(buffers) == 1  # one copy: every array is a view of the same host buffer
    assert not any(np.shares_memory(a, t.numpy()) for t, a in zip(tensors, out) if a.size)
    views = to_host(tensors[:1])  # CPU default: no copy at all
    assert np.shares_memory(views[0], tensors[0].numpy())


# ---- the pipeline: stages, packed copy and device-style lens give the same tables -----------------------


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_device_code_path_on_cpu_matches_the_cpu_pipeline(name):
    model = build_model(name, seed=7, spread=True)
    lm = wrap_model(model, IdTokenizer(8192), name=name)
    view = lm.view
    prompts = random_prompts(10, 8192, seed=2)
    lens = LogitLens.of(view)
    ref = extract_batch(lm, prompts, "r", lens=lens, vectors="spanning")
    staged = build_tables(lm, compute_batch(lm, prompts, lens=lens, vectors="spanning", host_pack=True), "r",
                          vectors="spanning")
    assert ref.keys() == staged.keys()
    for k in ref:
        assert ref[k].equals(staged[k]), k  # the packed host copy changes no bit

    device_lens = LogitLens(view.final_norm, view.unembedding, view.unembedding_bias, gemm="torch", chunk_rows=4096)
    other = extract_all(lm, prompts, device_lens, 4096, host_pack=True)
    ours = extract_all(lm, prompts, lens, 64, vectors="spanning")  # other batching too: 64-token batches
    assert len(ours) > 1 and len(other) == 1
    v = compare_runs(ours, other, view.final_norm, view.unembedding, view.unembedding_bias)
    assert v.ok, v.summary()
    assert v.rows == 2 * view.n_layers * sum(p.n_tokens for p in prompts)


def test_equality_measure_fails_on_real_differences_and_forgives_ties():
    norm, w, v, t = _lens_problem(n=50)
    w[7] = w[3]  # tokens 3 and 7 always tie exactly
    t[:, 0] = 3
    ref = LogitLens(norm, w, gemm="torch").project(v, t, K)
    arrays = lambda r: {f: getattr(r, f).clone().numpy() for f in ("top_ids", "bottom_ids", "top_logits", "target_ranks")}  # noqa: E731
    a = arrays(ref)
    assert compare_lens(a, arrays(ref), v, t.numpy(), norm, w).ok
    tie = arrays(ref)
    tie["target_ranks"][0, 0] += 1  # token 7 counted above token 3: the other valid answer of a tie
    vt = compare_lens(a, tie, v, t.numpy(), norm, w)
    assert vt.ok and vt.rank_diff == 1 and vt.rank_ties == 1
    bad = arrays(ref)
    bad["target_ranks"][1, 1] += 3
    bad["top_ids"][2, 0] = int(ref.bottom_ids[2, 0])  # the least probable token in the top-10
    vb = compare_lens(a, bad, v, t.numpy(), norm, w)
    assert not vb.ok and vb.unexplained == 2
    assert not Verdict().ok  # nothing compared is not a pass


def test_gpu_check_batches_like_the_job():
    from blens.extract.batching import token_budget_batches as job_batches

    prompts = random_prompts(200, 1000, seed=5, lo=1, hi=40)
    for bs, bt in ((32, 512), (7, 100), (1000, 4096)):
        ours = token_budget_batches(prompts, bs, bt)
        theirs = job_batches(sorted(prompts, key=lambda p: (p.n_tokens, p.record.case_id)), bs, bt)
        assert [[p.record.case_id for p in b] for b in ours] == [[p.record.case_id for p in b] for b in theirs]


def test_gpu_check_needs_only_the_extraction_core(tmp_path):
    """bench/gpu_check.sh on a machine without the project installed and without duckdb, prefect or
    datasets: the project's editable finder is removed and those modules fail on import."""
    fake = tmp_path / "absent"
    fake.mkdir()
    for mod in ("duckdb", "prefect", "datasets", "pydantic"):
        (fake / f"{mod}.py").write_text(f"raise ImportError('{mod} is not on this machine')\n")
    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/bin/sh
exec {sys.executable} -c '
import os, runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # -c put the cwd first; a script run does not
script = sys.argv[1]; sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.realpath(script)))
runpy.run_path(script, run_name="__main__")' "$@"
""")
    wrapper.chmod(0o755)
    env = {**os.environ, "PYTHON": str(wrapper), "PYTHONPATH": str(fake)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--imports-only"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imports ok" in proc.stdout and str(ROOT) not in proc.stdout.split("blens from")[1].split(";")[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_lens_matches_cpu():  # pragma: no cover - runs where a GPU is present
    norm, w, v, t = _lens_problem(n=2000, d=512, V=20000)
    ref = LogitLens(norm, w).project(v, t, K)
    dev = LogitLens(norm.cuda(), w.cuda()).project(v.cuda(), t.cuda(), K)
    arrays = lambda r: {f: getattr(r, f).cpu().numpy() for f in ("top_ids", "bottom_ids", "top_logits", "target_ranks")}  # noqa: E731
    verdict = compare_lens(arrays(ref), arrays(dev), v, t.numpy(), norm.cpu(), w)
    assert verdict.ok, verdict.summary()


# ---- the overlapped writer ------------------------------------------------------------------------------


def test_writer_runs_jobs_in_order_beside_the_producer():
    done, started = [], threading.Event()
    release = threading.Event()

    def first():
        started.set()
        assert release.wait(10), "the producer never got control back while a job ran"
        done.append(0)

    with BackgroundWriter(depth=2) as w:
        w.submit(first)
        assert started.wait(10)
        w.submit(lambda: done.append(1))  # returns while job 0 is still running: they overlap
        release.set()
        w.submit(lambda: done.append(2))
    assert done == [0, 1, 2] and w.completed == 3
    with pytest.raises(WriterClosedError):
        w.submit(lambda: None)


def test_writer_is_bounded():
    gate = threading.Event()
    w = BackgroundWriter(depth=1)
    w.submit(gate.wait)  # running
    w.submit(lambda: None)  # queued: the queue is full now
    t = threading.Thread(target=w.submit, args=(lambda: None,))
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # the third submit waits for room
    gate.set()
    t.join(10)
    w.close()
    assert w.completed == 3


class Boom(RuntimeError):
    pass


def test_writer_failure_fails_the_run_and_nothing_after_it_is_committed(tmp_path):
    """Batch 2's commit dies half-way while batch 3 is already queued behind it: the run fails with that
    error, batch 2 is not visible, and batch 3 (queued before the failure) is never committed."""
    sink = ParquetSink(tmp_path)
    computed = []
    batch3_queued = threading.Event()

    def commit(tables):
        i = tables["t"]["i"][0].as_py()
        if i == 2:
            assert batch3_queued.wait(10)
            d = tmp_path / "batch-failing"
            d.mkdir()
            pq.write_table(tables["t"], d / ".t.tmp")  # one table written, no commit marker
            raise Boom("disk full")
        sink(tables)

    def compute(i):
        computed.append(i)
        if i == 4:  # submit(batch 3) has returned: it sits in the queue behind batch 2
            batch3_queued.set()
            time.sleep(0.3)  # the worker drains the queue meanwhile
        return {"t": pa.table({"i": [i] * 10})}

    with pytest.raises(Boom, match="disk full"):
        run_overlapped(range(50), compute, commit, depth=1)
    committed = sorted(pq.read_table(p.parent / "t.parquet")["i"][0].as_py() for p in tmp_path.glob("*/_COMMITTED"))
    assert committed == [0, 1]  # not the failed batch, not the one queued behind it
    assert not (tmp_path / "batch-failing" / "_COMMITTED").exists()
    assert computed == [0, 1, 2, 3, 4]  # the producer stopped at the next submit


def test_writer_error_surfaces_at_close():
    w = BackgroundWriter()
    w.submit(lambda: (_ for _ in ()).throw(Boom("late")))
    with pytest.raises(Boom, match="late"):
        w.close()


def test_producer_failure_commits_nothing_queued():
    gate, ran = threading.Event(), []

    def compute(i):
        if i == 2:
            gate.set()
            raise KeyError("bad batch")
        return i

    def commit(i):
        gate.wait(10)
        ran.append(i)

    with pytest.raises(KeyError):
        run_overlapped(range(5), compute, commit, depth=1)
    assert ran == [0]  # batch 1 was queued behind batch 0 when the producer failed: dropped
