/* Vector building blocks of the native CPU kernels (float32): dot products of rows, exp,
 * SiLU, RMSNorm and rotary embedding. AVX2+FMA when the compiler targets it (the build uses
 * -march=native), plain loops otherwise. Included by each kernel file; everything is static. */
#ifndef PDSERVE_VECTOR_MATH_H
#define PDSERVE_VECTOR_MATH_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* ---- dot products: weights stream from memory, the (few) input rows stay in L1 ---------- */

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* out[r] = dot(w + r * ldw, x) over `in` floats, r < 4: four rows at once, each vector of x
 * loaded once. */
static inline void dot4(const float *w, size_t ldw, int in, const float *x, float out[4]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int c = 0;
    for (; c + 8 <= in; c += 8) {
        __m256 xv = _mm256_loadu_ps(x + c);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + ldw + c), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 2 * ldw + c), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 3 * ldw + c), xv, a3);
    }
    out[0] = hsum8(a0), out[1] = hsum8(a1), out[2] = hsum8(a2), out[3] = hsum8(a3);
    for (; c < in; c++) {
        for (int r = 0; r < 4; r++) out[r] += w[r * ldw + c] * x[c];
    }
}

/* out[r][i] = dot(w + r * ldw, x + i * ldx) over `in` floats, r < 4, i < 3: the register block
 * for several inputs at once, twelve accumulators fed by four row and three input loads. */
static inline void dot4x3(const float *w, size_t ldw, int in, const float *x, int ldx, float out[4][3]) {
    __m256 acc[4][3];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = acc[r][2] = _mm256_setzero_ps();
    int c = 0;
    for (; c + 8 <= in; c += 8) {
        __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + ldx + c);
        __m256 x2 = _mm256_loadu_ps(x + 2 * ldx + c);
        for (int r = 0; r < 4; r++) {
            __m256 wv = _mm256_loadu_ps(w + r * ldw + c);
            acc[r][0] = _mm256_fmadd_ps(wv, x0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(wv, x1, acc[r][1]);
            acc[r][2] = _mm256_fmadd_ps(wv, x2, acc[r][2]);
        }
    }
    for (int r = 0; r < 4; r++) {
        for (int i = 0; i < 3; i++) {
            float sum = hsum8(acc[r][i]);
            for (int t = c; t < in; t++) sum += w[r * ldw + t] * x[i * ldx + t];
            out[r][i] = sum;
        }
    }
}

/* One row against one input: four accumulators hide the FMA latency. */
static inline float dot1(const float *w, const float *x, int in) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int c = 0;
    for (; c + 32 <= in; c += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c), _mm256_loadu_ps(x + c), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c + 8), _mm256_loadu_ps(x + c + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c + 16), _mm256_loadu_ps(x + c + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c + 24), _mm256_loadu_ps(x + c + 24), a3);
    }
    for (; c + 8 <= in; c += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + c), _mm256_loadu_ps(x + c), a0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; c < in; c++) s += w[c] * x[c];
    return s;
}

/* One row against two inputs, each weight vector loaded once. */
static inline void dot1x2(const float *w, int in, const float *x, size_t ldx, float out[2]) {
    const float *x1 = x + ldx;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int c = 0;
    for (; c + 16 <= in; c += 16) {
        __m256 w0 = _mm256_loadu_ps(w + c), w1 = _mm256_loadu_ps(w + c + 8);
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + c), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + c + 8), a1);
        b0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + c), b0);
        b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + c + 8), b1);
    }
    float s0 = hsum8(_mm256_add_ps(a0, a1)), s1 = hsum8(_mm256_add_ps(b0, b1));
    for (; c < in; c++) s0 += w[c] * x[c], s1 += w[c] * x1[c];
    out[0] = s0, out[1] = s1;
}
#else
static inline float dot1(const float *w, const float *x, int in) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int c = 0; c < in; c++) s += w[c] * x[c];
    return s;
}

static inline void dot1x2(const float *w, int in, const float *x, size_t ldx, float out[2]) {
    out[0] = dot1(w, x, in), out[1] = dot1(w, x + ldx, in);
}

static inline void dot4(const float *w, size_t ldw, int in, const float *x, float out[4]) {
    for (int r = 0; r < 4; r++) out[r] = dot1(w + r * ldw, x, in);
}

static inline void dot4x3(const float *w, size_t ldw, int in, const float *x, int ldx, float out[4][3]) {
    for (int r = 0; r < 4; r++) {
        for (int i = 0; i < 3; i++) out[r][i] = dot1(w + r * ldw, x + (size_t)i * ldx, in);
    }
}
#endif

/* x[p] = exp(x[p] - shift) for p < n; returns their sum. */
#if defined(__AVX2__) && defined(__FMA__)
/* exp by 2^k * e^r with |r| <= ln2/2 and a degree-6 polynomial for e^r: within 2 ulp of expf
 * at a fraction of its cost; arguments are clamped to [-87, 88], where the result stays a
 * normal float. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

static inline float exp_shifted(float *x, int n, float shift) {
    __m256 total = _mm256_setzero_ps(), s = _mm256_set1_ps(shift);
    int p = 0;
    for (; p + 8 <= n; p += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + p), s));
        _mm256_storeu_ps(x + p, e);
        total = _mm256_add_ps(total, e);
    }
    float sum = hsum8(total);
    for (; p < n; p++) sum += x[p] = expf(x[p] - shift);
    return sum;
}
#else
static inline float exp_shifted(float *x, int n, float shift) {
    float sum = 0.0f;
    for (int p = 0; p < n; p++) sum += x[p] = expf(x[p] - shift);
    return sum;
}
#endif

/* out[j] = silu(gate[j]) * up[j] = gate[j] / (1 + exp(-gate[j])) * up[j], for j < n. */
static inline void silu_mul(const float *gate, const float *up, int n, float *out) {
    int j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
        __m256 g = _mm256_loadu_ps(gate + j);
        __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, g))));
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + j)));
    }
#endif
    for (; j < n; j++) out[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
}

static inline void rms_norm(const float *x, const float *weight, int dim, float eps, float *out) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int c = 0; c < dim; c++) ss += x[c] * x[c];
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int c = 0; c < dim; c++) out[c] = x[c] * inv * weight[c];
}

/* Every thread normalises all n rows into its own buffer: cheaper than a barrier. */
static inline void rms_norm_rows(const float *x, const float *weight, int n, int dim, float eps, float *out) {
    for (int i = 0; i < n; i++) rms_norm(x + (size_t)i * dim, weight, dim, eps, out + (size_t)i * dim);
}

/* x' = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[half:], x[:half]]. */
static inline void apply_rope(float *x, const float *cos_sin, int head_dim) {
    int half = head_dim / 2;
    const float *cos = cos_sin, *sin = cos_sin + head_dim;
    for (int c = 0; c < half; c++) {
        float a = x[c], b = x[c + half];
        x[c] = a * cos[c] - b * sin[c];
        x[c + half] = b * cos[c + half] + a * sin[c + half];
    }
}

#endif
