/* Prefill's matmul over stored-format weights: y (T, N) = x (T, K) W^T (+ bias), for a weight W
 * (N, K) in any stored format (projection.h) and many rows T (a prompt's tokens).
 *
 * A blocked GEMM that never holds more than a tile of W in float32. Each thread takes tiles of
 * NR weight rows in turn, unpacks one (its NR rows, all K columns) into a small buffer laid out
 * k-major (bp[k][j] = W[j0 + j][k], a few hundred KB that stay in L2) and multiplies every row
 * of x with it. The inner kernel keeps an MR x NR block of y in registers and, for each k,
 * broadcasts MR values of x against the NR weights of bp[k]: outer products, with no horizontal
 * sums, which run the FMA units near their peak. x is first copied into MR-row panels
 * (xp[k][i] = x[b * MR + i][k], zero rows padding the last), so the broadcasts read one stream.
 * The unpacking costs a few operations per weight, shared by all T rows. */
#include <omp.h>
#include <stdlib.h>

#include "projection.h"

enum { PD_OK = 0, PD_NO_MEMORY = 3 };

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

/* xp (panels of MR rows, k-major) from x (T, K); rows past T are zeros. */
static void pack_rows(const float *x, int64_t T, int K, float *xp) {
    const int64_t panels = (T + MR - 1) / MR;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < panels; b++) {
        float *panel = xp + (size_t)b * MR * K;
        for (int i = 0; i < MR; i++) {
            const int64_t t = b * MR + i;
            for (int k = 0; k < K; k++) panel[(size_t)k * MR + i] = t < T ? x[(size_t)t * K + k] : 0.0f;
        }
    }
}

/* bp (K, NR) = rows [j0, j0 + NR) of W transposed; rows past W's end are zeros. `row` holds one
 * unpacked row (K floats). */
static void unpack_tile(const pd_matrix *W, int j0, float *row, float *bp) {
    const int K = W->cols;
    for (int j = 0; j < NR; j++) {
        if (j0 + j < W->rows) matrix_row(W, j0 + j, row);
        else memset(row, 0, sizeof(float) * (size_t)K);
        for (int k = 0; k < K; k++) bp[(size_t)k * NR + j] = row[k];
    }
}

/* y rows [t0, t0 + rows) x columns [j0, j0 + cols) = panel . bp (+ bias), MR x NR in registers. */
static void micro_kernel(const float *panel, const float *bp, int K, int rows, int cols, const float *bias,
                         float *y, int64_t ldy) {
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
        for (int j = 0; j < cols; j++) out[j] = bias ? block[i][j] + bias[j] : block[i][j];
    }
}

/* Unpacked tiles a thread keeps at once (up to 384 KB of L2): x streams in once per group. At
 * least four groups per thread, so that threads finish together. */
static int tiles_per_group(int K, int64_t tiles, int num_threads) {
    int fit = (int)(((size_t)384 << 10) / (sizeof(float) * NR * (size_t)K));
    const int64_t balanced = tiles / (4 * (int64_t)num_threads);
    if (fit > balanced) fit = (int)balanced;
    return fit < 1 ? 1 : fit > 8 ? 8 : fit;
}

/* y (T, W->rows) = x (T, W->cols) W^T (+ bias). */
int pd_stored_gemm(const pd_matrix *W, const float *x, int64_t T, const float *bias, float *y, int num_threads) {
    if (num_threads < 1) num_threads = 1;
    const int K = W->cols, N = W->rows;
    const int64_t panels = (T + MR - 1) / MR, tiles = (N + NR - 1) / NR;
    const int group = tiles_per_group(K, tiles, num_threads);
    const int64_t groups = (tiles + group - 1) / group;
    const size_t per_thread = (size_t)(group * NR + 1) * K;
    float *xp = malloc(sizeof(float) * (size_t)panels * MR * K);
    float *scratch = malloc(sizeof(float) * (size_t)num_threads * per_thread);
    if (!xp || !scratch) {
        free(xp);
        free(scratch);
        return PD_NO_MEMORY;
    }
#pragma omp parallel num_threads(num_threads)
    {
        pack_rows(x, T, K, xp); /* ends with the loop's barrier */
        float *bp = scratch + (size_t)omp_get_thread_num() * per_thread, *row = bp + (size_t)group * NR * K;
#pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t first = g * group, last = first + group < tiles ? first + group : tiles;
            for (int64_t tile = first; tile < last; tile++) unpack_tile(W, (int)(tile * NR), row, bp + (tile - first) * NR * K);
            for (int64_t b = 0; b < panels; b++) {
                const int rows = T - b * MR < MR ? (int)(T - b * MR) : MR;
                for (int64_t tile = first; tile < last; tile++) {
                    const int j0 = (int)(tile * NR), cols = N - j0 < NR ? N - j0 : NR;
                    micro_kernel(xp + (size_t)b * MR * K, bp + (tile - first) * NR * K, K, rows, cols,
                                 bias ? bias + j0 : NULL, y + (size_t)b * MR * N + j0, N);
                }
            }
        }
    }
    free(xp);
    free(scratch);
    return PD_OK;
}
