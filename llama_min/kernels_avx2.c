/* kernels_avx2.c: the matrix products of a decode step, y = x W^T for a few rows x, on CPUs with AVX2,
 * FMA and F16C. Built and loaded by llama_min/native.py (see there for when they are used and why).
 *
 *   f32_linear     float32 W (N, K), as nn.Linear holds it
 *   q4_linear      4-bit W in groups of 32 (quantize.Int4Linear's 'avx2' layout, packed Q4 GGUF files)
 *   q4_dequantize  that 4-bit W as float32, for prompts of many rows
 *   q8_linear      int8 W (N, K) with a scale per row (quantize.Int8Linear, packed Q8_0 / Q5 / Q6_K files)
 *   rms_norm, decode_attention   the small operations between the products of a one-token step
 *
 *   decode_layers  a whole one-token step through every decoder layer, in one call
 *
 * A decode step multiplies one activation row by every weight matrix: each weight is used once per row,
 * so the product is limited by how fast W streams from memory, not by arithmetic. The products walk W
 * once, front to back, split between the threads in contiguous parts.
 *
 * Threads: each product is written as an OpenMP work-sharing loop (`omp for`) without a parallel region
 * of its own (the *_rows functions). The exported functions open one region around one product;
 * decode_layers opens one region for a whole step, so the threads are started once, not ~10 times per
 * layer, and wait for each other only at the end of each loop. y rows are `ldy` floats apart, so that
 * separate products can write side by side into one output.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

static float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- float32 weights ----
 *
 * y[m, n] = sum_k x[m, k] W[n, k]: eight rows of W at a time, each with its own vector of 8 partial
 * sums (8 independent multiply-add chains keep the FMA units busy while the loads stream). For a few
 * rows of x (a batch, a speculative verification) the 8 rows of W (8 K floats) are read from memory
 * once and from the L1 cache for the other rows of x. The next 8 rows are prefetched while these are
 * summed: the hardware prefetcher alone follows 8 streams less well.
 */

/* the 8 horizontal sums of a[0..7] -> one vector (lane r = sum of a[r]) */
static inline __m256 sum8x8(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

static float dot(const float *a, const float *b, int64_t K) {
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    float s = sum8(acc);
    for (; k < K; k++)
        s += a[k] * b[k];
    return s;
}

/* rows n .. n+7 of W (w points at row n) times every row of x -> y[m, n .. n+7] */
static void eight_rows(const float *x, int64_t M, int64_t K, const float *w, int64_t ldy, float *y) {
    const int64_t K8 = K / 8 * 8;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        __m256 a[8];
        for (int r = 0; r < 8; r++)
            a[r] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K8; k += 8) {
            const __m256 xv = _mm256_loadu_ps(xm + k);
            for (int r = 0; r < 8; r++) {
                if (m == 0)  /* the same place in the next 8 rows */
                    _mm_prefetch((const char *)(w + (r + 8) * K + k), _MM_HINT_T0);
                a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + k), xv, a[r]);
            }
        }
        __m256 sums = sum8x8(a);
        if (K8 < K) {  /* K not a multiple of 8: the last few products one by one */
            float tail[8];
            for (int r = 0; r < 8; r++)
                tail[r] = dot(w + r * K + K8, xm + K8, K - K8);
            sums = _mm256_add_ps(sums, _mm256_loadu_ps(tail));
        }
        _mm256_storeu_ps(y + m * ldy, sums);
    }
}

/* x (M, K), W (N, K), both float32 and contiguous -> y (M, N), rows ldy apart; work-sharing */
static void f32_rows(const float *x, int64_t M, int64_t K, const float *w, int64_t N, float *y, int64_t ldy) {
    const int64_t blocks = N / 8;
    #pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; b++)
        eight_rows(x, M, K, w + 8 * b * K, ldy, y + 8 * b);
    #pragma omp for schedule(static)
    for (int64_t n = 8 * blocks; n < N; n++)  /* the last N % 8 rows */
        for (int64_t m = 0; m < M; m++)
            y[m * ldy + n] = dot(x + m * K, w + n * K, K);
}

void f32_linear(const float *x, int64_t M, int64_t K, const float *w, int64_t N, float *y, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    f32_rows(x, M, K, w, N, y, N);
}

/* ---- 4-bit weights ----
 *
 * W (N, K): row n, group g (weights 32g .. 32g+31) is 16 bytes of codes q in 0..15 (byte j holds
 * weight j in its low nibble and weight j+16 in its high nibble: llama.cpp's Q4_0 order) and two fp16
 * numbers, scale d and min c:  w = d * q + c. A row's scales are stored together, then its mins, so that
 * 8 groups' scales load and convert at once.
 *
 * x (M, K): each group of 32 activations is written as int16 with its own scale:
 *     s = max |x| / 32767,   xq = round(x / s)       (|x - s xq| <= s / 2: 1.5e-5 of the group's max)
 * so that the sum over a group is an exact integer dot product:
 *     y[m, n] = sum_g  d s * (sum_j q_j xq_j)  +  c * (sum_j x_j)
 * |q xq| <= 15 * 32767, and 32 of them fit an int32. AVX2 multiplies 16 int16 pairs and adds
 * neighbours in one instruction (vpmaddwd), which is what makes this cheaper than converting every
 * weight to float.
 */
/* x (K,) -> xq (K,) int16, s (G,) the scale and xsum (G,) the plain sum of each group */
static void quantize_row(const float *x, int64_t K, int16_t *xq, float *s, float *xsum) {
    for (int64_t g = 0; g < K / 32; g++) {
        const float *xg = x + 32 * g;
        float amax = 0.f, sum = 0.f;
        for (int j = 0; j < 32; j++) {
            amax = fmaxf(amax, fabsf(xg[j]));
            sum += xg[j];
        }
        if (!isfinite(amax) || !isfinite(sum))  /* inf or nan (which fmaxf skips): let it reach the output */
            amax = NAN;
        const float inv = amax > 0.f ? 32767.f / amax : 0.f;
        for (int j = 0; j < 32; j++)
            xq[32 * g + j] = (int16_t)lrintf(xg[j] * inv);
        s[g] = amax / 32767.f;
        xsum[g] = sum;
    }
}

/* The integer dot product of one group: 32 codes (16 bytes) with 32 int16 activations -> 8 int32 partial sums */
static inline __m256i group_dot(const uint8_t *q, const int16_t *x) {
    const __m128i low4 = _mm_set1_epi8(15);
    const __m128i b = _mm_loadu_si128((const __m128i *)q);
    const __m256i q_lo = _mm256_cvtepu8_epi16(_mm_and_si128(b, low4));                      /* weights 0..15 */
    const __m256i q_hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low4));  /* weights 16..31 */
    return _mm256_add_epi32(_mm256_madd_epi16(q_lo, _mm256_loadu_si256((const __m256i *)x)),
                            _mm256_madd_epi16(q_hi, _mm256_loadu_si256((const __m256i *)(x + 16))));
}

/* Eight groups' 8 int32 partial sums each (p[0..7]) -> one vector holding the 8 groups' sums */
static inline __m256i reduce8(const __m256i *p) {
    /* pairwise horizontal adds: lanes 0-3 then hold groups 0-3's partial sums of the low 128 bits, 4-7 of the high */
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* The dot products of 8 consecutive groups -> one vector holding the 8 groups' sums (int32, exact) */
static inline __m256i eight_groups(const uint8_t *q, const int16_t *x) {
    __m256i p[8];
    for (int j = 0; j < 8; j++)
        p[j] = group_dot(q + 16 * j, x + 32 * j);
    return reduce8(p);
}

/* The activations of M rows as int16 per group of 32 (quantize_row), in one buffer of
 * QUANTIZED_BYTES(M, K): xq (M, K), then s and xsum (M, K/32) each. */
#define QUANTIZED_BYTES(M, K) (sizeof(int16_t) * (M) * (K) + 2 * sizeof(float) * (M) * ((K) / 32))

static void quantize_rows(const float *x, int64_t M, int64_t K, int16_t *xq) {
    float *s = (float *)(xq + M * K), *xsum = s + M * (K / 32);
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, xq + m * K, s + m * (K / 32), xsum + m * (K / 32));
}

/* codes (N, K/2) uint8; dc (N, 2, K/32) fp16: each row's scales d, then its mins c; xq: M rows of
 * activations from quantize_rows -> y (M, N) float32, rows ldy apart; work-sharing */
static void q4_rows(const int16_t *xq, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *dc, int64_t N,
                    float *y, int64_t ldy) {
    const int64_t G = K / 32, G8 = G / 8 * 8;
    const float *s = (const float *)(xq + M * K), *xsum = s + M * G;
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *qn = codes + n * (K / 2);
        const uint16_t *d = dc + n * 2 * G, *c = d + G;
        for (int64_t m = 0; m < M; m++) {
            const int16_t *xm = xq + m * K;
            const float *sm = s + m * G, *xsm = xsum + m * G;
            __m256 acc = _mm256_setzero_ps();      /* sum over groups of d s (sum_j q_j xq_j), 8 groups at a time */
            __m256 offsets = _mm256_setzero_ps();  /* sum over groups of c (sum_j x_j) */
            int64_t g = 0;
            for (; g < G8; g += 8) {
                const __m256i dots = eight_groups(qn + 16 * g, xm + 32 * g);
                const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + g)));
                const __m256 c8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(c + g)));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_mul_ps(d8, _mm256_loadu_ps(sm + g)), acc);
                offsets = _mm256_fmadd_ps(c8, _mm256_loadu_ps(xsm + g), offsets);
            }
            float rest = 0.f;  /* the last G % 8 groups, one at a time */
            for (; g < G; g++) {
                const float dot = sum8(_mm256_cvtepi32_ps(group_dot(qn + 16 * g, xm + 32 * g)));
                rest += _cvtsh_ss(d[g]) * sm[g] * dot + _cvtsh_ss(c[g]) * xsm[g];
            }
            y[m * ldy + n] = sum8(_mm256_add_ps(acc, offsets)) + rest;
        }
    }
}

/* x (M, K) float32 -> y (M, N). Returns 0, or 1 when memory for the int16 activations could not be had. */
int q4_linear(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *dc, int64_t N,
              float *y, int nthreads) {
    int16_t *xq = malloc(QUANTIZED_BYTES(M, K));
    if (!xq)
        return 1;
    quantize_rows(x, M, K, xq);
    #pragma omp parallel num_threads(nthreads)
    q4_rows(xq, M, K, codes, dc, N, y, N);
    free(xq);
    return 0;
}

/* The same weights as float32: w (N, K) = d q + c, for a float matrix product over many rows */
void q4_dequantize(const uint8_t *codes, const uint16_t *dc, int64_t N, int64_t K, float *w, int nthreads) {
    const int64_t G = K / 32;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *b = codes + n * (K / 2) + 16 * g;
            const float d = _cvtsh_ss(dc[n * 2 * G + g]), c = _cvtsh_ss(dc[n * 2 * G + G + g]);
            float *out = w + n * K + 32 * g;
            for (int j = 0; j < 16; j++) {
                out[j] = d * (float)(b[j] & 15) + c;
                out[j + 16] = d * (float)(b[j] >> 4) + c;
            }
        }
    }
}

/* ---- 8-bit weights: int8 W (N, K) and one float32 scale per row (quantize.Int8Linear) ----
 *
 * y[m, n] = scale[n] * sum_g s_g (sum_j q_j xq_j), the activations as int16 per group of 32 as above
 * (|q xq| <= 127 * 32767: 32 of them fit an int32). K must be a multiple of 32.
 */

static inline __m256i group_dot_q8(const int8_t *q, const int16_t *x) {
    const __m256i b = _mm256_loadu_si256((const __m256i *)q);
    const __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(b));       /* weights 0..15 */
    const __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(b, 1));  /* weights 16..31 */
    return _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                            _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 16))));
}

/* xq: M rows of activations from quantize_rows -> y (M, N), rows ldy apart; work-sharing */
static void q8_rows(const int16_t *xq, int64_t M, int64_t K, const int8_t *w, const float *scales, int64_t N,
                    float *y, int64_t ldy) {
    const int64_t G = K / 32, G8 = G / 8 * 8;
    const float *s = (const float *)(xq + M * K);
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wn = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const int16_t *xm = xq + m * K;
            const float *sm = s + m * G;
            __m256 acc = _mm256_setzero_ps();
            int64_t g = 0;
            for (; g < G8; g += 8) {
                __m256i p[8];
                for (int j = 0; j < 8; j++)
                    p[j] = group_dot_q8(wn + 32 * (g + j), xm + 32 * (g + j));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(p)), _mm256_loadu_ps(sm + g), acc);
            }
            float rest = 0.f;
            for (; g < G; g++)
                rest += sm[g] * sum8(_mm256_cvtepi32_ps(group_dot_q8(wn + 32 * g, xm + 32 * g)));
            y[m * ldy + n] = scales[n] * (sum8(acc) + rest);
        }
    }
}

/* x (M, K) float32 -> y (M, N). Returns 0, or 1 when memory for the int16 activations could not be had. */
int q8_linear(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scales, int64_t N, float *y,
              int nthreads) {
    int16_t *xq = malloc(QUANTIZED_BYTES(M, K));
    if (!xq)
        return 1;
    quantize_rows(x, M, K, xq);
    #pragma omp parallel num_threads(nthreads)
    q8_rows(xq, M, K, w, scales, N, y, N);
    free(xq);
    return 0;
}

/* ---- the rest of a decode step: RMSNorm, and attention for one new token ----
 *
 * Between its matrix products a decode step of a small model runs a few dozen small PyTorch operations
 * per layer (the norm alone is eight), each costing a few microseconds of dispatch for a few hundred
 * numbers of work. These two functions do the same arithmetic in one call each.
 */

/* Each of M rows of x (M, D): out = x * (1 / sqrt(mean(x^2) + eps)) * w, as model.py's RMSNorm */
void rms_norm(const float *x, int64_t M, int64_t D, const float *w, float eps, float *out) {
    const int64_t D8 = D / 8 * 8;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * D;
        float *om = out + m * D;
        __m256 acc = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k < D8; k += 8) {
            const __m256 v = _mm256_loadu_ps(xm + k);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = sum8(acc);
        for (; k < D; k++)
            ss += xm[k] * xm[k];
        const float r = 1.f / sqrtf(ss / (float)D + eps);
        const __m256 r8 = _mm256_set1_ps(r);
        for (k = 0; k < D8; k += 8)
            _mm256_storeu_ps(om + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xm + k), r8), _mm256_loadu_ps(w + k)));
        for (; k < D; k++)
            om[k] = xm[k] * r * w[k];
    }
}

/* RoPE on one head's hd numbers: pair i = (x[2i], x[2i+1]) times (cos_i + j sin_i); cs holds
 * (cos_0, sin_0, cos_1, sin_1, ...), the complex freqs_cis row of this position viewed as floats */
static void rotate(const float *x, const float *cs, int64_t hd, float *out) {
    for (int64_t i = 0; i < hd; i += 2) {
        const float c = cs[i], s = cs[i + 1];
        out[i] = x[i] * c - x[i + 1] * s;
        out[i + 1] = x[i] * s + x[i + 1] * c;
    }
}

/* One new token in each of B rows at position pos. q (B, H*hd), k and v (B, K*hd), each row `stride`
 * floats after the last (they may be slices of one fused q|k|v row); caches (B_cache, S, K, hd).
 *   1. k is rotated (RoPE) and written to k_cache[b, pos], v to v_cache[b, pos] (write_cache);
 *   2. query head h (rotated) attends over positions 0..pos of KV head h / (H/K) (attend_rows):
 *        out[b, h] = sum_s softmax_s(q . k_s / sqrt(hd)) v_s
 * out (B, H*hd). */
static void write_cache(const float *k, const float *v, int64_t stride, int64_t B, int64_t K, int64_t hd,
                        const float *cs, int64_t pos, float *k_cache, float *v_cache, int64_t S) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < K; g++) {
            const int64_t at = b * S * K * hd + pos * K * hd + g * hd;
            rotate(k + b * stride + g * hd, cs, hd, k_cache + at);
            for (int64_t i = 0; i < hd; i++)
                v_cache[at + i] = v[b * stride + g * hd + i];
        }
}

/* work-sharing over the B * H (row, head) pairs; scores: pos + 1 floats for each thread of the team */
static void attend_rows(const float *q, int64_t stride, int64_t B, int64_t H, int64_t K, int64_t hd,
                        const float *cs, int64_t pos, const float *k_cache, const float *v_cache, int64_t S,
                        float *out, float *scores) {
    const int64_t n_rep = H / K, row = S * K * hd, n = pos + 1;
    const float scale = 1.f / sqrtf((float)hd);
    float *p = scores + omp_get_thread_num() * n;
    #pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H, g = h / n_rep;
        float qr[hd];
        rotate(q + b * stride + h * hd, cs, hd, qr);
        const float *kb = k_cache + b * row + g * hd, *vb = v_cache + b * row + g * hd;
        float top = -INFINITY;
        for (int64_t s = 0; s < n; s++) {
            p[s] = dot(qr, kb + s * K * hd, hd) * scale;
            top = fmaxf(top, p[s]);
        }
        float total = 0.f;
        for (int64_t s = 0; s < n; s++) {
            p[s] = expf(p[s] - top);
            total += p[s];
        }
        float *o = out + b * H * hd + h * hd;
        for (int64_t i = 0; i < hd; i++)
            o[i] = 0.f;
        for (int64_t s = 0; s < n; s++) {
            const float *vs = vb + s * K * hd;
            for (int64_t i = 0; i < hd; i++)
                o[i] += p[s] * vs[i];
        }
        for (int64_t i = 0; i < hd; i++)
            o[i] /= total;
    }
}

/* Both steps. Returns 0, or 1 when memory for the scores could not be had. */
int decode_attention(const float *q, const float *k, const float *v, int64_t stride, int64_t B, int64_t H,
                     int64_t K, int64_t hd, const float *cs, int64_t pos, float *k_cache, float *v_cache,
                     int64_t S, float *out, int nthreads) {
    float *scores = malloc(sizeof(float) * nthreads * (pos + 1));
    if (!scores)
        return 1;
    write_cache(k, v, stride, B, K, hd, cs, pos, k_cache, v_cache, S);
    #pragma omp parallel num_threads(nthreads) if (B * H * (pos + 1) * hd > (1 << 16))
    attend_rows(q, stride, B, H, K, hd, cs, pos, k_cache, v_cache, S, out, scores);
    free(scores);
    return 0;
}

/* ---- a whole one-token step through the decoder layers, in one call ----
 *
 * Even at one call per operation, a small model's step spends most of its time between the calls:
 * Python, PyTorch's dispatch and starting the threads cost microseconds each, and SmolLM2 makes about
 * ten calls in each of 30 layers for products of a few microseconds. decode_layers computes what
 * model.py's TransformerBlock does, for every layer, with the functions above, in one parallel region:
 *
 *   x = rms_norm(h);  q|k|v = x Wqkv^T;  h += attention(q, k, v) Wo^T
 *   x = rms_norm(h);  gate|up = x W13^T; h += (silu(gate) * up) W2^T,    silu(g) = g / (1 + e^-g)
 *
 * Each weight matrix is described by a `matrix` in whichever format its layer holds; the q|k|v and
 * gate|up products may be one fused matrix or separate ones (written side by side).
 */
typedef struct {
    int64_t kind;        /* 0: float32 W (N, K); 1: 4-bit codes (N, K/2) + fp16 dc (N, 2, K/32); 2: int8 W (N, K) + float32 scales (N,) */
    int64_t N, K;
    const void *w;       /* the float32 W, the 4-bit codes or the int8 W */
    const void *scales;  /* dc (4-bit), scales (int8), unused for float32 */
} matrix;

typedef struct {
    const float *attention_norm, *ffn_norm;  /* (D,) each */
    int64_t n_qkv, n_up;                     /* 1 (fused) or 3 matrices for q|k|v; 1 or 2 for gate|up */
    matrix qkv[3], wo, up[2], w2;
    float *k_cache, *v_cache;                /* (B_cache, S, KV, hd) each */
} layer;

/* y (M, sum of their N), rows ldy apart = the products of n matrices with x (M, K) side by side; inside a
 * parallel region, called by every thread. xq: QUANTIZED_BYTES(M, K) for the int16 activations. */
static void products(const matrix *ms, int64_t n, const float *x, int64_t M, float *y, int64_t ldy, int16_t *xq) {
    int quantized = 0;
    for (int64_t i = 0; i < n; i++) {
        const matrix *m = ms + i;
        if (m->kind == 0) {
            f32_rows(x, M, m->K, m->w, m->N, y, ldy);
        } else {
            if (!quantized) {
                #pragma omp single
                quantize_rows(x, M, m->K, xq);
                quantized = 1;
            }
            if (m->kind == 1)
                q4_rows(xq, M, m->K, m->w, m->scales, m->N, y, ldy);
            else
                q8_rows(xq, M, m->K, m->w, m->scales, m->N, y, ldy);
        }
        y += m->N;
    }
}

/* h (B, D): one new token per row at position pos, through all L layers in place. cs: the freqs_cis row
 * of pos as (cos, sin) floats; S: the caches' length; F: the FFN's hidden size. Returns 0, or 1 when
 * memory for the activations could not be had (h is then untouched). */
int decode_layers(const layer *layers, int64_t L, float *h, int64_t B, int64_t D, int64_t H, int64_t KV,
                  int64_t hd, int64_t F, float eps, const float *cs, int64_t pos, int64_t S, int nthreads) {
    const int64_t QKV = (H + 2 * KV) * hd, widest = D > H * hd ? (D > F ? D : F) : (H * hd > F ? H * hd : F);
    const int64_t floats = B * (D + QKV + H * hd + D + 2 * F + F) + (int64_t)nthreads * (pos + 1);
    float *x = malloc(sizeof(float) * floats + QUANTIZED_BYTES(B, widest));
    if (!x)
        return 1;
    float *qkv = x + B * D, *att = qkv + B * QKV, *y = att + B * H * hd, *gu = y + B * D, *a = gu + B * 2 * F;
    float *scores = a + B * F;
    int16_t *xq = (int16_t *)(x + floats);

    #pragma omp parallel num_threads(nthreads)
    for (int64_t l = 0; l < L; l++) {
        const layer *ly = layers + l;
        #pragma omp single
        rms_norm(h, B, D, ly->attention_norm, eps, x);
        products(ly->qkv, ly->n_qkv, x, B, qkv, QKV, xq);
        #pragma omp single
        write_cache(qkv + H * hd, qkv + (H + KV) * hd, QKV, B, KV, hd, cs, pos, ly->k_cache, ly->v_cache, S);
        attend_rows(qkv, QKV, B, H, KV, hd, cs, pos, ly->k_cache, ly->v_cache, S, att, scores);
        products(&ly->wo, 1, att, B, y, D, xq);
        #pragma omp single
        {
            for (int64_t i = 0; i < B * D; i++)
                h[i] += y[i];
            rms_norm(h, B, D, ly->ffn_norm, eps, x);
        }
        products(ly->up, ly->n_up, x, B, gu, 2 * F, xq);
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < B * F; i++) {
            const int64_t r = i / F, j = i % F;
            const float g = gu[r * 2 * F + j];
            a[i] = g / (1.f + expf(-g)) * gu[r * 2 * F + F + j];
        }
        products(&ly->w2, 1, a, B, y, D, xq);
        #pragma omp single
        for (int64_t i = 0; i < B * D; i++)
            h[i] += y[i];
    }
    free(x);
    return 0;
}
