/* A whole decode step of a pre-norm Transformer's layers in one call: batch 1, a few new tokens, a contiguous fp32
 * KV cache. The GEMVs (decode.c) are most of a step's time, but between them a step runs ~40 small torch ops per
 * layer (two norms, reshapes, rotary, the cache write, an activation, residual adds), each a few µs of dispatch
 * around far less work: ~20% of a GPT-2 step on the 2-core machine lmforge is developed on. Here those run in C
 * between the same GEMV calls, so a step costs the weight reads and little else (llama.cpp's and gpt-fast's
 * lesson: a decode step is a memory-bound loop, and everything else should stay out of its way).
 *
 * Per layer, for the residual stream x [d] of each new token:
 *   h = norm1(x);  q, k, v = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ (one call);  rotary on q, k;  store k, v in the cache;
 *   x += attention(q over the cached keys up to its own)·Woᵀ;
 *   h = norm2(x);  x += act(h·Wupᵀ [, h·Wgateᵀ])·Wdownᵀ.
 * lmforge/infer/fastpath.py (FusedDecode) builds the layer descriptions and checks that a model fits them.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

void gemv_f32(long, const float *const *, const float *const *, const float *const *, const long *, const float *,
              float *, long, long);
void gemv_bf16(long, const uint16_t *const *, const float *const *, const float *const *, const long *,
               const float *, float *, long, long);
void gemv_i8(long, const int8_t *const *, const float *const *, const float *const *, const long *, const float *,
             float *, long, long);
__attribute__((visibility("hidden"))) float horizontal_sum(__m256 v); /* decode.c */
void decode_attention(const float *q, const float *k, const float *v, float *out, const long *tables, long n_cols,
                      long block_size, const long *lengths, const long *row_offsets, long B, long H, long Hk, long D,
                      long token_stride, long head_stride, float scale);

enum { F32 = 0, BF16 = 1, I8 = 2 };
enum { LAYERNORM = 0, RMSNORM = 1 };
enum { RELU = 0, GELU = 1, GELU_TANH = 2, SWIGLU = 3 };

typedef struct { /* one weight matrix [out, in]: fp32, bf16 or int8 (with one fp32 scale per row) */
    long dtype, out;
    const void *weight;
    const float *scale, *bias; /* NULL when absent */
} Matrix;

typedef struct { /* mirrored by lmforge/infer/fastpath.py's ctypes structures: keep the two in step */
    long d, n_head, n_kv_head, head_dim, d_ff, norm, act;
    float eps;
    const float *norm1_w, *norm1_b, *norm2_w, *norm2_b; /* biases NULL for RMSNorm or bias-free LayerNorm */
    Matrix q, k, v, o, up, gate, down;                  /* gate only for SWIGLU */
} Layer;

/* y [m, Σ out] = x [m, in]·Wᵀ for each matrix, outputs side by side; the matrices share one dtype (checked in
 * lmforge/infer/fastpath.py). */
static void product(const Matrix *const *ms, long n, const float *x, float *y, long in, long m) {
    const void *ws[3];
    const float *scales[3], *biases[3];
    long outs[3];
    for (long i = 0; i < n; i++) ws[i] = ms[i]->weight, scales[i] = ms[i]->scale, biases[i] = ms[i]->bias,
                                 outs[i] = ms[i]->out;
    if (ms[0]->dtype == F32) gemv_f32(n, (const float *const *)ws, scales, biases, outs, x, y, in, m);
    if (ms[0]->dtype == BF16) gemv_bf16(n, (const uint16_t *const *)ws, scales, biases, outs, x, y, in, m);
    if (ms[0]->dtype == I8) gemv_i8(n, (const int8_t *const *)ws, scales, biases, outs, x, y, in, m);
}

/* LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019) of x [d] into h, in fp32 as the model computes
 * them. d is a multiple of 8 (fastpath.py checks). */
static void norm(const Layer *L, const float *x, const float *w, const float *b, float *h) {
    long d = L->d;
    float mean = 0.0f;
    if (L->norm == LAYERNORM) {
        __m256 s = _mm256_setzero_ps();
        for (long i = 0; i < d; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + i));
        mean = horizontal_sum(s) / d;
    }
    __m256 m = _mm256_set1_ps(mean), s = _mm256_setzero_ps();
    for (long i = 0; i < d; i += 8) {
        __m256 c = _mm256_sub_ps(_mm256_loadu_ps(x + i), m);
        s = _mm256_fmadd_ps(c, c, s);
    }
    __m256 inv = _mm256_set1_ps(1.0f / sqrtf(horizontal_sum(s) / d + L->eps));
    for (long i = 0; i < d; i += 8) {
        __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m), inv), _mm256_loadu_ps(w + i));
        if (b) y = _mm256_add_ps(y, _mm256_loadu_ps(b + i));
        _mm256_storeu_ps(h + i, y);
    }
}

/* e^x for eight floats: Cody-Waite range reduction x = n·ln2 + r and Cephes' degree-6 polynomial for e^r
 * (~1 ulp); |x| clamped to 87 so 2^n stays a normal float. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

static inline __m256 abs8(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
static inline __m256 copysign8(__m256 magnitude, __m256 sign) {
    __m256 bit = _mm256_set1_ps(-0.0f);
    return _mm256_or_ps(_mm256_andnot_ps(bit, magnitude), _mm256_and_ps(bit, sign));
}

/* tanh z = 1 − 2/(e^{2|z|} + 1), signed: absolute error ~1e-7, which is what GELU's 0.5·x·(1 + tanh) sees. */
static inline __m256 tanh8(__m256 z) {
    __m256 e = exp8(_mm256_mul_ps(abs8(z), _mm256_set1_ps(2.0f)));
    __m256 t = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
    return copysign8(t, z);
}

/* erf by Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7). */
static inline __m256 erf8(__m256 x) {
    __m256 a = abs8(x);
    __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(a, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
    __m256 p = _mm256_set1_ps(1.061405429f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
    p = _mm256_mul_ps(p, t);
    __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
    return copysign8(_mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f)), x);
}

/* The feed-forward's activation of one row, u [d_ff] (for SwiGLU u = [gate | up], 2·d_ff) into out [d_ff]. ReLU;
 * exact GELU x·Φ(x) (Hendrycks & Gimpel 2016); GPT-2's tanh GELU; SwiGLU silu(gate)·up (Shazeer 2020). */
static void activate(const Layer *L, const float *u, float *out) {
    long n = L->d_ff;
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    for (long i = 0; i < n; i += 8) {
        __m256 x = _mm256_loadu_ps(u + i), y;
        if (L->act == RELU) {
            y = _mm256_max_ps(x, _mm256_setzero_ps());
        } else if (L->act == GELU) {
            y = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, erf8(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)))));
        } else if (L->act == GELU_TANH) {
            __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
            __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f), _mm256_fmadd_ps(cube, _mm256_set1_ps(0.044715f), x));
            y = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, tanh8(z)));
        } else { /* SWIGLU: silu(g) = g / (1 + e^−g), times up */
            __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
            y = _mm256_mul_ps(silu, _mm256_loadu_ps(u + n + i));
        }
        _mm256_storeu_ps(out + i, y);
    }
}

/* Rotary embedding (Su et al. 2021), half-split layout as GPT-NeoX and HF Llama: channel i pairs with i + D/2.
 * cos, sin [D] for this token's position; x holds `heads` heads of D. */
static void rotate(float *x, long heads, long D, const float *cos, const float *sin) {
    long half = D / 2;
    for (long h = 0; h < heads; h++) {
        float *p = x + h * D;
        for (long i = 0; i < half; i++) {
            float a = p[i], b = p[i + half];
            p[i] = a * cos[i] - b * sin[i];
            p[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

static void add(float *x, const float *y, long n) {
    for (long i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}

/* Every layer for m new tokens of one sequence (m ≤ MAX_ROWS: a decode step, a speculative verification):
 * x [m, d] is the residual stream, updated in place. k_cache and v_cache are the cache's [n_layer, n_kv_head,
 * slots, head_dim] buffers (passed per call, not kept in the layer descriptions: a new cache may sit at a freed
 * one's address with another shape). Token i's key and value go to slot `slot` + i, and it attends to slots
 * 0..slot+i (causal among the new tokens). cos and sin: rotary tables [m, head_dim], or NULL. work: scratch of
 * at least m·(d + 3·q_dim + 2·kv_dim + 3·d_ff) floats. */
#ifndef MAX_ROWS
#error "MAX_ROWS is defined once, in lmforge/infer/kernels/__init__.py, and passed as -DMAX_ROWS"
#endif
void decode_layers(long n_layer, const Layer *layers, float *x, long m, float *k_cache, float *v_cache, long slots,
                   long slot, const float *cos, const float *sin, float *work) {
    long lengths[MAX_ROWS], offsets[MAX_ROWS];
    if (m > MAX_ROWS) return; /* fastpath.py never asks */
    for (long i = 0; i < m; i++) lengths[i] = slot + i + 1, offsets[i] = 0;
    for (long l = 0; l < n_layer; l++) {
        const Layer *L = layers + l;
        long d = L->d, D = L->head_dim, q_dim = L->n_head * D, kv_dim = L->n_kv_head * D, qkv_dim = q_dim + 2 * kv_dim;
        long ff = L->d_ff, u_dim = L->act == SWIGLU ? 2 * ff : ff;
        float *layer_k = k_cache + l * L->n_kv_head * slots * D, *layer_v = v_cache + l * L->n_kv_head * slots * D;
        float *h = work, *qkv = h + m * d, *q = qkv + m * qkv_dim, *attended = q + m * q_dim, *u = attended + m * q_dim;
        float *a = u + m * u_dim;

        for (long i = 0; i < m; i++) norm(L, x + i * d, L->norm1_w, L->norm1_b, h + i * d);
        const Matrix *qkv_m[3] = {&L->q, &L->k, &L->v};
        product(qkv_m, 3, h, qkv, d, m);
        for (long i = 0; i < m; i++) { /* row i of qkv is [q | k | v] */
            float *qi = qkv + i * qkv_dim, *ki = qi + q_dim, *vi = ki + kv_dim;
            if (cos) {
                rotate(qi, L->n_head, D, cos + i * D, sin + i * D);
                rotate(ki, L->n_kv_head, D, cos + i * D, sin + i * D);
            }
            for (long c = 0; c < q_dim; c++) q[i * q_dim + c] = qi[c]; /* the attention kernel reads [m, H, D] */
            for (long j = 0; j < L->n_kv_head; j++) { /* the cache is [n_kv_head, slots, D]: one row per head */
                float *at_k = layer_k + (j * slots + slot + i) * D, *at_v = layer_v + (j * slots + slot + i) * D;
                for (long c = 0; c < D; c++) at_k[c] = ki[j * D + c], at_v[c] = vi[j * D + c];
            }
        }
        /* the m queries as m "rows" over one cache (offset 0 each), row i seeing slot + i + 1 keys: causal */
        decode_attention(q, layer_k, layer_v, attended, 0, 0, 1, lengths, offsets, m, L->n_head, L->n_kv_head, D, D,
                         slots * D, 1.0f / sqrtf((float)D));
        const Matrix *o_m[1] = {&L->o};
        product(o_m, 1, attended, h, q_dim, m);
        add(x, h, m * d);

        for (long i = 0; i < m; i++) norm(L, x + i * d, L->norm2_w, L->norm2_b, h + i * d);
        const Matrix *up_m[2] = {L->act == SWIGLU ? &L->gate : &L->up, &L->up};
        product(up_m, L->act == SWIGLU ? 2 : 1, h, u, d, m);
        for (long i = 0; i < m; i++) activate(L, u + i * u_dim, a + i * ff);
        const Matrix *down_m[1] = {&L->down};
        product(down_m, 1, a, h, ff, m);
        add(x, h, m * d);
    }
}
