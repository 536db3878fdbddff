/* Fused CPU kernels of byom_lab.merging, for contiguous float32 tensors (see native.py).
 *
 * Each kernel does in one pass what the eager path does in several: it reads θ0 (or an anchor)
 * and the fine-tuned values once, forms v = θ_t − θ0 in registers and never writes a task vector.
 * Arithmetic follows the eager path operation by operation (float32, same order, no contraction),
 * so both paths give the same bits.
 *
 * A magnitude key is the bit pattern of |v| read as a non-negative int32: it orders like |v|.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLOCK 1024 /* entries per selection block (its buffers are checked once per block) */
#define W 8        /* lanes of one vector (GCC/Clang vector extensions; split where narrower) */

typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

static const vi LANE = {0, 1, 2, 3, 4, 5, 6, 7};
#define FINITE_KEY 0x7f7fffff /* the largest key of a finite float; above it: Inf, NaN */

/* The first w (<= W) floats at p; lanes from w on are 0. */
static inline vf load(const float *p, int w)
{
    vf x = {0};
    memcpy(&x, p, sizeof(float) * (size_t)w);
    return x;
}

static inline void store(float *p, vf x, int w) { memcpy(p, &x, sizeof(float) * (size_t)w); }

static inline vi magnitude_keys(vf v) { return (vi)v & 0x7fffffff; }

static inline vf where(vi mask, vf x) { return (vf)(mask & (vi)x); } /* mask ? x : +0 */

static inline vf choose(vi mask, vf x, vf y) { return (vf)((mask & (vi)x) | (~mask & (vi)y)); }

static inline int any(vi mask)
{
#ifdef __AVX__
    return !_mm256_testz_si256((__m256i)mask, (__m256i)mask);
#endif
    uint64_t part[W / 2];
    memcpy(part, &mask, sizeof part);
    uint64_t all = 0;
    for (int j = 0; j < W / 2; j++)
        all |= part[j];
    return all != 0;
}

static inline int64_t lane_sum(vi x)
{
    int64_t total = 0;
    for (int j = 0; j < W; j++)
        total += x[j];
    return total;
}

#ifdef __AVX2__
/* PACK[mask]: the indices of the set lanes of mask, one per byte from the lowest, then zeros. */
static const uint64_t PACK[256] = {
    0x0000000000000000, 0x0000000000000000, 0x0000000000000001, 0x0000000000000100,
    0x0000000000000002, 0x0000000000000200, 0x0000000000000201, 0x0000000000020100,
    0x0000000000000003, 0x0000000000000300, 0x0000000000000301, 0x0000000000030100,
    0x0000000000000302, 0x0000000000030200, 0x0000000000030201, 0x0000000003020100,
    0x0000000000000004, 0x0000000000000400, 0x0000000000000401, 0x0000000000040100,
    0x0000000000000402, 0x0000000000040200, 0x0000000000040201, 0x0000000004020100,
    0x0000000000000403, 0x0000000000040300, 0x0000000000040301, 0x0000000004030100,
    0x0000000000040302, 0x0000000004030200, 0x0000000004030201, 0x0000000403020100,
    0x0000000000000005, 0x0000000000000500, 0x0000000000000501, 0x0000000000050100,
    0x0000000000000502, 0x0000000000050200, 0x0000000000050201, 0x0000000005020100,
    0x0000000000000503, 0x0000000000050300, 0x0000000000050301, 0x0000000005030100,
    0x0000000000050302, 0x0000000005030200, 0x0000000005030201, 0x0000000503020100,
    0x0000000000000504, 0x0000000000050400, 0x0000000000050401, 0x0000000005040100,
    0x0000000000050402, 0x0000000005040200, 0x0000000005040201, 0x0000000504020100,
    0x0000000000050403, 0x0000000005040300, 0x0000000005040301, 0x0000000504030100,
    0x0000000005040302, 0x0000000504030200, 0x0000000504030201, 0x0000050403020100,
    0x0000000000000006, 0x0000000000000600, 0x0000000000000601, 0x0000000000060100,
    0x0000000000000602, 0x0000000000060200, 0x0000000000060201, 0x0000000006020100,
    0x0000000000000603, 0x0000000000060300, 0x0000000000060301, 0x0000000006030100,
    0x0000000000060302, 0x0000000006030200, 0x0000000006030201, 0x0000000603020100,
    0x0000000000000604, 0x0000000000060400, 0x0000000000060401, 0x0000000006040100,
    0x0000000000060402, 0x0000000006040200, 0x0000000006040201, 0x0000000604020100,
    0x0000000000060403, 0x0000000006040300, 0x0000000006040301, 0x0000000604030100,
    0x0000000006040302, 0x0000000604030200, 0x0000000604030201, 0x0000060403020100,
    0x0000000000000605, 0x0000000000060500, 0x0000000000060501, 0x0000000006050100,
    0x0000000000060502, 0x0000000006050200, 0x0000000006050201, 0x0000000605020100,
    0x0000000000060503, 0x0000000006050300, 0x0000000006050301, 0x0000000605030100,
    0x0000000006050302, 0x0000000605030200, 0x0000000605030201, 0x0000060503020100,
    0x0000000000060504, 0x0000000006050400, 0x0000000006050401, 0x0000000605040100,
    0x0000000006050402, 0x0000000605040200, 0x0000000605040201, 0x0000060504020100,
    0x0000000006050403, 0x0000000605040300, 0x0000000605040301, 0x0000060504030100,
    0x0000000605040302, 0x0000060504030200, 0x0000060504030201, 0x0006050403020100,
    0x0000000000000007, 0x0000000000000700, 0x0000000000000701, 0x0000000000070100,
    0x0000000000000702, 0x0000000000070200, 0x0000000000070201, 0x0000000007020100,
    0x0000000000000703, 0x0000000000070300, 0x0000000000070301, 0x0000000007030100,
    0x0000000000070302, 0x0000000007030200, 0x0000000007030201, 0x0000000703020100,
    0x0000000000000704, 0x0000000000070400, 0x0000000000070401, 0x0000000007040100,
    0x0000000000070402, 0x0000000007040200, 0x0000000007040201, 0x0000000704020100,
    0x0000000000070403, 0x0000000007040300, 0x0000000007040301, 0x0000000704030100,
    0x0000000007040302, 0x0000000704030200, 0x0000000704030201, 0x0000070403020100,
    0x0000000000000705, 0x0000000000070500, 0x0000000000070501, 0x0000000007050100,
    0x0000000000070502, 0x0000000007050200, 0x0000000007050201, 0x0000000705020100,
    0x0000000000070503, 0x0000000007050300, 0x0000000007050301, 0x0000000705030100,
    0x0000000007050302, 0x0000000705030200, 0x0000000705030201, 0x0000070503020100,
    0x0000000000070504, 0x0000000007050400, 0x0000000007050401, 0x0000000705040100,
    0x0000000007050402, 0x0000000705040200, 0x0000000705040201, 0x0000070504020100,
    0x0000000007050403, 0x0000000705040300, 0x0000000705040301, 0x0000070504030100,
    0x0000000705040302, 0x0000070504030200, 0x0000070504030201, 0x0007050403020100,
    0x0000000000000706, 0x0000000000070600, 0x0000000000070601, 0x0000000007060100,
    0x0000000000070602, 0x0000000007060200, 0x0000000007060201, 0x0000000706020100,
    0x0000000000070603, 0x0000000007060300, 0x0000000007060301, 0x0000000706030100,
    0x0000000007060302, 0x0000000706030200, 0x0000000706030201, 0x0000070603020100,
    0x0000000000070604, 0x0000000007060400, 0x0000000007060401, 0x0000000706040100,
    0x0000000007060402, 0x0000000706040200, 0x0000000706040201, 0x0000070604020100,
    0x0000000007060403, 0x0000000706040300, 0x0000000706040301, 0x0000070604030100,
    0x0000000706040302, 0x0000070604030200, 0x0000070604030201, 0x0007060403020100,
    0x0000000000070605, 0x0000000007060500, 0x0000000007060501, 0x0000000706050100,
    0x0000000007060502, 0x0000000706050200, 0x0000000706050201, 0x0000070605020100,
    0x0000000007060503, 0x0000000706050300, 0x0000000706050301, 0x0000070605030100,
    0x0000000706050302, 0x0000070605030200, 0x0000070605030201, 0x0007060503020100,
    0x0000000007060504, 0x0000000706050400, 0x0000000706050401, 0x0000070605040100,
    0x0000000706050402, 0x0000070605040200, 0x0000070605040201, 0x0007060504020100,
    0x0000000706050403, 0x0000070605040300, 0x0000070605040301, 0x0007060504030100,
    0x0000070605040302, 0x0007060504030200, 0x0007060504030201, 0x0706050403020100,
};
#endif

/* One task's state in a selection pass (native.py's TaskScan); the caller owns the buffers. */
struct task_scan {
    int32_t low, high;              /* the guessed window of keys */
    int64_t above;                  /* entries with key > high so far */
    int32_t *window;                /* keys in [low, high], in order */
    int64_t window_cap, window_len;
    int32_t *pos;                   /* candidates (key >= low): tensor-local index, sign bit set when the key */
    float *values;                  /* is in the window (it is then the next window key); m[i]. NULL: none */
    int64_t cap, len;
    int32_t nonfinite;              /* set when some v was NaN or infinite */
};

/* One vector of a selection pass: `lanes` entries from i. */
static inline void select_lanes(struct task_scan *s, const float *m, const float *b, int64_t i, int lanes,
                                vi *count, vi *nonfinite)
{
    const vf value = load(m + i, lanes);
    const vi key = magnitude_keys(value - load(b + i, lanes)), valid = LANE < lanes;
    const vi over = (key > s->high) & valid, kept = (key >= s->low) & valid, inside = kept & ~over;
    *count -= over;
    *nonfinite |= key > FINITE_KEY;
    if (any(inside))
        for (int j = 0; j < lanes; j++)
            if (inside[j])
                s->window[s->window_len++] = key[j];
    if (!s->pos)
        return;
#ifdef __AVX2__
    /* left-pack the kept lanes with one permutation per vector (no branch: about half the vectors keep some) */
    const int mask = _mm256_movemask_ps((__m256)kept);
    const __m256i order = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)PACK[mask]));
    const vi index = (LANE + (int32_t)i) | (inside & INT32_MIN);
    _mm256_storeu_si256((__m256i *)(s->pos + s->len), _mm256_permutevar8x32_epi32((__m256i)index, order));
    _mm256_storeu_ps(s->values + s->len, _mm256_permutevar8x32_ps((__m256)value, order));
    s->len += __builtin_popcount((unsigned)mask);
#else
    if (!any(kept))
        return;
    for (int j = 0; j < lanes; j++) {
        s->pos[s->len] = (int32_t)(i + j) | (inside[j] & INT32_MIN);
        s->values[s->len] = value[j];
        s->len += kept[j] != 0;
    }
#endif
}

/* One selection pass over v_t = models[t][i] − b[i] for i in [start, start + n), every task at once
 * (b is read once for all of them).
 *
 * Per task: adds to `above` the number of keys > high and appends the keys in [low, high] to
 * `window`; when `pos` is set, also appends every entry with key >= low as (i, models[t][i]),
 * i's sign bit set when its key went to the window;
 * sets `nonfinite` when some v_t is NaN or infinite (else b and the model are proven finite there).
 * Stops at a block boundary when some task's buffer has room for less than one more block (the
 * caller hands that task fresh buffers and calls again from there). Returns the entries processed.
 */
int64_t bl_select(const float *b, const float *const *models, int64_t ntask, int64_t start, int64_t n,
                  struct task_scan *tasks)
{
    int64_t i0;
    for (i0 = start; i0 < start + n; i0 += BLOCK) {
        const int64_t end = start + n - i0 < BLOCK ? start + n : i0 + BLOCK;
        int room = 1;
        for (int64_t t = 0; t < ntask; t++)
            room &= tasks[t].window_len + BLOCK <= tasks[t].window_cap
                    && (!tasks[t].pos || tasks[t].len + BLOCK + W <= tasks[t].cap);
        if (!room)
            break;
        for (int64_t t = 0; t < ntask; t++) {
            struct task_scan s = tasks[t]; /* a local copy: its fields stay in registers */
            vi count = {0}, nonfinite = {0};
            int64_t i = i0;
            for (; i + W <= end; i += W)
                select_lanes(&s, models[t], b, i, W, &count, &nonfinite);
            if (i < end)
                select_lanes(&s, models[t], b, i, (int)(end - i), &count, &nonfinite);
            s.above += lane_sum(count);
            s.nonfinite |= any(nonfinite);
            tasks[t] = s;
        }
    }
    return (i0 < start + n ? i0 : start + n) - start;
}

/* Writes the keys of v = m[i] − b[i] at i = 0, stride, 2·stride, ... < n to out; returns how many. */
int64_t bl_sample(const float *m, const float *b, int64_t n, int64_t stride, int32_t *out)
{
    int64_t c = 0;
    for (int64_t i = 0; i < n; i += stride) {
        const float v = m[i] - b[i];
        int32_t bits;
        memcpy(&bits, &v, sizeof bits);
        out[c++] = bits & 0x7fffffff;
    }
    return c;
}

/* Keeps, in place and in order, the candidates of a selection pass whose key is >= threshold
 * (>= 1), clearing the sign bits: a candidate without one lies above the window, one with it
 * takes its key from `window` (the same pass's window keys, in order). Returns how many. */
int64_t bl_compact(int32_t *pos, float *values, int64_t n, const int32_t *window, int32_t threshold)
{
    int64_t c = 0, w = 0;
    for (int64_t i = 0; i < n; i++) {
        const int32_t p = pos[i];
        int keep = 1;
        if (p < 0)
            keep = window[w++] >= threshold;
        pos[c] = p & INT32_MAX;
        values[c] = values[i];
        c += keep;
    }
    return c;
}

/* Sums of the T (trimmed) task vectors at W entries from i, combined into θ0 + lam·τ. */
static inline vi merge_lanes(const float *b, const float *const *models, int64_t ntask, int64_t i, int lanes,
                             const int32_t *keep, int consensus, int mean, float lam, float *out)
{
    vi nonfinite = {0};
    const vf one = (vf){0} + 1.0f, base = load(b + i, lanes);
    vf total = {0}, pos = {0}, sgn = {0}, cnt = {0};
    for (int64_t t = 0; t < ntask; t++) {
        vf v = load(models[t] + i, lanes) - base;
        nonfinite |= magnitude_keys(v) > FINITE_KEY;
        if (keep)
            v = where(magnitude_keys(v) >= keep[t], v);
        total += v;
        if (consensus || mean) {
            const vi up = v > 0.0f, down = v < 0.0f;
            pos += where(up, v);
            sgn += where(up, one) - where(down, one);
            cnt += where(v != 0.0f, one);
        }
    }
    vf tau = total;
    if (consensus) {
        vf p = pos, q = total - pos; /* Σ positive parts, Σ negative parts */
        if (mean) {
            const vf np = (cnt + sgn) * 0.5f, nq = (cnt - sgn) * 0.5f;
            p = p / choose(np > one, np, one);
            q = q / choose(nq > one, nq, one);
        }
        tau = choose(total < 0.0f, q, p);
    } else if (mean) {
        tau = total / choose(cnt > one, cnt, one);
    }
    store(out + i, tau * lam + base, lanes);
    return nonfinite;
}

/* out[i] = b[i] + lam·τ[i] for i in [start, start + n), τ from the T task vectors models[t] − b.
 *
 * keep (NULL: keep everything) holds, per task, the smallest key kept by trimming (>= 1, so a
 * trimmed-to-zero entry never counts). consensus: TIES sign election, γ = sign(Σ v), +1 at 0.
 * mean: divide by the number of contributing (agreeing) non-zero entries instead of summing.
 * Sums run over t in order, in float32, as the eager path's running sums do.
 * Returns 1 when some task vector entry is NaN or infinite, else 0 (b and every model proven finite).
 */
int bl_merge(const float *b, const float *const *models, int64_t ntask, int64_t start, int64_t n,
             const int32_t *keep, int consensus, int mean, float lam, float *out)
{
    vi nonfinite = {0};
    int64_t i = start;
    for (; i + W <= start + n; i += W)
        nonfinite |= merge_lanes(b, models, ntask, i, W, keep, consensus, mean, lam, out);
    if (i < start + n)
        nonfinite |= merge_lanes(b, models, ntask, i, (int)(start + n - i), keep, consensus, mean, lam, out);
    return any(nonfinite);
}
