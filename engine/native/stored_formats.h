/* Weight formats the native kernels read as they are stored: float32, float16, bfloat16 and
 * GGUF's block formats Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K, each unpacked to float32 inside
 * the kernels, a group of 32 weights at a time, never into a copy of the model.
 *
 * Every unpacked value is exactly the format's float32 dequantization: the quant times its scale,
 * then plus (or minus) the offset, each step rounded to float32, in the order the formats are
 * defined (and dequantized by the gguf package, so by HF transformers). The build disables FMA
 * contraction, which would fuse those two roundings into one and change the last bit.
 *
 * Layouts (one block; the type ids are GGML's, as written in GGUF files):
 *   Q4_0 (2)  32 weights in 18 bytes: f16 d, 16 bytes of nibbles; w = d * (q - 8)
 *   Q4_1 (3)  32 in 20: f16 d, f16 m, 16 bytes of nibbles; w = d * q + m
 *   Q8_0 (8)  32 in 34: f16 d, 32 int8; w = q * d
 *     (nibble byte j holds element j in its low half and element j + 16 in its high half)
 *   Q4_K (12) 256 in 144: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for eight groups
 *             of 32, 128 bytes of nibbles (32 bytes per pair of groups: low halves the first
 *             group, high halves the second); w = (d * scale) * q - (dmin * min)
 *   Q5_K (13) 256 in 176: as Q4_K with 32 more bytes (after the scales) holding each weight's
 *             fifth bit: bit g of byte t is the high bit of element t of group g
 *   Q6_K (14) 256 in 210: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8
 *             scales (one per 16 weights), f16 d last; w = (d * scale) * (q - 32)
 *   F32 (0), F16 (1), BF16 (30): one weight per element, any row length.
 */
#ifndef PDSERVE_STORED_FORMATS_H
#define PDSERVE_STORED_FORMATS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vector_math.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif

enum { PD_F32 = 0, PD_F16 = 1, PD_Q4_0 = 2, PD_Q4_1 = 3, PD_Q8_0 = 8, PD_Q4_K = 12, PD_Q5_K = 13,
       PD_Q6_K = 14, PD_BF16 = 30 };

typedef struct {
    int32_t block; /* weights per block */
    int32_t bytes; /* bytes per block */
} pd_format;

/* The format of a type id; block 0 for a type these kernels do not read. */
static inline pd_format format_of(int type) {
    switch (type) {
    case PD_F32: return (pd_format){1, 4};
    case PD_F16: return (pd_format){1, 2};
    case PD_BF16: return (pd_format){1, 2};
    case PD_Q4_0: return (pd_format){32, 18};
    case PD_Q4_1: return (pd_format){32, 20};
    case PD_Q8_0: return (pd_format){32, 34};
    case PD_Q4_K: return (pd_format){256, 144};
    case PD_Q5_K: return (pd_format){256, 176};
    case PD_Q6_K: return (pd_format){256, 210};
    default: return (pd_format){0, 0};
    }
}

static inline int is_block_format(int type) { return format_of(type).block > 1; }

static inline uint16_t load_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* IEEE half -> float, exact (F16C when the compiler targets it). */
static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13); /* inf, nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int shift = 0;
        while (!(man & 0x400)) man <<= 1, shift++;
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* The two halves at p -> out[0], out[1]: one conversion for a block's scale and offset. */
static inline void halves_to_floats(const uint8_t *p, float out[2]) {
#if defined(__F16C__)
    uint32_t both;
    memcpy(&both, p, 4);
    const __m128 v = _mm_cvtph_ps(_mm_cvtsi32_si128((int)both));
    out[0] = _mm_cvtss_f32(v), out[1] = _mm_cvtss_f32(_mm_movehdup_ps(v));
#else
    out[0] = half_to_float(load_u16(p)), out[1] = half_to_float(load_u16(p + 2));
#endif
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The 6-bit scale and min of group j (< 8) of a Q4_K / Q5_K block, from its 12 scale bytes:
 * groups 0-3 keep theirs in the low six bits of bytes j and j + 4; groups 4-7 have their low
 * four bits in byte j + 4's halves and their top two in the spare top bits of bytes j - 4, j. */
static inline void kquant_scale_min(const uint8_t *s, int j, int *scale, int *min) {
    if (j < 4) {
        *scale = s[j] & 63, *min = s[j + 4] & 63;
    } else {
        *scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* Group g (32 weights) of a row of a block format: scale, offset and where its quants sit. The
 * weights are fl(fl(scale * q[t]) + offset) (offset 0: just the product; the sum is skipped). */
typedef struct {
    float scale[2];  /* the scale of elements 0-15 and of 16-31 (they differ only in Q6_K) */
    float offset;    /* added after the product: Q4_1's m, the K formats' -(dmin * min) */
    int has_offset;
} group_scales;

static inline group_scales scales_of(int type, const uint8_t *row, int g) {
    group_scales s = {{0.0f, 0.0f}, 0.0f, 0};
    if (type == PD_Q4_1) {
        const uint8_t *b = row + (size_t)g * 20;
        float dm[2];
        halves_to_floats(b, dm);
        s.scale[0] = s.scale[1] = dm[0], s.offset = dm[1], s.has_offset = 1;
    } else if (type == PD_Q4_0 || type == PD_Q8_0) {
        s.scale[0] = s.scale[1] = half_to_float(load_u16(row + (size_t)g * format_of(type).bytes));
    } else if (type == PD_Q4_K || type == PD_Q5_K) {
        const uint8_t *b = row + (size_t)(g / 8) * format_of(type).bytes;
        int sc, mn;
        kquant_scale_min(b + 4, g % 8, &sc, &mn);
        s.scale[0] = s.scale[1] = half_to_float(load_u16(b)) * (float)sc;
        s.offset = -(half_to_float(load_u16(b + 2)) * (float)mn), s.has_offset = 1;
    } else if (type == PD_Q6_K) {
        const uint8_t *b = row + (size_t)(g / 8) * 210;
        const float d = half_to_float(load_u16(b + 208));
        const int8_t *sc = (const int8_t *)(b + 192) + 2 * (g % 8);
        s.scale[0] = d * (float)sc[0], s.scale[1] = d * (float)sc[1];
    }
    return s;
}

/* The 32 integer quants of group g of a row of a block format (before the scale). */
static inline void group_quants(int type, const uint8_t *row, int g, int q[32]) {
    const pd_format f = format_of(type);
    if (type == PD_Q4_0 || type == PD_Q4_1) {
        const uint8_t *qs = row + (size_t)g * f.bytes + (type == PD_Q4_0 ? 2 : 4);
        const int bias = type == PD_Q4_0 ? 8 : 0;
        for (int t = 0; t < 16; t++) q[t] = (qs[t] & 0x0F) - bias, q[t + 16] = (qs[t] >> 4) - bias;
    } else if (type == PD_Q8_0) {
        const int8_t *qs = (const int8_t *)(row + (size_t)g * f.bytes + 2);
        for (int t = 0; t < 32; t++) q[t] = qs[t];
    } else if (type == PD_Q4_K || type == PD_Q5_K) {
        const uint8_t *b = row + (size_t)(g / 8) * f.bytes, j = (uint8_t)(g % 8);
        const uint8_t *qs = b + (type == PD_Q4_K ? 16 : 48) + 32 * (j / 2), *qh = b + 16;
        for (int t = 0; t < 32; t++) {
            q[t] = (j & 1) ? qs[t] >> 4 : qs[t] & 0x0F;
            if (type == PD_Q5_K) q[t] |= ((qh[t] >> j) & 1) << 4;
        }
    } else if (type == PD_Q6_K) {
        const uint8_t *b = row + (size_t)(g / 8) * 210;
        const int j = g % 8, half = j / 4, quarter = j % 4;
        const uint8_t *ql = b + 64 * half + 32 * (quarter % 2), *qh = b + 128 + 32 * half;
        for (int t = 0; t < 32; t++) {
            int low = (ql[t] >> (4 * (quarter / 2))) & 0x0F, high = (qh[t] >> (2 * quarter)) & 3;
            q[t] = (low | high << 4) - 32;
        }
    }
}

/* Weights [32g, 32g + 32) of a block-format row into out (32 floats). */
static inline void unpack_group(int type, const uint8_t *row, int g, float *out) {
    int q[32];
    group_quants(type, row, g, q);
    const group_scales s = scales_of(type, row, g);
    for (int t = 0; t < 32; t++) {
        float w = s.scale[t >= 16] * (float)q[t];
        out[t] = s.has_offset ? w + s.offset : w;
    }
}

/* Elements [c0, c1) of a row of any format into out (c1 - c0 floats). For block formats c0 and
 * c1 must be multiples of 32 (rows are whole blocks). */
static inline void unpack_span(int type, const uint8_t *row, int c0, int c1, float *out) {
    if (type == PD_F32) {
        memcpy(out, (const float *)row + c0, sizeof(float) * (size_t)(c1 - c0));
    } else if (type == PD_F16 || type == PD_BF16) {
        const uint8_t *p = row + 2 * (size_t)c0;
        int c = 0;
#if defined(__AVX2__) && defined(__F16C__)
        for (; c + 8 <= c1 - c0; c += 8) {
            __m128i h = _mm_loadu_si128((const __m128i *)(p + 2 * c));
            __m256 v = type == PD_F16 ? _mm256_cvtph_ps(h)
                                      : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            _mm256_storeu_ps(out + c, v);
        }
#endif
        for (; c < c1 - c0; c++) {
            uint16_t h = load_u16(p + 2 * c);
            out[c] = type == PD_F16 ? half_to_float(h) : bf16_to_float(h);
        }
    } else {
        for (int g = c0 / 32; g < c1 / 32; g++) unpack_group(type, row, g, out + 32 * g - c0);
    }
}

#endif
