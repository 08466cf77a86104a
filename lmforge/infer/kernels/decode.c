/* Kernels for decode steps, where torch's general-purpose ones spend more time than the work needs.
 *
 * gemv_*: one-row matrix-vector products y = (W·x) · scale + bias, W [out, in] row-major, x [in] fp32 (a few
 * rows x at once, and a few matrices W side by side).
 *
 * A batch-1 decode step reads every weight once, so its speed is the rate at which W streams from memory.
 * torch's CPU path for a 1-row matmul reached ~16-20 GB/s on the 2-core AVX2 machine lmforge is developed on;
 * these loops reach ~25-32 GB/s there (benchmarks/decode.py measures both in the same run). Each thread takes
 * blocks of ROWS output rows: ROWS independent FMA chains hide the FMA latency, and one load of x serves ROWS
 * rows. Weights in bf16 or int8 are widened to fp32 in registers, so they cost half or a quarter of fp32's bytes
 * (int8 rows carry one scale each: per-output-channel quantization, lmforge.infer.quantize).
 *
 * Built on first use by lmforge/infer/kernels/__init__.py (cc -O3 -mavx2 -mfma -fopenmp -lm); OpenMP resolves to
 * the runtime torch has loaded, so torch.set_num_threads applies here too.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define ROWS 4
/* Each thread walks ROWS short streams (a row of GPT-2's 768-wide int8 matrix is 12 cache lines): too short for
 * the hardware prefetcher to ramp up. Asking for the bytes 8 KiB ahead made int8 ~15% faster here, the others
 * no slower. */
#define PREFETCH 8192

/* The sum of eight floats. layer.c uses it too; hidden, so the library does not export it and -O3 still inlines it
 * here (an exported symbol of a -fPIC library may be interposed, which stops inlining). */
__attribute__((visibility("hidden"))) float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* Eight weights widened to fp32. */
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const uint16_t *p) {  /* bf16 is the top half of an fp32 */
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline __m256 load8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* One weight widened to fp32, for the tail of a row (in % 8) and the last rows (out % ROWS). */
static inline float load1_f32(const float *p) { return *p; }
static inline float load1_bf16(const uint16_t *p) {
    union { uint32_t u; float f; } v = {.u = (uint32_t)*p << 16};
    return v.f;
}
static inline float load1_i8(const int8_t *p) { return (float)*p; }

/* sums[j][r] = x_j · W[r0 + r] for nx (1 or 2, a constant once inlined) input rows x_j and `rows` weight rows. Two
 * input rows share every weight load and widening: a few rows (speculative verification, a small batch) cost
 * little more than one. */
#define BLOCK(NAME, T)                                                                                      \
    static inline __attribute__((always_inline)) void block_##NAME(const T *w, long r0, long rows, long in,  \
                                                                   const float *const *xs, int nx,          \
                                                                   int prefetch, float sums[2][ROWS]) {     \
        long k = 0;                                                                                         \
        for (int j = 0; j < nx; j++)                                                                        \
            for (int r = 0; r < ROWS; r++) sums[j][r] = 0.0f;                                               \
        if (rows == ROWS) {                                                                                 \
            __m256 acc[2][ROWS];                                                                            \
            for (int j = 0; j < nx; j++)                                                                    \
                for (int r = 0; r < ROWS; r++) acc[j][r] = _mm256_setzero_ps();                             \
            for (; k + 8 <= in; k += 8) {                                                                   \
                __m256 xk[2];                                                                               \
                for (int j = 0; j < nx; j++) xk[j] = _mm256_loadu_ps(xs[j] + k);                            \
                for (int r = 0; r < ROWS; r++) {                                                            \
                    if (prefetch)                                                                           \
                        _mm_prefetch((const char *)(w + (r0 + r) * in + k) + PREFETCH, _MM_HINT_T0);        \
                    __m256 wk = load8_##NAME(w + (r0 + r) * in + k);                                        \
                    for (int j = 0; j < nx; j++) acc[j][r] = _mm256_fmadd_ps(wk, xk[j], acc[j][r]);         \
                }                                                                                           \
            }                                                                                               \
            for (int j = 0; j < nx; j++)                                                                    \
                for (int r = 0; r < ROWS; r++) sums[j][r] = horizontal_sum(acc[j][r]);                      \
        }                                                                                                   \
        for (int r = 0; r < rows; r++)                                                                      \
            for (long i = k; i < in; i++) {                                                                 \
                float wi = load1_##NAME(w + (r0 + r) * in + i);                                             \
                for (int j = 0; j < nx; j++) sums[j][r] += wi * xs[j][i];                                   \
            }                                                                                               \
    }

/* Block b of matrices laid side by side: sets the matrix it falls in and that matrix's first output column; returns
 * the block's index inside that matrix. */
static inline long locate_block(const long *outs, long b, long *mat, long *col) {
    while (b >= (outs[*mat] + ROWS - 1) / ROWS) {
        b -= (outs[*mat] + ROWS - 1) / ROWS;
        *col += outs[(*mat)++];
    }
    return b;
}

/* y[m] = (W · x[m]) · scale + bias for m input rows x [m, in], over n_mats matrices W_i [outs[i], in] side by side:
 * y [m, Σ outs] holds W_0's outputs, then W_1's, ... (q, k and v of one layer in a single call: one parallel
 * region instead of three). scales[i] and biases[i] may be NULL. Each thread takes blocks of ROWS weight rows and
 * runs every input row over them while they are in cache: the weights stream from memory once. */
#define GEMV(NAME, T)                                                                                       \
    BLOCK(NAME, T)                                                                                          \
    void gemv_##NAME(long n_mats, const T *const *ws, const float *const *scales, const float *const *biases, \
                     const long *outs, const float *x, float *y, long in, long m) {                         \
        long blocks = 0, total = 0;                                                                         \
        for (long i = 0; i < n_mats; i++) blocks += (outs[i] + ROWS - 1) / ROWS, total += outs[i];          \
        _Pragma("omp parallel for schedule(static)") for (long b = 0; b < blocks; b++) {                    \
            long mat = 0, col = 0, first = locate_block(outs, b, &mat, &col);                               \
            const T *w = ws[mat];                                                                           \
            const float *scale = scales[mat], *bias = biases[mat];                                          \
            long r0 = first * ROWS, rows = outs[mat] - r0 < ROWS ? outs[mat] - r0 : ROWS;                   \
            for (long i = 0; i < m; i += 2) {                                                               \
                const float *xs[2] = {x + i * in, x + (i + 1) * in};                                        \
                float sums[2][ROWS];                                                                        \
                int nx = i + 1 < m ? 2 : 1;                                                                 \
                if (nx == 2)                                                                                \
                    block_##NAME(w, r0, rows, in, xs, 2, i == 0, sums);                                     \
                else                                                                                        \
                    block_##NAME(w, r0, rows, in, xs, 1, i == 0, sums);                                     \
                for (int j = 0; j < nx; j++)                                                                \
                    for (int r = 0; r < rows; r++) {                                                        \
                        float s = sums[j][r];                                                               \
                        if (scale) s *= scale[r0 + r];                                                      \
                        if (bias) s += bias[r0 + r];                                                        \
                        y[(i + j) * total + col + r0 + r] = s;                                              \
                    }                                                                                       \
            }                                                                                               \
        }                                                                                                   \
    }

GEMV(f32, float)
GEMV(bf16, uint16_t)
GEMV(i8, int8_t)

/* Attention of one new query per row over that row's cached keys, read where the cache stores them:
 *   out[b, h] = Σ_t softmax_t(q[b, h] · K[b, t, h/g] · scale) V[b, t, h/g],  t < lengths[b],  g = H / Hk (GQA).
 * Key t of row b sits at element  row_offsets[b] + slot · token_stride + head · head_stride,  with slot = t for a
 * contiguous cache, or tables[b · n_cols + t / block_size] · block_size + t % block_size for a paged one (the
 * block table: no gather into a contiguous copy first, as vLLM's PagedAttention). One pass with an online softmax
 * (Milakov & Gimelshein 2018; FlashAttention's recurrence): K and V are read once. head_dim ≤ 256, a multiple of 8.
 *
 * The loop order follows the layout, so that memory is read in long runs: a contiguous cache stores each head's
 * keys together ([B, Hk, T, D]): one task per (row, head) walks them. A paged pool stores each token's heads
 * together ([slot, Hk, D]): one task per row walks its tokens and updates every head (a task per head there read
 * 256-byte pieces 3 KiB apart and ran 2x slower).
 */
typedef struct {
    __m256 acc[32];
    float running_max, denominator;
} Softmax;

static inline void softmax_add(Softmax *s, long n, float score, const float *value) {
    if (score > s->running_max) { /* rescale what was summed under the old maximum */
        float shrink = expf(s->running_max - score);
        s->denominator *= shrink;
        for (long i = 0; i < n; i++) s->acc[i] = _mm256_mul_ps(s->acc[i], _mm256_set1_ps(shrink));
        s->running_max = score;
    }
    float p = expf(score - s->running_max);
    s->denominator += p;
    for (long i = 0; i < n; i++)
        s->acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(p), _mm256_loadu_ps(value + 8 * i), s->acc[i]);
}

static inline float dot(const __m256 *q, const float *key, long n) {
    __m256 d = _mm256_setzero_ps();
    for (long i = 0; i < n; i++) d = _mm256_fmadd_ps(q[i], _mm256_loadu_ps(key + 8 * i), d);
    return horizontal_sum(d);
}

static inline void softmax_init(Softmax *s, long n) {
    for (long i = 0; i < n; i++) s->acc[i] = _mm256_setzero_ps();
    s->running_max = -INFINITY;
    s->denominator = 0.0f;
}

static inline void softmax_store(const Softmax *s, long n, float *out) {
    float inv = s->denominator > 0 ? 1.0f / s->denominator : 0.0f;
    for (long i = 0; i < n; i++) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(s->acc[i], _mm256_set1_ps(inv)));
}

static inline void load_query(__m256 *qr, const float *q, long n, float scale) {
    for (long i = 0; i < n; i++) qr[i] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * i), _mm256_set1_ps(scale));
}

void decode_attention(const float *q, const float *k, const float *v, float *out, const long *tables, long n_cols,
                      long block_size, const long *lengths, const long *row_offsets, long B, long H, long Hk, long D,
                      long token_stride, long head_stride, float scale) {
    long group = H / Hk, n = D / 8;
#define SLOT(b, t) (tables ? tables[(b) * n_cols + (t) / block_size] * block_size + (t) % block_size : (t))
    if (token_stride == D) { /* head-major: a task per (row, head) */
#pragma omp parallel for schedule(dynamic, 1)
        for (long bh = 0; bh < B * H; bh++) {
            long b = bh / H, kh = (bh % H) / group;
            __m256 qr[32];
            Softmax s;
            load_query(qr, q + bh * D, n, scale);
            softmax_init(&s, n);
            for (long t = 0; t < lengths[b]; t++) {
                long at = row_offsets[b] + SLOT(b, t) * token_stride + kh * head_stride;
                softmax_add(&s, n, dot(qr, k + at, n), v + at);
            }
            softmax_store(&s, n, out + bh * D);
        }
        return;
    }
#pragma omp parallel for schedule(dynamic, 1)
    for (long b = 0; b < B; b++) { /* token-major: a task per row, every head per token */
        Softmax *s = aligned_alloc(32, sizeof(Softmax) * H); /* __m256 members: 32-byte aligned */
        __m256 *qr = aligned_alloc(32, sizeof(__m256) * 32 * H);
        for (long h = 0; h < H; h++) {
            load_query(qr + 32 * h, q + (b * H + h) * D, n, scale);
            softmax_init(s + h, n);
        }
        for (long t = 0; t < lengths[b]; t++) {
            long at = row_offsets[b] + SLOT(b, t) * token_stride;
            for (long h = 0; h < H; h++) {
                long kv = at + (h / group) * head_stride;
                softmax_add(s + h, n, dot(qr + 32 * h, k + kv, n), v + kv);
            }
        }
        for (long h = 0; h < H; h++) softmax_store(s + h, n, out + (b * H + h) * D);
        free(s);
        free(qr);
    }
#undef SLOT
}
