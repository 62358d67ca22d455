"""The device check: CPU vs CUDA equality of the extraction, then throughput of paper-sized shapes.

    bash bench/gpu_check.sh            # on a machine with a CUDA GPU (< 8 minutes)
    bash bench/gpu_check.sh --cpu      # the same checks on CPU with small shapes (< 10 minutes, 2 cores)

Needs torch, transformers, pyarrow and numpy only: it drives the extraction core (``blens.extract``:
capture, lens, ranks, tables, overlap) directly, with random token ids instead of a tokenizer and
random-weight models built from configs in-process, so no network, model files, duckdb, prefect or
datasets are involved. It prints one Markdown table and exits 0 only if every equality row passes.

Equality (seeded tiny GPT-2 and Llama: 3 layers, d = 512, V = 8192; 24 prompts of 4-16 tokens): the reference is the CPU pipeline
with its defaults (oneDNN lens GEMM, 64-row blocks, 512-token batches). On CUDA the candidate is the CUDA
pipeline with its defaults (cuBLAS fp32, blocks and batch tokens from free memory, one packed host copy
per batch). With ``--cpu`` the candidates are (a) the plain ``h @ W.T`` lens and (b) the device code path
run on CPU (4096-row blocks, the packed host copy, 4096-token batches). "Equal" is defined in
bench/equality.py: gradient ranks identical, top/bottom-10 sets and target ranks identical except at
float ties (within 1e-5 of the row's largest |logit| in float64), which are counted and reported.

Throughput (random weights, prompts of 4-16 random tokens): per shape, one sequential pass with the
device synchronised between stages gives the time split (capture / lens / ranks / copy in
``compute_batch``, then Arrow building and a Parquet commit to a temp dir), and one pass with the host
work of batch k overlapped with the device work of batch k+1 (``blens.run.overlap``) gives the
overlapped rate. Peak memory: ``torch.cuda.max_memory_allocated`` per shape on CUDA, the process's VmHWM
on CPU. On CUDA the fp32 / TF32 / bf16 GEMM rates at the lens shape are printed too: the input for
deciding whether a bf16 shortlist with exact rescoring (the bf16 lens, removed in issue 22 after it measured 4x
slower on this CPU; in git history) would pay on that device.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from blens.extract.capture import auto_batch_tokens
from blens.extract.lens import LogitLens
from blens.extract.models import wrap_model
from blens.run.overlap import run_overlapped
from blens.extract.prepare import PreparedPrompt
from blens.extract.records import EditRecord
from blens.extract.tables import build_tables, compute_batch

from bench.equality import compare_runs

FORBIDDEN = ("duckdb", "prefect", "datasets")  # what a bare GPU machine lacks: must never be imported here

SHAPES = {
    # d = 512: below that oneDNN and MKL return bit-identical fp32 logits here, and the CPU comparison
    # of the two GEMMs would test nothing
    "tiny-gpt2": ("gpt2", dict(n_layer=3, n_embd=512, n_head=8, vocab_size=8192, n_positions=64)),
    "tiny-llama": ("llama", dict(num_hidden_layers=3, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                                 num_key_value_heads=4, vocab_size=8192, max_position_embeddings=64)),
    "smollm2-135m": ("llama", dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                                   tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)),
    "gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "gpt2-xl": ("gpt2", dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024)),
    "llama-3.2-1b": ("llama", dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                                   tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=500000.0)),
}
# the reduced shape of --cpu: SmolLM2's width and vocabulary, 4 of its 30 layers
SHAPES["smollm2-135m/4L"] = ("llama", {**SHAPES["smollm2-135m"][1], "num_hidden_layers": 4})


def build_model(name: str, device: str = "cpu", seed: int = 0, spread: bool = False) -> torch.nn.Module:
    """A random-weight model of a named shape, built directly on ``device`` from its config.

    ``spread``: randomise the final norm and scale the unembedding x20 (a tiny model at init std 0.02 has
    logits so close together that almost every answer would be a float tie, and the check would prove
    little)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    family, kw = SHAPES[name]
    cfg = GPT2Config(**kw) if family == "gpt2" else LlamaConfig(**kw)
    cls = GPT2LMHeadModel if family == "gpt2" else LlamaForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(cfg).float().eval()
    if spread:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            norm = model.transformer.ln_f if family == "gpt2" else model.model.norm
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) * 1.5 + 0.5)
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(torch.rand(norm.bias.shape, generator=g) - 0.5)
            model.lm_head.weight.mul_(20)
    return model


class IdTokenizer:
    """What the tables need of a tokenizer, without one: a pad id and labels for every id."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.pad_token_id = 0
        self.eos_token = "<0>"

    def __len__(self) -> int:
        return self.vocab_size

    def batch_decode(self, seqs):
        return ["".join(f"<{i}>" for i in s) for s in seqs]


def random_prompts(n: int, vocab_size: int, seed: int, lo: int = 4, hi: int = 16) -> list[PreparedPrompt]:
    """CounterFact-like prompts (4-16 tokens; CounterFact's mean is ~8-10) of random ids and targets."""
    g = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(g.integers(lo, hi + 1))
        ids = tuple(int(x) for x in g.integers(1, vocab_size, length))
        n_subj = min(2, length - 1)
        segs = ("subject",) * n_subj + ("other",) * (length - 1 - n_subj) + ("last",)
        rec = EditRecord(case_id=i, prompt=f"random prompt {i}", subject="s", target_new=f"new{i}",
                         target_true=f"true{i}", source=f"gpu_check#{i}")
        out.append(PreparedPrompt(rec, ids, segs, int(g.integers(1, vocab_size)), int(g.integers(1, vocab_size))))
    return out


def token_budget_batches(prompts: list[PreparedPrompt], batch_size: int, batch_tokens: int) -> list[list[PreparedPrompt]]:
    """Length-sorted prompts cut exactly as the pipeline cuts them (``blens.extract.batching``)."""
    from blens.extract.batching import token_budget_batches as cut

    return cut(sorted(prompts, key=lambda p: (p.n_tokens, p.record.case_id)), batch_size, batch_tokens)


class ParquetSink:
    """A stand-in for the store's commit: every table to Parquet under a temp name, renamed, marker last."""

    def __init__(self, root: Path):
        self.root = root
        self.n = 0

    def __call__(self, tables: dict[str, pa.Table]) -> None:
        d = self.root / f"batch-{self.n:05d}"
        d.mkdir(parents=True)
        for name, t in tables.items():
            pq.write_table(t, d / f".{name}.tmp")
            os.replace(d / f".{name}.tmp", d / f"{name}.parquet")
        (d / "_COMMITTED").write_text("ok")
        self.n += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vm_hwm_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def extract_all(lm, prompts, lens, batch_tokens, *, vectors="none", host_pack=None, batch_size=32):
    return [build_tables(lm, compute_batch(lm, b, lens=lens, vectors=vectors, host_pack=host_pack), "check", vectors=vectors)
            for b in token_budget_batches(prompts, batch_size, batch_tokens)]


# ---- rows of the one table ------------------------------------------------------------------------------

COLUMNS = ["check", "model (L, d, V)", "device", "result", "prompts/s seq", "prompts/s overlap", "capture s", "lens s",
           "ranks s", "copy s", "build s", "write s", "peak mem", "batch tokens", "GEMM TFLOP/s fp32/tf32/bf16"]


def shape_label(name: str) -> str:
    family, kw = SHAPES[name]
    if family == "gpt2":
        return f"{name} ({kw['n_layer']}, {kw['n_embd']}, {kw['vocab_size']})"
    return f"{name} ({kw['num_hidden_layers']}, {kw['hidden_size']}, {kw['vocab_size']})"


def equality_rows(device: torch.device, n_prompts: int) -> list[tuple[dict, bool]]:
    rows = []
    for name in ("tiny-gpt2", "tiny-llama"):
        model = build_model(name, "cpu", seed=7, spread=True)
        V = model.lm_head.weight.shape[0]
        tok = IdTokenizer(V)
        prompts = random_prompts(n_prompts, V, seed=11)
        cpu_lm = wrap_model(copy.deepcopy(model), tok, name=name, device="cpu")
        view = cpu_lm.view
        ref = extract_all(cpu_lm, prompts, LogitLens.of(view), 512, vectors="spanning")
        ref_lens = LogitLens.of(view)
        if device.type == "cuda":
            dev_lm = wrap_model(copy.deepcopy(model), tok, name=name, device=device)
            cands = [("cpu vs cuda (defaults)", dev_lm, LogitLens.of(dev_lm.view), auto_batch_tokens(dev_lm.view), None)]
        else:
            plain = LogitLens(view.final_norm, view.unembedding, view.unembedding_bias, gemm="torch")
            device_style = LogitLens(view.final_norm, view.unembedding, view.unembedding_bias, gemm="torch", chunk_rows=4096)
            cands = [(f"cpu {ref_lens.gemm} lens vs plain h @ W.T", cpu_lm, plain, 512, None),
                     ("cpu default vs device code path on cpu", cpu_lm, device_style, 4096, True)]
        for label, lm, lens, bt, pack in cands:
            other = extract_all(lm, prompts, lens, bt, host_pack=pack)
            verdict = compare_runs(ref, other, view.final_norm, view.unembedding, view.unembedding_bias)
            rows.append(({"check": f"equality: {label}", "model (L, d, V)": shape_label(name), "device": str(lm.device),
                          "result": verdict.summary(), "batch tokens": str(bt)}, verdict.ok))
    return rows


def gemm_rates(device: torch.device, d: int, V: int, rows: int = 4096) -> str:
    if device.type != "cuda":
        return "-"
    out = []
    a = torch.randn(rows, d, device=device)
    b = torch.randn(V, d, device=device)
    prev = torch.get_float32_matmul_precision()
    try:
        for mode in ("highest", "high", "bf16"):
            x, y = (a.bfloat16(), b.bfloat16()) if mode == "bf16" else (a, b)
            torch.set_float32_matmul_precision("highest" if mode == "bf16" else mode)
            for _ in range(2):
                x @ y.T
            sync(device)
            t0 = time.perf_counter()
            for _ in range(5):
                x @ y.T
            sync(device)
            out.append(f"{5 * 2 * rows * d * V / (time.perf_counter() - t0) / 1e12:.0f}")
    finally:
        torch.set_float32_matmul_precision(prev)
    return "/".join(out)


def throughput_row(name: str, device: torch.device, n_prompts: int, batch_size: int) -> dict:
    model = build_model(name, str(device), seed=0)
    V = model.lm_head.weight.shape[0]
    lm = wrap_model(model, IdTokenizer(V), name=name, device=device)
    lens = LogitLens.of(lm.view)
    bt = auto_batch_tokens(lm.view, device)
    prompts = random_prompts(n_prompts, V, seed=1)
    batches = token_budget_batches(prompts, batch_size, bt)
    build_tables(lm, compute_batch(lm, batches[0][:2], lens=lens), "warm")  # kernels, vocab labels, lens setup
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    split = dict.fromkeys(["capture", "lens", "ranks", "copy", "build", "write"], 0.0)
    stage_peak = dict.fromkeys(split, 0)  # CUDA: the most memory allocated during each stage (seq pass)
    clock = [0.0]

    def mark(stage: str) -> None:
        sync(device)
        now = time.perf_counter()
        split[stage] += now - clock[0]
        clock[0] = now
        if device.type == "cuda":
            stage_peak[stage] = max(stage_peak[stage], torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        sink = ParquetSink(Path(tmp) / "seq")
        t0 = time.perf_counter()
        for b in batches:
            clock[0] = time.perf_counter()
            host = compute_batch(lm, b, lens=lens, mark=mark)
            tables = build_tables(lm, host, "check")
            mark("build")
            sink(tables)
            mark("write")
        seq = n_prompts / (time.perf_counter() - t0)

        sink = ParquetSink(Path(tmp) / "overlap")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        run_overlapped(batches, compute=lambda b: compute_batch(lm, b, lens=lens),
                       commit=lambda h: sink(build_tables(lm, h, "check")), depth=1)
        ovl = n_prompts / (time.perf_counter() - t0)
        assert sink.n == len(batches)
    if device.type == "cuda":
        top = max(stage_peak, key=stage_peak.get)
        overlap_peak = torch.cuda.max_memory_allocated(device)
        peak = (f"{max(stage_peak[top], overlap_peak) / 2**30:.1f} GiB GPU (seq: {stage_peak[top] / 2**30:.1f} in "
                f"{top}; overlap pass {overlap_peak / 2**30:.1f})")
    else:
        peak = f"{vm_hwm_mb() / 1024:.1f} GiB RSS (process)"
    d = lm.view.unembedding.shape[1]
    return {"check": "throughput", "model (L, d, V)": shape_label(name), "device": str(device),
            "result": f"{n_prompts} prompts, {len(batches)} batches", "prompts/s seq": f"{seq:.2f}",
            "prompts/s overlap": f"{ovl:.2f}", **{f"{k} s": f"{v:.2f}" for k, v in split.items()},
            "peak mem": peak, "batch tokens": str(bt), "GEMM TFLOP/s fp32/tf32/bf16": gemm_rates(device, d, V)}


def render(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU with small shapes (no GPU needed)")
    ap.add_argument("--imports-only", action="store_true", help="import what the check needs, then stop")
    ap.add_argument("--equality-prompts", type=int, default=24)
    ap.add_argument("--shapes", default=None, help="comma-separated shapes for the throughput rows")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per throughput shape")
    ap.add_argument("--batch-size", type=int, default=None, help="most prompts per batch")
    ap.add_argument("--out", default=None, help="also write the table (with a header line) to this file")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip throughput shapes that would start after this many seconds (default 360 on CUDA, 480 on CPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; with --cpu, 1 when the load average exceeds the cores)")
    args = ap.parse_args(argv)

    leaked = [m for m in FORBIDDEN if m in sys.modules]
    if leaked:
        print(f"FAIL: the extraction core imported {leaked}", file=sys.stderr)
        return 1
    if args.imports_only:
        print("imports ok: blens from", sys.modules["blens"].__file__, "; extract from",
              sys.modules["blens.extract.tables"].__file__)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.cpu and hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        # A shared, oversubscribed machine: every parallel op then waits a scheduler slice at its OpenMP
        # barrier (measured: the lens 7x slower with 2 threads than with 1 at load 11 on 2 cores).
        torch.set_num_threads(1)
    if args.cpu:
        device = torch.device("cpu")
        shapes = args.shapes or "tiny-gpt2,smollm2-135m/4L"
        n_prompts, batch_size = args.prompts or 64, args.batch_size or 32
    else:
        if not torch.cuda.is_available():
            print("no CUDA device visible to torch; run `bash bench/gpu_check.sh --cpu` for the CPU check", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        shapes = args.shapes or "smollm2-135m,gpt2-xl,llama-3.2-1b"
        # 1024 prompts in batches of at most 256: several batches per shape, so the overlap has work to hide
        n_prompts, batch_size = args.prompts or 1024, args.batch_size or 256
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (f"gpu_check{' --cpu' if args.cpu else ''}: {where}, torch {torch.__version__}, python "
              f"{platform.python_version()}, {torch.get_num_threads()} threads, load avg {load:.1f}, "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    print(header, flush=True)

    t_start = time.perf_counter()
    rows, ok = [], True
    try:
        for row, passed in equality_rows(device, args.equality_prompts):
            rows.append(row)
            ok &= passed
            print(f"  {row['check']} [{row['model (L, d, V)']}]: {row['result']}", flush=True)
    except Exception:  # noqa: BLE001 - a crash is a failed check, reported in the table
        traceback.print_exc()
        rows.append({"check": "equality", "result": "ERROR (traceback above)"})
        ok = False
    budget = args.budget_s or (480.0 if args.cpu else 360.0)
    for name in shapes.split(","):
        if time.perf_counter() - t_start > budget:
            rows.append({"check": "throughput", "model (L, d, V)": name, "result": f"skipped: {budget:.0f} s budget spent"})
            print(f"  throughput {name}: skipped (time budget)", flush=True)
            continue
        try:
            t0 = time.perf_counter()
            rows.append(throughput_row(name.strip(), device, n_prompts, batch_size))
            print(f"  throughput {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            rows.append({"check": "throughput", "model (L, d, V)": name, "result": "ERROR (traceback above)"})
            ok = False
        finally:
            gc.collect()  # the previous shape's model (GBs) before the next one is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = render(rows)
    footer = f"total {time.perf_counter() - t_start:.0f} s; equality {'holds' if ok else 'FAILED'}"
    print(table)
    print(footer)
    if args.out:
        Path(args.out).write_text(f"{header}\n\n{table}\n\n{footer}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
