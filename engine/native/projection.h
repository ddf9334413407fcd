/* Projections y = W x of one to a few dozen inputs, for weights in any stored format
 * (stored_formats.h), and the split of a projection's rows among the threads. Included by the
 * kernel files that run projections; everything is static. */
#ifndef PDSERVE_PROJECTION_H
#define PDSERVE_PROJECTION_H

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "gemm_kernel.h"

/* Rows [0, rows) of a matrix, all in one format: row r at data + r * row_bytes. */
typedef struct {
    const uint8_t *data;
    int64_t row_bytes;
    int32_t rows, type;
} pd_segment;

/* A (rows, cols) weight as up to three row segments, one after another: a fused projection whose
 * parts are stored in different formats (a GGUF file may store V in Q6_K and Q, K in Q4_K). */
enum { PD_MAX_SEGMENTS = 3 };
typedef struct {
    int32_t rows, cols, num_segments;
    pd_segment segments[PD_MAX_SEGMENTS];
} pd_matrix;

static inline void store_row_results(float *y, int ldy, int i, int r, int count, const float *d,
                                     const float *bias, int accumulate) {
    float *out = y + (size_t)i * ldy + r;
    for (int k = 0; k < count; k++) {
        float v = d[k] + (bias ? bias[r + k] : 0.0f);
        out[k] = accumulate ? out[k] + v : v;
    }
}

/* y[i * ldy + r] (+)= dot(W[r], x[i * ldx]) + bias[r] for rows r in [r0, r1) and inputs i < n.
 * One or two inputs: the rows are read one after another, one sequential stream, which the
 * hardware prefetchers follow best (reading four rows side by side, four streams, measured 10-15%
 * slower on a memory-bound step). More inputs: four weight rows (a few KB) are read once and
 * reused from L1 for every input, three inputs at a time, as the arithmetic then needs it. */
static inline void matvec_rows(const float *W, int in, int r0, int r1, const float *x, int ldx, int n,
                        const float *bias, float *y, int ldy, int accumulate) {
    float d4[4], d43[4][3];
    int r = r0;
    if (n <= 2) {
        for (; r < r1; r++) {
            const float *w = W + (size_t)r * in;
            if (n == 2) {
                dot1x2(w, in, x, ldx, d4);
            } else {
                d4[0] = dot1(w, x, in);
            }
            for (int i = 0; i < n; i++) store_row_results(y, ldy, i, r, 1, d4 + i, bias, accumulate);
        }
        return;
    }
    for (; r + 4 <= r1; r += 4) {
        const float *w = W + (size_t)r * in;
        int i = 0;
        for (; i + 3 <= n; i += 3) {
            dot4x3(w, in, in, x + (size_t)i * ldx, ldx, d43);
            for (int k = 0; k < 3; k++) {
                float column[4] = {d43[0][k], d43[1][k], d43[2][k], d43[3][k]};
                store_row_results(y, ldy, i + k, r, 4, column, bias, accumulate);
            }
        }
        for (; i < n; i++) {
            dot4(w, in, in, x + (size_t)i * ldx, d4);
            store_row_results(y, ldy, i, r, 4, d4, bias, accumulate);
        }
    }
    for (; r < r1; r++) {
        for (int i = 0; i < n; i++) {
            float v = dot1(W + (size_t)r * in, x + (size_t)i * ldx, in);
            store_row_results(y, ldy, i, r, 1, &v, bias, accumulate);
        }
    }
}


/* Elements [c0, c1) of row i of W into out; for block formats c0 and c1 are multiples of 32. */
static inline void matrix_span(const pd_matrix *W, int64_t i, int c0, int c1, float *out) {
    for (int k = 0; k < W->num_segments; i -= W->segments[k].rows, k++) {
        const pd_segment *s = &W->segments[k];
        if (i < s->rows) {
            const uint8_t *row = s->data + (size_t)i * s->row_bytes;
            if (s->type == PD_F32) memcpy(out, (const float *)row + c0, sizeof(float) * (size_t)(c1 - c0));
            else stored_unpack_span(s->type, row, c0, c1, out);
            return;
        }
    }
}

/* Row i of W (cols floats) into out: an embedding lookup. */
static inline void matrix_row(const pd_matrix *W, int64_t i, float *out) { matrix_span(W, i, 0, W->cols, out); }

/* Columns of a tile unpacked at a time: a piece of 8 rows (8 KB) stays in L1 while it is
 * transposed into the tile. */
enum { PD_TILE_SPAN = 256 };

/* bp[k * NR + j] = piece[j][k] for j < 8 and k in [0, count): 8 rows of a piece into the k-major
 * tile, 8 x 8 blocks transposed in registers (scalar stores, a cache line each, cost several
 * times the unpacking). */
static inline void transpose_piece(float piece[8][PD_TILE_SPAN], int count, float *bp) {
    int k = 0;
#if defined(__AVX__)
    for (; k + 8 <= count; k += 8) {
        __m256 r[8], t[8];
        for (int j = 0; j < 8; j++) r[j] = _mm256_loadu_ps(piece[j] + k);
        for (int j = 0; j < 8; j += 2) t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]), t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
        for (int j = 0; j < 8; j += 4) {
            r[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44), r[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
            r[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44), r[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
        }
        /* r[0..3] hold columns {0,4}, {1,5}, {2,6}, {3,7} of rows 0-3; r[4..7] of rows 4-7 */
        for (int c = 0; c < 4; c++) {
            _mm256_storeu_ps(bp + (size_t)(k + c) * NR, _mm256_permute2f128_ps(r[c], r[c + 4], 0x20));
            _mm256_storeu_ps(bp + (size_t)(k + c + 4) * NR, _mm256_permute2f128_ps(r[c], r[c + 4], 0x31));
        }
    }
#endif
    for (; k < count; k++)
        for (int j = 0; j < 8; j++) bp[(size_t)k * NR + j] = piece[j][k];
}

/* bp (K, NR) = rows [j0, j0 + NR) of W transposed; rows from `end` on are zeros. Unpacked a
 * piece of 8 rows and PD_TILE_SPAN columns at a time. */
_Static_assert(NR % 8 == 0, "unpack_tile fills a tile 8 rows at a time");
static inline void unpack_tile(const pd_matrix *W, int j0, int end, float *bp) {
    const int K = W->cols;
    _Alignas(64) float piece[8][PD_TILE_SPAN];
    for (int c0 = 0; c0 < K; c0 += PD_TILE_SPAN) {
        const int c1 = K - c0 < PD_TILE_SPAN ? K : c0 + PD_TILE_SPAN;
        for (int jb = 0; jb < NR; jb += 8) {
            for (int j = 0; j < 8; j++) {
                if (j0 + jb + j < end) matrix_span(W, j0 + jb + j, c0, c1, piece[j]);
                else memset(piece[j], 0, sizeof(float) * (size_t)(c1 - c0));
            }
            transpose_piece(piece, c1 - c0, bp + (size_t)c0 * NR + jb);
        }
    }
}

/* From this many inputs on, projections run as small GEMMs (gemm_kernel.h): each tile of NR
 * weight rows unpacked once, k-major, and multiplied with the inputs in MR-row panels as outer
 * products. Below, the dot-product kernels (a few inputs leave an outer product's registers
 * mostly idle). */
enum { PD_TILED_MIN = 8 };

/* Floats of a thread's projection scratch for n inputs of `cols`: 4 unpacked rows, and from
 * PD_TILED_MIN inputs on an unpacked tile and the inputs in panels. */
static inline size_t projection_scratch(int cols, int n) {
    size_t floats = 4 * (size_t)cols;
    if (n >= PD_TILED_MIN) floats += (size_t)(NR + (n + MR - 1) / MR * MR) * cols;
    return (floats + 15) & ~(size_t)15;
}

/* Before a thread's projections of x (n, cols): packs the inputs into panels in its scratch when
 * the tiled kernel will run. */
static inline void prepare_projection(const float *x, int ldx, int n, int cols, float *scratch) {
    if (n >= PD_TILED_MIN) pack_panels(x, ldx, n, cols, 0, (n + MR - 1) / MR, scratch + (size_t)(4 + NR) * cols);
}

/* Rows [r0, r1) of W for n >= PD_TILED_MIN inputs prepared in `scratch`. */
static inline void tiled_rows(const pd_matrix *W, int r0, int r1, int n, const float *bias, float *y, int ldy,
                              int accumulate, float *scratch) {
    const int K = W->cols;
    float *bp = scratch + 4 * (size_t)K, *xp = bp + (size_t)NR * K;
    for (int j0 = r0; j0 < r1; j0 += NR) {
        const int cols = r1 - j0 < NR ? r1 - j0 : NR;
        unpack_tile(W, j0, j0 + cols, bp);
        for (int b = 0; b * MR < n; b++) {
            const int rows = n - b * MR < MR ? n - b * MR : MR;
            micro_kernel(xp + (size_t)b * MR * K, bp, K, rows, cols, bias ? bias + j0 : NULL,
                         y + (size_t)b * MR * ldy + j0, ldy, accumulate);
        }
    }
}

/* How far ahead (bytes) a row streamed for one or two inputs asks for its weights. There the
 * fused dots mostly wait on the weights' loads (the unpacking is short), and a software prefetch
 * 4 KB ahead keeps more lines in flight than the hardware prefetchers alone: the demo model's
 * batch-1 step ran 13-14% faster with it (2 to 8 KB ahead: the same). From three inputs on, where
 * the arithmetic dominates, it made no difference. A prefetch past a weight's end is harmless:
 * prefetches do not fault. */
enum { PD_PREFETCH_AHEAD = 4096 };

/* Rows [r0, r1) of one segment (rows local to it) of a stored format other than float32. One or
 * two inputs: each row streams once through the fused dots, prefetched ahead. More: each quad of
 * rows is unpacked into `unpacked` (4 * cols floats, a few KB that stay in L1) and the float32
 * code runs on it, so every unpacked weight serves all n inputs. */
static inline void stored_rows(const pd_segment *s, int cols, int r0, int r1, const float *x, int ldx, int n,
                        const float *bias, float *y, int ldy, int accumulate, float *unpacked) {
    float d2[2];
    if (n <= 2) {
        for (int r = r0; r < r1; r++) {
            const uint8_t *row = s->data + (size_t)r * s->row_bytes;
            for (int64_t off = 0; off < s->row_bytes; off += 64) __builtin_prefetch(row + PD_PREFETCH_AHEAD + off);
            if (n == 2) {
                stored_dot1x2(s->type, row, x, ldx, cols, d2);
            } else {
                d2[0] = stored_dot1(s->type, row, x, cols);
            }
            for (int i = 0; i < n; i++) store_row_results(y, ldy, i, r, 1, d2 + i, bias, accumulate);
        }
        return;
    }
    for (int r = r0; r < r1; r += 4) {
        const int count = r1 - r < 4 ? r1 - r : 4;
        for (int k = 0; k < count; k++)
            stored_unpack_row(s->type, s->data + (size_t)(r + k) * s->row_bytes, cols, unpacked + (size_t)k * cols);
        matvec_rows(unpacked, cols, 0, count, x, ldx, n, bias ? bias + r : NULL, y + r, ldy, accumulate);
    }
}

/* y[i * ldy + r] (+)= dot(W[r], x[i * ldx]) + bias[r] for rows r in [r0, r1) of a matrix made of
 * segments, each in its own format. `unpacked`: this thread's scratch (projection_scratch),
 * prepared for x (prepare_projection). */
static inline void project_rows(const pd_matrix *W, int r0, int r1, const float *x, int ldx, int n, const float *bias,
                         float *y, int ldy, int accumulate, float *unpacked) {
    if (n >= PD_TILED_MIN) {
        tiled_rows(W, r0, r1, n, bias, y, ldy, accumulate, unpacked);
        return;
    }
    int base = 0;
    for (int k = 0; k < W->num_segments && base < r1; base += W->segments[k].rows, k++) {
        const pd_segment *s = &W->segments[k];
        const int a = (r0 > base ? r0 : base) - base, b = (r1 < base + s->rows ? r1 : base + s->rows) - base;
        if (a >= b) continue;
        const float *seg_bias = bias ? bias + base : NULL;
        if (s->type == PD_F32) {
            matvec_rows((const float *)s->data, W->cols, a, b, x, ldx, n, seg_bias, y + base, ldy, accumulate);
        } else {
            stored_rows(s, W->cols, a, b, x, ldx, n, seg_bias, y + base, ldy, accumulate, unpacked);
        }
    }
}

/* Rows of a projection are handed out in quads (4 rows, what dot4 covers). Each thread owns one
 * contiguous range of quads and streams it front to back, a long chunk at a time, so the hardware
 * prefetchers keep their streams; a thread that is done steals short chunks from the back of a
 * range still in progress. Static slices alone left one thread idle at every barrier: on a
 * shared machine one core often runs 5-10% slower than the other for seconds at a time, and the
 * step has a barrier after every projection. */
enum { OWN_QUADS = 16, STOLEN_QUADS = 2 };

typedef struct {
    _Alignas(64) uint64_t range; /* front << 32 | back, in quads; a cache line per thread */
} row_share;

/* Splits `quads` quads into one contiguous range per thread. */
static inline void share_rows(row_share *shares, int quads, int nt) {
    for (int id = 0; id < nt; id++) {
        uint64_t begin = (uint64_t)quads * id / nt, end = (uint64_t)quads * (id + 1) / nt;
        shares[id].range = begin << 32 | end;
    }
}

/* Takes up to `want` quads off the front (or the back) of a range: returns how many, from *start. */
static inline int take_quads(row_share *share, int want, int from_back, int *start) {
    uint64_t old = __atomic_load_n(&share->range, __ATOMIC_RELAXED);
    for (;;) {
        uint32_t front = (uint32_t)(old >> 32), back = (uint32_t)old;
        if (front >= back) return 0;
        uint32_t count = back - front < (uint32_t)want ? back - front : (uint32_t)want;
        uint64_t next = from_back ? (uint64_t)front << 32 | (back - count)
                                  : (uint64_t)(front + count) << 32 | back;
        /* relaxed: the barrier after the projection publishes the rows written */
        if (__atomic_compare_exchange_n(&share->range, &old, next, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            *start = (int)(from_back ? back - count : front);
            return (int)count;
        }
    }
}

/* The next chunk [*q0, *q1) of quads for this thread: its own range first, then the others'. */
static inline int next_quads(row_share *shares, int *q0, int *q1) {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    int count = take_quads(&shares[id], OWN_QUADS, 0, q0);
    for (int k = 1; count == 0 && k < nt; k++) count = take_quads(&shares[(id + k) % nt], STOLEN_QUADS, 1, q0);
    *q1 = *q0 + count;
    return count;
}

/* y (+)= W x for rows [0, W->rows), shared out across the team; no barrier at the end. `unpacked`
 * is this thread's scratch (projection_scratch). */
static inline void project_shared(row_share *shares, const pd_matrix *W, const float *x, int ldx, int n,
                           const float *bias, float *y, int ldy, int accumulate, float *unpacked) {
    prepare_projection(x, ldx, n, W->cols, unpacked);
    int q0, q1;
    while (next_quads(shares, &q0, &q1)) {
        int r1 = 4 * q1 < W->rows ? 4 * q1 : W->rows;
        project_rows(W, 4 * q0, r1, x, ldx, n, bias, y, ldy, accumulate, unpacked);
    }
}

#endif
