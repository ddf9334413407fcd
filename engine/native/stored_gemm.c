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
    const size_t per_thread = (size_t)group * NR * K;
    float *xp = malloc(sizeof(float) * (size_t)panels * MR * K);
    float *scratch = malloc(sizeof(float) * (size_t)num_threads * per_thread);
    if (!xp || !scratch) {
        free(xp);
        free(scratch);
        return PD_NO_MEMORY;
    }
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static) /* ends with the loop's barrier */
        for (int64_t b = 0; b < panels; b++) pack_panels(x, K, T, K, b, b + 1, xp);
        float *bp = scratch + (size_t)omp_get_thread_num() * per_thread;
#pragma omp for schedule(dynamic, 1)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t first = g * group, last = first + group < tiles ? first + group : tiles;
            for (int64_t tile = first; tile < last; tile++) unpack_tile(W, (int)(tile * NR), N, bp + (tile - first) * NR * K);
            for (int64_t b = 0; b < panels; b++) {
                const int rows = T - b * MR < MR ? (int)(T - b * MR) : MR;
                for (int64_t tile = first; tile < last; tile++) {
                    const int j0 = (int)(tile * NR), cols = N - j0 < NR ? N - j0 : NR;
                    micro_kernel(xp + (size_t)b * MR * K, bp + (tile - first) * NR * K, K, rows, cols,
                                 bias ? bias + j0 : NULL, y + (size_t)b * MR * N + j0, N, 0);
                }
            }
        }
    }
    free(xp);
    free(scratch);
    return PD_OK;
}
