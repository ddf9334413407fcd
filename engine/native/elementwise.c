/* Elementwise kernels for prefill steps on the CPU (float32), and the benchmark's streaming
 * read. A prefill step is bound by its matmuls; around them, torch would run SwiGLU's gate as
 * three passes over freshly allocated tensors and rotary embedding as five: here each is one
 * pass, split across the threads by rows. */
#include <omp.h>

#include "vector_math.h"

/* out (rows, inter) = silu(gate) * up, where each row of gate_up (rows, 2 * inter) is [gate | up]. */
void pd_silu_mul(const float *gate_up, int64_t rows, int inter, float *out, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * inter;
        silu_mul(gate, gate + inter, inter, out + r * inter);
    }
}

/* Rotates `heads` heads of each row of x in place, row r by the table row of positions[r]:
 * x (rows, >= heads, head_dim) with `stride` floats between rows; table (positions, 2, head_dim). */
void pd_rope(float *x, int64_t rows, int64_t stride, int heads, int head_dim, const int64_t *positions,
             const float *table, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *cos_sin = table + positions[r] * 2 * head_dim;
        for (int h = 0; h < heads; h++) apply_rope(x + r * stride + (int64_t)h * head_dim, cos_sin, head_dim);
    }
}

/* Reads buffers of any format front to back, each split across the threads the way the
 * projections are, adding their 32-bit words as integers (so no bit pattern slows the adds):
 * the read bandwidth this code reaches, for the benchmark's floor. Given the model's weights, it
 * reads exactly the memory a decode step reads, as fast as the machine will stream it. */
uint64_t pd_stream_read(const uint8_t *const *buffers, const int64_t *nbytes, int num_buffers, int num_threads) {
    uint64_t total = 0;
#pragma omp parallel num_threads(num_threads) reduction(+ : total)
    {
        int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
        for (int k = 0; k < num_buffers; k++) {
            const uint32_t *buf = (const uint32_t *)buffers[k];
            const int64_t words = nbytes[k] / 4;
            int64_t per = (words / nt) & ~(int64_t)31;
            int64_t c = id * per, end = id == nt - 1 ? words : c + per;
            uint32_t part = 0;
#if defined(__AVX2__)
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            for (; c + 32 <= end; c += 32) {
                a0 = _mm256_add_epi32(a0, _mm256_loadu_si256((const __m256i *)(buf + c)));
                a1 = _mm256_add_epi32(a1, _mm256_loadu_si256((const __m256i *)(buf + c + 8)));
                a2 = _mm256_add_epi32(a2, _mm256_loadu_si256((const __m256i *)(buf + c + 16)));
                a3 = _mm256_add_epi32(a3, _mm256_loadu_si256((const __m256i *)(buf + c + 24)));
            }
            uint32_t lanes[8];
            _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)));
            for (int l = 0; l < 8; l++) part += lanes[l];
#endif
            for (; c < end; c++) part += buf[c];
            total += part;
        }
    }
    return total;
}
