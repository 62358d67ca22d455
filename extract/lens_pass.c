/* One pass over a block of logit-lens logits, fused: group extremes and target-rank counts.
 *
 * The CPU lens (extract/lens_fused.py) computes a block of R vectors against the whole vocabulary as
 * W @ h^T, a (V, R) buffer with the vocabulary as rows. What it needs from those logits, per vector r:
 *   - the max and the min of each group of `group` consecutive tokens (for the exact top-k / bottom-k of
 *     extract/extremes.py: the k groups with the largest maxima hold the k largest logits);
 *   - for each target j, the count #{v : logit[v, r] > t[j, r]} (the target's rank, 0 = most probable).
 * torch can only do these as separate passes over the buffer (max, min, then a compare and a sum per
 * target), each reading 100 MB for R = 512; here every logit is loaded once, and max, min and one compare
 * per target run on it in AVX2 registers, eight vectors at a time (the counts of up to four targets stay in
 * registers too: with the extraction's three, 0.14 s instead of 0.24 s for 6,144 SmolLM2 vectors).
 *
 * The comparisons are IEEE `>` on the very fp32 values the GEMM wrote (_CMP_GT_OQ: false when either side
 * is NaN, as torch.gt). The caller only sends finite logits here (extract/lens_fused.py checks the
 * inputs), so max and min need no NaN rule.
 *
 * Built once per machine by extract/native.py (cc -O3 -mavx2 -mfma -shared), called through ctypes; the
 * caller splits the rows [0, R) across threads (ctypes releases the GIL), so the pass takes no lock.
 */
#include <immintrin.h>
#include <stdint.h>

/* buf: (V, R) logits, row v = token v. For rows r in [r0, r1):
 *   gmax, gmin (V / group, R): max / min over each full group of `group` tokens (a shorter last group,
 *     V % group tokens, is left to the caller, which always keeps it as a candidate);
 *   counts (nt, R) int32: += #{v in [0, V): buf[v, r] > t[j, r]} for each target j < nt. */
/* One group of `group` tokens for eight rows at r, with NT targets held in registers (NT = 1..4). */
#define GROUP_KERNEL(NT)                                                                                       \
    static void group8_##NT(const float *base, int64_t R, int64_t r, int64_t group, const float *t,           \
                            float *gmax, float *gmin, int32_t *counts)                                         \
    {                                                                                                          \
        __m256 tj[NT];                                                                                         \
        __m256i cj[NT];                                                                                        \
        for (int j = 0; j < NT; j++) {                                                                         \
            tj[j] = _mm256_loadu_ps(t + j * R + r);                                                            \
            cj[j] = _mm256_loadu_si256((const __m256i *)(counts + j * R + r));                                 \
        }                                                                                                      \
        __m256 mx = _mm256_loadu_ps(base + r), mn = mx;                                                        \
        for (int64_t v = 0; v < group; v++) {                                                                  \
            const __m256 x = _mm256_loadu_ps(base + v * R + r);                                                \
            mx = _mm256_max_ps(mx, x);                                                                         \
            mn = _mm256_min_ps(mn, x);                                                                         \
            for (int j = 0; j < NT; j++) /* a true compare is all ones (-1 as an int32): subtracting adds 1 */ \
                cj[j] = _mm256_sub_epi32(cj[j], _mm256_castps_si256(_mm256_cmp_ps(x, tj[j], _CMP_GT_OQ)));     \
        }                                                                                                      \
        for (int j = 0; j < NT; j++)                                                                           \
            _mm256_storeu_si256((__m256i *)(counts + j * R + r), cj[j]);                                       \
        _mm256_storeu_ps(gmax + r, mx);                                                                        \
        _mm256_storeu_ps(gmin + r, mn);                                                                        \
    }
GROUP_KERNEL(1)
GROUP_KERNEL(2)
GROUP_KERNEL(3)
GROUP_KERNEL(4)

/* Any number of targets: counts through memory (slower; the extraction sends 3: target_new, target_true and
 * the model's answer, which the kernels above keep in registers). */
static void group8_any(const float *base, int64_t R, int64_t r, int64_t group, const float *t, int64_t nt,
                       float *gmax, float *gmin, int32_t *counts)
{
    __m256 mx = _mm256_loadu_ps(base + r), mn = mx;
    for (int64_t v = 0; v < group; v++) {
        const __m256 x = _mm256_loadu_ps(base + v * R + r);
        mx = _mm256_max_ps(mx, x);
        mn = _mm256_min_ps(mn, x);
        for (int64_t j = 0; j < nt; j++) {
            __m256i *c = (__m256i *)(counts + j * R + r);
            const __m256 gt = _mm256_cmp_ps(x, _mm256_loadu_ps(t + j * R + r), _CMP_GT_OQ);
            _mm256_storeu_si256(c, _mm256_sub_epi32(_mm256_loadu_si256(c), _mm256_castps_si256(gt)));
        }
    }
    _mm256_storeu_ps(gmax + r, mx);
    _mm256_storeu_ps(gmin + r, mn);
}

/* buf: (V, R) logits, row v = token v. For rows r in [r0, r1):
 *   gmax, gmin (V / group, R): max / min over each full group of `group` tokens (a shorter last group,
 *     V % group tokens, is left to the caller, which always keeps it as a candidate);
 *   counts (nt, R) int32: += #{v in [0, V): buf[v, r] > t[j, r]} for each target j < nt. */
void lens_pass(const float *buf, int64_t V, int64_t R, int64_t r0, int64_t r1, int64_t group,
               const float *t, int64_t nt, float *gmax, float *gmin, int32_t *counts)
{
    const int64_t G = V / group;
    const int64_t r8 = r0 + (r1 - r0) / 8 * 8; /* rows [r0, r8) eight at a time, [r8, r1) one at a time */
    for (int64_t g = 0; g < G; g++) {
        const float *base = buf + g * group * R; /* group g: `group` rows of R floats, 128 KB for R = 512 */
        float *gx = gmax + g * R, *gn = gmin + g * R;
        for (int64_t r = r0; r < r8; r += 8) {
            switch (nt) {
            case 1: group8_1(base, R, r, group, t, gx, gn, counts); break;
            case 2: group8_2(base, R, r, group, t, gx, gn, counts); break;
            case 3: group8_3(base, R, r, group, t, gx, gn, counts); break;
            case 4: group8_4(base, R, r, group, t, gx, gn, counts); break;
            default: group8_any(base, R, r, group, t, nt, gx, gn, counts);
            }
        }
        for (int64_t r = r8; r < r1; r++) { /* rows beyond the last multiple of eight */
            float mx = base[r], mn = base[r];
            for (int64_t v = 0; v < group; v++) {
                const float x = base[v * R + r];
                mx = x > mx ? x : mx;
                mn = x < mn ? x : mn;
                for (int64_t j = 0; j < nt; j++)
                    counts[j * R + r] += x > t[j * R + r];
            }
            gx[r] = mx;
            gn[r] = mn;
        }
    }
    for (int64_t v = G * group; v < V; v++) /* the shorter last group: counts only */
        for (int64_t r = r0; r < r1; r++)
            for (int64_t j = 0; j < nt; j++)
                counts[j * R + r] += buf[v * R + r] > t[j * R + r];
}
