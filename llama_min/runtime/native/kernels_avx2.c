/* kernels_avx2.c: the matrix products of a decode step, y = x W^T for a few rows x, on CPUs with AVX2,
 * FMA and F16C. Built and loaded by llama_min/runtime/native/__init__.py (see there for when they are used
 * and why, with measurements against PyTorch's kernels).
 *
 *   f32_linear     float32 W (N, K), as nn.Linear holds it
 *   q4_linear      4-bit W in groups of 32 (quantize.Int4Linear's 'avx2' layout, packed Q4 GGUF files)
 *   q4_dequantize  that 4-bit W as float32, for prompts of many rows
 *   q8_linear      int8 W (N, K) with a scale per row (quantize.Int8Linear, packed Q5 / Q6_K files)
 *   block_linear   a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks where the file is mapped (blocks.BlockLinear), or
 *                  regrouped in tiles of 8 rows (q4x8_repack, q8x8_repack, q4kx8_repack, q6kx8_repack;
 *                  blocks.TiledLinear, AVX-512 VNNI)
 *   block_dequantize, q4k_to_avx2, q6k_to_int8   conversions at load and for prompts
 *   rms_norm, decode_attention   the small operations between the products of a one-token step
 *   swiglu         silu(gate) * up between the FFN's products, for any number of rows
 *
 *   decode_layers  a whole decode step (one or a few new tokens) through every decoder layer, in one call;
 *                  every row at one position, or each row at its own (a server's rows)
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
 *
 * The comment opening each section below gives the reason for its design and what was measured. Two more, on an
 * AVX2-only EPYC: reading the 4-bit codes as word lanes instead of widening them byte by byte
 * took one row times 14336 x 4096 from 4.1 to 2.8-3.6 ms; rounding the activations to int16 with AVX2
 * instructions (quantize_row) replaced a libm call per value that cost ~15 us per 2048 on every product.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
 * once and from the L1 cache for the other rows of x. The hardware prefetcher follows the 8 streams on its
 * own. A software prefetch of the next 8 rows made it slower on long rows (they land 64-180 KB ahead, past
 * the L1 cache): 30 layers of SmolLM2's matrices streamed at 0.74-0.98 of a plain sum's rate with it,
 * 0.77-1.22 without; 5 layers of TinyLlama's at 0.86-1.09 with it, 1.05-1.62 without (2 threads).
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
            for (int r = 0; r < 8; r++)
                a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * K + k), xv, a[r]);
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

/* One row of W times x with four accumulators (the FMAs of one row do not wait on each other): the whole
 * product then reads W as a single sequential stream. */
static float dot4(const float *w, const float *x, int64_t K) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), s3);
    }
    for (; k + 8 <= K; k += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), s0);
    float s = sum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; k < K; k++)
        s += w[k] * x[k];
    return s;
}

/* Rows of at most this many weights are read one at a time (dot4) for a single activation row. Eight rows
 * at a time read eight streams a row apart; a row of 576 floats is 36 cache lines, too short a stream for
 * the hardware prefetcher to get going, and on an AVX-512 EPYC (2026-12-03, 2 threads) one row times
 * SmolLM2's 576-wide matrices streamed at 21-25 GB/s that way against 28-41 GB/s one row at a time
 * (49152 x 576: 25.5 against 45.7 GB/s, best of 5); rows of 1536 were even, of 2048 and more 8 rows
 * at a time was faster (38 against 34 GB/s). */
#define SEQUENTIAL_MAX_K 1024

/* x (M, K), W (N, K), both float32 and contiguous -> y (M, N), rows ldy apart; work-sharing */
static void f32_rows(const float *x, int64_t M, int64_t K, const float *w, int64_t N, float *y, int64_t ldy) {
    if (M == 1 && K <= SEQUENTIAL_MAX_K) {
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++)
            y[n] = dot4(w + n * K, x, K);
        return;
    }
    const int64_t blocks = N / 8;
    #pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; b++)
        eight_rows(x, M, K, w + 8 * b * K, ldy, y + 8 * b);
    #pragma omp for schedule(static)
    for (int64_t n = 8 * blocks; n < N; n++)  /* the last N % 8 rows */
        for (int64_t m = 0; m < M; m++)
            y[m * ldy + n] = dot(x + m * K, w + n * K, K);
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
 *
 * Word lanes: the codes are not widened byte by byte. 32 bytes (two groups) are read as 16 words of 16
 * bits, and each word holds four codes: bits 0-3 weight 2i, 4-7 weight 2i+16, 8-11 weight 2i+1, 12-15
 * weight 2i+17 (word i of a group is its bytes 2i, 2i+1). Four shift-and-masks give four vectors of 16
 * codes, one per nibble position, and the activations are stored in the matching order (q4_position),
 * so each code meets its own activation. Two groups then cost one load, six bit operations and four
 * vpmaddwd, and the lower half of each vector holds one group, the upper half the other.
 */
/* Prefetch. The integer products spend a few cycles of arithmetic on every 20-32 bytes of W, so the
 * instructions the core runs ahead of itself span about one cache line, and one thread keeps too few reads
 * from memory in flight. The 4-bit and 8-bit products therefore ask for the line AHEAD bytes further on.
 * Measured on a 5632x2048 4-bit matrix streamed from memory by 2 threads: 10-12 GB/s without, 13-15 GB/s
 * with 2-16 KB ahead; 256 bytes gave nothing. */
#ifndef AHEAD
#define AHEAD 4096
#endif

enum { NATURAL = 0, WORD_LANES = 1, INT8 = 2 };  /* orders of the int16 activations within a row; INT8: int8
                                                   * per block of 32 (quantize_rows_int8, the tiled kernels) */

/* Where activation j of group g (G groups in the row) is stored in the WORD_LANES order: groups in pairs
 * (2p, 2p+1) take 64 places as 4 blocks of 16 (one per nibble position v), each block the 8 of group 2p then
 * the 8 of group 2p+1; a last odd group takes 32 places as 4 blocks of 8. */
static inline int64_t q4_position(int64_t g, int64_t G, int j) {
    const int byte = j & 15, v = 2 * (byte & 1) + (j >> 4), i = byte >> 1;
    if (g % 2 == 1 || g + 1 < G)
        return 32 * (g - g % 2) + 16 * v + 8 * (g % 2) + i;
    return 32 * g + 8 * v + i;
}

/* the largest of the 8 lanes */
static float max8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* x (K,) -> xq (K,) int16 in `order`, s (G,) the scale and xsum (G,) the plain sum of each group.
 * Rounding is to the nearest integer, ties to even (vcvtps2dq in the default rounding mode). */
static void quantize_row(const float *x, int64_t K, int16_t *xq, float *s, float *xsum, int order) {
    const int64_t G = K / 32;
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int64_t g = 0; g < G; g++) {
        __m256 v[4], top = _mm256_setzero_ps(), total = _mm256_setzero_ps();
        for (int r = 0; r < 4; r++) {
            v[r] = _mm256_loadu_ps(x + 32 * g + 8 * r);
            top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v[r]));
            total = _mm256_add_ps(total, v[r]);
        }
        float amax = max8(top);
        const float sum = sum8(total);
        if (!isfinite(amax) || !isfinite(sum))  /* inf or nan (which max may skip): let it reach the output */
            amax = NAN;
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
        int16_t t[32], *out = order == NATURAL ? xq + 32 * g : t;  /* WORD_LANES: placed one by one below */
        for (int r = 0; r < 2; r++) {  /* 16 int16 in order: packs interleaves 128-bit lanes, the permute undoes it */
            const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * r], inv));
            const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * r + 1], inv));
            _mm256_storeu_si256((__m256i *)(out + 16 * r), _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xd8));
        }
        if (order == WORD_LANES)
            for (int j = 0; j < 32; j++)
                xq[q4_position(g, G, j)] = t[j];
        s[g] = amax / 32767.f;
        xsum[g] = sum;
    }
}

/* The activations of M rows as int16 per group of 32 (quantize_row), in one buffer of
 * QUANTIZED_BYTES(M, K): xq (M, K), then s and xsum (M, K/32) each. (The tiled kernels' two int8 digits take
 * the same room, with M rounded up to whole panels of 16 rows: PANEL_ROWS, and five numbers per block.) */
#define PANEL_ROWS(M) (((M) + 15) / 16 * 16)
#define QUANTIZED_BYTES(M, K) (sizeof(int16_t) * PANEL_ROWS(M) * (K) + 5 * sizeof(float) * (M) * ((K) / 32))

static void quantize_rows(const float *x, int64_t M, int64_t K, int16_t *xq, int order) {
    float *s = (float *)(xq + M * K), *xsum = s + M * (K / 32);
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, xq + m * K, s + m * (K / 32), xsum + m * (K / 32), order);
}

/* Two groups' codes (32 bytes) with their 64 activations in WORD_LANES order -> 8 int32 partial sums:
 * lanes 0-3 of the first group, 4-7 of the second */
static inline __m256i pair_dot_codes(__m256i b, const int16_t *x) {
    const __m256i low4 = _mm256_set1_epi16(15);
    const __m256i v0 = _mm256_and_si256(b, low4);                         /* weights 2i */
    const __m256i v1 = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);   /* 2i + 16 */
    const __m256i v2 = _mm256_and_si256(_mm256_srli_epi16(b, 8), low4);   /* 2i + 1 */
    const __m256i v3 = _mm256_srli_epi16(b, 12);                          /* 2i + 17 */
    const __m256i *xv = (const __m256i *)x;
    return _mm256_add_epi32(
        _mm256_add_epi32(_mm256_madd_epi16(v0, _mm256_loadu_si256(xv)), _mm256_madd_epi16(v1, _mm256_loadu_si256(xv + 1))),
        _mm256_add_epi32(_mm256_madd_epi16(v2, _mm256_loadu_si256(xv + 2)), _mm256_madd_epi16(v3, _mm256_loadu_si256(xv + 3))));
}

static inline __m256i pair_dot(const uint8_t *q, const int16_t *x) {
    return pair_dot_codes(_mm256_loadu_si256((const __m256i *)q), x);
}

/* The same for one group alone (a row's last group when their number is odd) -> 4 int32 partial sums */
static inline __m128i single_dot(const uint8_t *q, const int16_t *x) {
    const __m128i low4 = _mm_set1_epi16(15);
    const __m128i b = _mm_loadu_si128((const __m128i *)q);
    const __m128i *xv = (const __m128i *)x;
    return _mm_add_epi32(
        _mm_add_epi32(_mm_madd_epi16(_mm_and_si128(b, low4), _mm_loadu_si128(xv)),
                      _mm_madd_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low4), _mm_loadu_si128(xv + 1))),
        _mm_add_epi32(_mm_madd_epi16(_mm_and_si128(_mm_srli_epi16(b, 8), low4), _mm_loadu_si128(xv + 2)),
                      _mm_madd_epi16(_mm_srli_epi16(b, 12), _mm_loadu_si128(xv + 3))));
}

static inline int32_t sum4i(__m128i v) {
    v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(v, _mm_shuffle_epi32(v, 0xb1)));
}

/* codes (N, K/2) uint8; dc (N, 2, K/32) fp16: each row's scales d, then its mins c; xq: M rows of
 * activations from quantize_rows in WORD_LANES order -> y (M, N) float32, rows ldy apart; work-sharing */
static void q4_rows(const int16_t *xq, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *dc, int64_t N,
                    float *y, int64_t ldy) {
    const int64_t G = K / 32, G8 = G / 8 * 8;
    const float *s = (const float *)(xq + M * K), *xsum = s + M * G;
    const __m256i evens_then_odds = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
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
                const uint8_t *q = qn + 16 * g;
                const int16_t *x = xm + 32 * g;
                if (m == 0) {  /* AHEAD bytes on, in both streams: the codes, and the scales and mins at 1/4 of that */
                    _mm_prefetch((const char *)q + AHEAD, _MM_HINT_T0);
                    _mm_prefetch((const char *)q + AHEAD + 64, _MM_HINT_T0);
                    _mm_prefetch((const char *)(d + g) + AHEAD / 4, _MM_HINT_T0);
                    _mm_prefetch((const char *)(c + g) + AHEAD / 4, _MM_HINT_T0);
                }
                /* two rounds of pairwise adds: the groups' sums in the order 0 2 4 6 | 1 3 5 7 */
                const __m256i dots = _mm256_hadd_epi32(_mm256_hadd_epi32(pair_dot(q, x), pair_dot(q + 32, x + 64)),
                                                       _mm256_hadd_epi32(pair_dot(q + 64, x + 128), pair_dot(q + 96, x + 192)));
                const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + g)));
                const __m256 c8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(c + g)));
                const __m256 ds = _mm256_permutevar8x32_ps(_mm256_mul_ps(d8, _mm256_loadu_ps(sm + g)), evens_then_odds);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), ds, acc);
                offsets = _mm256_fmadd_ps(c8, _mm256_loadu_ps(xsm + g), offsets);
            }
            float rest = 0.f;  /* the last G % 8 groups: by pairs (lanes 0-3 group g, 4-7 group g+1), then one alone */
            for (; g + 2 <= G; g += 2) {
                const __m256 ds = _mm256_set_m128(_mm_set1_ps(_cvtsh_ss(d[g + 1]) * sm[g + 1]),
                                                  _mm_set1_ps(_cvtsh_ss(d[g]) * sm[g]));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_dot(qn + 16 * g, xm + 32 * g)), ds, acc);
                rest += _cvtsh_ss(c[g]) * xsm[g] + _cvtsh_ss(c[g + 1]) * xsm[g + 1];
            }
            if (g < G)
                rest += _cvtsh_ss(d[g]) * sm[g] * (float)sum4i(single_dot(qn + 16 * g, xm + 32 * g))
                        + _cvtsh_ss(c[g]) * xsm[g];
            y[m * ldy + n] = sum8(_mm256_add_ps(acc, offsets)) + rest;
        }
    }
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

/* Eight groups' 8 int32 partial sums each (p[0..7]) -> one vector holding the 8 groups' sums */
static inline __m256i reduce8(const __m256i *p) {
    /* pairwise horizontal adds: lanes 0-3 then hold groups 0-3's partial sums of the low 128 bits, 4-7 of the high */
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

static inline __m256i group_dot_q8(const int8_t *q, const int16_t *x) {
    const __m256i b = _mm256_loadu_si256((const __m256i *)q);
    const __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(b));       /* weights 0..15 */
    const __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(b, 1));  /* weights 16..31 */
    return _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                            _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 16))));
}

/* Rows longer than this prefetch their int8 weights into L2 only (not L1), where the activations (2K bytes
 * of int16) fill much of L1 themselves. One row times a matrix, 2 threads, AVX-512 EPYC 2026-12-03:
 * 4096 x 14336 16.5 -> 23.3 GB/s (PyTorch's int8 kernel: 26), 2048 x 5632 19.9 -> 24.5; 14336 x 4096 even;
 * but 960 x 576 20 -> 15 GB/s, hence the rows of 4096 and fewer keep prefetching into L1. */
#define Q8_L1_PREFETCH_MAX_K 4096

/* the 4 cache lines AHEAD bytes after p, into L2 only or into L1 too (the hint must be a constant) */
static inline void prefetch_q8(const int8_t *p, int to_l2) {
    for (int j = 0; j < 4; j++) {
        if (to_l2)
            _mm_prefetch((const char *)p + AHEAD + 64 * j, _MM_HINT_T1);
        else
            _mm_prefetch((const char *)p + AHEAD + 64 * j, _MM_HINT_T0);
    }
}

/* xq: M rows of activations from quantize_rows -> y (M, N), rows ldy apart; work-sharing */
static void q8_rows(const int16_t *xq, int64_t M, int64_t K, const int8_t *w, const float *scales, int64_t N,
                    float *y, int64_t ldy) {
    const int64_t G = K / 32, G8 = G / 8 * 8;
    const float *s = (const float *)(xq + M * K);
    const int to_l2 = K > Q8_L1_PREFETCH_MAX_K;
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
                if (m == 0)
                    prefetch_q8(wn + 32 * g, to_l2);
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

/* ---- ggml blocks, read where the file holds them ----
 *
 * A quantized GGUF file stores each row of W as blocks of 32 weights, each block's fp16 scale beside its codes:
 *   Q4_0  18 bytes: d, then 16 bytes of codes (byte j: weight j in the low nibble, j+16 in the high)   w = d (q - 8)
 *   Q4_1  20 bytes: d, m, then 16 bytes of codes as Q4_0                                                w = d q + m
 *   Q8_0  34 bytes: d, then 32 int8 codes                                                               w = d q
 * The products below read those blocks where they are: the file is memory-mapped, nothing is repacked when
 * it loads, and the weights are the file's own, bit for bit. The 4-bit codes are in the byte order of the
 * 'avx2' layout above, so two blocks' 16 code bytes, loaded into one register, go through the same
 * pair_dot; only the scales, a block apart instead of side by side, are read one by one. With the
 * activations as int16 per block (quantize_row):
 *     Q4_0: y = sum_g d s (sum_j q_j xq_j) - 8 d (sum_j x_j)      Q4_1: ... + m (sum_j x_j)
 *     Q8_0: y = sum_g d s (sum_j q_j xq_j)
 */
enum { Q4_0_BYTES = 18, Q4_1_BYTES = 20, Q8_0_BYTES = 34 };

static inline float fp16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* the fp16 numbers at byte `at` of 8 consecutive blocks of bb bytes -> 8 floats */
static inline __m256 fp16_of_8(const uint8_t *b, int64_t bb, int at) {
    uint16_t h[8];
    for (int i = 0; i < 8; i++)
        memcpy(h + i, b + i * bb + at, 2);
    return _mm256_cvtph_ps(_mm_setr_epi16(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]));
}

/* the codes of blocks b and b + bb (16 bytes each, at byte q_at of each) as one register, then pair_dot */
static inline __m256i block_pair_dot(const uint8_t *b, int64_t bb, int q_at, const int16_t *x) {
    const __m256i codes = _mm256_loadu2_m128i((const __m128i *)(b + bb + q_at), (const __m128i *)(b + q_at));
    return pair_dot_codes(codes, x);
}

/* Q4_0 / Q4_1 blocks (bb = 18 / 20 bytes) times xq (WORD_LANES order) -> y (M, N), rows ldy apart; work-sharing */
static void q4_block_rows(const int16_t *xq, int64_t M, int64_t K, const uint8_t *w, int64_t bb, int64_t N,
                          float *y, int64_t ldy) {
    const int64_t G = K / 32, G8 = G / 8 * 8, row_bytes = G * bb;
    const int has_min = bb == Q4_1_BYTES, q_at = has_min ? 4 : 2;
    const float *s = (const float *)(xq + M * K), *xsum = s + M * G;
    const __m256i evens_then_odds = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256 minus8 = _mm256_set1_ps(-8.f);
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * row_bytes;
        for (int64_t m = 0; m < M; m++) {
            const int16_t *xm = xq + m * K;
            const float *sm = s + m * G, *xsm = xsum + m * G;
            __m256 acc = _mm256_setzero_ps(), offsets = _mm256_setzero_ps();
            int64_t g = 0;
            for (; g < G8; g += 8) {
                const uint8_t *b = row + g * bb;
                const int16_t *x = xm + 32 * g;
                if (m == 0)  /* 8 blocks are 144 or 160 bytes: three cache lines, AHEAD bytes on */
                    for (int j = 0; j < 3; j++)
                        _mm_prefetch((const char *)b + AHEAD + 64 * j, _MM_HINT_T0);
                const __m256i dots = _mm256_hadd_epi32(
                    _mm256_hadd_epi32(block_pair_dot(b, bb, q_at, x), block_pair_dot(b + 2 * bb, bb, q_at, x + 64)),
                    _mm256_hadd_epi32(block_pair_dot(b + 4 * bb, bb, q_at, x + 128),
                                      block_pair_dot(b + 6 * bb, bb, q_at, x + 192)));
                const __m256 d8 = fp16_of_8(b, bb, 0);
                const __m256 c8 = has_min ? fp16_of_8(b, bb, 2) : _mm256_mul_ps(d8, minus8);
                const __m256 ds = _mm256_permutevar8x32_ps(_mm256_mul_ps(d8, _mm256_loadu_ps(sm + g)), evens_then_odds);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), ds, acc);
                offsets = _mm256_fmadd_ps(c8, _mm256_loadu_ps(xsm + g), offsets);
            }
            float rest = 0.f;  /* the last G % 8 blocks: by pairs, then one alone */
            for (; g + 2 <= G; g += 2) {
                const uint8_t *b = row + g * bb;
                const float d0 = fp16_at(b), d1 = fp16_at(b + bb);
                const __m256 ds = _mm256_set_m128(_mm_set1_ps(d1 * sm[g + 1]), _mm_set1_ps(d0 * sm[g]));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_pair_dot(b, bb, q_at, xm + 32 * g)), ds, acc);
                rest += (has_min ? fp16_at(b + 2) : -8.f * d0) * xsm[g] + (has_min ? fp16_at(b + bb + 2) : -8.f * d1) * xsm[g + 1];
            }
            if (g < G) {
                const uint8_t *b = row + g * bb;
                const float d0 = fp16_at(b);
                rest += d0 * sm[g] * (float)sum4i(single_dot(b + q_at, xm + 32 * g))
                        + (has_min ? fp16_at(b + 2) : -8.f * d0) * xsm[g];
            }
            y[m * ldy + n] = sum8(_mm256_add_ps(acc, offsets)) + rest;
        }
    }
}

/* Q8_0 blocks times xq (NATURAL order) -> y (M, N), rows ldy apart; work-sharing */
static void q8_block_rows(const int16_t *xq, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y,
                          int64_t ldy) {
    const int64_t G = K / 32, G8 = G / 8 * 8, row_bytes = G * Q8_0_BYTES;
    const float *s = (const float *)(xq + M * K);
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * row_bytes;
        for (int64_t m = 0; m < M; m++) {
            const int16_t *xm = xq + m * K;
            const float *sm = s + m * G;
            __m256 acc = _mm256_setzero_ps();
            int64_t g = 0;
            for (; g < G8; g += 8) {
                const uint8_t *b = row + g * Q8_0_BYTES;
                __m256i p[8];
                if (m == 0)  /* 8 blocks are 272 bytes: five cache lines */
                    for (int j = 0; j < 5; j++)
                        _mm_prefetch((const char *)b + AHEAD + 64 * j, _MM_HINT_T0);
                for (int j = 0; j < 8; j++)
                    p[j] = group_dot_q8((const int8_t *)(b + j * Q8_0_BYTES + 2), xm + 32 * (g + j));
                const __m256 ds = _mm256_mul_ps(fp16_of_8(b, Q8_0_BYTES, 0), _mm256_loadu_ps(sm + g));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(p)), ds, acc);
            }
            float rest = 0.f;
            for (; g < G; g++) {
                const uint8_t *b = row + g * Q8_0_BYTES;
                rest += fp16_at(b) * sm[g] * sum8(_mm256_cvtepi32_ps(group_dot_q8((const int8_t *)(b + 2), xm + 32 * g)));
            }
            y[m * ldy + n] = sum8(acc) + rest;
        }
    }
}

/* Rows of ggml blocks as float32: out (n, K) = the weights of rows r0 .. r0+n-1 (rows == NULL) or of rows
 * rows[0 .. n-1], by the formulas above (each weight one float32 multiply, and Q4_1's add: as the gguf
 * package computes them). kind: 3 Q4_0, 4 Q4_1, 5 Q8_0. */
void block_dequantize(int64_t kind, const uint8_t *w, int64_t K, int64_t r0, const int64_t *rows, int64_t n,
                      float *out, int nthreads) {
    const int64_t G = K / 32, bb = kind == 3 ? Q4_0_BYTES : kind == 4 ? Q4_1_BYTES : Q8_0_BYTES;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n * K > (1 << 16))
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = w + (rows ? rows[i] : r0 + i) * G * bb;
        float *o = out + i * K;
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *b = row + g * bb;
            const __m256 d = _mm256_set1_ps(fp16_at(b));
            float *og = o + 32 * g;
            if (kind == 5) {
                for (int j = 0; j < 32; j += 8) {
                    const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + j)));
                    _mm256_storeu_ps(og + j, _mm256_mul_ps(d, _mm256_cvtepi32_ps(q)));
                }
                continue;
            }
            const __m128i codes = _mm_loadu_si128((const __m128i *)(b + (kind == 4 ? 4 : 2)));
            const __m128i lo = _mm_and_si128(codes, _mm_set1_epi8(15));
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(codes, 4), _mm_set1_epi8(15));
            const __m128i halves[2] = {lo, hi};  /* weights 0-15, then 16-31 */
            for (int h = 0; h < 2; h++)
                for (int j = 0; j < 16; j += 8) {
                    const __m256i q = _mm256_cvtepu8_epi32(_mm_srli_si128(halves[h], j));
                    __m256 v;
                    if (kind == 3)  /* d (q - 8) */
                        v = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(8))));
                    else  /* d q + m: the product rounded, then the sum, as the gguf package */
                        v = _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(q)), _mm256_set1_ps(fp16_at(b + 2)));
                    _mm256_storeu_ps(og + 16 * h + j, v);
                }
        }
    }
}

/* ---- Q4_0 / Q4_1 tiles: integer products with AVX-512 VNNI, for decoding and prompts alike ----
 *
 * A prompt multiplies many activation rows by each matrix, so it is bound by arithmetic, not by memory.
 * The float route (dequantize a panel of W, then PyTorch's float32 GEMM) does one multiply-add per weight
 * and row in float32. Here each activation is written as two int8 digits per block of 32 (quantize_rows_int8:
 * as precise as int16) and each instruction vpdpbusd multiplies 32 unsigned 4-bit codes by 32 int8 digits
 * and adds them, four at a time, into eight int32 sums, two passes per block:
 *     y[m, n] = sum_g d s (sum_j q_j x_j)  -  8 d s (sum_j x_j)  [Q4_0]     + m s (sum_j x_j)  [Q4_1]
 * with x_j = 254 x1_j + x2_j the integer activations and s their scale.
 *
 * The eight lanes of a register hold eight rows n of W: a tile of 8 rows' blocks g (the tiled layout below) is
 * read once and serves J activation rows, each adding its 32 values by vpdpbusd with four of its digits
 * broadcast to every lane. The sums of a tile are the outputs y[m, n..n+7] directly: no horizontal additions.
 * Compiled for AVX-512 VNNI (the 256-bit forms, with AVX512VL) as a target of its own; Python calls it only
 * where /proc/cpuinfo lists avx512_vnni, avx512vl and avx512bw.
 */
#define VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
#define GEMM_ROWS 16  /* activation rows per pass over a tile of 8 weight rows */

/* Where the two digits of row m, block g start in the digits buffer: panels of 16 rows, each panel block by
 * block, each block the 16 rows' 32 bytes of x1 then 32 of x2. The kernel reads a panel front to back, one
 * stream of memory for 16 rows (the rows' own (M, K) arrays were 32 streams, more than the prefetchers
 * follow: 10% slower, measured). */
static inline int64_t digits_at(int64_t m, int64_t g, int64_t G) { return ((m >> 4) * G + g) * 1024 + (m & 15) * 64; }

/* Activation rows as two int8 digits (quantize_rows_int8): where each part lies in one buffer (int8_parts_of) */
typedef struct {
    int8_t *xq;      /* the digits, panels of 16 rows (digits_at) */
    float *s;        /* (M, K/32) s2 */
    int32_t *xsum;   /* (M, K/32) the block's sum of 254 x1 + x2 */
    float *ssum;     /* (M, K/32) s2 xsum */
    int32_t *xoff;   /* (M, K/32, 2) -32 times the block's sums of its first and last 16 values (for Q6_K) */
} int8_parts;

/* the sum of a register's eight int32 lanes */
static inline int32_t sum8i(__m256i v) {
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1)));
}

/* x (M, K) float32 -> each value as two int8 digits: x ~ s1 x1 + s2 x2 per block of 32, with
 *     s1 = max|x| / 127,  x1 = round(x / s1),  s2 = s1 / 254,  x2 = round((x - s1 x1) / s2)
 * (|x - s1 x1| <= s1 / 2, so |x2| <= 127), so x = s2 (254 x1 + x2) within s2 / 2 = max|x| / 64516: as precise as
 * the int16 activations of the other kernels (max|x| / 65534), and a product is 254 (q . x1) + (q . x2), two
 * vpdpbusd passes. One pass (int8 activations, llama.cpp's way) was 1.9x faster but changed the default model's
 * answers: a 512-row prompt rounded so moved SmolLM2 off "The capital of France is Paris." (measured).
 * digits: x1 and x2 of each block where digits_at says; s (M, G) = s2; xsum (M, G) = sum over the block of
 * 254 x1 + x2; ssum (M, G) = s2 xsum (Q4_1's minimum term, m s2 xsum, then costs one multiply-add); xoff (M, G, 2) =
 * -32 times the sums of the block's first and last 16 values (Q6_K: 16 weights a scale, codes offset by 32). */
VNNI static void quantize_rows_int8(const float *x, int64_t M, int64_t K, const int8_parts *a) {
    const int64_t G = K / 32;
    int8_t *digits = a->xq;
    float *s = a->s, *ssum = a->ssum;
    int32_t *xsum = a->xsum, *xoff = a->xoff;
    const __m256 sign = _mm256_set1_ps(-0.f);
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < M * G; i++) {
        const float *v = x + i * 32;
        __m256 top = _mm256_setzero_ps();
        for (int r = 0; r < 4; r++)
            top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + 8 * r)));
        float amax = max8(top);
        if (!isfinite(amax))  /* inf or nan: let it reach the output */
            amax = NAN;
        const float s1 = amax / 127.f;
        const __m256 inv1 = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        const __m256 inv2 = _mm256_set1_ps(amax > 0.f ? 254.f * 127.f / amax : 0.f);
        __m256i q1[4], q2[4];
        for (int r = 0; r < 4; r++) {
            const __m256 xv = _mm256_loadu_ps(v + 8 * r);
            q1[r] = _mm256_cvtps_epi32(_mm256_mul_ps(xv, inv1));
            const __m256 rest = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(q1[r]), _mm256_set1_ps(s1), xv);
            q2[r] = _mm256_cvtps_epi32(_mm256_mul_ps(rest, inv2));
        }
        int32_t total = 0, half = 0;
        for (int pass = 0; pass < 2; pass++) {
            const __m256i *q = pass ? q2 : q1;
            int8_t *out = digits + digits_at(i / G, i % G, G) + 32 * pass;
            const __m128i a = _mm_packs_epi32(_mm256_castsi256_si128(q[0]), _mm256_extracti128_si256(q[0], 1));
            const __m128i b = _mm_packs_epi32(_mm256_castsi256_si128(q[1]), _mm256_extracti128_si256(q[1], 1));
            const __m128i c = _mm_packs_epi32(_mm256_castsi256_si128(q[2]), _mm256_extracti128_si256(q[2], 1));
            const __m128i d = _mm_packs_epi32(_mm256_castsi256_si128(q[3]), _mm256_extracti128_si256(q[3], 1));
            _mm_storeu_si128((__m128i *)out, _mm_packs_epi16(a, b));
            _mm_storeu_si128((__m128i *)(out + 16), _mm_packs_epi16(c, d));
            const __m256i first = _mm256_add_epi32(q[0], q[1]);  /* the block's first 16 values */
            total += (pass ? 1 : 254) * sum8i(_mm256_add_epi32(first, _mm256_add_epi32(q[2], q[3])));
            half += (pass ? 1 : 254) * sum8i(first);
        }
        xsum[i] = total;
        xoff[2 * i] = -32 * half;
        xoff[2 * i + 1] = -32 * (total - half);
        s[i] = s1 / 254.f;
        ssum[i] = s[i] * (float)total;
    }
}

/* acc + the products of w's unsigned bytes with the 4 signed bytes at p, broadcast to every lane (vpdpbusd with an
 * embedded broadcast: one instruction; the intrinsics' form compiled to a separate broadcast before each) */
VNNI static inline __m256i dpbusd_broadcast(__m256i acc, __m256i w, const int32_t *p) {
    __asm__("vpdpbusd %2%{1to8%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*p));
    return acc;
}

/* The tiled layout: a Q4_0 / Q4_1 matrix regrouped at load (q4x8_repack) so that the eight lanes of a register
 * hold eight rows, with nothing left to turn at run time. Tile (t, g) = rows 8t .. 8t+7, block g, the same
 * bytes as their eight file blocks (144 for Q4_0, 160 for Q4_1), in this order:
 *     8 fp16 d (row 8t+r at r), [Q4_1: 8 fp16 m], then P_0 .. P_3, 32 bytes each: word r of P_k = code bytes
 *     4k .. 4k+3 of row 8t+r (low nibbles: weights 4k .. 4k+3, high nibbles: weights 16+4k .. 16+4k+3)
 * Tiles are stored t-major (all blocks of rows 8t .. 8t+7, then the next eight rows); a last tile of fewer than
 * 8 rows repeats the matrix's last row. */
static inline int64_t q4x8_tile_bytes(int64_t bb) { return 8 * bb; }

/* The file block that row r of tile t takes in block column g (G columns of bb bytes a row): a last tile of fewer
 * than 8 rows repeats the matrix's last row, so every tile is whole */
static inline const uint8_t *tile_source(const uint8_t *w, int64_t N, int64_t t, int r, int64_t G, int64_t g,
                                         int64_t bb) {
    return w + ((8 * t + r < N ? 8 * t + r : N - 1) * G + g) * bb;
}

/* Writes row r's share of one tile from that row's file block */
typedef void (*tile_filler)(uint8_t *tile, const uint8_t *block, int r);

/* The repack loop of the tiles built row by row (Q8_0, Q4_K, Q6_K): for every tile t and block column g (G columns
 * of bb-byte file blocks a row), the tile of TB bytes at (t G + g) TB, zeroed, then each of its 8 rows filled in */
static void tiles_by_rows(const uint8_t *w, int64_t N, int64_t G, int64_t bb, int64_t TB, tile_filler fill,
                          uint8_t *out, int nthreads) {
    const int64_t tiles = (N + 7) / 8;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t g = 0; g < G; g++) {
            uint8_t *o = out + (t * G + g) * TB;
            memset(o, 0, TB);
            for (int r = 0; r < 8; r++)
                fill(o, tile_source(w, N, t, r, G, g, bb), r);
        }
}

/* kind: 6 (Q4_0) or 7 (Q4_1), the kinds of the tiled matrix it makes */
void q4x8_repack(const uint8_t *w, int64_t N, int64_t K, int64_t kind, uint8_t *out, int nthreads) {
    const int has_min = kind == 7, q_at = has_min ? 4 : 2, codes_at = has_min ? 32 : 16;
    const int64_t G = K / 32, bb = has_min ? Q4_1_BYTES : Q4_0_BYTES, TB = q4x8_tile_bytes(bb);
    const int64_t tiles = (N + 7) / 8;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t g = 0; g < G; g++) {
            uint8_t *o = out + (t * G + g) * TB;
            const uint8_t *b[8];
            for (int r = 0; r < 8; r++) {
                b[r] = tile_source(w, N, t, r, G, g, bb);
                memcpy(o + 2 * r, b[r], 2);
                if (has_min)
                    memcpy(o + 16 + 2 * r, b[r] + 2, 2);
            }
            /* rows r and r+4 in the two halves, then a 4x4 transpose of 32-bit words in each half */
            const __m256i a0 = _mm256_loadu2_m128i((const __m128i *)(b[4] + q_at), (const __m128i *)(b[0] + q_at));
            const __m256i a1 = _mm256_loadu2_m128i((const __m128i *)(b[5] + q_at), (const __m128i *)(b[1] + q_at));
            const __m256i a2 = _mm256_loadu2_m128i((const __m128i *)(b[6] + q_at), (const __m128i *)(b[2] + q_at));
            const __m256i a3 = _mm256_loadu2_m128i((const __m128i *)(b[7] + q_at), (const __m128i *)(b[3] + q_at));
            const __m256i t0 = _mm256_unpacklo_epi32(a0, a1), t1 = _mm256_unpackhi_epi32(a0, a1);
            const __m256i t2 = _mm256_unpacklo_epi32(a2, a3), t3 = _mm256_unpackhi_epi32(a2, a3);
            __m256i *p = (__m256i *)(o + codes_at);
            _mm256_storeu_si256(p, _mm256_unpacklo_epi64(t0, t2));
            _mm256_storeu_si256(p + 1, _mm256_unpackhi_epi64(t0, t2));
            _mm256_storeu_si256(p + 2, _mm256_unpacklo_epi64(t1, t3));
            _mm256_storeu_si256(p + 3, _mm256_unpackhi_epi64(t1, t3));
        }
}

/* One block of 32 weights of a 4-bit tile (8 rows: codes P_0 .. P_3 at `codes`, per-row scale d and, with
 * has_min, minimum c) times J activation rows m0 .. m0+J-1 of block g: acc[j] += the 8 rows' products */
VNNI static inline void q4x8_block(const uint8_t *codes, __m256 d, __m256 c, int has_min, int64_t g, int64_t G,
                                   const int8_parts *a, int64_t m0, int J, __m256 *acc) {
    const float *s = a->s, *ssum = a->ssum;
    const int32_t *xsum = a->xsum;
    const __m256i low4 = _mm256_set1_epi8(15);
    __m256i lo[4], hi[4];  /* codes of weights 4k .. 4k+3 and 16+4k .. 16+4k+3 of each row */
    for (int k = 0; k < 4; k++) {
        const __m256i p = _mm256_loadu_si256((const __m256i *)(codes + 32 * k));
        lo[k] = _mm256_and_si256(p, low4);
        hi[k] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low4);
    }
    const int8_t *panel = a->xq + digits_at(m0, g, G);  /* rows m0 .. m0+J-1 lie in one panel, 64 bytes apart */
    for (int j = 0; j < J; j++) {
        const int64_t m = m0 + j;
        const int32_t *x1 = (const int32_t *)(panel + 64 * j), *x2 = x1 + 8;
        const int32_t total = xsum[m * G + g];
        /* four sums of four products each, not two of eight: each vpdpbusd waits for the one before it in
         * its sum (4 cycles), and four independent sums keep both of a core's VNNI units busy */
        __m256i d1 = _mm256_setzero_si256(), e1 = _mm256_setzero_si256(), e2 = _mm256_setzero_si256();
        __m256i d2 = _mm256_set1_epi32(has_min ? 0 : -8 * total);  /* Q4_0: q - 8 */
        for (int k = 0; k < 4; k++) {
            d1 = dpbusd_broadcast(d1, lo[k], x1 + k);
            e1 = dpbusd_broadcast(e1, hi[k], x1 + 4 + k);
            d2 = dpbusd_broadcast(d2, lo[k], x2 + k);
            e2 = dpbusd_broadcast(e2, hi[k], x2 + 4 + k);
        }
        d1 = _mm256_add_epi32(d1, e1);
        d2 = _mm256_add_epi32(d2, e2);
        /* 254 (q . x1) + (q . x2) */
        const __m256i dot = _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(d1, 8), _mm256_slli_epi32(d1, 1)), d2);
        const __m256 sg = _mm256_set1_ps(s[m * G + g]);
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, sg), acc[j]);
        if (has_min)  /* Q4_1, Q4_K: + m s (sum_j xq_j) */
            acc[j] = _mm256_fmadd_ps(c, _mm256_set1_ps(ssum[m * G + g]), acc[j]);
    }
}

/* acc[j] (the 8 rows' sums) -> y[m0 + j, n .. n+valid-1] */
static inline void store_tile_rows(const __m256 *acc, int J, float *y, int64_t ldy, int64_t m0, int64_t n, int valid) {
    for (int j = 0; j < J; j++) {
        if (valid == 8) {
            _mm256_storeu_ps(y + (m0 + j) * ldy + n, acc[j]);
            continue;
        }
        float out[8];
        _mm256_storeu_ps(out, acc[j]);
        for (int r = 0; r < valid; r++)
            y[(m0 + j) * ldy + n + r] = out[r];
    }
}

/* Tile row t (all its blocks) times J activation rows m0 .. m0+J-1 (quantize_rows_int8's digits) -> y[m, 8t ..
 * 8t+7] (only `valid` stored) */
VNNI static inline void q4x8_tile(const uint8_t *tile, int has_min, int64_t G, const int8_parts *a, int64_t m0, int J,
                                  float *y, int64_t ldy, int64_t n, int valid) {
    const int64_t TB = has_min ? 160 : 144;
    __m256 acc[GEMM_ROWS];
    for (int j = 0; j < J; j++)
        acc[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *b = tile + g * TB;
        if (J == 1)  /* decoding: the tiles stream from memory, AHEAD bytes on */
            for (int i = 0; i < 3; i++)
                _mm_prefetch((const char *)b + AHEAD + 64 * i, _MM_HINT_T0);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
        const __m256 c = has_min ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16))) : _mm256_setzero_ps();
        q4x8_block(b + (has_min ? 32 : 16), d, c, has_min, g, G, a, m0, J, acc);
    }
    store_tile_rows(acc, J, y, ldy, m0, n, valid);
}

/* ---- Q4_K tiles: the file's super-blocks of 256 weights, 8 rows side by side ----
 *
 * Tile (t, S) = rows 8t .. 8t+7, super-block S, 1184 bytes (the file's eight 144-byte blocks take 1152):
 *     8 fp16 d, 8 fp16 dmin (row 8t+r at r), then for each sub-block j = 0..7 of 32 weights, 144 bytes:
 *     8 bytes sc (row r at r), 8 bytes mn, then P_0 .. P_3 as in the Q4_1 tiles (low nibbles weights 4k .. 4k+3,
 *     high nibbles 16+4k .. 16+4k+3 of the sub-block)
 * so a sub-block is a Q4_1 block with d = d sc and m = -dmin mn, both exact in float32 (an 11-bit d times a
 * 6-bit sc): w = d sc q - dmin mn, the file's weights exactly. */
#define Q4KX8_TILE 1184

static inline int q4k_scale(const uint8_t *s, int j);  /* (below, with the other Q4_K conversions) */
static inline int q4k_min(const uint8_t *s, int j);
static inline uint8_t q4k_codes(const uint8_t *qs, int j, int i);

static void q4kx8_fill(uint8_t *o, const uint8_t *b, int r) {
    memcpy(o + 2 * r, b, 2);
    memcpy(o + 16 + 2 * r, b + 2, 2);
    for (int j = 0; j < 8; j++) {
        uint8_t *sub = o + 32 + 144 * j;
        sub[r] = (uint8_t)q4k_scale(b + 4, j);
        sub[8 + r] = (uint8_t)q4k_min(b + 4, j);
        for (int i = 0; i < 16; i++)
            sub[16 + 32 * (i / 4) + 4 * r + i % 4] = q4k_codes(b + 16, j, i);
    }
}

void q4kx8_repack(const uint8_t *w, int64_t N, int64_t K, uint8_t *out, int nthreads) {
    tiles_by_rows(w, N, K / 256, 144, Q4KX8_TILE, q4kx8_fill, out, nthreads);
}

/* Tile row t of a Q4_K tiled matrix times J activation rows m0 .. m0+J-1 -> y[m, 8t .. 8t+7], as q4x8_tile */
VNNI static inline void q4kx8_tile(const uint8_t *tile, int64_t G, const int8_parts *a, int64_t m0, int J, float *y,
                                   int64_t ldy, int64_t n, int valid) {
    __m256 acc[GEMM_ROWS];
    for (int j = 0; j < J; j++)
        acc[j] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < G / 8; sb++) {
        const uint8_t *b = tile + sb * Q4KX8_TILE;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16)));
        for (int j = 0; j < 8; j++) {
            const uint8_t *sub = b + 32 + 144 * j;
            if (J == 1)
                for (int i = 0; i < 3; i++)
                    _mm_prefetch((const char *)sub + AHEAD + 64 * i, _MM_HINT_T0);
            const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)sub)));
            const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sub + 8))));
            q4x8_block(sub + 16, _mm256_mul_ps(d, sc), _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), dmin), mn),
                       1, 8 * sb + j, G, a, m0, J, acc);
        }
    }
    store_tile_rows(acc, J, y, ldy, m0, n, valid);
}

/* ---- Q8_0 tiles: the same two-digit products on 8-bit weights ----
 *
 * Tile (t, g) = rows 8t .. 8t+7, block g, 272 bytes (eight 34-byte Q8_0 blocks): 8 fp16 d (row 8t+r at r), then
 * P_0 .. P_7, 32 bytes each: word r of P_k = codes 4k .. 4k+3 of row 8t+r, each plus 128 (stored as q ^ 0x80):
 * vpdpbusd multiplies unsigned bytes by signed ones, so the weights are made unsigned and the activations keep
 * their sign; sum_j (q_j + 128) x_j - 128 sum_j x_j = sum_j q_j x_j, the correction from the block's xsum as
 * Q4_0's q - 8. Weights d q exactly as the file's; t-major like the 4-bit tiles. */
#define Q8X8_TILE 272

static void q8x8_fill(uint8_t *o, const uint8_t *b, int r) {
    memcpy(o + 2 * r, b, 2);
    for (int k = 0; k < 8; k++)
        for (int i = 0; i < 4; i++)
            o[16 + 32 * k + 4 * r + i] = b[2 + 4 * k + i] ^ 0x80;
}

void q8x8_repack(const uint8_t *w, int64_t N, int64_t K, uint8_t *out, int nthreads) {
    tiles_by_rows(w, N, K / 32, Q8_0_BYTES, Q8X8_TILE, q8x8_fill, out, nthreads);
}

/* Tile row t of a Q8_0 tiled matrix times J activation rows m0 .. m0+J-1 -> y[m, 8t .. 8t+7], as q4x8_tile */
VNNI static inline void q8x8_tile(const uint8_t *tile, int64_t G, const int8_parts *a, int64_t m0, int J, float *y,
                                  int64_t ldy, int64_t n, int valid) {
    const float *s = a->s;
    const int32_t *xsum = a->xsum;
    __m256 acc[GEMM_ROWS];
    for (int j = 0; j < J; j++)
        acc[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *b = tile + g * Q8X8_TILE;
        if (J == 1)
            for (int i = 0; i < 5; i++)
                _mm_prefetch((const char *)b + AHEAD + 64 * i, _MM_HINT_T0);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
        __m256i p[8];  /* codes 4k .. 4k+3 of each row, plus 128 */
        for (int k = 0; k < 8; k++)
            p[k] = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * k));
        const int8_t *panel = a->xq + digits_at(m0, g, G);
        for (int j = 0; j < J; j++) {
            const int64_t m = m0 + j;
            const int32_t *x1 = (const int32_t *)(panel + 64 * j), *x2 = x1 + 8;
            __m256i d1 = _mm256_setzero_si256(), e1 = _mm256_setzero_si256(), e2 = _mm256_setzero_si256();
            __m256i d2 = _mm256_set1_epi32(-128 * xsum[m * G + g]);  /* (q + 128) - 128 */
            for (int k = 0; k < 4; k++) {
                d1 = dpbusd_broadcast(d1, p[k], x1 + k);
                e1 = dpbusd_broadcast(e1, p[k + 4], x1 + 4 + k);
                d2 = dpbusd_broadcast(d2, p[k], x2 + k);
                e2 = dpbusd_broadcast(e2, p[k + 4], x2 + 4 + k);
            }
            d1 = _mm256_add_epi32(d1, e1);
            d2 = _mm256_add_epi32(d2, e2);
            const __m256i dot = _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(d1, 8), _mm256_slli_epi32(d1, 1)), d2);
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(s[m * G + g])), acc[j]);
        }
    }
    store_tile_rows(acc, J, y, ldy, m0, n, valid);
}

/* ---- Q6_K tiles: the file's super-blocks of 256 weights, 8 rows side by side, at the file's size ----
 *
 * Q6_K (210 bytes per 256 weights, described at q6k_code): 6-bit codes q (0..63), an int8 scale per 16
 * weights, one fp16 d; w = d sc (q - 32). Tile (t, S) = rows 8t .. 8t+7, super-block S, 1680 bytes (8 x 210):
 *     8 fp16 d (row 8t+r at r), then for each sub-block j = 0..7 of 32 weights, 208 bytes:
 *     8 int8 sc of its weights 0-15 (row r at r), 8 of its weights 16-31, P_0 .. P_3 as in the Q4 tiles (the codes'
 *     low 4 bits: weights 4k .. 4k+3 in the low nibbles, 16+4k .. 16+4k+3 in the high ones), then H_01 and H_23,
 *     32 bytes each: byte i of word r of H_01 = the top 2 bits of weights i, 16+i, 4+i, 20+i (2 bits each, from
 *     bit 0 up); H_23 the same for 8+i, 24+i, 12+i, 28+i
 * The kernel puts each code together (4 + 2 bits, 0..63, unsigned as vpdpbusd wants) and takes the 32 from the
 * digits' sums of the block's two halves (xoff): sum (q - 32) x = sum q x - 32 sum x. The file's weights exactly. */
#define Q6KX8_TILE 1680
#define Q6K_SUB 208

/* Code q (0..63) of weight w (0..255) of a Q6_K block b. The block, 210 bytes: 128 bytes ql (low 4 bits), 64 bytes
 * qh (high 2 bits), 16 int8 scales (one per 16 weights: sc[w / 16]), fp16 d; w = d sc (q - 32). Each half h of 128
 * weights: for l = 0..31, with ql + 64 h and qh + 32 h,
 *     weight l      low nibble of ql[l],      bits 0-1 of qh[l]
 *     weight l+32   low nibble of ql[l+32],   bits 2-3
 *     weight l+64   high nibble of ql[l],     bits 4-5
 *     weight l+96   high nibble of ql[l+32],  bits 6-7 */
static inline int q6k_code(const uint8_t *b, int w) {
    const int h = w / 128, m = (w % 128) / 32, l = w % 32;
    const uint8_t low = b[64 * h + l + 32 * (m & 1)];
    return (m >= 2 ? low >> 4 : low & 15) | (((b[128 + 32 * h + l] >> (2 * m)) & 3) << 4);
}

static void q6kx8_fill(uint8_t *o, const uint8_t *b, int r) {
    memcpy(o + 2 * r, b + 208, 2);
    for (int j = 0; j < 8; j++) {
        uint8_t *sub = o + 16 + Q6K_SUB * j;
        sub[r] = b[192 + 2 * j];
        sub[8 + r] = b[192 + 2 * j + 1];
        for (int i = 0; i < 16; i++) {
            const int qa = q6k_code(b, 32 * j + i), qb = q6k_code(b, 32 * j + 16 + i), k = i / 4;
            sub[16 + 32 * k + 4 * r + i % 4] = (uint8_t)((qa & 15) | (qb & 15) << 4);
            sub[144 + 32 * (k / 2) + 4 * r + i % 4] |= (uint8_t)(((qa >> 4) | (qb >> 4) << 2) << (4 * (k & 1)));
        }
    }
}

void q6kx8_repack(const uint8_t *w, int64_t N, int64_t K, uint8_t *out, int nthreads) {
    tiles_by_rows(w, N, K / 256, 210, Q6KX8_TILE, q6kx8_fill, out, nthreads);
}

/* Tile row t of a Q6_K tiled matrix times J activation rows m0 .. m0+J-1 -> y[m, 8t .. 8t+7], as q4x8_tile */
VNNI static inline void q6kx8_tile(const uint8_t *tile, int64_t G, const int8_parts *a, int64_t m0, int J, float *y,
                                   int64_t ldy, int64_t n, int valid) {
    const __m256i low4 = _mm256_set1_epi8(15), two = _mm256_set1_epi8(3), twoup = _mm256_set1_epi8(12);
    __m256 acc[GEMM_ROWS];
    for (int j = 0; j < J; j++)
        acc[j] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < G / 8; sb++) {
        const uint8_t *b = tile + sb * Q6KX8_TILE;
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
        for (int jb = 0; jb < 8; jb++) {
            const uint8_t *sub = b + 16 + Q6K_SUB * jb;
            if (J == 1)
                for (int i = 0; i < 4; i++)
                    _mm_prefetch((const char *)sub + AHEAD + 64 * i, _MM_HINT_T0);
            const __m256 da = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)sub))));
            const __m256 db = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sub + 8)))));
            __m256i lo[4], hi[4];  /* codes (0..63) of weights 4k .. 4k+3 and 16+4k .. 16+4k+3 of each row */
            for (int k = 0; k < 4; k++) {
                const __m256i p = _mm256_loadu_si256((const __m256i *)(sub + 16 + 32 * k));
                const __m256i h = _mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(sub + 144 + 32 * (k / 2))),
                                                    4 * (k & 1));
                lo[k] = _mm256_or_si256(_mm256_and_si256(p, low4), _mm256_slli_epi16(_mm256_and_si256(h, two), 4));
                hi[k] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(p, 4), low4),
                                        _mm256_slli_epi16(_mm256_and_si256(h, twoup), 2));
            }
            const int64_t g = 8 * sb + jb;
            const int8_t *panel = a->xq + digits_at(m0, g, G);
            for (int j = 0; j < J; j++) {
                const int64_t m = m0 + j;
                const int32_t *x1 = (const int32_t *)(panel + 64 * j), *x2 = x1 + 8;
                const int32_t *off = a->xoff + 2 * (m * G + g);  /* q - 32 */
                __m256i d1 = _mm256_setzero_si256(), e1 = _mm256_setzero_si256();
                __m256i d2 = _mm256_set1_epi32(off[0]), e2 = _mm256_set1_epi32(off[1]);
                for (int k = 0; k < 4; k++) {
                    d1 = dpbusd_broadcast(d1, lo[k], x1 + k);
                    e1 = dpbusd_broadcast(e1, hi[k], x1 + 4 + k);
                    d2 = dpbusd_broadcast(d2, lo[k], x2 + k);
                    e2 = dpbusd_broadcast(e2, hi[k], x2 + 4 + k);
                }
                /* 254 (q . x1) + (q . x2) for each half, each with its own scale */
                const __m256i A = _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(d1, 8), _mm256_slli_epi32(d1, 1)), d2);
                const __m256i B = _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(e1, 8), _mm256_slli_epi32(e1, 1)), e2);
                const __m256 halves = _mm256_fmadd_ps(_mm256_cvtepi32_ps(B), db, _mm256_mul_ps(_mm256_cvtepi32_ps(A), da));
                acc[j] = _mm256_fmadd_ps(halves, _mm256_set1_ps(a->s[m * G + g]), acc[j]);
            }
        }
    }
    store_tile_rows(acc, J, y, ldy, m0, n, valid);
}

/* One pass of J activation rows over a tile row, in the kernel of the matrix's kind (6, 7: Q4_0, Q4_1; 8: Q8_0;
 * 9: Q4_K; 10: Q6_K) */
VNNI static inline void tile_pass(int kind, const uint8_t *tile, int64_t G, const int8_parts *a, int64_t m0, int J,
                                  float *y, int64_t ldy, int64_t n, int valid) {
    if (kind == 8)
        q8x8_tile(tile, G, a, m0, J, y, ldy, n, valid);
    else if (kind == 9)
        q4kx8_tile(tile, G, a, m0, J, y, ldy, n, valid);
    else if (kind == 10)
        q6kx8_tile(tile, G, a, m0, J, y, ldy, n, valid);
    else
        q4x8_tile(tile, kind == 7, G, a, m0, J, y, ldy, n, valid);
}

/* A tiled matrix (N, K) of kind 6 to 10 times M activation rows already in `a` (quantize_rows_int8) -> y (M, N),
 * rows ldy apart; work-sharing over the tiles, each tile row taking the rows in passes of 16, 4 and 1. */
VNNI static void tiled_rows(int kind, const int8_parts *a, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y,
                            int64_t ldy) {
    static const int64_t tile_bytes[] = {144, 160, Q8X8_TILE, Q4KX8_TILE / 8, Q6KX8_TILE / 8};  /* per 32 of K */
    const int64_t G = K / 32, TB = tile_bytes[kind - 6];
    const int64_t tiles = (N + 7) / 8;
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int valid = N - 8 * t < 8 ? (int)(N - 8 * t) : 8;
        const uint8_t *tile = w + t * G * TB;
        int64_t m0 = 0;
        for (; m0 + GEMM_ROWS <= M; m0 += GEMM_ROWS)
            tile_pass(kind, tile, G, a, m0, GEMM_ROWS, y, ldy, 8 * t, valid);
        for (; m0 + 4 <= M; m0 += 4)
            tile_pass(kind, tile, G, a, m0, 4, y, ldy, 8 * t, valid);
        for (; m0 < M; m0++)
            tile_pass(kind, tile, G, a, m0, 1, y, ldy, 8 * t, valid);
    }
}

/* The two int8 digits of M rows in one buffer of QUANTIZED_BYTES(M, K): the digits (PANEL_ROWS(M), 2 K) as
 * digits_at lays them out, then s, xsum and ssum, (M, K/32) each, and xoff, (M, K/32, 2) */
static inline int8_parts int8_parts_of(void *buf, int64_t M, int64_t K) {
    int8_parts a;
    a.xq = (int8_t *)buf;
    a.s = (float *)(a.xq + 2 * PANEL_ROWS(M) * K);
    a.xsum = (int32_t *)(a.s + M * (K / 32));
    a.ssum = (float *)(a.xsum + M * (K / 32));
    a.xoff = (int32_t *)(a.ssum + M * (K / 32));
    return a;
}

/* ---- K-quant rows converted at load: Q4_K into the 'avx2' 4-bit layout, Q6_K into int8 per row ----
 *
 * These formats pack 256 weights with sub-block scales of their own (6-bit in Q4_K, int8 in Q6_K) under one
 * fp16 d; the products above do not read them in place, so a load converts them, once, row by row and
 * straight from the mapped file (a Python conversion of the 8B shape's Q4_K_M file took minutes).
 *
 * Q4_K, 144 bytes: d, dmin (fp16), 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks of 32, then
 * 128 bytes of codes: 32-byte chunk c holds sub-block 2c in its low nibbles and 2c+1 in its high ones.
 *     w = d sc q - dmin mn   ->  'avx2' group of 32: scale = d sc, min = -dmin mn (each rounded to fp16),
 *                                byte i = weight i | weight i+16 << 4
 * Pairs j = 0-3: sc = s[j] & 63, mn = s[j+4] & 63; j = 4-7: the low 4 bits from byte j+4 (low nibble: sc,
 * high: mn), the top 2 bits from the top bits of byte j-4 (sc) and byte j (mn).
 */
/* the 6-bit scale and min of sub-block j from a Q4_K block's 12 bytes s (as described above) */
static inline int q4k_scale(const uint8_t *s, int j) {
    return j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
}

static inline int q4k_min(const uint8_t *s, int j) {
    return j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
}

/* Byte i (0..15) of sub-block j in the 4-bit layouts' order, from a Q4_K block's 128 code bytes qs: weight i in the
 * low nibble, weight i+16 in the high one (sub-block j lies in chunk j/2, in its low nibbles when j is even) */
static inline uint8_t q4k_codes(const uint8_t *qs, int j, int i) {
    const uint8_t *chunk = qs + 32 * (j / 2);
    const int shift = 4 * (j & 1);
    return (uint8_t)(((chunk[i] >> shift) & 15) | (((chunk[i + 16] >> shift) & 15) << 4));
}

void q4k_to_avx2(const uint8_t *src, int64_t n, int64_t K, uint8_t *codes, uint16_t *dc, int nthreads) {
    const int64_t S = K / 256, G = K / 32;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        for (int64_t sb = 0; sb < S; sb++) {
            const uint8_t *b = src + (r * S + sb) * 144, *s = b + 4, *qs = b + 16;
            const float d = fp16_at(b), dmin = fp16_at(b + 2);
            for (int j = 0; j < 8; j++) {
                const int sc = q4k_scale(s, j), mn = q4k_min(s, j);
                const int64_t g = sb * 8 + j;
                dc[r * 2 * G + g] = _cvtss_sh(d * (float)sc, 0);
                dc[r * 2 * G + G + g] = _cvtss_sh(-dmin * (float)mn, 0);
                uint8_t *out = codes + r * (K / 2) + 16 * g;
                for (int i = 0; i < 16; i++)
                    out[i] = q4k_codes(qs, j, i);
            }
        }
    }
}

/* A Q6_K row (S blocks, q6k_code has the layout) dequantized into w (K floats: a row per thread), then quantized to
 * int8 with its own scale as quantize.quantize_per_channel does: s = max |w| / 127, q = round(w / s) (ties to
 * even). */
static void q6k_row(const uint8_t *b, int64_t S, float *w) {
    for (int64_t sb = 0; sb < S; sb++, b += 210, w += 256) {
        const float d = fp16_at(b + 208);
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int i = 0; i < 256; i++)
            w[i] = d * sc[i / 16] * (float)(q6k_code(b, i) - 32);
    }
}

static float abs_max(const float *v, int64_t n) {
    float top = 0.f;
    for (int64_t i = 0; i < n; i++)
        top = fabsf(v[i]) > top ? fabsf(v[i]) : top;
    return top;
}

/* q = round(v / s) (ties to even), clamped to +-127; all 0 when s is 0 */
static void round_int8(const float *v, int64_t n, float s, int8_t *q) {
    for (int64_t i = 0; i < n; i++) {
        const float x = s > 0.f ? nearbyintf(v[i] / s) : 0.f;
        q[i] = (int8_t)(x > 127.f ? 127.f : x < -127.f ? -127.f : x);
    }
}

/* Each Q6_K row dequantized into a row of K floats per thread (q6k_row), then handed to `emit` with its index (the
 * conversion to int8 rows below). Returns 0, or 1 when the rows' memory could not be had. */
typedef void (*row_sink)(const float *w, int64_t r, int64_t K, void *out);

static int q6k_each_row(const uint8_t *src, int64_t n, int64_t K, row_sink emit, void *out, int nthreads) {
    const int64_t S = K / 256;
    float *tmp = malloc(sizeof(float) * K * nthreads);
    if (!tmp)
        return 1;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        float *w = tmp + omp_get_thread_num() * K;
        q6k_row(src + r * S * 210, S, w);
        emit(w, r, K, out);
    }
    free(tmp);
    return 0;
}

typedef struct { int8_t *q; float *scales; } int8_rows;

static void int8_row(const float *w, int64_t r, int64_t K, void *out) {
    const int8_rows *o = out;
    const float top = abs_max(w, K), s = (top > 1e-12f ? top : 1e-12f) / 127.f;
    round_int8(w, K, s, o->q + r * K);
    o->scales[r] = s;
}

int q6k_to_int8(const uint8_t *src, int64_t n, int64_t K, int8_t *q, float *scales, int nthreads) {
    int8_rows out = {q, scales};
    return q6k_each_row(src, n, K, int8_row, &out, nthreads);
}

/* ---- one matrix in any of the three formats, and the exported products ---- */

typedef struct {
    int64_t kind;        /* 0: float32 W (N, K); 1: 4-bit codes (N, K/2) + fp16 dc (N, 2, K/32); 2: int8 W (N, K) + float32
                          * scales (N,); 3, 4, 5: ggml Q4_0, Q4_1, Q8_0 blocks, N rows of K/32 blocks (scales unused);
                          * 6, 7: Q4_0, Q4_1 in the tiled layout (q4x8_repack; AVX-512 VNNI only); 8: Q8_0 in
                          * its tiled layout (q8x8_repack; AVX-512 VNNI only); 9: Q4_K in its tiled layout
                          * (q4kx8_repack; AVX-512 VNNI only) */
    int64_t N, K;
    const void *w;       /* the float32 W, the 4-bit codes or the int8 W */
    const void *scales;  /* dc (4-bit), scales (int8), unused for float32 */
} matrix;

/* y (M, sum of their N), rows ldy apart = the products of n matrices with x (M, K) side by side; inside a
 * parallel region, called by every thread. xq: QUANTIZED_BYTES(M, K) for the int16 activations. */
static void products(const matrix *ms, int64_t n, const float *x, int64_t M, float *y, int64_t ldy, int16_t *xq) {
    int quantized = -1;  /* the order xq holds x in, if any */
    for (int64_t i = 0; i < n; i++) {
        const matrix *m = ms + i;
        const int order = m->kind == 1 || m->kind == 3 || m->kind == 4 ? WORD_LANES : m->kind >= 6 ? INT8 : NATURAL;
        if (m->kind == 0) {
            f32_rows(x, M, m->K, m->w, m->N, y, ldy);
        } else {
            if (quantized != order && order == INT8) {  /* work-sharing, in the tiled kernels' int8 form */
                const int8_parts a = int8_parts_of(xq, M, m->K);
                quantize_rows_int8(x, M, m->K, &a);
                quantized = order;
            } else if (quantized != order) {
                #pragma omp single
                quantize_rows(x, M, m->K, xq, order);
                quantized = order;
            }
            if (m->kind == 1)
                q4_rows(xq, M, m->K, m->w, m->scales, m->N, y, ldy);
            else if (m->kind == 2)
                q8_rows(xq, M, m->K, m->w, m->scales, m->N, y, ldy);
            else if (m->kind == 5)
                q8_block_rows(xq, M, m->K, m->w, m->N, y, ldy);
            else if (m->kind >= 6) {
                const int8_parts a = int8_parts_of(xq, M, m->K);
                tiled_rows((int)m->kind, &a, M, m->K, m->w, m->N, y, ldy);
            }
            else
                q4_block_rows(xq, M, m->K, m->w, m->kind == 3 ? Q4_0_BYTES : Q4_1_BYTES, m->N, y, ldy);
        }
        y += m->N;
    }
}

/* y (M, N) = x (M, K) W^T for one matrix, in a parallel region of its own. Returns 0, or 1 when memory for
 * the int16 activations could not be had. */
static int one_product(const matrix *m, const float *x, int64_t M, float *y, int nthreads) {
    int16_t *xq = NULL;
    if (m->kind != 0 && !(xq = malloc(QUANTIZED_BYTES(M, m->K))))
        return 1;
    #pragma omp parallel num_threads(nthreads)
    products(m, 1, x, M, y, m->N, xq);
    free(xq);
    return 0;
}

void f32_linear(const float *x, int64_t M, int64_t K, const float *w, int64_t N, float *y, int nthreads) {
    const matrix m = {0, N, K, w, NULL};
    one_product(&m, x, M, y, nthreads);
}

int q4_linear(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *dc, int64_t N,
              float *y, int nthreads) {
    const matrix m = {1, N, K, codes, dc};
    return one_product(&m, x, M, y, nthreads);
}

int q8_linear(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scales, int64_t N, float *y,
              int nthreads) {
    const matrix m = {2, N, K, w, scales};
    return one_product(&m, x, M, y, nthreads);
}

int block_linear(const float *x, int64_t M, int64_t K, int64_t kind, const uint8_t *w, int64_t N, float *y,
                 int nthreads) {
    const matrix m = {kind, N, K, w, NULL};
    return one_product(&m, x, M, y, nthreads);
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

/* Where each row's new tokens go. In plain decoding every row is at the same position (one generation, in
 * lockstep); a server's rows started at different times, so each row may have a position of its own:
 *   starts == NULL: row b's T tokens are at positions pos .. pos+T-1, with the freqs_cis rows cs (T, hd)
 *   otherwise:      row b's T tokens are at positions starts[b] .. starts[b]+T-1, with cs (B, T, hd)
 * cs holds each freqs_cis row as (cos, sin) floats. */
typedef struct {
    int64_t pos;            /* every row's first position, when starts is NULL */
    const int64_t *starts;  /* (B,): row b's own first position, or NULL */
    const float *cs;        /* the freqs_cis rows, (T, hd) or (B, T, hd) */
    int64_t T, hd;
} positions;

/* the position of token t of row b */
static inline int64_t position(const positions *at, int64_t b, int64_t t) {
    return (at->starts ? at->starts[b] : at->pos) + t;
}

/* the (cos, sin) row that rotates token t of row b */
static inline const float *angles(const positions *at, int64_t b, int64_t t) {
    return at->cs + ((at->starts ? b * at->T : 0) + t) * at->hd;
}

/* the number of positions the longest row attends over after this step (the scores each thread needs) */
static int64_t longest(const positions *at, int64_t B) {
    int64_t n = 0;
    for (int64_t b = 0; b < B; b++)
        if (position(at, b, at->T) > n)
            n = position(at, b, at->T);
    return n;
}

/* T new tokens in each of B rows, at the positions `at` gives. q (B*T, H*hd), k and v (B*T, K*hd), each
 * row `stride` floats after the last (they may be slices of one fused q|k|v row); caches (B_cache, S, K, hd):
 * row b of the batch is row b of each cache.
 *   1. k is rotated (RoPE) and written to k_cache[b, p], v to v_cache[b, p], p = position(b, t) (write_cache);
 *   2. query head h of token t (rotated) attends over positions 0..p of its row's KV head h / (H/K)
 *      (attend_rows):
 *        out[b, t, h] = sum_s softmax_s(q . k_s / sqrt(hd)) v_s
 *      (every new key is written before any query attends: token t sees tokens before it, as a causal mask;
 *      a row never reads past its own position, so what other rows left there does not matter)
 * out (B*T, H*hd). */
static void write_cache(const float *k, const float *v, int64_t stride, int64_t B, int64_t T, int64_t K, int64_t hd,
                        const positions *at, float *k_cache, float *v_cache, int64_t S) {
    for (int64_t r = 0; r < B * T; r++)
        for (int64_t g = 0; g < K; g++) {
            const int64_t b = r / T, t = r % T, where = b * S * K * hd + position(at, b, t) * K * hd + g * hd;
            rotate(k + r * stride + g * hd, angles(at, b, t), hd, k_cache + where);
            for (int64_t i = 0; i < hd; i++)
                v_cache[where + i] = v[r * stride + g * hd + i];
        }
}

/* work-sharing over the B * T * H (row, head) pairs; scores: `per_thread` floats for each thread of the team */
static void attend_rows(const float *q, int64_t stride, int64_t B, int64_t T, int64_t H, int64_t K, int64_t hd,
                        const positions *at, const float *k_cache, const float *v_cache, int64_t S,
                        float *out, float *scores, int64_t per_thread) {
    const int64_t n_rep = H / K, row = S * K * hd;
    const float scale = 1.f / sqrtf((float)hd);
    float *p = scores + omp_get_thread_num() * per_thread;
    #pragma omp for schedule(static)
    for (int64_t rh = 0; rh < B * T * H; rh++) {
        const int64_t r = rh / H, h = rh % H, g = h / n_rep, b = r / T, t = r % T, n = position(at, b, t) + 1;
        float qr[hd];
        rotate(q + r * stride + h * hd, angles(at, b, t), hd, qr);
        const float *kb = k_cache + b * row + g * hd, *vb = v_cache + b * row + g * hd;
        float top = -INFINITY;
        for (int64_t s = 0; s < n; s++) {
            p[s] = dot(qr, kb + s * K * hd, hd) * scale;
            if (p[s] > top)  /* fmaxf, without a call into libm per score */
                top = p[s];
        }
        float total = 0.f;
        for (int64_t s = 0; s < n; s++) {
            p[s] = expf(p[s] - top);
            total += p[s];
        }
        float *o = out + r * H * hd + h * hd;
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

/* Both steps for one new token per row (T = 1), every row at `pos`. Returns 0, or 1 when memory for the
 * scores could not be had. */
int decode_attention(const float *q, const float *k, const float *v, int64_t stride, int64_t B, int64_t H,
                     int64_t K, int64_t hd, const float *cs, int64_t pos, float *k_cache, float *v_cache,
                     int64_t S, float *out, int nthreads) {
    const positions at = {pos, NULL, cs, 1, hd};
    float *scores = malloc(sizeof(float) * nthreads * (pos + 1));
    if (!scores)
        return 1;
    write_cache(k, v, stride, B, 1, K, hd, &at, k_cache, v_cache, S);
    #pragma omp parallel num_threads(nthreads) if (B * H * (pos + 1) * hd > (1 << 16))
    attend_rows(q, stride, B, 1, H, K, hd, &at, k_cache, v_cache, S, out, scores, pos + 1);
    free(scores);
    return 0;
}

/* ---- SwiGLU: silu(gate) * up, between the FFN's two products ----
 *
 * PyTorch runs it as two passes over the (rows, F) activations, silu then the product, each reading the
 * strided halves of the fused gate|up output; for a 512-token prompt of SmolLM2 that was 1-3 ms a layer.
 * Here it is one pass, e^x for 8 numbers at a time:
 *   x = n ln2 + r, |r| <= ln2/2, n an integer;  e^x = 2^n e^r
 * with e^r = 1 + r + r^2 P(r), P of degree 5 (Cephes' expf coefficients, relative error about 1e-7), and 2^n
 * written straight into the float's exponent bits. x is clamped to [-87.3, 88] first, so 2^n stays a normal
 * float: silu(g) = g / (1 + e^-g) is then off from the exact value by less than 1e-35 outside that range.
 */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln2 in two parts: r stays exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

/* out (M, F) = silu(gate) * up for rows gu (M, 2F) = [gate | up]; a work-sharing loop over the rows */
static void swiglu_rows(const float *gu, int64_t M, int64_t F, float *out) {
    const int64_t F8 = F / 8 * 8;
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *g = gu + m * 2 * F, *u = g + F;
        float *o = out + m * F;
        int64_t j = 0;
        for (; j < F8; j += 8) {
            const __m256 g8 = _mm256_loadu_ps(g + j);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g8));
            const __m256 silu = _mm256_div_ps(g8, _mm256_add_ps(_mm256_set1_ps(1.f), e));
            _mm256_storeu_ps(o + j, _mm256_mul_ps(silu, _mm256_loadu_ps(u + j)));
        }
        for (; j < F; j++)
            o[j] = g[j] / (1.f + expf(-g[j])) * u[j];
    }
}

void swiglu(const float *gu, int64_t M, int64_t F, float *out, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    swiglu_rows(gu, M, F, out);
}

/* ---- a whole decode step through the decoder layers, in one call ----
 *
 * A step feeds one new token per row, or a few (a speculative check, a short prompt): every token is a
 * row of each product, and each attends to the positions up to its own. The rows are at one position (a
 * generation in lockstep) or each at its own (a server's requests, which started at different times: row
 * b reads and writes only row b of each cache, up to its own position). Only RoPE and attention look at
 * positions; the products take all rows at once either way, which is what batching buys: each weight is
 * read from memory once for all rows. How much that saves depends on the format: 8 rows times SmolLM2's
 * float32 49152 x 576 cost 1.75x one row, but 8 rows times a 4-bit 1536 x 576 cost 4.7x (118 against
 * 25 us, 2 threads, AVX-512 EPYC 2026-12-07): with the weights in cache the integer products are bound by
 * the multiply-adds (vpmaddwd, one per 16 weights and row). Unpacking each pair of groups' codes once for
 * 8 rows instead of once per row gave the same sums bit for bit and was slower (129 against 118 us).
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
    const float *attention_norm, *ffn_norm;  /* (D,) each */
    int64_t n_qkv, n_up;                     /* 1 (fused) or 3 matrices for q|k|v; 1 or 2 for gate|up */
    matrix qkv[3], wo, up[2], w2;
    float *k_cache, *v_cache;                /* (B_cache, S, KV, hd) each */
} layer;

/* h (B*T, D): T new tokens per row, through all L layers in place. Row b's tokens are at positions
 * pos .. pos+T-1 with cs (T, hd) the freqs_cis rows of those positions as (cos, sin) floats, or, when
 * `starts` is not NULL, at its own positions starts[b] .. starts[b]+T-1 with cs (B, T, hd) (see `positions`).
 * S: the caches' length; F: the FFN's hidden size. Returns 0, or 1 when memory for the activations could
 * not be had (h is then untouched). */
int decode_layers(const layer *layers, int64_t L, float *h, int64_t B, int64_t T, int64_t D, int64_t H, int64_t KV,
                  int64_t hd, int64_t F, float eps, const float *cs, int64_t pos, const int64_t *starts, int64_t S,
                  int nthreads) {
    const positions at = {pos, starts, cs, T, hd};
    const int64_t QKV = (H + 2 * KV) * hd, widest = D > H * hd ? (D > F ? D : F) : (H * hd > F ? H * hd : F);
    const int64_t M = B * T;  /* rows through the products */
    const int64_t per_thread = longest(&at, B);  /* scores of the longest row */
    const int64_t floats = M * (D + QKV + H * hd + D + 2 * F + F) + (int64_t)nthreads * per_thread;
    float *x = malloc(sizeof(float) * floats + QUANTIZED_BYTES(M, widest));
    if (!x)
        return 1;
    float *qkv = x + M * D, *att = qkv + M * QKV, *y = att + M * H * hd, *gu = y + M * D, *a = gu + M * 2 * F;
    float *scores = a + M * F;
    int16_t *xq = (int16_t *)(x + floats);

    #pragma omp parallel num_threads(nthreads)
    for (int64_t l = 0; l < L; l++) {
        const layer *ly = layers + l;
        #pragma omp single
        rms_norm(h, M, D, ly->attention_norm, eps, x);
        products(ly->qkv, ly->n_qkv, x, M, qkv, QKV, xq);
        #pragma omp single
        write_cache(qkv + H * hd, qkv + (H + KV) * hd, QKV, B, T, KV, hd, &at, ly->k_cache, ly->v_cache, S);
        attend_rows(qkv, QKV, B, T, H, KV, hd, &at, ly->k_cache, ly->v_cache, S, att, scores, per_thread);
        products(&ly->wo, 1, att, M, y, D, xq);
        #pragma omp single
        {
            for (int64_t i = 0; i < M * D; i++)
                h[i] += y[i];
            rms_norm(h, M, D, ly->ffn_norm, eps, x);
        }
        products(ly->up, ly->n_up, x, M, gu, 2 * F, xq);
        swiglu_rows(gu, M, F, a);
        products(&ly->w2, 1, a, M, y, D, xq);
        #pragma omp single
        for (int64_t i = 0; i < M * D; i++)
            h[i] += y[i];
    }
    free(x);
    return 0;
}
