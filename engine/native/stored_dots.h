/* Rows of a stored-format weight against one or two float32 inputs, unpacking each group of 32
 * weights in registers (stored_formats.h gives the values), and the vectorised unpacking of a
 * span of a row into floats.
 *
 * The dots accumulate in the order dot1 and dot1x2 (vector_math.h) use for a float32 row: four
 * (two) accumulators taking 8 columns each in turn, summed pairwise at the end. A stored row
 * therefore gives bit for bit the result its float32 dequantization gives, for one or two inputs
 * as for more (where the kernels unpack rows into a buffer and run the float32 code on it). */
#ifndef PDSERVE_STORED_DOTS_H
#define PDSERVE_STORED_DOTS_H

#include "stored_formats.h"

#define PD_INLINE static inline __attribute__((always_inline))

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PD_STORED_AVX2 1

/* The 32 integer quants of group g as four vectors of 8 int32 (elements 8k .. 8k + 7). */
PD_INLINE void quant_vectors(int type, const uint8_t *row, int g, __m256i q[4]) {
    const pd_format f = format_of(type);
    if (type == PD_Q4_0 || type == PD_Q4_1) {
        /* Bytes 0-7 widened: their low halves are elements 0-7, their high halves 16-23. */
        const uint8_t *qs = row + (size_t)g * f.bytes + (type == PD_Q4_0 ? 2 : 4);
        const __m256i m4 = _mm256_set1_epi32(0x0F), bias = _mm256_set1_epi32(type == PD_Q4_0 ? 8 : 0);
        for (int h = 0; h < 2; h++) {
            const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * h)));
            q[h] = _mm256_and_si256(bytes, m4), q[h + 2] = _mm256_srli_epi32(bytes, 4);
            if (type == PD_Q4_0) q[h] = _mm256_sub_epi32(q[h], bias), q[h + 2] = _mm256_sub_epi32(q[h + 2], bias);
        }
    } else if (type == PD_Q8_0) {
        const uint8_t *qs = row + (size_t)g * f.bytes + 2;
        for (int k = 0; k < 4; k++) q[k] = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * k)));
    } else if (type == PD_Q4_K || type == PD_Q5_K) {
        const uint8_t *b = row + (size_t)(g / 8) * f.bytes;
        const int j = g % 8;
        const uint8_t *qs = b + (type == PD_Q4_K ? 16 : 48) + 32 * (j / 2), *qh = b + 16;
        const __m128i nibble_shift = _mm_cvtsi32_si128(4 * (j & 1)), bit_shift = _mm_cvtsi32_si128(j);
        const __m256i m4 = _mm256_set1_epi32(0x0F), one = _mm256_set1_epi32(1);
        for (int k = 0; k < 4; k++) {
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8 * k)));
            v = _mm256_and_si256(_mm256_srl_epi32(v, nibble_shift), m4);
            if (type == PD_Q5_K) {
                __m256i h = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qh + 8 * k)));
                v = _mm256_or_si256(v, _mm256_slli_epi32(_mm256_and_si256(_mm256_srl_epi32(h, bit_shift), one), 4));
            }
            q[k] = v;
        }
    } else { /* PD_Q6_K */
        const uint8_t *b = row + (size_t)(g / 8) * 210;
        const int j = g % 8, half = j / 4, quarter = j % 4;
        const uint8_t *ql = b + 64 * half + 32 * (quarter % 2), *qh = b + 128 + 32 * half;
        const __m128i low_shift = _mm_cvtsi32_si128(4 * (quarter / 2)), high_shift = _mm_cvtsi32_si128(2 * quarter);
        for (int k = 0; k < 4; k++) {
            __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ql + 8 * k)));
            __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qh + 8 * k)));
            lo = _mm256_and_si256(_mm256_srl_epi32(lo, low_shift), _mm256_set1_epi32(0x0F));
            hi = _mm256_and_si256(_mm256_srl_epi32(hi, high_shift), _mm256_set1_epi32(3));
            q[k] = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
        }
    }
}

/* The 32 weights of group g of a block-format row as four vectors of 8. */
PD_INLINE void weight_vectors(int type, const uint8_t *row, int g, __m256 w[4]) {
    __m256i q[4];
    quant_vectors(type, row, g, q);
    const group_scales s = scales_of(type, row, g);
    const __m256 s0 = _mm256_set1_ps(s.scale[0]), s1 = _mm256_set1_ps(s.scale[1]), off = _mm256_set1_ps(s.offset);
    for (int k = 0; k < 4; k++) {
        w[k] = _mm256_mul_ps(_mm256_cvtepi32_ps(q[k]), k < 2 ? s0 : s1);
        if (s.has_offset) w[k] = _mm256_add_ps(w[k], off);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define PD_STORED_AVX512 1

/* The 32 integer quants of group g as two vectors of 16 int32 (elements 0-15, 16-31), for the
 * formats weight_vectors16 does not look up in a table: Q8_0, Q5_K, Q6_K. */
PD_INLINE void quant_vectors16(int type, const uint8_t *row, int g, __m512i q[2]) {
    const pd_format f = format_of(type);
    const __m512i m4 = _mm512_set1_epi32(0x0F);
    if (type == PD_Q8_0) {
        const uint8_t *qs = row + (size_t)g * f.bytes + 2;
        for (int h = 0; h < 2; h++) q[h] = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16 * h)));
    } else if (type == PD_Q5_K) {
        const uint8_t *b = row + (size_t)(g / 8) * f.bytes;
        const int j = g % 8;
        const uint8_t *qs = b + 48 + 32 * (j / 2), *qh = b + 16;
        const __m128i nibble_shift = _mm_cvtsi32_si128(4 * (j & 1)), bit_shift = _mm_cvtsi32_si128(j);
        for (int h = 0; h < 2; h++) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16 * h)));
            v = _mm512_and_si512(_mm512_srl_epi32(v, nibble_shift), m4);
            const __m512i hb = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qh + 16 * h)));
            q[h] = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(hb, bit_shift),
                                                                         _mm512_set1_epi32(1)), 4));
        }
    } else { /* PD_Q6_K */
        const uint8_t *b = row + (size_t)(g / 8) * 210;
        const int j = g % 8, half = j / 4, quarter = j % 4;
        const uint8_t *ql = b + 64 * half + 32 * (quarter % 2), *qh = b + 128 + 32 * half;
        const __m128i low_shift = _mm_cvtsi32_si128(4 * (quarter / 2)), high_shift = _mm_cvtsi32_si128(2 * quarter);
        for (int h = 0; h < 2; h++) {
            __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ql + 16 * h)));
            __m512i hi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qh + 16 * h)));
            lo = _mm512_and_si512(_mm512_srl_epi32(lo, low_shift), m4);
            hi = _mm512_and_si512(_mm512_srl_epi32(hi, high_shift), _mm512_set1_epi32(3));
            q[h] = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), _mm512_set1_epi32(32));
        }
    }
}

/* The 32 weights of group g as two vectors of 16: the same values as weight_vectors. In the
 * 4-bit formats without a second scale (Q4_0, Q4_1, Q4_K) a group's weights take one of 16
 * values: those are computed once, as weight_vectors computes each weight (quant x scale, then
 * + offset), and looked up per lane. The permute reads only the low 4 bits of an index, so the
 * nibbles need no mask. */
PD_INLINE void weight_vectors16(int type, const uint8_t *row, int g, __m512 w[2]) {
    const group_scales s = scales_of(type, row, g);
    const __m512 off = _mm512_set1_ps(s.offset);
    if (type == PD_Q4_0 || type == PD_Q4_1 || type == PD_Q4_K) {
        const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 quants = type == PD_Q4_0 ? _mm512_sub_ps(levels, _mm512_set1_ps(8.0f)) : levels;
        __m512 table = _mm512_mul_ps(quants, _mm512_set1_ps(s.scale[0]));
        if (s.has_offset) table = _mm512_add_ps(table, off);
        __m512i index[2];
        if (type == PD_Q4_K) {
            const int j = g % 8;
            const uint8_t *qs = row + (size_t)(g / 8) * format_of(type).bytes + 16 + 32 * (j / 2);
            const __m128i shift = _mm_cvtsi32_si128(4 * (j & 1));
            for (int h = 0; h < 2; h++)
                index[h] = _mm512_srl_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qs + 16 * h))), shift);
        } else { /* byte t: element t in its low half, element t + 16 in its high half */
            const uint8_t *qs = row + (size_t)g * format_of(type).bytes + (type == PD_Q4_0 ? 2 : 4);
            index[0] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qs));
            index[1] = _mm512_srli_epi32(index[0], 4);
        }
        for (int h = 0; h < 2; h++) w[h] = _mm512_permutexvar_ps(index[h], table);
        return;
    }
    __m512i q[2];
    quant_vectors16(type, row, g, q);
    for (int h = 0; h < 2; h++) {
        w[h] = _mm512_mul_ps(_mm512_cvtepi32_ps(q[h]), _mm512_set1_ps(s.scale[h]));
        if (s.has_offset) w[h] = _mm512_add_ps(w[h], off);
    }
}
#endif

/* Eight weights of a float16 / bfloat16 row from element c on. */
PD_INLINE __m256 half_vector(int type, const uint8_t *row, int c) {
    const __m128i h = _mm_loadu_si128((const __m128i *)(row + 2 * (size_t)c));
    return type == PD_F16 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

PD_INLINE float half_scalar(int type, const uint8_t *row, int c) {
    const uint16_t h = load_u16(row + 2 * (size_t)c);
    return type == PD_F16 ? half_to_float(h) : bf16_to_float(h);
}

/* dot1 of a block-format row (type fixed at the call, so the unpacking is specialised). */
PD_INLINE float block_dot1(int type, const uint8_t *row, const float *x, int cols) {
#if PD_STORED_AVX512
    /* Lanes 0-7 and 8-15 of acc0 are a0 and a1 below, those of acc1 a2 and a3: the same sums. */
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, v[2];
    for (int g = 0; g < cols / 32; g++) {
        weight_vectors16(type, row, g, v);
        acc0 = _mm512_fmadd_ps(v[0], _mm512_loadu_ps(x + 32 * g), acc0);
        acc1 = _mm512_fmadd_ps(v[1], _mm512_loadu_ps(x + 32 * g + 16), acc1);
    }
    const __m256 s01 = _mm256_add_ps(_mm512_castps512_ps256(acc0), _mm512_extractf32x8_ps(acc0, 1));
    const __m256 s23 = _mm256_add_ps(_mm512_castps512_ps256(acc1), _mm512_extractf32x8_ps(acc1, 1));
    return hsum8(_mm256_add_ps(s01, s23));
#else
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, w[4];
    for (int g = 0; g < cols / 32; g++) {
        const float *xg = x + 32 * g;
        weight_vectors(type, row, g, w);
        a0 = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xg), a0);
        a1 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xg + 8), a1);
        a2 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xg + 16), a2);
        a3 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xg + 24), a3);
    }
    return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
}

/* dot1x2 of a block-format row: columns in 16s, as dot1x2 takes them. */
PD_INLINE void block_dot1x2(int type, const uint8_t *row, const float *x, size_t ldx, int cols, float out[2]) {
    const float *x1 = x + ldx;
#if PD_STORED_AVX512
    /* Lanes 0-7 of a are a0 below, lanes 8-15 a1 (b likewise): the same sums, in the same order. */
    __m512 a = _mm512_setzero_ps(), b = a, v[2];
    for (int g = 0; g < cols / 32; g++) {
        weight_vectors16(type, row, g, v);
        for (int h = 0; h < 2; h++) {
            const int c = 32 * g + 16 * h;
            a = _mm512_fmadd_ps(v[h], _mm512_loadu_ps(x + c), a);
            b = _mm512_fmadd_ps(v[h], _mm512_loadu_ps(x1 + c), b);
        }
    }
    out[0] = hsum8(_mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)));
    out[1] = hsum8(_mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1)));
#else
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, w[4];
    for (int g = 0; g < cols / 32; g++) {
        weight_vectors(type, row, g, w);
        for (int h = 0; h < 2; h++) {
            const int c = 32 * g + 16 * h;
            a0 = _mm256_fmadd_ps(w[2 * h], _mm256_loadu_ps(x + c), a0);
            a1 = _mm256_fmadd_ps(w[2 * h + 1], _mm256_loadu_ps(x + c + 8), a1);
            b0 = _mm256_fmadd_ps(w[2 * h], _mm256_loadu_ps(x1 + c), b0);
            b1 = _mm256_fmadd_ps(w[2 * h + 1], _mm256_loadu_ps(x1 + c + 8), b1);
        }
    }
    out[0] = hsum8(_mm256_add_ps(a0, a1)), out[1] = hsum8(_mm256_add_ps(b0, b1));
#endif
}

/* dot1 of a float16 / bfloat16 row, any length. */
PD_INLINE float half_dot1(int type, const uint8_t *row, const float *x, int in) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int c = 0;
    for (; c + 32 <= in; c += 32) {
        a0 = _mm256_fmadd_ps(half_vector(type, row, c), _mm256_loadu_ps(x + c), a0);
        a1 = _mm256_fmadd_ps(half_vector(type, row, c + 8), _mm256_loadu_ps(x + c + 8), a1);
        a2 = _mm256_fmadd_ps(half_vector(type, row, c + 16), _mm256_loadu_ps(x + c + 16), a2);
        a3 = _mm256_fmadd_ps(half_vector(type, row, c + 24), _mm256_loadu_ps(x + c + 24), a3);
    }
    for (; c + 8 <= in; c += 8) a0 = _mm256_fmadd_ps(half_vector(type, row, c), _mm256_loadu_ps(x + c), a0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; c < in; c++) s += half_scalar(type, row, c) * x[c];
    return s;
}

PD_INLINE void half_dot1x2(int type, const uint8_t *row, const float *x, size_t ldx, int in, float out[2]) {
    const float *x1 = x + ldx;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int c = 0;
    for (; c + 16 <= in; c += 16) {
        __m256 w0 = half_vector(type, row, c), w1 = half_vector(type, row, c + 8);
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + c), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + c + 8), a1);
        b0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + c), b0);
        b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + c + 8), b1);
    }
    float s0 = hsum8(_mm256_add_ps(a0, a1)), s1 = hsum8(_mm256_add_ps(b0, b1));
    for (; c < in; c++) {
        const float w = half_scalar(type, row, c);
        s0 += w * x[c], s1 += w * x1[c];
    }
    out[0] = s0, out[1] = s1;
}

/* The type is a constant in each case, so every call below is a specialised copy. */
#define PD_DISPATCH(type, call)                                                                  \
    switch (type) {                                                                               \
    case PD_Q4_0: call(PD_Q4_0); break;                                                           \
    case PD_Q4_1: call(PD_Q4_1); break;                                                           \
    case PD_Q8_0: call(PD_Q8_0); break;                                                           \
    case PD_Q4_K: call(PD_Q4_K); break;                                                           \
    case PD_Q5_K: call(PD_Q5_K); break;                                                           \
    case PD_Q6_K: call(PD_Q6_K); break;                                                           \
    case PD_F16: call(PD_F16); break;                                                             \
    default: call(PD_BF16); break;                                                                \
    }

/* One stored row (not float32) against x: dot1's result for its float32 dequantization. */
static inline float stored_dot1(int type, const uint8_t *row, const float *x, int cols) {
    float s = 0.0f;
#define PD_DOT1(T) s = is_block_format(T) ? block_dot1(T, row, x, cols) : half_dot1(T, row, x, cols)
    PD_DISPATCH(type, PD_DOT1)
#undef PD_DOT1
    return s;
}

static inline void stored_dot1x2(int type, const uint8_t *row, const float *x, size_t ldx, int cols, float out[2]) {
#define PD_DOT2(T) if (is_block_format(T)) block_dot1x2(T, row, x, ldx, cols, out); else half_dot1x2(T, row, x, ldx, cols, out)
    PD_DISPATCH(type, PD_DOT2)
#undef PD_DOT2
}

/* Elements [c0, c1) of a stored row (not float32) into out (c1 - c0 floats); for block formats
 * c0 and c1 are multiples of 32. */
static inline void stored_unpack_span(int type, const uint8_t *row, int c0, int c1, float *out) {
    if (!is_block_format(type)) {
        unpack_span(type, row, c0, c1, out);
        return;
    }
#if PD_STORED_AVX512
#define PD_UNPACK(T)                                                                              \
    for (int g = c0 / 32; g < c1 / 32; g++) {                                                     \
        __m512 w[2];                                                                              \
        weight_vectors16(T, row, g, w);                                                           \
        for (int h = 0; h < 2; h++) _mm512_storeu_ps(out + 32 * g - c0 + 16 * h, w[h]);           \
    }
#else
#define PD_UNPACK(T)                                                                              \
    for (int g = c0 / 32; g < c1 / 32; g++) {                                                     \
        __m256 w[4];                                                                              \
        weight_vectors(T, row, g, w);                                                             \
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(out + 32 * g - c0 + 8 * k, w[k]);            \
    }
#endif
    PD_DISPATCH(type, PD_UNPACK)
#undef PD_UNPACK
}
#else
/* Without AVX2: unpack the row into a buffer on the stack, piece by piece, and take dot1. */
enum { PD_ROW_PIECE = 256 };

static inline void stored_unpack_span(int type, const uint8_t *row, int c0, int c1, float *out) {
    unpack_span(type, row, c0, c1, out);
}

static inline float stored_dot1(int type, const uint8_t *row, const float *x, int cols) {
    float piece[PD_ROW_PIECE], s = 0.0f;
    for (int c = 0; c < cols; c += PD_ROW_PIECE) {
        const int end = c + PD_ROW_PIECE < cols ? c + PD_ROW_PIECE : cols;
        unpack_span(type, row, c, end, piece);
        s += dot1(piece, x + c, end - c);
    }
    return s;
}

static inline void stored_dot1x2(int type, const uint8_t *row, const float *x, size_t ldx, int cols, float out[2]) {
    out[0] = stored_dot1(type, row, x, cols), out[1] = stored_dot1(type, row, x + ldx, cols);
}
#endif

/* A whole stored row (not float32) into out (cols floats). */
static inline void stored_unpack_row(int type, const uint8_t *row, int cols, float *out) {
    stored_unpack_span(type, row, 0, cols, out);
}

#endif
