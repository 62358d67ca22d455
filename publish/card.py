"""The dataset card of a published warehouse: YAML metadata (one config per table) and prose generated
from the warehouse itself (sources, how it was made, limitations, columns in the paper's terms, headline
statistics, citation). The column meanings are the schema's (``store/schema.py``: ``column_doc``); the
sections that need more than a few lines have their own modules (card_provenance, card_stats, markdown)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from blens.store.schema import COLUMN_DOCS, SCHEMA_VERSION, column_doc  # noqa: F401 (COLUMN_DOCS: the card's API)

from .card_provenance import how_made_section, limitations_section, source_note
from .card_stats import _stats_sections
from .markdown import Raw, _code, _fence, _md_escape, _md_table, _scrub_paths, dataset_name, public_name  # noqa: F401

SPLIT_DOCS = {
    "prompts": "One row per extracted prompt (a CounterFact edit request) and its loss.",
    "tokens": "The prompt's tokens, with the segment each belongs to.",
    "gradient_ranks": "Exact rank of the gradient dL/dW of every MLP and attention matrix of every layer, per prompt.",
    "projections": "Logit-lens projections of the gradient's spanning vectors, per prompt, layer, site and token.",
    "vectors": "The raw spanning vectors themselves (inputs x_i and VJPs delta_i).",
    "vjp_similarity": "Appendix G: cosine of the last position's VJP between every pair of layers, per prompt and site.",
    "settings": "Each result-settings id (the settings column of every result row) with its JSON.",
    "edit_results": "Knowledge-editing outcomes, one row per (prompt, method, layer, learning rate).",
    "runs": "Provenance: one row per run (model, data, settings, code version) that produced rows.",
    "models": "The models: family, shape, and the file the weights came from with its sha256.",
    "errors": "Records that were turned away, with the field at fault and why.",
    "supersessions": "Results replaced by a changed record's new result (same model, settings and case_id).",
}

COUNTERFACT_CITATION = """@inproceedings{meng2022locating,
    title = "Locating and Editing Factual Associations in {GPT}",
    author = "Meng, Kevin and Bau, David and Andonian, Alex and Belinkov, Yonatan",
    booktitle = "Advances in Neural Information Processing Systems",
    volume = "35",
    year = "2022",
}"""

CITATION = """@inproceedings{katz-etal-2024-backward,
    title = "Backward Lens: Projecting Language Model Gradients into the Vocabulary Space",
    author = "Katz, Shahar and Belinkov, Yonatan and Geva, Mor and Wolf, Lior",
    booktitle = "Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing",
    month = nov,
    year = "2024",
    address = "Miami, Florida, USA",
    publisher = "Association for Computational Linguistics",
    doi = "10.18653/v1/2024.emnlp-main.142",
    pages = "2390--2422",
}"""


def _size_category(n: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                         (1_000_000_000, "100M<n<1B")):
        if n < bound:
            return label
    return "n>1T" if n > 1_000_000_000_000 else "1B<n<10B"


def model_license(models: list[str]) -> tuple[dict, str]:
    """The card's licence: YAML fields and one sentence, from the models' registry entries (``EmbeddedModel``).

    The rows are derived from the model's weights, so the weights' licence is the one that binds them (the
    CounterFact prompts are MIT). One embedded model's licence, or several models' shared one, is named;
    a model blens does not know (a hub name, a local directory) makes it ``other``, with a line telling the
    reader to check that model's own licence. The weights themselves are never part of the dataset."""
    from blens.extract.registry import EMBEDDED

    entries = [EMBEDDED.get(m) for m in models]
    known = [e for e in entries if e is not None and e.license]
    if known and len(known) == len(entries) and len({e.license for e in known}) == 1:
        e = known[0]
        meta = {"license": e.license}
        if e.license not in ("apache-2.0", "mit"):  # the Hub knows these by id; name and link the others
            meta.update({"license_name": e.license_name, "license_link": e.license_url})
        text = (f"the {e.license_name} ({e.license_url}), the licence of {', '.join(x.name for x in known)}, "
                "whose outputs these rows are")
    else:
        unknown = [_md_escape(public_name(m)) for m, e in zip(models, entries)
                   if e is None or not e.license] or ["each model"]  # a name may hold Markdown or a path
        named = "".join(f"{e.name}: {e.license_name} ({e.license_url}); " for e in known)
        meta = {"license": "other", "license_name": "the licence of each model named in this card"}
        text = (f"each model's own licence, which these rows follow; {named}check the licence of "
                f"{', '.join(unknown)} before using them")
    return meta, f"License: {text}. The prompt texts come from CounterFact (Meng et al., 2022), under its own licence. No model weights are included.\n"


def card_metadata(splits: dict, pretty_name: str, license_meta: dict | None = None) -> dict:
    biggest = max(s.num_rows for s in splits.values())
    configs, infos = [], []
    for name, s in splits.items():
        cfg = {"config_name": name, "data_files": [{"split": "train", "path": f"data/{name}/*.parquet"}]}
        if name == "prompts":
            cfg["default"] = True
        configs.append(cfg)
        infos.append({"config_name": name, "features": s.features._to_yaml_list(),
                      "splits": [{"name": "train", "num_bytes": s.num_bytes, "num_examples": s.num_rows}]})
    return {
        **(license_meta or {"license": "other"}),
        "language": ["en"],
        "pretty_name": pretty_name,
        "task_categories": ["text-generation"],
        "tags": ["interpretability", "gradients", "logit-lens", "backward-lens", "knowledge-editing", "counterfact"],
        "size_categories": [_size_category(biggest)],
        "configs": configs,
        "dataset_info": infos,
    }


def render_card(con, splits: dict, *, repo_id: str | None = None, snapshot: int | None = None) -> str:
    import yaml

    runs = con.sql("SELECT run_id, model, model_revision, dataset, dataset_fingerprint, config_json, "
                   "created_at, code_version, kind FROM runs ORDER BY created_at").fetchall()
    per_run = dict(con.sql("SELECT run_id, count(*) FROM prompts GROUP BY run_id").fetchall())
    errors = dict(con.sql("SELECT run_id, count(*) FROM errors GROUP BY run_id").fetchall())
    models = sorted({public_name(r[1]) for r in runs}
                    | {public_name(r[0]) for r in con.sql("SELECT DISTINCT model FROM prompts").fetchall()})
    n_prompts = splits["prompts"].num_rows
    pretty = "Backward Lens gradients" + (f" ({', '.join(models)})" if models else "")
    license_meta, license_line = model_license(models)
    meta = card_metadata(splits, pretty, license_meta)

    md: list[str] = []
    md.append("---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n")
    md.append(f"# {_md_escape(pretty)}\n")
    md.append(
        "Gradients of a language model's MLP matrices for CounterFact knowledge-editing prompts, in the form the "
        "paper *Backward Lens: Projecting Language Model Gradients into the Vocabulary Space* (Katz, Belinkov, "
        "Geva, Wolf; EMNLP 2024) studies them. For a prompt of n tokens the gradient of the loss with respect to "
        "an MLP matrix W is a sum of n outer products, dL/dW = sum_i outer(x_i, delta_i), of the matrix's inputs "
        "x_i (forward pass) and vector-Jacobian products delta_i (backward pass) — the *spanning set*, so "
        "rank(dL/dW) <= n (Lemma 4.1). This dataset stores the exact rank of every gradient, the logit-lens "
        "projection of the spanning vectors (x_i entering FF1, the *imprint*; delta_i at FF2's output, the "
        "*shift*), and optionally the vectors themselves. The loss is the cross-entropy of the first token of "
        "the counterfactual `target_new` at the prompt's last position.\n")
    md.append(f"It has {n_prompts:,} prompts from {len(runs)} extraction run(s). Every number below was computed "
              "from these rows by the SQL views of the `blens` warehouse"
              + (f", all read at one DuckLake snapshot (version {int(snapshot)})" if snapshot is not None else "")
              + ".\n")

    md.append("## Source\n")
    run_rows = []
    for run_id, model, rev, dataset, fp, cfg, created, code, kind in runs:
        run_rows.append([_code(run_id), public_name(model), _code(rev), dataset_name(dataset), _code(fp[:16]),
                         per_run.get(run_id, 0),
                         errors.get(run_id, 0), kind, str(created)[:19], code])
    md.append(_md_table(["run", "model", "revision", "dataset", "fingerprint", "prompts", "skipped records",
                         "kind", "created (UTC)", "code"], run_rows) + "\n")
    md.append("Prompts come from CounterFact (Meng et al., 2022), one edit request per `case_id`. Records that could "
              "not be used (e.g. a target the tokenizer cannot produce) are counted under *skipped records*.\n")
    md.append(source_note([dataset_name(r[3]) for r in runs]))
    md.append("### Extraction settings\n")
    for run_id, *_rest in runs:
        cfg = _rest[4]
        try:
            settings = json.loads(cfg)
            settings.pop("warehouse", None)  # a path on the machine that extracted: not part of the data
            if "data" in settings:
                settings["data"] = dataset_name(settings["data"])
            cfg = json.dumps(_scrub_paths(settings), indent=2, sort_keys=True)
        except (TypeError, ValueError, AttributeError):
            cfg = "(settings not readable as JSON)"
        md.append(f"Run {_code(run_id)}:\n\n{_fence(cfg, 'json')}\n")

    md.extend(how_made_section(runs))
    md.extend(limitations_section(models, [r[3] for r in runs], n_prompts))

    md.append("## Tables\n")
    md.append("Each table is a config with one `train` split (the tables have different columns), stored as Parquet "
              "under `data/<table>/`, locally and on the Hub alike.\n")
    for name, s in splits.items():
        md.append(f"### `{name}` — {s.num_rows:,} row{'' if s.num_rows == 1 else 's'}\n")
        md.append(SPLIT_DOCS.get(name, "") + "\n")
        md.append(column_table(name, s.features) + "\n")

    md.append("## Headline statistics\n")
    md.extend(_stats_sections(con))

    md.append("## How to load\n")
    md.append("```python\nfrom datasets import load_dataset\n\n"
              "# this folder: one config per table (the card's configs), each with a train split\n"
              "proj = load_dataset(\"PATH/TO/THIS/FOLDER\", \"projections\", split=\"train\")\n"
              "print(proj[0])\n\n"
              "# or the Parquet files themselves, without the card\n"
              "proj = load_dataset(\"parquet\", data_files={\"train\": \"PATH/TO/THIS/FOLDER/data/projections/*.parquet\"},\n"
              "                    split=\"train\")\n"
              + (f"\n# from the Hub: one config per table, each with a train split\n"
                 f"proj = load_dataset(\"{repo_id}\", \"projections\", split=\"train\")\n" if repo_id else "")
              + "```\n")
    md.append("## How to query with DuckDB\n")
    md.append("```sql\n-- where target_new lands in the FF2 VJP's logit lens, at the last token, by layer\n"
              "SELECT layer, median(target_new_rank) AS median_rank\n"
              "FROM 'data/projections/*.parquet'\n"
              "WHERE site = 'ff2_vjp' AND segment = 'last'\n"
              "GROUP BY layer ORDER BY layer;\n\n"
              "-- share of prompts whose FF2 gradient has full rank n\n"
              "SELECT layer, avg((rank = n_tokens)::INT) AS rate\n"
              "FROM 'data/gradient_ranks/*.parquet' WHERE matrix = 'ff2'\n"
              "GROUP BY layer ORDER BY layer;\n```\n")
    if repo_id:
        md.append(f"On the Hub, DuckDB reads the same files as `'hf://datasets/{repo_id}/data/projections/*.parquet'`.\n")
    md.append("The `blens` project defines the analysis views used above (`rank_equals_length`, "
              "`target_rank_by_layer`, `vjp_norm_by_segment`) in `queries/*.sql`.\n")
    md.append("## Citation\n")
    md.append("```bibtex\n" + CITATION + "\n```\n")
    md.append("The prompts come from CounterFact:\n")
    md.append("```bibtex\n" + COUNTERFACT_CITATION + "\n```\n")
    md.append(f"Schema version {SCHEMA_VERSION}. " + license_line)
    return "\n".join(md)


def column_table(table: str, features) -> str:
    """A table's columns as Markdown: name, published type and meaning (the schema's, ``column_doc``: our own
    Markdown, so its code spans stay code)."""
    rows = [[Raw(f"`{col}`"), Raw(f"`{_feature_repr(feat)}`"), Raw(column_doc(table, col))]
            for col, feat in features.items()]
    return _md_table(["column", "type", "meaning"], rows)


def _feature_repr(feat) -> str:
    from datasets import List, Value

    if isinstance(feat, List):
        return f"list<{_feature_repr(feat.feature)}>"
    if isinstance(feat, Value):
        return feat.dtype
    return str(feat)


def read_card_metadata(readme: str | os.PathLike) -> dict:
    """The YAML header of a card written by :func:`render_card`."""
    import yaml

    text = Path(readme).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError("card has no YAML header")
    return yaml.safe_load(text[4:text.index("\n---\n", 4)])
