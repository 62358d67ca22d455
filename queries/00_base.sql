-- Backward Lens warehouse: base views (public API).
-- Set the warehouse location first:   SET VARIABLE warehouse = 'warehouse';
-- Every table view shows only committed batches (see store/writer.py): a writer killed mid-batch
-- leaves files that no view reads. If a prompt was committed twice (a --force rerun, or two writers
-- given the same shard), the latest commit wins, so each (run_id, case_id) appears exactly once.

CREATE OR REPLACE VIEW _commits AS
SELECT run_id, batch_id, created_at AS committed_at, writer, n_prompts
FROM read_parquet(getvariable('warehouse') || '/_commits/**/*.parquet', union_by_name = true);

CREATE OR REPLACE VIEW _prompt_rows AS
SELECT p.*, c.committed_at
FROM read_parquet(getvariable('warehouse') || '/prompts/**/*.parquet', union_by_name = true) AS p
JOIN _commits AS c USING (run_id, batch_id);

-- The batch that holds the live copy of each (run_id, case_id).
CREATE OR REPLACE VIEW _live AS
SELECT run_id, case_id, arg_max(batch_id, committed_at) AS batch_id
FROM _prompt_rows GROUP BY run_id, case_id;

-- One row per run: identity (model + revision, dataset fingerprint, settings) and provenance.
CREATE OR REPLACE VIEW runs AS
SELECT run_id, model, model_revision, dataset, config_json, created_at, code_version,
       dataset_fingerprint, schema_version, kind
FROM read_parquet(getvariable('warehouse') || '/runs/**/*.parquet', union_by_name = true) AS r
WHERE batch_id IN (SELECT batch_id FROM _commits)
QUALIFY row_number() OVER (PARTITION BY run_id ORDER BY created_at) = 1;

-- One row per extracted prompt. loss = NLL of target_new's first token at the last position.
CREATE OR REPLACE VIEW prompts AS
SELECT run_id, case_id, model, prompt, subject, target_new, target_true, n_tokens, loss,
       target_new_id, target_true_id
FROM _prompt_rows JOIN _live USING (run_id, case_id, batch_id);

-- Prompt tokens. segment: 'subject' (overlaps the subject string), 'last' (final position), 'other'.
CREATE OR REPLACE VIEW tokens AS
SELECT run_id, case_id, position, token_id, token, segment
FROM read_parquet(getvariable('warehouse') || '/tokens/**/*.parquet', union_by_name = true)
JOIN _live USING (run_id, case_id, batch_id);

-- Exact rank of the gradient dL/dW of each MLP matrix (ff1, ff1_gate, ff2), computed from the
-- spanning sets. Lemma 4.1: rank <= n_tokens; the last layer's MLP gradient is rank 1.
CREATE OR REPLACE VIEW gradient_ranks AS
SELECT run_id, case_id, layer, matrix, rank, n_tokens
FROM read_parquet(getvariable('warehouse') || '/gradient_ranks/**/*.parquet', union_by_name = true)
JOIN _live USING (run_id, case_id, batch_id);

-- Logit-lens projections (final norm, then unembedding) of the spanning vectors.
-- site 'ff1_input' = x_i entering FF1 (the paper's "imprint"); site 'ff2_vjp' = delta_i at FF2's
-- output (the "shift": target_new shows up among the least probable tokens, i.e. bottom_*).
-- *_rank: rank of the token among all V logits, 0 = most probable, V-1 = least probable.
CREATE OR REPLACE VIEW projections AS
SELECT run_id, case_id, layer, site, position, segment, norm,
       top_ids, top_tokens, top_logits, bottom_ids, bottom_tokens, bottom_logits,
       target_new_rank, target_true_rank
FROM read_parquet(getvariable('warehouse') || '/projections/**/*.parquet', union_by_name = true)
JOIN _live USING (run_id, case_id, batch_id);

-- Raw spanning vectors (when extracted with --vectors spanning|all). For a matrix W applied at
-- positions i: dL/dW = sum_i outer(input_i, vjp_i). Sites: ff1_input, ff2_vjp (+ ff1_vjp,
-- ff1_gate_vjp, ff2_input with --vectors all).
CREATE OR REPLACE VIEW vectors AS
SELECT run_id, case_id, layer, site, position, vector
FROM read_parquet(getvariable('warehouse') || '/vectors/**/*.parquet', union_by_name = true)
JOIN _live USING (run_id, case_id, batch_id);

-- Records that were skipped or failed: which case, which field, why. A run never stops for one.
CREATE OR REPLACE VIEW errors AS
SELECT DISTINCT run_id, case_id, stage, field, message, source
FROM read_parquet(getvariable('warehouse') || '/errors/**/*.parquet', union_by_name = true)
WHERE batch_id IN (SELECT batch_id FROM _commits);

-- Knowledge-editing results, one row per (run, case, method, layer, lr); see blens edit.
CREATE OR REPLACE VIEW edit_results AS
SELECT * EXCLUDE (batch_id, committed_at)
FROM (
  SELECT e.*, c.committed_at
  FROM read_parquet(getvariable('warehouse') || '/edit_results/**/*.parquet', union_by_name = true) AS e
  JOIN _commits AS c USING (run_id, batch_id)
)
QUALIFY row_number() OVER (PARTITION BY run_id, case_id, method, layer, lr ORDER BY committed_at DESC) = 1;
