/* Stored-format weights outside the decode step: unpacking rows into float32 (prefill unpacks
 * a tile of a projection at a time for its matmul; the embedding gathers its rows), a projection
 * of a few rows run as the decode step runs it. Everything splits its work across num_threads OpenMP threads. */
#include <omp.h>
#include <stdlib.h>

#include "projection.h"

enum { PD_OK = 0, PD_BAD_ROW = 1, PD_NO_MEMORY = 3 };

/* out ((r1 - r0), cols) = rows [r0, r1) of W, unpacked. */
int pd_unpack_rows(const pd_matrix *W, int64_t r0, int64_t r1, float *out, int num_threads) {
    if (r0 < 0 || r1 > W->rows || r0 > r1) return PD_BAD_ROW;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (r1 - r0 > 16)
    for (int64_t r = r0; r < r1; r++) matrix_row(W, r, out + (size_t)(r - r0) * W->cols);
    return PD_OK;
}

/* out (n, cols) = rows ids[0..n) of W: the embedding lookup of a prefill. */
int pd_gather_rows(const pd_matrix *W, const int64_t *ids, int64_t n, float *out, int num_threads) {
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= W->rows) return PD_BAD_ROW;
    }
#pragma omp parallel for num_threads(num_threads) schedule(static) if (n > 16)
    for (int64_t i = 0; i < n; i++) matrix_row(W, ids[i], out + (size_t)i * W->cols);
    return PD_OK;
}

/* y (n, rows) = x (n, cols) W^T (+ bias), the rows split among the threads with the decode
 * step's work sharing and kernels: what one projection of a decode step computes. */
int pd_project(const pd_matrix *W, const float *x, int n, const float *bias, float *y, int num_threads) {
    if (num_threads < 1) num_threads = 1;
    const size_t stride = projection_scratch(W->cols, n);
    row_share *shares = aligned_alloc(64, sizeof(row_share) * num_threads);
    float *unpacked = aligned_alloc(64, sizeof(float) * stride * num_threads);
    if (!shares || !unpacked) {
        free(shares);
        free(unpacked);
        return PD_NO_MEMORY;
    }
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp single
        share_rows(shares, (W->rows + 3) / 4, omp_get_num_threads());
        project_shared(shares, W, x, W->cols, n, bias, y, W->rows, 0, unpacked + omp_get_thread_num() * stride);
    }
    free(shares);
    free(unpacked);
    return PD_OK;
}
