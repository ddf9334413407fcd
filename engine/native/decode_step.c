/* One decode step of a Llama-family model on the CPU, in float32, for one to a few dozen
 * requests at once (one new token each).
 *
 * With few requests, a decode step reads every weight once and does about two FLOPs per weight
 * and request: it is bound by memory bandwidth. Built from ~20 torch ops per layer, such a step
 * spends about as long dispatching ops as reading weights, and BLAS's matrix-vector path streams
 * weights well below what the memory delivers. Here the whole step (embedding lookup, every
 * layer, final norm, LM head) runs inside one OpenMP parallel region. Each projection is split
 * by output rows across the threads, so a thread streams one contiguous slice of every
 * row-major weight, reusing each few-KB piece from L1 for all requests (three at a time in
 * registers, which keeps larger batches, bound by arithmetic, near the FMA units' rate).
 * Attention reads the paged KV blocks in place. Threads meet at a barrier only where a stage
 * needs the complete output of the one before.
 *
 * The projections' weights stay in the format they were stored in (projection.h): float32, or a
 * 16-bit float or GGUF block format unpacked in registers as it streams in, so a quantized model
 * reads a fraction of the bytes; activations and sums stay float32.
 *
 * Layouts (C-contiguous; float32 unless said):
 *   weights      (out, in) pd_matrix, row-major; QKV rows are [Q | K | V], gate/up rows are [gate | up]
 *   kv_cache     (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim); 0 = K, 1 = V
 *   rope         (max_positions, 2, head_dim): cos then sin, each frequency twice ("rotate half")
 *   block_table  (num_reqs, max_blocks) int32; seq_lens (num_reqs,) int32, this token included
 *   logits       (num_reqs, vocab)
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "projection.h"

typedef struct {
    const float *input_norm; /* (hidden) */
    pd_matrix qkv;           /* (q_size + 2 * kv_size, hidden) */
    const float *qkv_bias;   /* (q_size + 2 * kv_size) or NULL */
    const float *q_norm;     /* (head_dim) or NULL: Qwen3's per-head RMSNorm */
    const float *k_norm;     /* (head_dim) or NULL */
    pd_matrix o;             /* (hidden, q_size) */
    const float *post_norm;  /* (hidden) */
    pd_matrix gate_up;       /* (2 * intermediate, hidden) */
    pd_matrix down;          /* (hidden, intermediate) */
} pd_layer;

typedef struct {
    int32_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, vocab;
    int32_t block_size, max_positions;
    int64_t num_blocks;
    float eps;
    pd_matrix embed;         /* (vocab, hidden) */
    const float *final_norm; /* (hidden) */
    pd_matrix lm_head;       /* (vocab, hidden); the embedding when tied */
    const float *rope;       /* (max_positions, 2, head_dim) */
    const pd_layer *layers;  /* (num_layers) */
} pd_model;

enum { PD_OK = 0, PD_BAD_BLOCK = 1, PD_BAD_LENGTH = 2, PD_NO_MEMORY = 3, PD_BAD_TOKEN = 4 };

/* out[j * ldo + c] = sum over p < count of w[j * ldw + p] * v[p * ldv + c], for c < dim and
 * j < heads (1 to 3): the softmax-weighted sum of value rows for the query heads that share
 * them, each value vector loaded once for all of those heads. */
static void weighted_rows(const float *v, size_t ldv, const float *w, int ldw, int heads, int count,
                          int dim, float *out, int ldo) {
    int c = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; c + 32 <= dim; c += 32) { /* 32 columns of up to 3 heads stay in registers */
        __m256 acc[3][4];
        for (int j = 0; j < 3; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = _mm256_setzero_ps();
        for (int p = 0; p < count; p++) {
            const float *row = v + p * ldv + c;
            __m256 r0 = _mm256_loadu_ps(row), r1 = _mm256_loadu_ps(row + 8);
            __m256 r2 = _mm256_loadu_ps(row + 16), r3 = _mm256_loadu_ps(row + 24);
            for (int j = 0; j < heads; j++) {
                __m256 wp = _mm256_set1_ps(w[j * ldw + p]);
                acc[j][0] = _mm256_fmadd_ps(wp, r0, acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(wp, r1, acc[j][1]);
                acc[j][2] = _mm256_fmadd_ps(wp, r2, acc[j][2]);
                acc[j][3] = _mm256_fmadd_ps(wp, r3, acc[j][3]);
            }
        }
        for (int j = 0; j < heads; j++) {
            for (int k = 0; k < 4; k++) _mm256_storeu_ps(out + j * ldo + c + 8 * k, acc[j][k]);
        }
    }
#endif
    for (; c < dim; c++) {
        for (int j = 0; j < heads; j++) {
            float sum = 0.0f;
            for (int p = 0; p < count; p++) sum += w[j * ldw + p] * v[p * ldv + c];
            out[j * ldo + c] = sum;
        }
    }
}

/* Whether logit v at index r beats the best so far (b at bi): the larger value, the lower index
 * on a tie, and NaN above everything (numpy's and torch's argmax return the first NaN). */
static inline int beats(float v, int32_t r, float b, int32_t bi) {
    if (isnan(v)) return !isnan(b) || r < bi;
    return !isnan(b) && (v > b || (v == b && r < bi));
}

/* The LM head: logits (n, vocab) = W x, shared out like every projection; each thread also
 * keeps, per input, the largest logit of the rows it wrote (best, best_id: (n) each), read
 * while those rows are still in L1. */
static void lm_head_shared(row_share *shares, const pd_matrix *W, const float *x, int n, float *logits,
                           float *best, int32_t *best_id, float *unpacked) {
    const int vocab = W->rows;
    for (int i = 0; i < n; i++) best[i] = -INFINITY, best_id[i] = INT32_MAX;
    prepare_projection(x, W->cols, n, W->cols, unpacked);
    int q0, q1;
    while (next_quads(shares, &q0, &q1)) {
        const int r0 = 4 * q0, r1 = 4 * q1 < vocab ? 4 * q1 : vocab;
        project_rows(W, r0, r1, x, W->cols, n, NULL, logits, vocab, 0, unpacked);
        for (int i = 0; i < n; i++) {
            const float *row = logits + (size_t)i * vocab;
            for (int r = r0; r < r1; r++) {
                if (beats(row[r], r, best[i], best_id[i])) best[i] = row[r], best_id[i] = r;
            }
        }
    }
}

/* ---- the step -------------------------------------------------------------------------- */

typedef struct {
    float *x;        /* (n, hidden): the residual stream */
    float *normed;   /* (threads, n, hidden): each thread's normalised copy of x */
    float *qkv;      /* (n, qkv_out), as projected: prepare_tasks norms and rotates copies */
    float *attn;     /* (threads, n, q_size): the merged attention output (only the first when shared) */
    float *q_rot;    /* (threads, n, q_size): each thread's rotated queries */
    float *gate_up;  /* (n, 2 * intermediate) */
    float *act;      /* (n, intermediate) */
    float *partials; /* (tasks, heads, head_dim + 2): a task's unnormalised output, max, sum */
    float *scratch;  /* (threads, heads * block_size): a task's scores */
    row_share *shares; /* (layers * PROJECTIONS + 1, threads): the work split of each projection */
    float *best;       /* (threads, n): each thread's largest logit per input, and its index */
    int32_t *best_id;  /* (threads, n) */
    float *unpacked;   /* (threads, unpacked_stride): each thread's unpacked rows (projection.h) */
    size_t unpacked_stride;
} buffers;

enum { PROJECTIONS = 4 }; /* per layer: qkv, o, gate_up, down; then the LM head */
enum { PRIVATE_MERGE_MAX = 4 }; /* up to this many requests, every thread merges attention itself */

/* Attention runs as one task per request and KV block: each task reads its block's keys and
 * values of this layer, one contiguous stretch each, for every head, and keeps its own softmax
 * max and sum; the partial results are merged afterwards (as flash-decoding does). Tasks give
 * every thread a share even for one request. */
typedef struct {
    int n, max_blocks, num_tasks;
    const int32_t *block_table, *seq_lens;
    const int32_t *task_start; /* (n + 1): request i's tasks are [task_start[i], task_start[i+1]) */
    float *kv_cache;
} step_inputs;

/* Offsets into the KV cache (num_blocks, layers, 2, block_size, kv_heads, head_dim). */
typedef struct {
    size_t token, half, block; /* one position, K to V, one block */
} kv_strides;

static kv_strides strides_of(const pd_model *m) {
    kv_strides st;
    st.token = (size_t)m->num_kv_heads * m->head_dim;
    st.half = (size_t)m->block_size * st.token;
    st.block = (size_t)m->num_layers * 2 * st.half;
    return st;
}

/* Before a thread runs its attention tasks [t0, t1): it rotates the queries of the requests
 * those tasks cover into its own q_rot (n, heads, head_dim), with Qwen3's per-head norm when the
 * model has one. The thread that holds a request's last block also writes this step's key
 * (normed and rotated) and value into the cache: only that block's task reads them. So no
 * barrier separates the QKV projection's barrier from attention. */
static void prepare_tasks(const pd_model *m, const pd_layer *L, int layer, const step_inputs *in, int t0, int t1,
                          const float *qkv, float *q_rot) {
    const int H = m->num_heads, KVH = m->num_kv_heads, hd = m->head_dim, bs = m->block_size;
    const kv_strides st = strides_of(m);
    if (t0 >= t1) return;
    int i = 0;
    while (t0 >= in->task_start[i + 1]) i++;
    for (; i < in->n && in->task_start[i] < t1; i++) {
        const int pos = in->seq_lens[i] - 1;
        const float *cos_sin = m->rope + (size_t)pos * 2 * hd;
        const float *src = qkv + (size_t)i * (H + 2 * KVH) * hd;
        for (int h = 0; h < H; h++) {
            float *q = q_rot + ((size_t)i * H + h) * hd;
            if (L->q_norm) rms_norm(src + (size_t)h * hd, L->q_norm, hd, m->eps, q);
            else memcpy(q, src + (size_t)h * hd, sizeof(float) * hd);
            apply_rope(q, cos_sin, hd);
        }
        const int last = in->task_start[i + 1] - 1;
        if (last < t0 || last >= t1) continue;
        const int32_t block = in->block_table[(size_t)i * in->max_blocks + pos / bs];
        float *slot = in->kv_cache + block * st.block + (size_t)layer * 2 * st.half + (size_t)(pos % bs) * st.token;
        for (int g = 0; g < KVH; g++) {
            float *k = slot + (size_t)g * hd;
            if (L->k_norm) rms_norm(src + (size_t)(H + g) * hd, L->k_norm, hd, m->eps, k);
            else memcpy(k, src + (size_t)(H + g) * hd, sizeof(float) * hd);
            apply_rope(k, cos_sin, hd);
            memcpy(k + st.half, src + (size_t)(H + KVH + g) * hd, sizeof(float) * hd); /* V follows K */
        }
    }
}

/* Reads one float of every cache line of [p, p + n) with independent loads, front to back. The
 * KV cache was last read a step ago, so a task's block comes from memory; read the way the
 * scores and the weighted sum read it (a head at a time, 256-byte pieces 768 bytes apart), it
 * arrives one strided miss after another, at a third of streaming speed. A sequential sweep
 * first is followed by the hardware prefetchers and brings the block in at streaming speed. */
static inline void warm_lines(const float *p, size_t n) {
    float sink = 0.0f;
    for (size_t k = 0; k < n; k += 16) sink += p[k];
    __asm__ volatile("" : : "x"(sink)); /* the loads are the point: keep them */
}

/* This thread's share [*first, *end) of `count` items (attention tasks, merge items): a contiguous run. */
static void thread_share(int count, int *first, int *end) {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    *first = (int)((int64_t)count * id / nt);
    *end = (int)((int64_t)count * (id + 1) / nt);
}

/* Task t: request i's positions in its block b, for every head. */
static void attention_task(const pd_model *m, int layer, int t, const step_inputs *in, const float *q_rot,
                           buffers *b) {
    const int H = m->num_heads, KVH = m->num_kv_heads, hd = m->head_dim, bs = m->block_size;
    const int G = H / KVH;
    int i = 0;
    while (t >= in->task_start[i + 1]) i++;
    const int blk = t - in->task_start[i], seq_len = in->seq_lens[i];
    const int count = seq_len - blk * bs < bs ? seq_len - blk * bs : bs;
    const kv_strides st = strides_of(m);
    const float *keys = in->kv_cache + in->block_table[(size_t)i * in->max_blocks + blk] * st.block
                        + (size_t)layer * 2 * st.half; /* (block_size, kv_heads, head_dim) */
    warm_lines(keys, (size_t)count * st.token);
    warm_lines(keys + st.half, (size_t)count * st.token);
    const float *q = q_rot + (size_t)i * H * hd; /* (heads, head_dim), rotated */
    float *scores = b->scratch + (size_t)omp_get_thread_num() * H * bs; /* (heads, block_size) */
    const float scale = 1.0f / sqrtf((float)hd);

    /* Scores (heads, positions): four positions by three heads of a group at a time. */
    for (int g = 0; g < KVH; g++) {
        const float *key = keys + (size_t)g * hd, *qg = q + (size_t)g * G * hd;
        float d43[4][3], d4[4];
        int p = 0;
        for (; p + 4 <= count; p += 4) {
            int j = 0;
            for (; j + 3 <= G; j += 3) {
                dot4x3(key + p * st.token, st.token, hd, qg + j * hd, hd, d43);
                for (int r = 0; r < 4; r++) {
                    for (int k = 0; k < 3; k++) scores[(g * G + j + k) * bs + p + r] = d43[r][k] * scale;
                }
            }
            for (; j < G; j++) {
                dot4(key + p * st.token, st.token, hd, qg + j * hd, d4);
                for (int r = 0; r < 4; r++) scores[(g * G + j) * bs + p + r] = d4[r] * scale;
            }
        }
        for (; p < count; p++) {
            for (int j = 0; j < G; j++) scores[(g * G + j) * bs + p] = dot1(key + p * st.token, qg + j * hd, hd) * scale;
        }
    }
    float *part = b->partials + (size_t)t * H * (hd + 2); /* per head: output (head_dim), max, sum */
    for (int h = 0; h < H; h++) {
        float *sc = scores + h * bs, max_score = -INFINITY;
        for (int p = 0; p < count; p++) max_score = sc[p] > max_score ? sc[p] : max_score;
        part[h * (hd + 2) + hd] = max_score;
        part[h * (hd + 2) + hd + 1] = exp_shifted(sc, count, max_score);
    }
    for (int g = 0; g < KVH; g++) { /* the heads of a group share its value rows */
        for (int j = 0; j < G; j += 3) {
            int h = g * G + j, heads = G - j < 3 ? G - j : 3;
            weighted_rows(keys + st.half + (size_t)g * hd, st.token, scores + h * bs, bs, heads, count, hd,
                          part + h * (hd + 2), hd + 2);
        }
    }
}

/* out (n, q_size) = the softmax-weighted merge of every task's partial output, for the (request,
 * head) items [item0, item1). */
static void merge_attention(const pd_model *m, const step_inputs *in, const float *partials, float *out,
                            int item0, int item1) {
    const int H = m->num_heads, hd = m->head_dim;
    const size_t task_stride = (size_t)H * (hd + 2);
    for (int item = item0; item < item1; item++) {
        const int i = item / H, h = item % H;
        const int first = in->task_start[i], tasks = in->task_start[i + 1] - first;
        const float *head = partials + ((size_t)first * H + h) * (hd + 2);
        float max_score = -INFINITY, total = 0.0f, *o = out + ((size_t)i * H + h) * hd;
        for (int c = 0; c < tasks; c++) {
            float mc = head[c * task_stride + hd];
            max_score = mc > max_score ? mc : max_score;
        }
        memset(o, 0, sizeof(float) * hd);
        for (int c = 0; c < tasks; c++) {
            const float *part = head + c * task_stride;
            float w = expf(part[hd] - max_score);
            total += w * part[hd + 1];
#pragma omp simd
            for (int d = 0; d < hd; d++) o[d] += w * part[d];
        }
        for (int d = 0; d < hd; d++) o[d] /= total;
    }
}

static void layer_step(const pd_model *m, int layer, const step_inputs *in, buffers *b) {
    const pd_layer *L = &m->layers[layer];
    const int n = in->n, D = m->hidden, I = m->intermediate, q_size = m->num_heads * m->head_dim;
    const int qkv_out = q_size + 2 * m->num_kv_heads * m->head_dim;
    float *normed = b->normed + (size_t)omp_get_thread_num() * n * D;
    row_share *shares = b->shares + (size_t)layer * PROJECTIONS * omp_get_num_threads();
    const int nt = omp_get_num_threads();

    rms_norm_rows(b->x, L->input_norm, n, D, m->eps, normed);
    float *unpacked = b->unpacked + (size_t)omp_get_thread_num() * b->unpacked_stride;
    project_shared(shares, &L->qkv, normed, D, n, L->qkv_bias, b->qkv, qkv_out, 0, unpacked);
#pragma omp barrier
    int t0, t1;
    thread_share(in->num_tasks, &t0, &t1);
    float *q_rot = b->q_rot + (size_t)omp_get_thread_num() * n * q_size;
    prepare_tasks(m, L, layer, in, t0, t1, b->qkv, q_rot);
    for (int t = t0; t < t1; t++) attention_task(m, layer, t, in, q_rot, b);
#pragma omp barrier /* every partial result is in */
    float *attn = b->attn;
    if (n <= PRIVATE_MERGE_MAX) {
        /* A few requests: each thread merges all of them into its own copy, sparing a barrier. */
        attn += (size_t)omp_get_thread_num() * n * q_size;
        merge_attention(m, in, b->partials, attn, 0, n * m->num_heads);
    } else {
        int item0, item1;
        thread_share(n * m->num_heads, &item0, &item1);
        merge_attention(m, in, b->partials, attn, item0, item1);
#pragma omp barrier
    }
    project_shared(shares + nt, &L->o, attn, q_size, n, NULL, b->x, D, 1, unpacked); /* x += o(attn) */
#pragma omp barrier
    rms_norm_rows(b->x, L->post_norm, n, D, m->eps, normed);
    /* Gate rows [j0, j1) with the matching up rows: then act's columns [j0, j1) are complete. */
    prepare_projection(normed, D, n, D, unpacked);
    int q0, q1;
    while (next_quads(shares + 2 * nt, &q0, &q1)) {
        const int j0 = 4 * q0, j1 = 4 * q1 < I ? 4 * q1 : I;
        project_rows(&L->gate_up, j0, j1, normed, D, n, NULL, b->gate_up, 2 * I, 0, unpacked);
        project_rows(&L->gate_up, I + j0, I + j1, normed, D, n, NULL, b->gate_up, 2 * I, 0, unpacked);
        for (int i = 0; i < n; i++) {
            const float *gate = b->gate_up + (size_t)i * 2 * I, *up = gate + I;
            silu_mul(gate + j0, up + j0, j1 - j0, b->act + (size_t)i * I + j0);
        }
    }
#pragma omp barrier
    project_shared(shares + 3 * nt, &L->down, b->act, I, n, NULL, b->x, D, 1, unpacked); /* x += down(act) */
#pragma omp barrier
}

/* Checks that every position and block id the step will touch is inside the model's tables. */
static int check_inputs(const pd_model *m, int n, const int64_t *token_ids,
                        const int32_t *block_table, int max_blocks, const int32_t *seq_lens) {
    for (int i = 0; i < n; i++) {
        int len = seq_lens[i];
        if (len < 1 || len > m->max_positions || len > max_blocks * m->block_size) return PD_BAD_LENGTH;
        if (token_ids[i] < 0 || token_ids[i] >= m->vocab) return PD_BAD_TOKEN;
        for (int b = 0; b < (len + m->block_size - 1) / m->block_size; b++) {
            int32_t id = block_table[(size_t)i * max_blocks + b];
            if (id < 0 || id >= m->num_blocks) return PD_BAD_BLOCK;
        }
    }
    return PD_OK;
}

/* Runs one decode step for n requests, each with one new token; writes logits (n, vocab) and
 * each row's argmax (n) (the first index of its largest value, as torch's argmax). */
int pd_decode_step(const pd_model *m, int n, const int64_t *token_ids, const int32_t *block_table,
                   int max_blocks, const int32_t *seq_lens, float *kv_cache, float *logits,
                   int32_t *argmax, int num_threads) {
    int status = check_inputs(m, n, token_ids, block_table, max_blocks, seq_lens);
    if (status != PD_OK) return status;
    const int D = m->hidden, hd = m->head_dim, I = m->intermediate;
    const int q_size = m->num_heads * hd, qkv_out = q_size + 2 * m->num_kv_heads * hd;
    if (num_threads < 1) num_threads = 1;
    int32_t *task_start = malloc(sizeof(int32_t) * (n + 1));
    if (!task_start) return PD_NO_MEMORY;
    task_start[0] = 0;
    for (int i = 0; i < n; i++)
        task_start[i + 1] = task_start[i] + (seq_lens[i] + m->block_size - 1) / m->block_size;
    step_inputs in = {n, max_blocks, task_start[n], block_table, seq_lens, task_start, kv_cache};
    const int num_shares = (m->num_layers * PROJECTIONS + 1) * num_threads;
    /* Each thread's 4 unpacked rows of the widest weight (stored formats, batches of 3 and more). */
    const size_t widest = (size_t)(D > I ? (D > q_size ? D : q_size) : (I > q_size ? I : q_size));
    const size_t unpacked_stride = projection_scratch((int)widest, n);
    enum { PARTS = 12 };
    size_t sizes[PARTS] = {(size_t)n * D, (size_t)num_threads * n * D, (size_t)n * qkv_out,
                           (size_t)num_threads * n * q_size, (size_t)num_threads * n * q_size,
                           (size_t)n * 2 * I, (size_t)n * I,
                           (size_t)in.num_tasks * m->num_heads * (hd + 2),
                           (size_t)num_threads * m->num_heads * m->block_size,
                           (size_t)num_threads * n, (size_t)num_threads * n, num_threads * unpacked_stride};
    size_t total = 0;
    for (int k = 0; k < PARTS; k++) total += (sizes[k] + 15) & ~(size_t)15; /* 64-byte aligned parts */
    float *arena = aligned_alloc(64, total * sizeof(float));
    row_share *shares = aligned_alloc(64, sizeof(row_share) * num_shares);
    if (!arena || !shares) {
        free(arena);
        free(shares);
        free(task_start);
        return PD_NO_MEMORY;
    }
    buffers b;
    float *best_id_slots; /* int32 values in float-sized slots */
    float **parts[PARTS] = {&b.x, &b.normed, &b.qkv, &b.attn, &b.q_rot, &b.gate_up, &b.act, &b.partials,
                            &b.scratch, &b.best, &best_id_slots, &b.unpacked};
    size_t offset = 0;
    for (int k = 0; k < PARTS; k++) {
        *parts[k] = arena + offset;
        offset += (sizes[k] + 15) & ~(size_t)15;
    }
    b.shares = shares;
    b.unpacked_stride = unpacked_stride;
    b.best_id = (int32_t *)best_id_slots;
    for (int k = 0; k < num_threads * n; k++) b.best_id[k] = INT32_MAX; /* threads left out of the team */
    for (int i = 0; i < n; i++) matrix_row(&m->embed, token_ids[i], b.x + (size_t)i * D);

#pragma omp parallel num_threads(num_threads)
    {
        const int nt = omp_get_num_threads(); /* the team may be smaller than asked for */
        row_share *head_shares = shares + (size_t)m->num_layers * PROJECTIONS * nt;
#pragma omp single /* implicit barrier: every split is set before any is used */
        {
            const int rows[PROJECTIONS] = {qkv_out, D, I, D}; /* gate_up is split by its gate rows */
            for (int layer = 0; layer < m->num_layers; layer++) {
                for (int k = 0; k < PROJECTIONS; k++)
                    share_rows(shares + (size_t)(layer * PROJECTIONS + k) * nt, (rows[k] + 3) / 4, nt);
            }
            share_rows(head_shares, (m->vocab + 3) / 4, nt);
        }
        for (int layer = 0; layer < m->num_layers; layer++) layer_step(m, layer, &in, &b);
        float *normed = b.normed + (size_t)omp_get_thread_num() * n * D;
        rms_norm_rows(b.x, m->final_norm, n, D, m->eps, normed);
        const int id = omp_get_thread_num();
        lm_head_shared(head_shares, &m->lm_head, normed, n, logits, b.best + (size_t)id * n,
                       b.best_id + (size_t)id * n, b.unpacked + (size_t)id * b.unpacked_stride);
    }
    for (int i = 0; i < n; i++) {
        float best = -INFINITY;
        int32_t best_id = INT32_MAX;
        for (int t = 0; t < num_threads; t++) {
            const float v = b.best[(size_t)t * n + i];
            const int32_t r = b.best_id[(size_t)t * n + i];
            if (r != INT32_MAX && beats(v, r, best, best_id)) best = v, best_id = r;
        }
        argmax[i] = best_id;
    }
    free(arena);
    free(shares);
    free(task_start);
    return PD_OK;
}

