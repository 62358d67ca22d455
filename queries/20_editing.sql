-- Knowledge editing (paper Section 7, "editing with a forward pass"): per-configuration means of the
-- per-edit rows written by `blens edit` and `blens sweep` (table edit_results).

-- One row per (run, method, model, layer, lr): means over the edits that ran without error, in [0, 1].
-- method: 'none' = unedited model; 'shift' = the paper's forward-pass edit W += lr * x_n^T E[t] on FF2
--   of `layer` (lr = eta); 'shift-normalized' / 'shift-minimal' = our step-size variants (lr = c in
--   eta = c / (|x_n|^2 |E[t]|^2), resp. the margin over the smallest eta making target_new the argmax);
--   'sgd' = one gradient step W -= lr * dL/dW on the same matrix.
-- efficacy            the paper's "efficacy": target_new's first token is the argmax after the edit prompt.
-- generalization      the paper's "paraphrase": the same on the rephrased prompt(s).
-- locality            the paper's "neighborhood": a neighbouring prompt's true answer is the argmax
--                     (unedited models score low here too; compare with the method = 'none' row).
-- locality_unchanged  the neighbouring prompt's argmax is the same token as before the edit (1 = untouched).
-- new_gt_true         ROME-style efficacy score: P(target_new) > P(target_true) on the edit prompt.
-- rephrase_new_gt_true ROME-style paraphrase score: the same on the rephrased prompt(s).
-- mean_target_new_prob / mean_target_true_prob  probabilities on the edit prompt after the edit.
-- mean_update_grad_cosine  cosine(shift update x_n^T E[t], -dL/dW) of that matrix: how well the
--                     forward-only edit points along the true descent direction (eta-free).
-- mean_update_norm    Frobenius norm of the update actually applied.
-- n / n_errors        edits scored / edits that failed (see the errors view, stage 'edit').
-- kind / dataset      'edit' (held-out report) or 'sweep' (tuning on the train split), and the data source.
CREATE OR REPLACE VIEW edit_summary AS
SELECT e.run_id, r.kind, r.dataset, e.method, e.model, e.layer, e.lr,
       count(*) FILTER (WHERE e.error IS NULL) AS n,
       avg(e.efficacy) AS efficacy,
       avg(e.generalization) AS generalization,
       avg(e.locality) AS locality,
       avg(e.locality_unchanged) AS locality_unchanged,
       avg(e.new_gt_true) AS new_gt_true,
       avg(e.rephrase_new_gt_true) AS rephrase_new_gt_true,
       avg(e.update_grad_cosine) AS mean_update_grad_cosine,
       avg(e.target_new_prob) AS mean_target_new_prob,
       avg(e.target_true_prob) AS mean_target_true_prob,
       avg(e.update_norm) AS mean_update_norm,
       count(*) FILTER (WHERE e.error IS NOT NULL) AS n_errors
FROM edit_results AS e
LEFT JOIN runs AS r USING (run_id)
GROUP BY ALL;
