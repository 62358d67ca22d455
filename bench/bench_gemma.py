"""Where Gemma 3 270M's extraction time goes (not a test). Prints one table; optionally writes it as Markdown.

    .venv/bin/python bench/bench_gemma.py [--batch-size 32] [--n1 50 --n2 150] [--compare smollm2-135m]
        [--fused-rows 64,256] [--out F]

* one batch of the first ``--batch-size`` prompts of counterfact-edit-1k, as `blens extract` runs it: the traced
  forward+backward (capture), the gradient ranks, and the logit lens over every (site, layer, position) vector
  (Gemma has three lens sites: ff1_input, ff2_vjp, resid_post_vjp); wall and process CPU seconds each, the lens
  GFLOP/s against the machine's fp32 GEMM peak (the faster of MKL and oneDNN), and the lens' share of the batch;
  where the fused CPU lens ran (the default since issue 26), the block lens (vocabulary tiles for Gemma) on the
  same vectors beside it, and with ``--fused-rows`` the fused lens at other block sizes;
* the same batch for ``--compare`` (default SmolLM2, two lens sites), for the per-vector cost ratio;
* with ``--n2``: marginal prompts/s of real `blens extract --model gemma3-270m` processes, (N2 - N1) / (T(N2) -
  T(N1)), by wall clock and by the children's CPU seconds (the CPU figure is the one to trust on a shared box),
  and each process' peak RSS (VmHWM).

The load average is printed at the start and the end: on a shared machine every wall-clock figure depends on it.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_extract import RUN_CLI, gemm_peak, machine, onednn_peak  # noqa: E402
from blens.extract.capture import capture  # noqa: E402
from blens.extract.lens import LogitLens  # noqa: E402
from blens.extract.lens_fused import SLAB_TOKENS, FusedUnembedding, slab_logits  # noqa: E402
from blens.extract.models import load_model  # noqa: E402
from blens.extract.prepare import prepare  # noqa: E402
from blens.extract.ranks import ranks_for_batch  # noqa: E402
from blens.extract.sources import load_records  # noqa: E402

DATA = "/work/shared/data/counterfact/counterfact-edit-1k.json"


def timed(f):
    """(result, wall s, this process' CPU s)."""
    c, t = time.process_time(), time.perf_counter()
    out = f()
    return out, time.perf_counter() - t, time.process_time() - c


def gemm_alone(lens: LogitLens, flat: torch.Tensor, peak: float) -> str:
    """The unembedding GEMMs of a lens call and nothing else, blocked the way the lens blocks them."""
    with torch.no_grad():
        h = lens.norm(flat)
    V = lens.w.shape[0]
    if lens.fused:
        f = lens._fused or FusedUnembedding(lens.w, lens.bias)
        buf = torch.empty(V * f.rows)
        blocks = [lambda s=s: slab_logits(f.routine, lens.w, h[s : s + f.rows], lens.bias,
                                          buf[: V * h[s : s + f.rows].shape[0]].view(V, -1))
                  for s in range(0, h.shape[0], f.rows)]
        shape = f"fused lens: slabs of {SLAB_TOKENS} tokens x {f.rows} vectors, {f.routine}"
    elif lens.tiled is not None:
        t = lens.tiled
        blocks = [lambda i=i, s=s: t.tile_logits(i, h[s : s + t.rows]) for i in range(len(t.tiles))
                  for s in range(0, h.shape[0], t.rows)]
        shape = f"{len(t.tiles)} vocabulary tiles of {t.tiles[0][1]} tokens x {t.rows}-row blocks"
    else:
        rows = lens.block_rows(h.device)
        blocks = [lambda s=s: lens._logits(h[s : s + rows]) for s in range(0, h.shape[0], rows)]
        shape = f"{rows}-row blocks over the whole vocabulary"
    best = min(timed(lambda: [b() for b in blocks])[1] for _ in range(2))
    gflops = 2 * h.shape[0] * h.shape[1] * V / 1e9
    return f"{gflops / best:.0f} GFLOP/s = {100 * gflops / best / peak:.0f} % of the fp32 peak ({shape})"


def batch_profile(name: str, batch_size: int, add, peak: float, fused_rows: tuple[int, ...] = ()) -> float:
    """Time one extraction batch of model ``name``; returns the lens CPU seconds per vector."""
    lm = load_model(name)
    view = lm.view
    records = load_records(DATA, limit=batch_size).records
    batch = sorted((prepare(r, lm.tokenizer, 8192) for r in records), key=lambda p: p.n_tokens)
    lens = LogitLens.of(view)
    capture(view, batch[:2], lm.tokenizer.pad_token_id)  # warm-up
    spans, w_cap, c_cap = timed(lambda: capture(view, batch, lm.tokenizer.pad_token_id))
    _, w_rank, c_rank = timed(lambda: ranks_for_batch(spans, view.matrix_names, view.n_layers))
    sites = view.lens_sites
    flat = torch.stack([torch.stack([spans.site(layer, s) for layer in range(view.n_layers)])[:, spans.mask]
                        for s in sites]).reshape(-1, view.unembedding.shape[1])
    tgt = torch.randint(0, view.vocab_size, (flat.shape[0], 2), generator=torch.Generator().manual_seed(0))
    lens.project(flat[:128], tgt[:128], 10)  # warm-up
    _, w_lens, c_lens = timed(lambda: lens.project(flat, tgt, 10))
    n_vec, d, V = flat.shape[0], flat.shape[1], view.vocab_size
    gflops = 2 * n_vec * d * V / 1e9
    total_c = c_cap + c_rank + c_lens
    n_tok = int(spans.mask.sum())
    add(f"{name}: batch", f"{len(batch)} prompts, {n_tok} tokens, {len(sites)} lens sites x {view.n_layers} layers "
        f"= {n_vec} lens vectors (V = {V}, d = {d})")
    add(f"{name}: capture (fwd + one backward)", f"{w_cap:.2f} s wall, {c_cap:.2f} s CPU")
    add(f"{name}: gradient ranks", f"{w_rank:.2f} s wall, {c_rank:.2f} s CPU")
    add(f"{name}: lens, whole projection", f"{w_lens:.2f} s wall, {c_lens:.2f} s CPU; {gflops / w_lens:.0f} GFLOP/s "
        f"= {100 * gflops / w_lens / peak:.0f} % of the fp32 peak; {1e3 * c_lens / n_vec:.2f} ms CPU per vector")
    add(f"{name}: lens GEMM alone", gemm_alone(lens, flat[:2048], peak))
    if lens.fused:  # the block lens (tiled for big vocabularies) on the same vectors, for comparison
        block = LogitLens(view.final_norm, view.unembedding, view.unembedding_bias, fused=False)
        block.project(flat[:128], tgt[:128], 10)  # warm-up (packs the tiles)
        _, w_block, c_block = timed(lambda: block.project(flat, tgt, 10))
        add(f"{name}: block lens{' (tiles)' if block.tiled is not None else ''}, whole projection",
            f"{w_block:.2f} s wall, {c_block:.2f} s CPU; {gflops / w_block:.0f} GFLOP/s = "
            f"{100 * gflops / w_block / peak:.0f} % of the fp32 peak")
        del block
    for rows in fused_rows:  # the fused lens at other block sizes (vectors per (V, rows) buffer)
        other = LogitLens(view.final_norm, view.unembedding, view.unembedding_bias, chunk_rows=rows)
        other.project(flat[:128], tgt[:128], 10)
        _, w_rows, c_rows = timed(lambda: other.project(flat, tgt, 10))
        add(f"{name}: fused lens, {rows} vectors per block ({V * rows * 4 / 2**20:.0f} MiB buffer)",
            f"{w_rows:.2f} s wall, {c_rows:.2f} s CPU; {gflops / w_rows:.0f} GFLOP/s = "
            f"{100 * gflops / w_rows / peak:.0f} % of the fp32 peak")
        del other
    add(f"{name}: lens share of the batch", f"{100 * c_lens / total_c:.0f} % of CPU seconds "
        f"({total_c / len(batch):.2f} CPU s per prompt)")
    del lm, spans, flat
    return c_lens / n_vec


def run_cli(n: int, warehouse: Path, model: str) -> tuple[float, float, float]:
    """Wall s, CPU s (user + sys of the child) and peak RSS (MB) of one `blens extract` over the first n records."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-c", RUN_CLI, "extract", "--model", model, "--data", DATA, "--limit", str(n),
           "--warehouse", str(warehouse)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"blens extract failed: {proc.stderr[-2000:]}")
    kb = [float(line.split("=")[1]) for line in proc.stderr.splitlines() if line.startswith("BENCH_MAXRSS_KB=")]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, (kb[-1] / 1024 if kb else float("nan"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--compare", default="smollm2-135m", help="second model for the per-vector ratio ('' = none)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n1", type=int, default=50)
    ap.add_argument("--n2", type=int, default=0, help="> n1: also time real blens extract runs (minutes)")
    ap.add_argument("--fused-rows", default="", help="also time the fused lens at these vectors per block "
                                                       "(comma-separated, e.g. 64,256)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    rows: list[tuple[str, str]] = []

    def add(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"{name}: {value}", flush=True)

    start = machine()
    print(start, flush=True)
    mkl, onednn = gemm_peak(torch.float32), onednn_peak()
    peak = max(mkl, onednn)  # the lens takes whichever routine is faster here (extract/lens_fused.py)
    add("fp32 GEMM peak, 2048^3: torch matmul (MKL) / oneDNN linear", f"{mkl:.0f} / {onednn:.0f} GFLOP/s")
    per_vec = batch_profile(args.model, args.batch_size, add, peak,
                            tuple(int(r) for r in args.fused_rows.split(",") if r.strip()))
    if args.compare:
        other = batch_profile(args.compare, args.batch_size, add, peak)
        add("lens CPU per vector, ratio", f"{args.model} / {args.compare} = {per_vec / other:.1f}x")
    if args.n2 > args.n1:
        with tempfile.TemporaryDirectory() as tmp:
            w1, c1, r1 = run_cli(args.n1, Path(tmp) / "a", args.model)
            w2, c2, r2 = run_cli(args.n2, Path(tmp) / "b", args.model)
        dn = args.n2 - args.n1
        add(f"blens extract --model {args.model}, marginal",
            f"{dn / (w2 - w1):.2f} prompts/s by wall clock (T({args.n1}) = {w1:.0f} s, T({args.n2}) = {w2:.0f} s), "
            f"{(c2 - c1) / dn:.2f} CPU s per prompt (CPU {c1:.0f} s -> {c2:.0f} s); peak RSS {r1:.0f} MB -> {r2:.0f} MB")
    end = machine()
    add("machine at start / end", f"{start} / load avg at end {os.getloadavg()[0]:.1f}")
    width = max(len(a) for a, _ in rows)
    text = [f"# bench_gemma ({end})", "", f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    text += [f"| {a.ljust(width)} | {b} |" for a, b in rows]
    print("\n".join(text))
    if args.out:
        Path(args.out).write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
