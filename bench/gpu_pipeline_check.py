"""The real extraction job on CUDA, into a real DuckLake warehouse, against the same job on CPU.

    python bench/gpu_pipeline_check.py --tokenizer DIR --data counterfact-edit-1k.json [--limit 1000]

Where `bench/gpu_check.sh` drives the extraction core (``compute_batch``/``build_tables``) with a Parquet
stand-in for the store, this drives the job exactly as the Prefect flow's tasks do
(``blens.extract.job``: ``plan_run`` -> ``background_commits`` -> ``process_batch`` per batch), with the
real CounterFact records, a real GPT-2 tokenizer and the store's DuckLake commits, only without Prefect
(a bare GPU machine has none; the flow is a loop over these calls). The model is the GPT-2 small shape
(12 layers, d = 768, V = 50,257) with seeded random weights, built in-process.

It prints one Markdown table:
* **equality**: the first ``--equal`` records extracted on CPU (``vectors=spanning``, the lens inputs
  kept) and on CUDA, read back from the two warehouses and compared with ``bench/equality.py``
  (gradient ranks identical, top/bottom-10 sets and target ranks identical up to float ties).
* **throughput**: all ``--limit`` records on CUDA with the defaults (``--device auto``: CUDA, batch sizes
  for the device, background commits), then again with ``overlap=False``: prompts/s of the job, batches,
  batch sizes, and the check that every key is stored once.
Exit status 0 only if equality holds and both CUDA warehouses hold every record once.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

from blens.extract.config import ExtractConfig
from blens.extract.job import background_commits, make_lens, plan_run, process_batch
from blens.extract.models import wrap_model
from blens.store.connect import connect

from bench.equality import compare_runs
from bench.gpu_check import build_model

TABLES = ("prompts", "gradient_ranks", "projections", "vectors")


def tokenizer(path: str):
    """GPT-2's BPE from its tokenizer.json (as tests/conftest.py loads it)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(path) / "tokenizer.json"))
    tok.pad_token = tok.eos_token = "<|endoftext|>"
    return tok


def run_job(lm, data: str, wh: Path, limit: int, **cfg_kw) -> dict:
    cfg = ExtractConfig(model=lm.name, data=data, warehouse=str(wh), limit=limit, **cfg_kw)
    t0 = time.perf_counter()
    plan = plan_run(cfg, lm)
    lens = make_lens(lm)
    t1 = time.perf_counter()
    done = 0
    with background_commits(plan.run_id, plan.overlap):
        for batch in plan.batches:
            done += process_batch(cfg, plan.run_id, batch, lm, lens).n_prompts
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    con = connect(wh)
    n, distinct = con.execute("SELECT count(*), count(DISTINCT key) FROM prompts").fetchone()
    con.close()
    return {"plan": plan, "extracted": done, "stored": n, "distinct": distinct, "plan_s": t1 - t0, "run_s": t2 - t1,
            "sizes": sorted({len(b) for b in plan.batches})}


def read_tables(wh: Path) -> dict:
    con = connect(wh)
    try:
        return {t: con.execute(f"SELECT * FROM {t}").fetch_arrow_table() for t in TABLES}
    finally:
        con.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="directory with GPT-2's tokenizer.json")
    ap.add_argument("--data", required=True, help="CounterFact records (EasyEdit or ROME layout)")
    ap.add_argument("--limit", type=int, default=1000, help="records for the CUDA throughput runs")
    ap.add_argument("--equal", type=int, default=96, help="records for the CPU vs CUDA equality")
    ap.add_argument("--candidate-device", default="cuda", help="cpu: rehearse the whole check without a GPU")
    args = ap.parse_args(argv)
    dev = args.candidate_device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2
    tok = tokenizer(args.tokenizer)
    model = build_model("gpt2-small", "cpu", seed=5, spread=True)
    print(f"gpu_pipeline_check: {torch.cuda.get_device_name() if dev != 'cpu' else 'cpu rehearsal'}, torch {torch.__version__}, "
          f"{args.equal} records for equality, {args.limit} for throughput", flush=True)
    ok = True
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-pipeline-") as tmp:
        tmp = Path(tmp)
        cpu_lm = wrap_model(copy.deepcopy(model), tok, name="gpt2-small-random", device="cpu")
        gpu_lm = wrap_model(copy.deepcopy(model), tok, name="gpt2-small-random", device=dev)
        ref = run_job(cpu_lm, args.data, tmp / "cpu", args.equal, device="cpu", vectors="spanning")
        cand = run_job(gpu_lm, args.data, tmp / "cuda-eq", args.equal, device=dev)
        view = cpu_lm.view
        ref_t, cand_t = read_tables(tmp / "cpu"), read_tables(tmp / "cuda-eq")
        verdict = compare_runs([ref_t], [cand_t], view.final_norm, view.unembedding, view.unembedding_bias)
        # result keys do not depend on the device (or on stored vectors): the same results, the same keys
        same_keys = sorted(ref_t["prompts"]["key"].to_pylist()) == sorted(cand_t["prompts"]["key"].to_pylist())
        ok &= verdict.ok and same_keys
        rows.append(("equality: cpu job vs cuda job", f"{ref['stored']} / {cand['stored']} prompts",
                     f"{verdict.summary()}; same result keys: {same_keys}", "", "", ""))
        for label, kw in (("cuda job, defaults (overlap on)", {}), ("cuda job, overlap off", {"overlap": False})):
            r = run_job(gpu_lm, args.data, tmp / label.replace(" ", "_").replace(",", ""), args.limit, device=dev,
                        **kw)
            complete = r["stored"] == r["distinct"] == r["extracted"] == r["plan"].n_todo
            ok &= complete
            rows.append((label, f"{r['stored']} prompts, {len(r['plan'].batches)} batches (sizes {r['sizes'][0]}-"
                         f"{r['sizes'][-1]}), overlap {r['plan'].overlap}",
                         "every key once" if complete else f"INCOMPLETE {r}", f"{r['run_s']:.2f}",
                         f"{r['extracted'] / r['run_s']:.1f}", f"{r['plan_s']:.2f}"))
            print(f"  {label}: {rows[-1]}", flush=True)
    print("| check | records | result | job s | prompts/s | plan s |\n|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    peak = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if dev != "cpu" else ""
    print(f"pipeline check {'holds' if ok else 'FAILED'}{peak}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
