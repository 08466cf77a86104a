/* One-row matrix-vector products for decode steps: y = (W·x) · scale + bias, W [out, in] row-major, x [in] fp32.
 *
 * A batch-1 decode step reads every weight once, so its speed is the rate at which W streams from memory.
 * torch's CPU path for a 1-row matmul reached ~16-20 GB/s on the 2-core AVX2 machine lmforge is developed on;
 * these loops reach ~25-32 GB/s there (benchmarks/decode.py measures both in the same run). Each thread takes
 * blocks of ROWS output rows: ROWS independent FMA chains hide the FMA latency, and one load of x serves ROWS
 * rows. Weights in bf16 or int8 are widened to fp32 in registers, so they cost half or a quarter of fp32's bytes
 * (int8 rows carry one scale each: per-output-channel quantization, lmforge.infer.quantize).
 *
 * Built on first use by lmforge/infer/kernels/__init__.py (cc -O3 -mavx2 -mfma -fopenmp); OpenMP resolves to
 * the runtime torch has loaded, so torch.set_num_threads applies here too.
 */
#include <immintrin.h>
#include <stdint.h>

#define ROWS 4
/* Each thread walks ROWS short streams (a row of GPT-2's 768-wide int8 matrix is 12 cache lines): too short for
 * the hardware prefetcher to ramp up. Asking for the bytes 8 KiB ahead made int8 ~15% faster here, the others
 * no slower. */
#define PREFETCH 8192

static inline float horizontal_sum(__m256 v) {
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

#define GEMV(NAME, T)                                                                                      \
    void gemv_##NAME(const T *w, const float *x, const float *scale, const float *bias, float *y, long out,  \
                     long in) {                                                                            \
        long blocks = (out + ROWS - 1) / ROWS;                                                             \
        _Pragma("omp parallel for schedule(static)") for (long b = 0; b < blocks; b++) {                   \
            long r0 = b * ROWS, rows = out - r0 < ROWS ? out - r0 : ROWS, k = 0;                           \
            float sums[ROWS] = {0};                                                                        \
            if (rows == ROWS) {                                                                            \
                __m256 acc[ROWS];                                                                          \
                for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();                               \
                for (; k + 8 <= in; k += 8) {                                                              \
                    __m256 xk = _mm256_loadu_ps(x + k);                                                    \
                    for (int r = 0; r < ROWS; r++) {                                                       \
                        _mm_prefetch((const char *)(w + (r0 + r) * in + k) + PREFETCH, _MM_HINT_T0);       \
                        acc[r] = _mm256_fmadd_ps(load8_##NAME(w + (r0 + r) * in + k), xk, acc[r]);         \
                    }                                                                                      \
                }                                                                                          \
                for (int r = 0; r < ROWS; r++) sums[r] = horizontal_sum(acc[r]);                           \
            }                                                                                              \
            for (int r = 0; r < rows; r++) {                                                               \
                float s = sums[r];                                                                         \
                for (long j = k; j < in; j++) s += load1_##NAME(w + (r0 + r) * in + j) * x[j];             \
                if (scale) s *= scale[r0 + r];                                                             \
                if (bias) s += bias[r0 + r];                                                               \
                y[r0 + r] = s;                                                                             \
            }                                                                                              \
        }                                                                                                  \
    }

GEMV(f32, float)
GEMV(bf16, uint16_t)
GEMV(i8, int8_t)
