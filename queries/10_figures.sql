-- Analysis views: the paper's figures as SQL, stored in the warehouse's catalog (they work from any
-- DuckDB session that attached the warehouse; see `blens init-sql`). The tables themselves (prompts,
-- tokens, gradient_ranks, projections, vectors, errors, runs, models, edit_results) hold each result
-- key once, so these views need no de-duplication. layer_frac = layer / (n_layers - 1) puts models of
-- different depth on one axis (0 = first block, 1 = last).

-- Figure 3: share of prompts whose gradient rank equals the prompt length, per layer and matrix.
-- rate = 1.0 means every prompt's gradient is full rank n (the spanning set is independent);
-- the last layer's rate is ~0 because only the last position's VJP is non-zero there (rank 1).
CREATE OR REPLACE VIEW rank_equals_length AS
WITH depth AS (SELECT model, max(layer) + 1 AS n_layers FROM gradient_ranks GROUP BY model)
SELECT g.model, g.layer, g.matrix,
       count(*) AS n,
       avg(CASE WHEN g.rank = g.n_tokens THEN 1.0 ELSE 0.0 END) AS rate,
       avg(g.rank) AS mean_rank,
       avg(g.n_tokens) AS mean_n_tokens,
       g.layer / greatest(d.n_layers - 1, 1) AS layer_frac
FROM gradient_ranks AS g
JOIN depth AS d ON d.model = g.model
GROUP BY g.model, g.layer, g.matrix, d.n_layers;

-- Figure 6: where target_new lands in the logit lens of each site, by layer, at the last position
-- versus all other positions. For ff2_vjp the paper finds target_new among the LEAST probable tokens
-- (rank near vocab_size - 1) at the last position of the upper layers. Zero vectors (a position that
-- cannot affect the loss) have no direction to rank and are left out.
-- Spread: q25_/q75_ are the quartiles of each rank over prompts (the median is the middle one);
-- target_true_in_bottom_k is the same share as target_new_in_bottom_k for the true object (the control);
-- vocab_size is V (ranks run 0..V-1): from the models table, else the largest rank seen + 1 (a lower bound).
-- The shares read the membership flags stored with each projection (target in top_ids / bottom_ids), so this
-- view reads narrow columns of projections only: no join with prompts, no scan of the id lists.
CREATE OR REPLACE VIEW target_rank_by_layer AS
WITH agg AS (
         SELECT x.model, x.site, x.layer,
                CASE WHEN x.segment = 'last' THEN 'last' ELSE 'not_last' END AS position_kind,
                count(*) AS n,
                avg(x.target_new_rank) AS mean_target_new_rank,
                -- one sort per rank column for its three quartiles (median = the middle one)
                quantile_cont(x.target_new_rank, [0.25, 0.5, 0.75]) AS q_new,
                avg(x.target_true_rank) AS mean_target_true_rank,
                quantile_cont(x.target_true_rank, [0.25, 0.5, 0.75]) AS q_true,
                avg(x.target_new_in_bottom_k::DOUBLE) AS target_new_in_bottom_k,
                avg(x.target_new_in_top_k::DOUBLE) AS target_new_in_top_k,
                avg(x.target_true_in_bottom_k::DOUBLE) AS target_true_in_bottom_k,
                max(greatest(x.target_new_rank, x.target_true_rank)) + 1 AS ranks_seen
         FROM projections AS x
         WHERE NOT x.zero_vector
         GROUP BY x.model, x.site, x.layer, position_kind),
     depth AS (SELECT model, max(layer) + 1 AS n_layers, max(ranks_seen) AS ranks_seen FROM agg GROUP BY model),
     vocab AS (SELECT model, max(vocab_size) AS vocab_size FROM models GROUP BY model)
SELECT a.model, a.site, a.layer, a.position_kind, a.n,
       a.mean_target_new_rank, a.q_new[2] AS median_target_new_rank,
       a.mean_target_true_rank, a.q_true[2] AS median_target_true_rank,
       a.target_new_in_bottom_k, a.target_new_in_top_k, a.layer / greatest(d.n_layers - 1, 1) AS layer_frac,
       a.q_new[1] AS q25_target_new_rank, a.q_new[3] AS q75_target_new_rank,
       a.q_true[1] AS q25_target_true_rank, a.q_true[3] AS q75_target_true_rank,
       a.target_true_in_bottom_k, coalesce(v.vocab_size, d.ranks_seen) AS vocab_size
FROM agg AS a
JOIN depth AS d ON d.model = a.model
LEFT JOIN vocab AS v ON v.model = a.model;

-- Figure 5: mean L2 norm of the spanning vectors by layer and token segment. For ff2_vjp the norm
-- concentrates on the subject tokens and the last token.
CREATE OR REPLACE VIEW vjp_norm_by_segment AS
WITH agg AS (SELECT model, site, layer, segment, count(*) AS n, avg(norm) AS mean_norm, median(norm) AS median_norm
             FROM projections GROUP BY model, site, layer, segment),
     depth AS (SELECT model, max(layer) + 1 AS n_layers FROM agg GROUP BY model)  -- one scan of projections
SELECT a.model, a.site, a.layer, a.segment, a.n, a.mean_norm, a.median_norm,
       a.layer / greatest(d.n_layers - 1, 1) AS layer_frac
FROM agg AS a
JOIN depth AS d ON d.model = a.model;
