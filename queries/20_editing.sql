-- Knowledge editing (paper Section 7, "editing with a forward pass"): per-configuration means of the
-- per-edit rows written by `blens edit` and `blens sweep` (table edit_results).

-- One row per (run, method, model, layer, lr): means over the edits that ran without error and did not fail
-- a step-size search (converged is not false), in [0, 1].
-- method: 'none' = unedited model; 'shift' = the paper's forward-pass edit W += lr * x_n^T E[t] on FF2
--   of `layer` (lr = eta); 'shift-normalized' / 'shift-minimal' = our step-size variants (lr = c in
--   eta = c / (|x_n|^2 |E[t]|^2), resp. the margin over the smallest eta making target_new the argmax);
--   'sgd' = one gradient step W -= lr * dL/dW on the same matrix; 'rome' = ROME's rank-one update of the
--   same matrix (ROME's hyper-parameters; lr NULL).
-- efficacy            the paper's "efficacy": target_new's first token is the argmax after the edit prompt.
-- generalization      the paper's "paraphrase": the same on the rephrased prompt(s).
-- locality            the paper's "neighborhood" (neighbourhood accuracy): a neighbouring prompt's true answer
--                     is the argmax (unedited models score low here too; compare with the method = 'none' row).
-- locality_unchanged  neighbourhood preservation: the neighbouring prompt's argmax is the same token as before
--                     the edit (1 = untouched; 'none' = 1 by definition).
-- new_gt_true         ROME-style efficacy score: P(target_new) > P(target_true) on the edit prompt.
-- rephrase_new_gt_true ROME-style paraphrase score: the same on the rephrased prompt(s).
-- mean_target_new_prob / mean_target_true_prob  probabilities on the edit prompt after the edit.
-- mean_update_grad_cosine  cosine(the method's own update, -dL/dW) of that matrix: 1 for sgd; for the shift
--                     how well the forward-only edit points along the true descent direction (eta-free).
-- mean_update_norm    Frobenius norm of the update actually applied.
-- n / n_errors        edits in the means / edits that failed (see the errors view, stage 'edit').
-- n_not_converged     shift-minimal edits whose step search never made target_new the argmax (stored, flagged
--                     converged = false, kept out of every mean above; they are failed edits).
-- fluency             ROME's generation n-gram entropy (2/3 H2 + 4/3 H3, averaged; bits) of greedy continuations
--                     of the edit prompt and its paraphrases after the edit (blens.edit.fluency).
-- kind / dataset      'edit' (held-out report) or 'sweep' (tuning on the train split), and the data source.
CREATE OR REPLACE VIEW edit_summary AS
SELECT e.run_id, r.kind, r.dataset, e.method, e.model, e.layer, e.lr,
       count(*) FILTER (WHERE e.error IS NULL AND e.converged IS NOT FALSE) AS n,
       avg(e.efficacy) FILTER (WHERE e.converged IS NOT FALSE) AS efficacy,
       avg(e.generalization) FILTER (WHERE e.converged IS NOT FALSE) AS generalization,
       avg(e.locality) FILTER (WHERE e.converged IS NOT FALSE) AS locality,
       avg(e.locality_unchanged) FILTER (WHERE e.converged IS NOT FALSE) AS locality_unchanged,
       avg(e.new_gt_true) FILTER (WHERE e.converged IS NOT FALSE) AS new_gt_true,
       avg(e.rephrase_new_gt_true) FILTER (WHERE e.converged IS NOT FALSE) AS rephrase_new_gt_true,
       avg(e.update_grad_cosine) FILTER (WHERE e.converged IS NOT FALSE) AS mean_update_grad_cosine,
       avg(e.target_new_prob) FILTER (WHERE e.converged IS NOT FALSE) AS mean_target_new_prob,
       avg(e.target_true_prob) FILTER (WHERE e.converged IS NOT FALSE) AS mean_target_true_prob,
       avg(e.update_norm) FILTER (WHERE e.converged IS NOT FALSE) AS mean_update_norm,
       count(*) FILTER (WHERE e.error IS NOT NULL) AS n_errors,
       count(*) FILTER (WHERE e.error IS NULL AND e.converged IS FALSE) AS n_not_converged,
       avg(e.fluency) FILTER (WHERE e.converged IS NOT FALSE) AS fluency
FROM edit_results AS e
LEFT JOIN runs AS r USING (run_id)
GROUP BY ALL;
