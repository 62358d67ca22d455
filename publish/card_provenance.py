"""The card's account of how the rows were made and what they are not: the data's source, the exact commands that
reproduce the warehouse (from the ``runs`` table's stored settings, local paths replaced by placeholders), and
the limitations a reader needs before comparing these numbers with the paper's.

Every value that came from the extracting machine goes through :func:`placeholder` or ``markdown.public_name``:
a card is published, and that machine's folders are neither data nor safe to show.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from .markdown import _fence, _md_escape, dataset_name, public_name

# Where the data sets blens is used with come from, by the name the card gives them (markdown.dataset_name).
KNOWN_SOURCES = {
    "counterfact-edit-1k": "a fixed 1,000-record subset of `counterfact-edit` (not its first 1,000 records), the "
                           "set the `blens` project extracts by default",
    "counterfact-edit": "EasyEdit's CounterFact edit split: 10,000 records, disjoint from `counterfact-train`",
    "counterfact-train": "EasyEdit's CounterFact train split: 10,000 records (the tuning data of `blens sweep`)",
}
SOURCE_NOTE = (
    "`counterfact-train` and `counterfact-edit` are EasyEdit's CounterFact split (EasyEdit, Wang et al., 2024), "
    "the CounterFact data of ROME (Meng et al., 2022; under its own licence) in EasyEdit's record layout: `case_id`, "
    "`prompt` with the subject filled in, `subject`, `target_new`, `ground_truth`, `rephrase_prompt`, "
    "`locality_prompt`, `locality_ground_truth`.")

_PLACEHOLDER_DIR = "PATH/TO/"
_DATA_SUFFIXES = (".json", ".jsonl")


_SAFE = re.compile(r"[\w.+@=,:%/-]+")  # a value a shell and a reader take as it is


def placeholder(value: object, what: str = "NAME") -> str:
    """A command-line value as the card shows it: a local path (absolute, relative to a folder, or a data file)
    as ``PATH/TO/<its last part>``, an embedded model name or a hub id as it is. A name with characters a shell
    or Markdown would read (quotes, ``$``, backticks, ``<``) becomes ``PATH/TO/<what>``: the card never shows it
    raw, even in a code block."""
    text = str(value)
    local = public_name(text) != text or text.lower().endswith(_DATA_SUFFIXES) or "\\" in text \
        or text.startswith(("./", "../"))
    shown = _PLACEHOLDER_DIR + (Path(text.replace("\\", "/")).name or what) if local else text
    return shown if _SAFE.fullmatch(shown) else _PLACEHOLDER_DIR + what


def _safe(value: object, what: str = "VALUE") -> str:
    text = str(value)
    return text if _SAFE.fullmatch(text) else what


def _flag(name: str, value: object) -> list[str]:
    return [] if value is None or value is False else [f"--{name}", shlex.quote(_safe(value))]


def run_commands(kind: str, model: str, dataset: str, config_json: str) -> list[str]:
    """The command line(s) that make one run's rows again, from its stored settings. Settings that change no row
    (device, threads, batch sizes, workers, overlap) are left out; a run whose settings cannot be read gets
    the command with model and data only."""
    try:
        cfg = json.loads(config_json)
        if not isinstance(cfg, dict):
            raise ValueError
    except (TypeError, ValueError):
        cfg = {}
    base = ["--model", shlex.quote(placeholder(model, "MODEL")),
            "--data", shlex.quote(placeholder(cfg.get("data", dataset), "DATA")), "--warehouse", "warehouse"]
    if kind == "extract":
        out = ["blens", "extract", *base, *_flag("top-k", cfg.get("top_k")), *_flag("vectors", cfg.get("vectors")),
               *_flag("limit", cfg.get("limit")), *_flag("shard", cfg.get("shard")),
               *_flag("max-prompt-tokens", cfg.get("max_prompt_tokens"))]
        return [" ".join(out)]
    if kind == "sweep":
        return [" ".join(["blens", "sweep", *base, *_flag("limit", cfg.get("limit"))])]
    specs = cfg.get("specs") if isinstance(cfg.get("specs"), list) else [{}]
    lines = []
    for spec in specs:
        spec = spec if isinstance(spec, dict) else {}
        lines.append(" ".join(["blens", "edit", *base, *_flag("method", spec.get("method")),
                               *_flag("layer", spec.get("layer")), *_flag("lr", spec.get("lr")),
                               *_flag("step", spec.get("step")), *_flag("limit", cfg.get("limit")),
                               *_flag("fluency-tokens", cfg.get("fluency_tokens"))]))
    return lines


def how_made_section(runs: list[tuple]) -> list[str]:
    """"How this was made": one shell block with every run's command, oldest first, then the publish.
    ``runs``: (run_id, model, revision, dataset, fingerprint, config_json, created_at, code_version, kind)."""
    lines = []
    for run_id, model, _rev, dataset, _fp, cfg, _created, code, kind in runs:
        lines.append(f"# run {_safe(run_id, 'RUN')} ({_safe(kind, 'KIND')}, blens {_safe(code, 'unknown')})")
        lines.extend(run_commands(kind, model, dataset, cfg))
    lines.append("blens publish --warehouse warehouse --out dataset")
    return [
        "## How this was made\n",
        "The commands below, run in a checkout of the `blens` project at the code version named in each comment "
        "(`scripts/setup.sh` installs it), make these rows again; they are generated from the settings each run "
        "stored in the warehouse's `runs` table. `PATH/TO/` stands for a folder on the machine that extracted; "
        "settings that change no row (device, threads, batch sizes) are left out. Results are identified by "
        "content (model, revision, settings, record), so a rerun adds no duplicate.\n",
        _fence("\n".join(lines), "bash") + "\n",
    ]


def source_note(datasets: list[str]) -> str:
    """Where the named data sets come from (those blens knows), for the card's Source section."""
    known = [f"`{_md_escape(d)}` is {KNOWN_SOURCES[d]}" for d in dict.fromkeys(datasets) if d in KNOWN_SOURCES]
    return ("; ".join(known) + ". " if known else "") + SOURCE_NOTE + "\n"


def limitations_section(models: list[str], datasets: list[str], n_prompts: int) -> list[str]:
    """What these rows are not: the paper's model, exact batch-independent floats, whole-target losses."""
    from blens.extract.registry import EMBEDDED

    described = []
    for m in models:
        e = EMBEDDED.get(m)
        described.append(f"`{_md_escape(m)}`: {e.title}" if e is not None and e.title else
                         f"`{_md_escape(m)}`: a model blens does not embed, loaded by `transformers` as given")
    data = ", ".join(f"`{_md_escape(dataset_name(d))}`" for d in dict.fromkeys(datasets)) or "CounterFact"
    items = [
        "**Not the paper's model.** The paper's experiments use GPT-2 XL (1.5B parameters) and Llama 2. These "
        "rows come from " + "; ".join(described) + ". The embedded models are small quantised GGUF checkpoints "
        "(SmolLM2-135M-Instruct Q4_1, an Instruct-tuned model; Gemma 3 270M Q4_K_M, a base model) dequantised to "
        "fp32, not the original bf16/fp32 releases, so their numbers are not expected to equal the paper's or "
        "those of the unquantised weights; the 'paper vs ours' section of `blens report` compares claim by claim.",
        "**Batch-padding noise.** Prompts are extracted in padded batches. A padded batch and the same prompt "
        "alone agree only to float summation order (relative ~1e-5 to 1e-4), so a rank among near-tied logits "
        "(target_new_rank, target_true_rank, the top-k/bottom-k lists) can differ by a few places from an "
        "unbatched run, and a gradient rank decided by a singular value near the numerical tolerance can differ "
        "by one. Compare distributions, not single near-tied values.",
        "**First token of the target only.** The loss is the NLL of the first token of `target_new` at the last "
        "position (the gradient studied), and target ranks are those of the first tokens of `target_new` / "
        "`target_true`; a multi-token object is judged by its first token.",
        f"**A CounterFact subset.** {n_prompts:,} prompts from {data} (see *Source*), English only, one edit "
        "request per `case_id`; records the tokenizer or the length limit could not take are counted as skipped, "
        "not extracted.",
        "**Numerical ranks.** `gradient_ranks.rank` counts the singular values of dL/dW (from its n spanning "
        "vectors' Gram matrices, in float64) above `torch.linalg.matrix_rank`'s float32 tolerance, sigma_max x "
        "max(d_in, d_out) x eps; Lemma 4.1's bound n always holds, but rank = n is a statement at that tolerance.",
    ]
    return ["## Limitations\n", "\n".join(f"- {i}" for i in items) + "\n"]
