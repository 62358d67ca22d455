-- Analysis views: the paper's figures as SQL (Katz, Belinkov, Geva, Wolf, "Backward Lens", EMNLP 2024; figure
-- numbers are the EMNLP version's), stored in the warehouse's catalog (they work from any DuckDB session that
-- attached the warehouse; see `blens init-sql`). The tables themselves (prompts, tokens, gradient_ranks,
-- projections, vectors, vjp_similarity, errors, runs, models, edit_results) hold each result key once, so these
-- views need no de-duplication. layer_frac = layer / (n_layers - 1) puts models of different depth on one axis
-- (0 = first block, 1 = last).
--
-- Settings never mix: every result row carries `settings`, the id of the result settings it was computed under
-- (top-k, loss, lens, sites, result format; JSON in the `settings` table), and every view groups by model AND
-- settings. A warehouse that holds one model under two settings (say --top-k 10 and --top-k 20) shows two rows
-- per layer, never their average: filter with WHERE settings = '...'.

-- Figure 3: share of prompts whose gradient rank equals the prompt length, per layer and matrix (MLP: ff1,
-- ff1_gate, ff2; attention: attn_q, attn_k, attn_v, attn_o; Lemma 4.1 holds for every one of them).
-- rate = 1.0 means every prompt's gradient is full rank n (the spanning set is independent);
-- the last layer's rate is ~0 because only the last position's VJP is non-zero there (rank 1).
CREATE OR REPLACE VIEW rank_equals_length AS
WITH depth AS (SELECT model, max(layer) + 1 AS n_layers FROM gradient_ranks GROUP BY model)
SELECT g.model, g.layer, g.matrix,
       count(*) AS n,
       avg(CASE WHEN g.rank = g.n_tokens THEN 1.0 ELSE 0.0 END) AS rate,
       avg(g.rank) AS mean_rank,
       avg(g.n_tokens) AS mean_n_tokens,
       g.layer / greatest(d.n_layers - 1, 1) AS layer_frac,
       g.settings
FROM gradient_ranks AS g
JOIN depth AS d ON d.model = g.model
GROUP BY g.model, g.settings, g.layer, g.matrix, d.n_layers;

-- Figure 6: where target_new lands in the logit lens of each site, by layer, at the last position
-- versus all other positions. For ff2_vjp the paper finds target_new among the LEAST probable tokens
-- (rank near vocab_size - 1) at the last position of the upper layers. Zero vectors (a position that
-- cannot affect the loss) have no direction to rank and are left out.
-- Spread: q25_/q75_ are the quartiles of each rank over prompts (the median is the middle one);
-- target_true_in_bottom_k is the same share as target_new_in_bottom_k for the true object (the control);
-- vocab_size is V (ranks run 0..V-1): from the models table, else the largest rank seen + 1 (a lower bound).
-- model_answer_*: the same readings for the model's own answer (the argmax of the unedited model at the last
-- position; NULL for results older than schema 4). Split by token role and by whether the model answered
-- correctly: view target_rank_by_role.
-- The shares read the membership flags stored with each projection (target in top_ids / bottom_ids), so this
-- view reads narrow columns of projections only: no join with prompts, no scan of the id lists.
CREATE OR REPLACE VIEW target_rank_by_layer AS
WITH agg AS (
         SELECT x.model, x.settings, x.site, x.layer,
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
                avg(x.model_answer_rank) AS mean_model_answer_rank,
                median(x.model_answer_rank) AS median_model_answer_rank,
                avg(x.model_answer_in_top_k::DOUBLE) AS model_answer_in_top_k,
                avg(x.model_answer_in_bottom_k::DOUBLE) AS model_answer_in_bottom_k,
                max(greatest(x.target_new_rank, x.target_true_rank)) + 1 AS ranks_seen
         FROM projections AS x
         WHERE NOT x.zero_vector
         GROUP BY x.model, x.settings, x.site, x.layer, position_kind),
     depth AS (SELECT model, max(layer) + 1 AS n_layers, max(ranks_seen) AS ranks_seen FROM agg GROUP BY model),
     vocab AS (SELECT model, max(vocab_size) AS vocab_size FROM models GROUP BY model)
SELECT a.model, a.site, a.layer, a.position_kind, a.n,
       a.mean_target_new_rank, a.q_new[2] AS median_target_new_rank,
       a.mean_target_true_rank, a.q_true[2] AS median_target_true_rank,
       a.target_new_in_bottom_k, a.target_new_in_top_k, a.layer / greatest(d.n_layers - 1, 1) AS layer_frac,
       a.q_new[1] AS q25_target_new_rank, a.q_new[3] AS q75_target_new_rank,
       a.q_true[1] AS q25_target_true_rank, a.q_true[3] AS q75_target_true_rank,
       a.target_true_in_bottom_k, coalesce(v.vocab_size, d.ranks_seen) AS vocab_size,
       a.settings, a.mean_model_answer_rank, a.median_model_answer_rank, a.model_answer_in_top_k,
       a.model_answer_in_bottom_k
FROM agg AS a
JOIN depth AS d ON d.model = a.model
LEFT JOIN vocab AS v ON v.model = a.model;

-- Figures 6, 19 and 20 by token role and by the model's own answer: target_new's, target_true's and the model's
-- answer's rank in each site's logit lens, per layer, token role (ROME's causal-tracing segmentation, see
-- tokens.role) and model_answer_is_true (true: the unedited model's argmax at the last position is target_true's
-- first token, the paper's "correct prediction" split; NULL for results older than schema 4). Zero vectors are
-- left out. The shares *_in_bottom_k say how often the token is among the k least probable.
CREATE OR REPLACE VIEW target_rank_by_role AS
WITH agg AS (
         SELECT x.model, x.settings, x.site, x.layer, x.role, p.model_answer_is_true,
                count(*) AS n,
                avg(x.target_new_rank) AS mean_target_new_rank,
                median(x.target_new_rank) AS median_target_new_rank,
                avg(x.target_true_rank) AS mean_target_true_rank,
                median(x.target_true_rank) AS median_target_true_rank,
                avg(x.model_answer_rank) AS mean_model_answer_rank,
                median(x.model_answer_rank) AS median_model_answer_rank,
                avg(x.target_new_in_bottom_k::DOUBLE) AS target_new_in_bottom_k,
                avg(x.target_true_in_bottom_k::DOUBLE) AS target_true_in_bottom_k,
                avg(x.model_answer_in_bottom_k::DOUBLE) AS model_answer_in_bottom_k,
                avg(x.model_answer_in_top_k::DOUBLE) AS model_answer_in_top_k
         FROM projections AS x
         JOIN prompts AS p ON p.key = x.key
         WHERE NOT x.zero_vector
         GROUP BY ALL),
     depth AS (SELECT model, max(layer) + 1 AS n_layers FROM agg GROUP BY model)
SELECT a.model, a.settings, a.site, a.layer, a.role, a.model_answer_is_true, a.n,
       a.mean_target_new_rank, a.median_target_new_rank, a.mean_target_true_rank, a.median_target_true_rank,
       a.mean_model_answer_rank, a.median_model_answer_rank, a.target_new_in_bottom_k, a.target_true_in_bottom_k,
       a.model_answer_in_bottom_k, a.model_answer_in_top_k, a.layer / greatest(d.n_layers - 1, 1) AS layer_frac
FROM agg AS a
JOIN depth AS d ON d.model = a.model;

-- Mean L2 norm of the spanning vectors by layer and coarse token segment (subject / last / other). Kept for
-- compatibility; Figure 5 is vjp_norm_by_role. What our data shows here: on SmolLM2 and Gemma 3 the subject
-- segment comes out LOWEST, because it averages the first and middle subject pieces in with the last one, and
-- the first position (where most CounterFact subjects start) carries ~10x smaller VJP norms from the middle
-- layers on. The paper's reading (the norm peaks at the last subject token early and at the last token later)
-- needs the finer roles.
CREATE OR REPLACE VIEW vjp_norm_by_segment AS
WITH agg AS (SELECT model, settings, site, layer, segment, count(*) AS n, avg(norm) AS mean_norm,
                    median(norm) AS median_norm
             FROM projections GROUP BY model, settings, site, layer, segment),
     depth AS (SELECT model, max(layer) + 1 AS n_layers FROM agg GROUP BY model)  -- one scan of projections
SELECT a.model, a.site, a.layer, a.segment, a.n, a.mean_norm, a.median_norm,
       a.layer / greatest(d.n_layers - 1, 1) AS layer_frac, a.settings
FROM agg AS a
JOIN depth AS d ON d.model = a.model;

-- Figure 5: mean L2 norm of each site's vectors by layer and token role (ROME's causal-tracing segmentation:
-- bos, before_subject, first_subject, middle_subject, last_subject, first_subsequent, further, last). The paper
-- finds the FF2 VJP norm largest at the last subject token in the early layers and at the last token in the
-- later ones. Every lens site is here: ff1_input (imprint), ff2_vjp (shift), attn_vjp (the attention output's
-- VJP), and Gemma's resid_post_vjp (the residual-stream gradient, GPT-2's FF2 output VJP's counterpart).
CREATE OR REPLACE VIEW vjp_norm_by_role AS
WITH agg AS (SELECT model, settings, site, layer, role, count(*) AS n, avg(norm) AS mean_norm,
                    median(norm) AS median_norm
             FROM projections GROUP BY model, settings, site, layer, role),
     depth AS (SELECT model, max(layer) + 1 AS n_layers FROM agg GROUP BY model)
SELECT a.model, a.settings, a.site, a.layer, a.role, a.n, a.mean_norm, a.median_norm,
       a.layer / greatest(d.n_layers - 1, 1) AS layer_frac
FROM agg AS a
JOIN depth AS d ON d.model = a.model;

-- Appendix G: how similar the last position's VJPs of two layers are: the mean over prompts of the cosine
-- between the VJP at layer_a and at layer_b (1 on the diagonal), per VJP site (ff2_vjp, attn_vjp, and
-- resid_post_vjp where the family has it). Computed at extraction into table vjp_similarity, so it needs no
-- stored vectors. Pairs with a zero vector have no cosine and are left out.
CREATE OR REPLACE VIEW vjp_layer_similarity AS
WITH pairs AS (SELECT model, settings, site, layer AS layer_a, unnest(range(len(cosines))) AS layer_b,
                      unnest(cosines) AS cosine
               FROM vjp_similarity)
SELECT model, settings, site, layer_a::INTEGER AS layer_a, layer_b::INTEGER AS layer_b, count(cosine) AS n,
       avg(cosine) AS mean_cosine
FROM pairs
GROUP BY ALL;

-- The settings id holding the most prompts of each model (ties: the smallest id): what the report and the dataset
-- card draw by default, so a figure shows one setting per model. Other settings stay queryable in every view.
CREATE OR REPLACE VIEW main_settings AS
WITH counts AS (SELECT model, settings, count(*) AS n FROM prompts GROUP BY ALL)
SELECT model, first(settings ORDER BY n DESC, settings) AS settings, max(n) AS n_prompts
FROM counts
GROUP BY model;
