"""Paper-sized models on CPU: random weights built in-process from configs, one extraction, measured.

    PYTHONPATH=. python bench/bench_big_cpu.py [--shapes gpt2-xl,llama-3.2-1b] [--prompts 8] [--threads 1]

Each shape runs in its own process, so each peak RSS (VmHWM) is that model's alone. The model is fp32
(GPT-2 XL: 1.56 B parameters = 6.2 GB; Llama-3.2-1B shape: 1.24 B = 4.9 GB, embeddings tied as in the
release), the lens is the default CPU lens (fp32, oneDNN, 64-row blocks, so a block's logits are 13 MB
for V = 50,257 and 33 MB for V = 128,256), and the prompts (random ids, 10-14 tokens, ~12 on average)
go through the default 512-token batches. One 2-prompt batch runs first to set up the kernels; the timed
run is the rest, through the same ``compute_batch`` / ``build_tables`` stages as ``blens extract`` and a
Parquet commit to a temp dir. Prints one table (``--out`` also writes it as Markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(name: str, n_prompts: int, threads: int | None) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import SHAPES, IdTokenizer, ParquetSink, build_model, random_prompts, token_budget_batches, vm_hwm_mb
    from blens.extract.batching import CPU_BATCH_TOKENS
    from blens.extract.lens import LogitLens
    from blens.extract.models import wrap_model
    from blens.extract.tables import build_tables, compute_batch

    if threads:
        torch.set_num_threads(threads)

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

    t0 = time.perf_counter()
    model = build_model(name, "cpu", seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    V = model.lm_head.weight.shape[0]
    lm = wrap_model(model, IdTokenizer(V), name=name)
    lens = LogitLens.of(lm.view)
    build_s = time.perf_counter() - t0
    rss_model = rss_mb()
    prompts = random_prompts(n_prompts + 2, V, seed=1, lo=10, hi=14)
    warm, timed = prompts[:2], prompts[2:]
    build_tables(lm, compute_batch(lm, warm, lens=lens), "warm")

    split = dict.fromkeys(["capture", "lens", "ranks", "copy", "build", "write"], 0.0)
    clock = [0.0]

    def mark(stage: str) -> None:
        now = time.perf_counter()
        split[stage] += now - clock[0]
        clock[0] = now

    batches = token_budget_batches(timed, 32, CPU_BATCH_TOKENS)
    with tempfile.TemporaryDirectory(prefix="big-cpu-") as tmp:
        sink = ParquetSink(Path(tmp))
        t0 = time.perf_counter()
        for b in batches:
            clock[0] = time.perf_counter()
            tables = build_tables(lm, compute_batch(lm, b, lens=lens, mark=mark), "big")
            mark("build")
            sink(tables)
            mark("write")
        wall = time.perf_counter() - t0
    family, kw = SHAPES[name]
    return {"shape": name, "layers": lm.view.n_layers, "d": int(lm.view.unembedding.shape[1]), "V": int(V),
            "params_b": n_params / 1e9, "prompts": len(timed), "tokens": sum(p.n_tokens for p in timed),
            "batches": len(batches), "prompts_per_s": len(timed) / wall, "wall_s": wall, "model_build_s": build_s,
            "rss_model_gb": rss_model / 1024, "peak_rss_gb": vm_hwm_mb() / 1024, "threads": torch.get_num_threads(),
            **{f"{k}_s": v for k, v in split.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="gpt2-xl,llama-3.2-1b")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("BIG_CPU_RESULT=" + json.dumps(child(args.child, args.prompts, args.threads)))
        return 0
    results = []
    for name in args.shapes.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--prompts", str(args.prompts)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        load0 = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = [l for l in proc.stdout.splitlines() if l.startswith("BIG_CPU_RESULT=")]
        if proc.returncode != 0 or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(line[0].split("=", 1)[1])
        r["load"] = f"{load0:.1f} -> {os.getloadavg()[0]:.1f}"
        results.append(r)
        print(f"{name}: {r['prompts_per_s']:.3f} prompts/s, peak RSS {r['peak_rss_gb']:.1f} GB", flush=True)
    cols = ["shape (L, d, V, params)", "prompts (tokens)", "prompts/s", "capture s", "lens s", "ranks s", "copy s",
            "build s", "write s", "model build s", "RSS after load", "peak RSS (VmHWM)", "threads", "load avg"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in results:
        lines.append("| " + " | ".join([
            f"{r['shape']} ({r['layers']}, {r['d']}, {r['V']:,}, {r['params_b']:.2f} B)", f"{r['prompts']} ({r['tokens']})",
            f"{r['prompts_per_s']:.3f}", *(f"{r[k + '_s']:.1f}" for k in ("capture", "lens", "ranks", "copy", "build", "write")),
            f"{r['model_build_s']:.0f}", f"{r['rss_model_gb']:.1f} GB", f"{r['peak_rss_gb']:.1f} GB", str(r['threads']), r['load']]) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
