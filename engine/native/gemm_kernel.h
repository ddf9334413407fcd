/* The register-blocked kernel of the blocked GEMM over stored weights (stored_gemm.c), also
 * used by the decode step's projections of 8 and more requests (projection.h): y (MR rows of x,
 * NR weight rows) = panel . bp, with bp an unpacked tile of NR weight rows laid out k-major
 * (bp[k][j] = W[j0 + j][k]) and panel MR rows of x laid out k-major (panel[k][i]). For each k it
 * broadcasts MR values of x against the NR weights of bp[k]: outer products, MR x NR sums in
 * registers, no horizontal sums, the FMA units near their peak. */
#ifndef PDSERVE_GEMM_KERNEL_H
#define PDSERVE_GEMM_KERNEL_H

#include <stdint.h>
#include <string.h>

#include "stored_dots.h"

#if defined(__AVX512F__)
#define VW 16
#define MR 12
typedef __m512 vec;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vbroadcast(p) _mm512_set1_ps(*(p))
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vstore(p, v) _mm512_storeu_ps(p, v)
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
#define MR 6
typedef __m256 vec;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vbroadcast(p) _mm256_broadcast_ss(p)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vstore(p, v) _mm256_storeu_ps(p, v)
#else
#define VW 1
#define MR 4
typedef float vec;
#define vzero() 0.0f
#define vload(p) (*(p))
#define vbroadcast(p) (*(p))
#define vfma(a, b, c) ((a) * (b) + (c))
#define vstore(p, v) (*(p) = (v))
#endif
#define NR (2 * VW) /* two vectors of weight rows */


/* Panels [b0, b1) of MR rows of x (T, K) into xp, k-major; rows past T are zeros. */
static inline void pack_panels(const float *x, int64_t ldx, int64_t T, int K, int64_t b0, int64_t b1, float *xp) {
    for (int64_t b = b0; b < b1; b++) {
        float *panel = xp + (size_t)b * MR * K;
        for (int i = 0; i < MR; i++) {
            const int64_t t = b * MR + i;
            const float *row = x + (size_t)t * ldx;
            for (int k = 0; k < K; k++) panel[(size_t)k * MR + i] = t < T ? row[k] : 0.0f;
        }
    }
}

/* y rows [0, rows) x columns [0, cols) (+)= panel . bp (+ bias), MR x NR in registers. */
static inline void micro_kernel(const float *panel, const float *bp, int K, int rows, int cols, const float *bias,
                                float *y, int64_t ldy, int accumulate) {
    vec acc[MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = vzero();
    for (int k = 0; k < K; k++) {
        const vec b0 = vload(bp + (size_t)k * NR), b1 = vload(bp + (size_t)k * NR + VW);
        const float *xk = panel + (size_t)k * MR;
        for (int i = 0; i < MR; i++) {
            const vec a = vbroadcast(xk + i);
            acc[i][0] = vfma(a, b0, acc[i][0]);
            acc[i][1] = vfma(a, b1, acc[i][1]);
        }
    }
    float block[MR][NR];
    for (int i = 0; i < MR; i++) vstore(block[i], acc[i][0]), vstore(block[i] + VW, acc[i][1]);
    for (int i = 0; i < rows; i++) {
        float *out = y + (size_t)i * ldy;
        for (int j = 0; j < cols; j++) {
            const float v = bias ? block[i][j] + bias[j] : block[i][j];
            out[j] = accumulate ? out[j] + v : v;
        }
    }
}

#endif
