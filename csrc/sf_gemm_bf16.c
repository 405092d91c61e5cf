/* bfloat16 products with fp32 accumulation: the semantics (sf_bf16.h: VDPBF16PS, step by
 * step), packing, and three kernels that give the same bits:
 *   native    AVX512_BF16 register tiles of 8 rows x 32 columns (vdpbf16ps), chosen at run
 *             time where the CPU has it (compiled with a target attribute, so the library
 *             still loads on any x86);
 *   emulated  AVX2/FMA tiles of 6 rows x 16 columns: bf16 widened to fp32 with a mask / shift,
 *             two vfmadd231ps per pair (odd element first) under MXCSR.DAZ|FTZ;
 *   model     portable C, one sf_bf16_fma_model per step (no AVX2, or non-x86).
 * Every output element is one chain over all of K run by one thread, so the partition of the
 * work (which differs between the kernels) never changes a bit. */
#include "sf_bf16.h"
#include "sf_cpu.h"
#include "sf_kernels.h"
#include "sf.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* ---- the reference step ------------------------------------------------------------------- */
static float daz(float x) { return fpclassify(x) == FP_SUBNORMAL ? copysignf(0.0f, x) : x; }

/* round the exact value s + e (|e| <= half an ulp of s in double) to the nearest fp32, ties to
 * even: (float)s is right unless s is exactly halfway between two floats and e != 0 */
static float round_sum(double s, double e) {
    float r = (float)s;
    double d = s - (double)r;
    if (d != 0.0 && e != 0.0 && isfinite(r)) {
        float r2 = nextafterf(r, d > 0 ? INFINITY : -INFINITY);
        if (2.0 * fabs(d) == fabs((double)r2 - (double)r) && (e > 0) == (d > 0)) r = r2;
    }
    return r;
}

float sf_bf16_fma_model(float a, float b, float c) {
    a = daz(a); b = daz(b); c = daz(c);
    if (!isfinite(a) || !isfinite(b) || !isfinite(c)) return a * b + c; /* inf / NaN: IEEE */
    double p = (double)a * (double)b; /* exact: 48 significant bits at most */
    double s = p + (double)c;
    double bb = s - p, e = (p - (s - bb)) + ((double)c - bb); /* TwoSum: s + e == p + c */
    if (fabs(s) < 0x1p-100) {
        /* near fp32's bottom: round with an unbounded exponent (scaled by 2^100, exact) and
         * flush when that is below 2^-126 (tininess after rounding) */
        double ss = s * 0x1p100, es = e * 0x1p100;
        if (fabs(ss) < 0x1p-27) return copysignf(0.0f, (float)(ss != 0.0 ? ss : es != 0.0 ? es : s));
        float r = round_sum(ss, es);
        if (fabsf(r) < 0x1p-26f) return copysignf(0.0f, r);
        return r * 0x1p-100f; /* exact: a normal number */
    }
    return round_sum(s, e);
}

/* ---- packing -------------------------------------------------------------------------------- */
int64_t sf_bf16_pack_words(int64_t K, int64_t M) {
    return ((M + SF_BF16_NR - 1) / SF_BF16_NR) * SF_BF16_NR * ((K + 1) / 2);
}

#ifdef SF_X86
/* sf_bf16_from_f32 on 8 lanes (the bf16 in each 32-bit lane's low half): the same integer
 * operations, so the same bits. Packing one-element-at-a-time cost more than the emulated
 * product itself for the weight gradient's transposed dy (and would dominate a native one). */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) __m256i
cvt8(const float *src) {
    const __m256i u = _mm256_loadu_si256((const __m256i *)src);
    const __m256i expo = _mm256_and_si256(u, _mm256_set1_epi32(0x7F800000));
    const __m256i mant = _mm256_and_si256(u, _mm256_set1_epi32(0x007FFFFF));
    const __m256i one = _mm256_set1_epi32(1);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                                     _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
    r = _mm256_srli_epi32(r, 16);
    const __m256i hi = _mm256_srli_epi32(u, 16);
    const __m256i zero_den = _mm256_cmpeq_epi32(expo, _mm256_setzero_si256());
    const __m256i inf_nan = _mm256_cmpeq_epi32(expo, _mm256_set1_epi32(0x7F800000));
    const __m256i is_nan = _mm256_andnot_si256(_mm256_cmpeq_epi32(mant, _mm256_setzero_si256()), inf_nan);
    r = _mm256_blendv_epi8(r, _mm256_and_si256(hi, _mm256_set1_epi32(0x8000)), zero_den);
    r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_and_si256(is_nan, _mm256_set1_epi32(0x40))), inf_nan);
    return r;
}
/* 8 pair words from rows lo and hi (8 columns each; hi may be NULL: zeros) */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) __m256i
pair8(const float *lo, const float *hi) {
    __m256i w = cvt8(lo);
    if (hi) w = _mm256_or_si256(w, _mm256_slli_epi32(cvt8(hi), 16));
    return w;
}
/* 8 pair words from 16 consecutive floats (elements 2i, 2i+1 -> word i) */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) __m256i
pairs_of16(const float *src) {
    __m256i p = _mm256_packus_epi32(cvt8(src), cvt8(src + 8)); /* a0-3 b0-3 | a4-7 b4-7 */
    return _mm256_permute4x64_epi64(p, 0xD8);                   /* a0-7 b0-7 */
}
/* an 8x8 block of 32-bit words transposed in registers */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
transpose8_words(__m256i v[8]) {
    __m256 r[8], t[8], q[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_castsi256_ps(v[i]);
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    q[0] = _mm256_shuffle_ps(t[0], t[2], 0x44); q[1] = _mm256_shuffle_ps(t[0], t[2], 0xEE);
    q[2] = _mm256_shuffle_ps(t[1], t[3], 0x44); q[3] = _mm256_shuffle_ps(t[1], t[3], 0xEE);
    q[4] = _mm256_shuffle_ps(t[4], t[6], 0x44); q[5] = _mm256_shuffle_ps(t[4], t[6], 0xEE);
    q[6] = _mm256_shuffle_ps(t[5], t[7], 0x44); q[7] = _mm256_shuffle_ps(t[5], t[7], 0xEE);
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_castps_si256(_mm256_permute2f128_ps(q[i], q[i + 4], 0x20));
        v[i + 4] = _mm256_castps_si256(_mm256_permute2f128_ps(q[i], q[i + 4], 0x31));
    }
}

/* B with unit column stride (x for the weight gradient, W for the input gradient): row pair i
 * into every whole panel, eight columns per conversion */
__attribute__((target("avx2,fma"))) static void
pack_b_pair_avx2(uint32_t *pack, const float *b, int64_t rs, int64_t K, int64_t Kh, int64_t i, int64_t Pf) {
    const float *r0 = b + 2 * i * rs, *r1 = 2 * i + 1 < K ? r0 + rs : NULL;
    for (int64_t p = 0; p < Pf; p++) {
        uint32_t *dst = pack + (p * Kh + i) * SF_BF16_NR;
        const int64_t j0 = p * SF_BF16_NR;
        _mm256_storeu_si256((__m256i *)dst, pair8(r0 + j0, r1 ? r1 + j0 : NULL));
        _mm256_storeu_si256((__m256i *)(dst + 8), pair8(r0 + j0 + 8, r1 ? r1 + j0 + 8 : NULL));
    }
}

/* B = W^T (W rows of unit stride: the forward's weights): panel of rows j0..j0+15 of W, each
 * row's pair words (8 per 16 floats) transposed in registers into the panel's k-major order */
__attribute__((target("avx2,fma"))) static void
pack_b_t_avx2(uint32_t *dst, const float *w, int64_t ldw, int64_t K, int64_t j0) {
    const int64_t Kh = (K + 1) / 2;
    int64_t i = 0;
    for (; 2 * i + 16 <= K; i += 8)
        for (int h = 0; h < 2; h++) {
            __m256i v[8];
            for (int r = 0; r < 8; r++) v[r] = pairs_of16(w + (j0 + 8 * h + r) * ldw + 2 * i);
            transpose8_words(v);
            for (int q = 0; q < 8; q++) _mm256_storeu_si256((__m256i *)(dst + (i + q) * SF_BF16_NR + 8 * h), v[q]);
        }
    for (; i < Kh; i++)
        for (int j = 0; j < SF_BF16_NR; j++) {
            const float *row = w + (j0 + j) * ldw;
            dst[i * SF_BF16_NR + j] = sf_bf16_pair(row[2 * i], 2 * i + 1 < K ? row[2 * i + 1] : 0.0f);
        }
}

/* A row with unit column stride: 8 words per 16 floats, the tail in scalar code */
__attribute__((target("avx2,fma"))) static void pack_a_row_avx2(uint32_t *d, const float *s, int64_t K) {
    int64_t i = 0;
    for (; 2 * i + 16 <= K; i += 8) _mm256_storeu_si256((__m256i *)(d + i), pairs_of16(s + 2 * i));
    for (; 2 * i + 1 < K; i++) d[i] = sf_bf16_pair(s[2 * i], s[2 * i + 1]);
    if (2 * i < K) d[i] = sf_bf16_pair(s[2 * i], 0.0f);
}

/* The same conversions on AVX512_BF16's own instruction (VCVTNE2PS2BF16 / VCVTNEPS2BF16, whose
 * documented semantics sf_bf16_from_f32 is): 32 floats per instruction instead of the integer
 * emulation. Used only where cvt_native() says the instruction gave sf_bf16_from_f32's bits on
 * every probe pattern, and never under STACKFORMER_NO_BF16=1 / STACKFORMER_NO_AVX512=1, so
 * the emulated path stays free of the instruction. */
#define SF_TARGET_NAT_CVT __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bf16")))
SF_TARGET_NAT_CVT static inline __attribute__((always_inline)) __m256i pairs_of16_nat(const float *src) {
    return (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src));
}

SF_TARGET_NAT_CVT static void pack_a_row_nat(uint32_t *d, const float *s, int64_t K) {
    int64_t i = 0;
    for (; 2 * i + 32 <= K; i += 16)
        _mm512_storeu_si512((void *)(d + i), (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + 2 * i + 16), _mm512_loadu_ps(s + 2 * i)));
    for (; 2 * i + 16 <= K; i += 8) _mm256_storeu_si256((__m256i *)(d + i), pairs_of16_nat(s + 2 * i));
    for (; 2 * i + 1 < K; i++) d[i] = sf_bf16_pair(s[2 * i], s[2 * i + 1]);
    if (2 * i < K) d[i] = sf_bf16_pair(s[2 * i], 0.0f);
}

SF_TARGET_NAT_CVT static void pack_b_t_nat(uint32_t *dst, const float *w, int64_t ldw, int64_t K, int64_t j0) {
    const int64_t Kh = (K + 1) / 2;
    int64_t i = 0;
    for (; 2 * i + 16 <= K; i += 8)
        for (int h = 0; h < 2; h++) {
            __m256i v[8];
            for (int r = 0; r < 8; r++) v[r] = pairs_of16_nat(w + (j0 + 8 * h + r) * ldw + 2 * i);
            transpose8_words(v);
            for (int q = 0; q < 8; q++) _mm256_storeu_si256((__m256i *)(dst + (i + q) * SF_BF16_NR + 8 * h), v[q]);
        }
    for (; i < Kh; i++)
        for (int j = 0; j < SF_BF16_NR; j++) {
            const float *row = w + (j0 + j) * ldw;
            dst[i * SF_BF16_NR + j] = sf_bf16_pair(row[2 * i], 2 * i + 1 < K ? row[2 * i + 1] : 0.0f);
        }
}

/* every high half with low halves around the rounding points (ties, just below / above),
 * and zeros, denormals, infinities and NaNs among them: the instruction against the model */
SF_TARGET_NAT_CVT static int cvt_probe(void) {
    static const uint32_t lows[] = {0x0000u, 0x0001u, 0x7FFFu, 0x8000u, 0x8001u, 0xC000u, 0xFFFFu, 0x4321u};
    uint32_t src[16];
    uint16_t got[16];
    for (size_t l = 0; l < sizeof lows / sizeof lows[0]; l++)
        for (uint32_t hi = 0; hi < 65536u; hi += 16) {
            for (int j = 0; j < 16; j++) src[j] = (hi + (uint32_t)j) << 16 | lows[l];
            float f[16];
            memcpy(f, src, sizeof f);
            _mm256_storeu_si256((__m256i *)got, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(f)));
            for (int j = 0; j < 16; j++)
                if (got[j] != sf_bf16_from_f32(f[j])) return 0;
        }
    return 1;
}

static _Atomic int cvt_flag = -1;
static int cvt_native(void) {
    int v = atomic_load_explicit(&cvt_flag, memory_order_relaxed);
    if (v < 0) {
        const char *off = getenv("STACKFORMER_NO_BF16");
        v = !(off && strcmp(off, "1") == 0) && sf_cpu_avx512() && sf_bf16_cpu_has_native() && cvt_probe();
        atomic_store_explicit(&cvt_flag, v, memory_order_relaxed);
    }
    return v;
}

/* A with unit row stride (dy^T for the weight gradient): rows r0..r0+15 of A, pairs [i0, i1)
 * (i1 - i0 a multiple of 8 unless i1 == Kh), in blocks of 16 rows x 8 pairs converted down
 * columns (16 consecutive rows are one 64-byte line of src) and transposed in registers */
__attribute__((target("avx2,fma"))) static void
pack_a_cols_avx2(uint32_t *a, int64_t lda, const float *src, int64_t cs, int64_t r0, int64_t K,
                 int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8)
        for (int h = 0; h < 2; h++) {
            __m256i v[8];
            for (int q = 0; q < 8; q++) {
                const int64_t k = 2 * (i + q);
                v[q] = pair8(src + k * cs + r0 + 8 * h, k + 1 < K ? src + (k + 1) * cs + r0 + 8 * h : NULL);
            }
            transpose8_words(v);
            for (int r = 0; r < 8; r++) _mm256_storeu_si256((__m256i *)(a + (r0 + 8 * h + r) * lda + i), v[r]);
        }
    for (; i < i1; i++)
        for (int r = 0; r < 16; r++)
            a[(r0 + r) * lda + i] = sf_bf16_pair(src[2 * i * cs + r0 + r], 2 * i + 1 < K ? src[(2 * i + 1) * cs + r0 + r] : 0.0f);
}

/* pair words of 16 columns from rows lo and hi (hi may be NULL: zeros), by the instruction:
 * w[0] = columns 0-7, w[1] = columns 8-15 (what pair8 gives for each half) */
SF_TARGET_NAT_CVT static inline __attribute__((always_inline)) void
pair16_nat(__m256i w[2], const float *lo, const float *hi) {
    const __m256i l = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(lo));
    const __m256i h = hi ? (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(hi)) : _mm256_setzero_si256();
    const __m256i a = _mm256_unpacklo_epi16(l, h), b = _mm256_unpackhi_epi16(l, h); /* 0-3 8-11 | 4-7 12-15 */
    w[0] = _mm256_permute2x128_si256(a, b, 0x20);
    w[1] = _mm256_permute2x128_si256(a, b, 0x31);
}

SF_TARGET_NAT_CVT static void
pack_b_pair_nat(uint32_t *pack, const float *b, int64_t rs, int64_t K, int64_t Kh, int64_t i, int64_t Pf) {
    const float *r0 = b + 2 * i * rs, *r1 = 2 * i + 1 < K ? r0 + rs : NULL;
    for (int64_t p = 0; p < Pf; p++) {
        uint32_t *dst = pack + (p * Kh + i) * SF_BF16_NR;
        const int64_t j0 = p * SF_BF16_NR;
        __m256i w[2];
        pair16_nat(w, r0 + j0, r1 ? r1 + j0 : NULL);
        _mm256_storeu_si256((__m256i *)dst, w[0]);
        _mm256_storeu_si256((__m256i *)(dst + 8), w[1]);
    }
}

SF_TARGET_NAT_CVT static void
pack_a_cols_nat(uint32_t *a, int64_t lda, const float *src, int64_t cs, int64_t r0, int64_t K,
                int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
        __m256i v0[8], v1[8];
        for (int q = 0; q < 8; q++) {
            const int64_t k = 2 * (i + q);
            __m256i w[2];
            pair16_nat(w, src + k * cs + r0, k + 1 < K ? src + (k + 1) * cs + r0 : NULL);
            v0[q] = w[0];
            v1[q] = w[1];
        }
        transpose8_words(v0);
        transpose8_words(v1);
        for (int r = 0; r < 8; r++) {
            _mm256_storeu_si256((__m256i *)(a + (r0 + r) * lda + i), v0[r]);
            _mm256_storeu_si256((__m256i *)(a + (r0 + 8 + r) * lda + i), v1[r]);
        }
    }
    for (; i < i1; i++)
        for (int r = 0; r < 16; r++)
            a[(r0 + r) * lda + i] = sf_bf16_pair(src[2 * i * cs + r0 + r], 2 * i + 1 < K ? src[(2 * i + 1) * cs + r0 + r] : 0.0f);
}
#endif

void sf_bf16_pack_b(uint32_t *pack, const float *b, int64_t rs, int64_t cs, int64_t K,
                    int64_t M, int nt) {
    const int64_t Kh = (K + 1) / 2, P = (M + SF_BF16_NR - 1) / SF_BF16_NR;
#ifdef SF_X86
    const int vec = cs == 1 && sf_cpu_avx2_fma(), vec_t = rs == 1 && cs != 1 && sf_cpu_avx2_fma();
    const int nat = vec_t && cvt_native(), nat_p = vec && cvt_native();
#else
    const int vec = 0, vec_t = 0;
#endif
#ifdef SF_X86
    if (vec) { /* row pairs outer: each pair of rows of B is read once, contiguously, and each
                * (pair, panel) writes one 64-byte line */
        const int64_t Pf = M / SF_BF16_NR;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && K * M > 65536)
        for (int64_t i = 0; i < Kh; i++) {
            if (nat_p) pack_b_pair_nat(pack, b, rs, K, Kh, i, Pf);
            else pack_b_pair_avx2(pack, b, rs, K, Kh, i, Pf);
        }
        if (Pf == P) return;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && K * M > 65536)
    for (int64_t p = vec ? M / SF_BF16_NR : 0; p < P; p++) {
        uint32_t *dst = pack + p * Kh * SF_BF16_NR;
        const int64_t j0 = p * SF_BF16_NR, mw = M - j0 < SF_BF16_NR ? M - j0 : SF_BF16_NR;
#ifdef SF_X86
        if (vec_t && mw == SF_BF16_NR) {
            if (nat) pack_b_t_nat(dst, b, cs, K, j0);
            else pack_b_t_avx2(dst, b, cs, K, j0);
            continue;
        }
#endif
        for (int64_t i = 0; i < Kh; i++) {
            const float *r0 = b + 2 * i * rs, *r1 = r0 + rs;
            const int odd = 2 * i + 1 < K;
            for (int64_t j = 0; j < SF_BF16_NR; j++)
                dst[i * SF_BF16_NR + j] = j < mw ? sf_bf16_pair(r0[(j0 + j) * cs], odd ? r1[(j0 + j) * cs] : 0.0f) : 0u;
        }
    }
    (void)vec; (void)vec_t;
}

void sf_bf16_pack_a(uint32_t *a, int64_t lda, const float *src, int64_t rs, int64_t cs,
                    int64_t N, int64_t K, int nt) {
    const int64_t Kh = (K + 1) / 2;
#ifdef SF_X86
    if (rs == 1 && cs != 1 && sf_cpu_avx2_fma()) { /* columns of src are rows of A */
        const int nat_c = cvt_native();
        /* each thread takes a run of 16-row blocks and walks src in chunks of 64 rows (32
         * pairs) across all of them: a chunk stays in L2 and its pages in the TLB (a block at a
         * time down all of src's rows, one page each, thrashed the TLB) */
        const int64_t blocks = N / 16, CH = 32;
#pragma omp parallel num_threads(nt) if (nt > 1 && N * K > 65536)
        {
            const int tid = sf_team_tid(), nth = sf_team_size();
            const int64_t b_lo = blocks * tid / nth, b_hi = blocks * (tid + 1) / nth;
            for (int64_t i0 = 0; i0 < Kh; i0 += CH)
                for (int64_t bl = b_lo; bl < b_hi; bl++)
                    if (nat_c) pack_a_cols_nat(a, lda, src, cs, bl * 16, K, i0, i0 + CH < Kh ? i0 + CH : Kh);
                    else pack_a_cols_avx2(a, lda, src, cs, bl * 16, K, i0, i0 + CH < Kh ? i0 + CH : Kh);
        }
        for (int64_t r = blocks * 16; r < N; r++)
            for (int64_t i = 0; i < Kh; i++)
                a[r * lda + i] = sf_bf16_pair(src[2 * i * cs + r], 2 * i + 1 < K ? src[(2 * i + 1) * cs + r] : 0.0f);
        return;
    }
    const int vec = cs == 1 && sf_cpu_avx2_fma(), nat = vec && cvt_native();
#else
    const int vec = 0;
#endif
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && N * K > 65536)
    for (int64_t r = 0; r < N; r++) {
        const float *s = src + r * rs;
        uint32_t *d = a + r * lda;
#ifdef SF_X86
        if (nat) { pack_a_row_nat(d, s, K); continue; }
        if (vec) { pack_a_row_avx2(d, s, K); continue; }
#endif
        if (cs == 1) {
            int64_t i = 0;
            for (; 2 * i + 1 < K; i++) d[i] = sf_bf16_pair(s[2 * i], s[2 * i + 1]);
            if (i < Kh) d[i] = sf_bf16_pair(s[2 * i], 0.0f);
        } else {
            for (int64_t i = 0; i < Kh; i++)
                d[i] = sf_bf16_pair(s[2 * i * cs], 2 * i + 1 < K ? s[(2 * i + 1) * cs] : 0.0f);
        }
    }
    (void)vec;
#ifdef SF_X86
    (void)nat;
#endif
}

/* ---- kernels -------------------------------------------------------------------------------- */
/* The start of every chain: y (accumulate), the bias, or 0; tiles load it into registers. */
static inline float chain_start(const float *y, int64_t ldy, const float *bias, int64_t r,
                                int64_t j, int accumulate) {
    return accumulate ? y[r * ldy + j] : bias ? bias[j] : 0.0f;
}

/* portable: the model, step by step (slow; for CPUs without AVX2/FMA and as a test oracle) */
static void tile_model(float *y, int64_t ldy, const uint32_t *a, int64_t lda, const uint32_t *panel,
                       const float *bias, int64_t Kh, int64_t r0, int64_t mr, int64_t j0, int64_t mw,
                       int accumulate) {
    for (int64_t r = r0; r < r0 + mr; r++)
        for (int64_t j = 0; j < mw; j++) {
            float acc = chain_start(y, ldy, bias, r, j0 + j, accumulate);
            for (int64_t i = 0; i < Kh; i++) {
                uint32_t wa = a[r * lda + i], wb = panel[i * SF_BF16_NR + j];
                acc = sf_bf16_fma_model(sf_bf16_to_f32((sf_bf16)(wa >> 16)), sf_bf16_to_f32((sf_bf16)(wb >> 16)), acc);
                acc = sf_bf16_fma_model(sf_bf16_to_f32((sf_bf16)wa), sf_bf16_to_f32((sf_bf16)wb), acc);
            }
            y[r * ldy + j0 + j] = acc;
        }
}

#ifdef SF_X86
#define EMU_MR 6
/* emulated: 6 rows x 16 columns (one panel), 12 ymm accumulators. Rows past mr reuse row r0's
 * operands and are not stored. The caller has set MXCSR.DAZ|FTZ. */
__attribute__((target("avx2,fma"))) static void
tile_emulated(float *y, int64_t ldy, const uint32_t *a, int64_t lda, const uint32_t *panel,
              const float *bias, int64_t Kh, int64_t r0, int64_t mr, int64_t j0, int64_t mw,
              int accumulate) {
    __m256 acc[EMU_MR][2];
    const uint32_t *ar[EMU_MR];
    float tmp[SF_BF16_NR];
    for (int r = 0; r < EMU_MR; r++) {
        ar[r] = a + (r0 + (r < mr ? r : 0)) * lda;
        for (int j = 0; j < SF_BF16_NR; j++)
            tmp[j] = r < mr && j < mw ? chain_start(y, ldy, bias, r0 + r, j0 + j, accumulate) : 0.0f;
        acc[r][0] = _mm256_loadu_ps(tmp);
        acc[r][1] = _mm256_loadu_ps(tmp + 8);
    }
    const __m256i hi_mask = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int64_t i = 0; i < Kh; i++) {
        __m256i b0 = _mm256_loadu_si256((const __m256i *)(panel + i * SF_BF16_NR));
        __m256i b1 = _mm256_loadu_si256((const __m256i *)(panel + i * SF_BF16_NR + 8));
        __m256 bo0 = _mm256_castsi256_ps(_mm256_and_si256(b0, hi_mask));
        __m256 bo1 = _mm256_castsi256_ps(_mm256_and_si256(b1, hi_mask));
        __m256 be0 = _mm256_castsi256_ps(_mm256_slli_epi32(b0, 16));
        __m256 be1 = _mm256_castsi256_ps(_mm256_slli_epi32(b1, 16));
        for (int r = 0; r < EMU_MR; r++) {
            __m256i w = _mm256_set1_epi32((int)ar[r][i]);
            __m256 ao = _mm256_castsi256_ps(_mm256_and_si256(w, hi_mask));
            __m256 ae = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
            acc[r][0] = _mm256_fmadd_ps(ao, bo0, acc[r][0]); /* odd element first */
            acc[r][1] = _mm256_fmadd_ps(ao, bo1, acc[r][1]);
            acc[r][0] = _mm256_fmadd_ps(ae, be0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(ae, be1, acc[r][1]);
        }
    }
    for (int r = 0; r < mr; r++) {
        _mm256_storeu_ps(tmp, acc[r][0]);
        _mm256_storeu_ps(tmp + 8, acc[r][1]);
        memcpy(y + (r0 + r) * ldy + j0, tmp, (size_t)mw * sizeof(float));
    }
}

#define NAT_MR 8
/* native: 8 rows x 32 columns (two panels, np = 1 or 2 of them), 16 zmm accumulators; one
 * vdpbf16ps per (row, panel) and pair. */
__attribute__((target("avx512f,avx512bf16"))) static void
tile_native(float *y, int64_t ldy, const uint32_t *a, int64_t lda, const uint32_t *p0,
            const uint32_t *p1, const float *bias, int64_t Kh, int64_t r0, int64_t mr, int64_t j0,
            int64_t mw, int accumulate) {
    __m512 acc[NAT_MR][2];
    const uint32_t *ar[NAT_MR];
    float tmp[2 * SF_BF16_NR];
    for (int r = 0; r < NAT_MR; r++) {
        ar[r] = a + (r0 + (r < mr ? r : 0)) * lda;
        if (!accumulate && !bias) { /* the chains start at +0 */
            acc[r][0] = _mm512_setzero_ps();
            acc[r][1] = _mm512_setzero_ps();
            continue;
        }
        if (accumulate && r < mr && mw == 2 * SF_BF16_NR) { /* a whole row of y */
            acc[r][0] = _mm512_loadu_ps(y + (r0 + r) * ldy + j0);
            acc[r][1] = _mm512_loadu_ps(y + (r0 + r) * ldy + j0 + SF_BF16_NR);
            continue;
        }
        for (int j = 0; j < 2 * SF_BF16_NR; j++)
            tmp[j] = r < mr && j < mw ? chain_start(y, ldy, bias, r0 + r, j0 + j, accumulate) : 0.0f;
        acc[r][0] = _mm512_loadu_ps(tmp);
        acc[r][1] = _mm512_loadu_ps(tmp + SF_BF16_NR);
    }
    if (!p1) p1 = p0; /* a lone last panel: the second half is computed and dropped */
    for (int64_t i = 0; i < Kh; i++) {
        __m512i b0 = _mm512_loadu_si512((const void *)(p0 + i * SF_BF16_NR));
        __m512i b1 = _mm512_loadu_si512((const void *)(p1 + i * SF_BF16_NR));
        for (int r = 0; r < NAT_MR; r++) {
            __m512i w = _mm512_set1_epi32((int)ar[r][i]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)w, (__m512bh)b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)w, (__m512bh)b1);
        }
    }
    for (int r = 0; r < mr; r++) {
        if (mw == 2 * SF_BF16_NR) {
            _mm512_storeu_ps(y + (r0 + r) * ldy + j0, acc[r][0]);
            _mm512_storeu_ps(y + (r0 + r) * ldy + j0 + SF_BF16_NR, acc[r][1]);
            continue;
        }
        _mm512_storeu_ps(tmp, acc[r][0]);
        _mm512_storeu_ps(tmp + SF_BF16_NR, acc[r][1]);
        memcpy(y + (r0 + r) * ldy + j0, tmp, (size_t)mw * sizeof(float));
    }
}
#endif


/* ---- single-threaded products for kernels that tile their own work (attention) ------------- */
static _Atomic int forced_path = -1;

void sf_bf16_force_path(int path) { atomic_store_explicit(&forced_path, path, memory_order_relaxed); }

int sf_bf16_path(void) {
    int p = atomic_load_explicit(&forced_path, memory_order_relaxed);
    if (p < 0) p = sf_bf16_native() ? 1 : 0;
#ifdef SF_X86
    if (p == 0 && !sf_cpu_avx2_fma()) p = 2;
#else
    p = 2;
#endif
    return p;
}

int sf_bf16_path_mr(int path) { return path == 1 ? 8 : 6; }

void sf_bf16_rows(int path, float *y, int64_t ldy, const uint32_t *a, int64_t lda, const uint32_t *b,
                  int64_t pstride, int64_t N, int64_t Kh, int64_t M, int accumulate) {
    if (N <= 0 || M <= 0) return;
#ifdef SF_X86
    if (path == 0 && !sf_cpu_avx2_fma()) path = 2;
#else
    path = 2;
#endif
    const int64_t mr_t = sf_bf16_path_mr(path), pw = path == 1 ? 2 : 1;
    const int64_t P = (M + SF_BF16_NR - 1) / SF_BF16_NR;
#ifdef SF_X86
    unsigned csr = 0;
    if (path == 0) {
        csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040u); /* FTZ | DAZ, as sf_bf16_gemm_path */
    }
#endif
    for (int64_t r0 = 0; r0 < N; r0 += mr_t) {
        const int64_t mr = N - r0 < mr_t ? N - r0 : mr_t;
        for (int64_t p = 0; p < P; p += pw) {
            const int64_t j0 = p * SF_BF16_NR;
            const int64_t mw = M - j0 < pw * SF_BF16_NR ? M - j0 : pw * SF_BF16_NR;
            const uint32_t *panel = b + p * pstride;
#ifdef SF_X86
            if (path == 1) {
                tile_native(y, ldy, a, lda, panel, p + 1 < P ? panel + pstride : NULL, NULL, Kh, r0, mr,
                            j0, mw, accumulate);
                continue;
            }
            if (path == 0) {
                tile_emulated(y, ldy, a, lda, panel, NULL, Kh, r0, mr, j0, mw, accumulate);
                continue;
            }
#endif
            tile_model(y, ldy, a, lda, panel, NULL, Kh, r0, mr, j0, mw, accumulate);
        }
    }
#ifdef SF_X86
    if (path == 0) _mm_setcsr(csr);
#endif
}

static inline float bf16r(float x) { return sf_bf16_to_f32(sf_bf16_from_f32(x)); }

#ifdef SF_X86
/* one step of the chain in hardware: the caller has set MXCSR.DAZ|FTZ; a, b are bf16 values */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) float
step_hw(float a, float b, float c) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

__attribute__((target("avx2,fma"))) static void
dots_hw(float *out, const float *a, const float *b, int64_t b_rs, int64_t n, int64_t K) {
    const int64_t Kh = (K + 1) / 2;
    for (int64_t j0 = 0; j0 < n; j0 += 8) { /* 8 independent chains at a time */
        const int64_t nb = n - j0 < 8 ? n - j0 : 8;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t i = 0; i < Kh; i++) {
            const int odd = 2 * i + 1 < K;
            const float ao = odd ? bf16r(a[2 * i + 1]) : 0.0f, ae = bf16r(a[2 * i]);
            for (int64_t j = 0; j < nb; j++) {
                const float *bj = b + (j0 + j) * b_rs;
                acc[j] = step_hw(ao, odd ? bf16r(bj[2 * i + 1]) : 0.0f, acc[j]);
                acc[j] = step_hw(ae, bf16r(bj[2 * i]), acc[j]);
            }
        }
        for (int64_t j = 0; j < nb; j++) out[j0 + j] = acc[j];
    }
}

/* 8 bf16-rounded floats (cvt8's integer conversion, widened back) */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) __m256
round8(const float *src) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(cvt8(src), 16));
}

__attribute__((target("avx2,fma"))) static void
combine_hw(float *y, const float *p, const float *v, int64_t v_rs, int64_t n, int64_t M) {
    const int64_t Nh = (n + 1) / 2;
    int64_t e0 = 0;
    for (; e0 + 8 <= M; e0 += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < Nh; i++) {
            const int odd = 2 * i + 1 < n;
            const __m256 po = _mm256_set1_ps(odd ? bf16r(p[2 * i + 1]) : 0.0f);
            const __m256 pe = _mm256_set1_ps(bf16r(p[2 * i]));
            const __m256 vo = odd ? round8(v + (2 * i + 1) * v_rs + e0) : _mm256_setzero_ps();
            acc = _mm256_fmadd_ps(po, vo, acc);
            acc = _mm256_fmadd_ps(pe, round8(v + 2 * i * v_rs + e0), acc);
        }
        _mm256_storeu_ps(y + e0, acc);
    }
    for (; e0 < M; e0++) {
        float acc = 0.0f;
        for (int64_t i = 0; i < Nh; i++) {
            const int odd = 2 * i + 1 < n;
            acc = step_hw(odd ? bf16r(p[2 * i + 1]) : 0.0f, odd ? bf16r(v[(2 * i + 1) * v_rs + e0]) : 0.0f, acc);
            acc = step_hw(bf16r(p[2 * i]), bf16r(v[2 * i * v_rs + e0]), acc);
        }
        y[e0] = acc;
    }
}
#endif

/* The portable model of one vdpbf16ps chain: sum_k x[k] w[k ws] over k < K, pairs (odd term
 * first, zero past K) in ascending k, as the register kernels accumulate them. */
static float pair_chain(const float *x, const float *w, int64_t ws, int64_t K) {
    float acc = 0.0f;
    for (int64_t i = 0; i < (K + 1) / 2; i++) {
        const int odd = 2 * i + 1 < K;
        acc = sf_bf16_fma_model(odd ? bf16r(x[2 * i + 1]) : 0.0f, odd ? bf16r(w[(2 * i + 1) * ws]) : 0.0f, acc);
        acc = sf_bf16_fma_model(bf16r(x[2 * i]), bf16r(w[2 * i * ws]), acc);
    }
    return acc;
}

void sf_bf16_dots(int path, float *out, const float *a, const float *b, int64_t b_rs, int64_t n,
                  int64_t K) {
    if (n <= 0) return;
#ifdef SF_X86
    if (path != 2 && sf_cpu_avx2_fma()) {
        const unsigned csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040u);
        dots_hw(out, a, b, b_rs, n, K);
        _mm_setcsr(csr);
        return;
    }
#endif
    for (int64_t j = 0; j < n; j++) out[j] = pair_chain(a, b + j * b_rs, 1, K);
}

void sf_bf16_combine(int path, float *y, const float *p, const float *v, int64_t v_rs, int64_t n,
                     int64_t M) {
    if (M <= 0) return;
#ifdef SF_X86
    if (path != 2 && sf_cpu_avx2_fma()) {
        const unsigned csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040u);
        combine_hw(y, p, v, v_rs, n, M);
        _mm_setcsr(csr);
        return;
    }
#endif
    for (int64_t e = 0; e < M; e++) y[e] = pair_chain(p, v + e, v_rs, n);
}

/* ---- kernel choice -------------------------------------------------------------------------- */
static _Atomic int native_flag = -1;

int sf_bf16_cpu_has_native(void) {
#ifdef SF_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

/* The native kernel is used only where it gives the bits the emulated kernel and the scalar
 * model give (the documented VDPBF16PS semantics): once per process it runs a probe product
 * with ragged edges, signed values from 2^-140 (bf16 denormals: DAZ) to 2^20, cancelling sums
 * and denormal accumulators (FTZ) on both kernels and compares every bit. A CPU whose
 * instruction rounds differently keeps bf16 mode deterministic and thread-independent by
 * running the emulated kernel, and sf_bf16_kernel() says why. */
static _Atomic int verified_flag = -1;

static float probe_value(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    const uint32_t r = (uint32_t)(*s >> 33);
    const int e = (int)(r % 161u) - 140;                 /* 2^-140 .. 2^20 */
    const float m = 1.0f + (float)((r >> 8) & 0x7f) / 128.0f;
    return ((r >> 16) & 1 ? -m : m) * ldexpf(1.0f, e);
}

static int native_verified(void) {
    int v = atomic_load_explicit(&verified_flag, memory_order_relaxed);
    if (v >= 0) return v;
    v = 0;
    if (sf_bf16_cpu_has_native()) {
        enum { N = 11, K = 67, M = 45, KH = (K + 1) / 2 };
        float x[N * K], w[M * K], y1[N * M], y2[N * M];
        uint64_t s = 0x5DEECE66Dull;
        for (int i = 0; i < N * K; i++) x[i] = probe_value(&s);
        for (int i = 0; i < M * K; i++) w[i] = probe_value(&s);
        for (int i = 0; i < N; i++) x[i * K + 3] = -x[i * K + 2]; /* exact cancellations */
        for (int i = 0; i < N * M; i++) y1[i] = y2[i] = (i % 7 == 0) ? 0x1p-130f : probe_value(&s);
        uint32_t *a = malloc((size_t)(N * KH) * sizeof(uint32_t));
        uint32_t *b = malloc((size_t)sf_bf16_pack_words(K, M) * sizeof(uint32_t));
        if (a && b) {
            sf_bf16_pack_a(a, KH, x, K, 1, N, K, 1);
            sf_bf16_pack_b(b, w, 1, K, K, M, 1);
            sf_bf16_gemm_path(1, y1, M, a, KH, b, NULL, N, K, M, 1, 1);
            sf_bf16_gemm_path(2, y2, M, a, KH, b, NULL, N, K, M, 1, 1);
            v = memcmp(y1, y2, sizeof y1) == 0;
        }
        free(a);
        free(b);
    }
    atomic_store_explicit(&verified_flag, v, memory_order_relaxed);
    return v;
}

int sf_bf16_native_usable(void) { return sf_bf16_cpu_has_native() && native_verified(); }

int sf_bf16_native(void) {
    int have = atomic_load_explicit(&native_flag, memory_order_relaxed);
    if (have < 0) {
        const char *off = getenv("STACKFORMER_NO_BF16");
        /* STACKFORMER_NO_AVX512=1 keeps the products off 512-bit registers here too */
        have = !(off && strcmp(off, "1") == 0) && sf_cpu_avx512() && sf_bf16_native_usable();
        atomic_store_explicit(&native_flag, have, memory_order_relaxed);
    }
    return have;
}

const char *sf_bf16_kernel(void) {
    if (sf_bf16_native()) return "avx512_bf16";
    if (sf_bf16_cpu_has_native() && !native_verified())
        return "emulated (this CPU's vdpbf16ps does not give the documented bits: its native kernel is off)";
    return "emulated (no AVX512_BF16: bf16 mode is for correctness here, not speed)";
}

/* ---- the product ------------------------------------------------------------------------------ */
/* act >= 0: act_out = act(y) on each tile right after it is stored (sf_act_block, the fp32
 * epilogue's function, run with the caller's MXCSR: the same bits as a separate pass) */
static void gemm_path_act(int path, float *y, int64_t ldy, const uint32_t *a, int64_t lda,
                          const uint32_t *b, const float *bias, int64_t N, int64_t K, int64_t M,
                          int accumulate, int nt, int act, float *act_out);
static void gemm_path_act_pack(int path, uint32_t *pk, int64_t ldpk, const uint32_t *a, int64_t lda,
                               const uint32_t *b, const float *bias, int64_t N, int64_t K, int64_t M,
                               int nt, int act);

void sf_bf16_gemm_path(int path, float *y, int64_t ldy, const uint32_t *a, int64_t lda,
                       const uint32_t *b, const float *bias, int64_t N, int64_t K, int64_t M,
                       int accumulate, int nt) {
    gemm_path_act(path, y, ldy, a, lda, b, bias, N, K, M, accumulate, nt, -1, NULL);
}

static void gemm_path_act(int path, float *y, int64_t ldy, const uint32_t *a, int64_t lda,
                          const uint32_t *b, const float *bias, int64_t N, int64_t K, int64_t M,
                          int accumulate, int nt, int act, float *act_out) {
    if (N <= 0 || M <= 0) return;
    const int64_t Kh = (K + 1) / 2, P = (M + SF_BF16_NR - 1) / SF_BF16_NR;
#ifdef SF_X86
    if (path == 0 && !sf_cpu_avx2_fma()) path = 2;
#else
    path = 2;
#endif
    /* a job: one row tile x one column group (1 panel emulated / model, 2 native) */
    const int64_t mr_t = path == 1 ? 8 : 6, pw = path == 1 ? 2 : 1;
    const int64_t rt = (N + mr_t - 1) / mr_t, ct = (P + pw - 1) / pw, jobs = rt * ct;
    if (nt < 1) nt = 1;
    if (N * Kh * M < (1 << 15)) nt = 1; /* too small to wake a second thread for */
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#ifdef SF_X86
        unsigned csr = _mm_getcsr();
        if (path == 0) _mm_setcsr(csr | 0x8040u); /* FTZ (bit 15) | DAZ (bit 6) */
#endif
        const int tid = sf_team_tid(), nth = sf_team_size();
        /* contiguous static split, column group outer so a B panel stays in cache */
        const int64_t j_lo = jobs * tid / nth, j_hi = jobs * (tid + 1) / nth;
        for (int64_t job = j_lo; job < j_hi; job++) {
            const int64_t c = job / rt, t = job % rt;
            const int64_t r0 = t * mr_t, mr = N - r0 < mr_t ? N - r0 : mr_t;
            const int64_t p = c * pw, j0 = p * SF_BF16_NR;
            const int64_t mw = M - j0 < pw * SF_BF16_NR ? M - j0 : pw * SF_BF16_NR;
            const uint32_t *panel = b + p * Kh * SF_BF16_NR;
#ifdef SF_X86
            if (path == 1) {
                tile_native(y, ldy, a, lda, panel, p + 1 < P ? panel + Kh * SF_BF16_NR : NULL, bias,
                            Kh, r0, mr, j0, mw, accumulate);
                if (act >= 0) sf_act_block(act, act_out, y, ldy, r0, mr, j0, mw);
                continue;
            }
            if (path == 0) {
                tile_emulated(y, ldy, a, lda, panel, bias, Kh, r0, mr, j0, mw, accumulate);
                if (act >= 0) { /* under the caller's MXCSR, not the kernel's DAZ / FTZ */
                    _mm_setcsr(csr);
                    sf_act_block(act, act_out, y, ldy, r0, mr, j0, mw);
                    _mm_setcsr(csr | 0x8040u);
                }
                continue;
            }
#endif
            tile_model(y, ldy, a, lda, panel, bias, Kh, r0, mr, j0, mw, accumulate);
            if (act >= 0) sf_act_block(act, act_out, y, ldy, r0, mr, j0, mw);
        }
#ifdef SF_X86
        _mm_setcsr(csr);
#endif
    }
}

#ifdef SF_X86
/* one row of a 32-wide tile (32 floats) -> 16 pair words, by the instruction */
SF_TARGET_NAT_CVT static void cvt_row32_nat(uint32_t *dst, const float *src) {
    _mm512_storeu_si512((void *)dst, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src)));
}
#endif

/* A bias-started product whose tiles go to a per-thread buffer, get act (under the caller's
 * MXCSR) and are converted into packed bf16 rows pk (row r at pk + r*ldpk, word j/2 for column
 * j): what pack_a of act(y) would hold, without y. */
static void gemm_path_act_pack(int path, uint32_t *pk, int64_t ldpk, const uint32_t *a, int64_t lda,
                               const uint32_t *b, const float *bias, int64_t N, int64_t K, int64_t M,
                               int nt, int act) {
    if (N <= 0 || M <= 0) return;
    const int64_t Kh = (K + 1) / 2, P = (M + SF_BF16_NR - 1) / SF_BF16_NR;
#ifdef SF_X86
    if (path == 0 && !sf_cpu_avx2_fma()) path = 2;
    const int nat = cvt_native();
#else
    path = 2;
#endif
    const int64_t mr_t = path == 1 ? 8 : 6, pw = path == 1 ? 2 : 1;
    const int64_t rt = (N + mr_t - 1) / mr_t, ct = (P + pw - 1) / pw, jobs = rt * ct;
    if (nt < 1) nt = 1;
    if (N * Kh * M < (1 << 15)) nt = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float ty[8 * 2 * SF_BF16_NR];
        const int tid = sf_team_tid(), nth = sf_team_size();
        const int64_t j_lo = jobs * tid / nth, j_hi = jobs * (tid + 1) / nth;
#ifdef SF_X86
        const unsigned csr = _mm_getcsr();
#endif
        for (int64_t job = j_lo; job < j_hi; job++) {
            const int64_t c = job / rt, t = job % rt;
            const int64_t r0 = t * mr_t, mr = N - r0 < mr_t ? N - r0 : mr_t;
            const int64_t p = c * pw, j0 = p * SF_BF16_NR;
            const int64_t mw = M - j0 < pw * SF_BF16_NR ? M - j0 : pw * SF_BF16_NR;
            const uint32_t *panel = b + p * Kh * SF_BF16_NR, *ar = a + r0 * lda;
            const float *bj = bias ? bias + j0 : NULL;
            const int64_t ldt = 2 * SF_BF16_NR;
#ifdef SF_X86
            if (path == 1) {
                tile_native(ty, ldt, ar, lda, panel, p + 1 < P ? panel + Kh * SF_BF16_NR : NULL, bj, Kh, 0, mr,
                            0, mw, 0);
            } else if (path == 0) {
                _mm_setcsr(csr | 0x8040u);
                tile_emulated(ty, ldt, ar, lda, panel, bj, Kh, 0, mr, 0, mw, 0);
                _mm_setcsr(csr);
            } else
#endif
                tile_model(ty, ldt, ar, lda, panel, bj, Kh, 0, mr, 0, mw, 0);
            sf_act_block(act, ty, ty, ldt, 0, mr, 0, mw);
            for (int64_t r = 0; r < mr; r++) {
                uint32_t *dst = pk + (r0 + r) * ldpk + j0 / 2;
                const float *src = ty + r * ldt;
#ifdef SF_X86
                if (nat && mw == 2 * SF_BF16_NR) { cvt_row32_nat(dst, src); continue; }
#endif
                for (int64_t w = 0; 2 * w < mw; w++) dst[w] = sf_bf16_pair(src[2 * w], 2 * w + 1 < mw ? src[2 * w + 1] : 0.0f);
            }
        }
    }
}

void sf_bf16_gemm(float *y, int64_t ldy, const uint32_t *a, int64_t lda, const uint32_t *b,
                  const float *bias, int64_t N, int64_t K, int64_t M, int accumulate, int nt) {
    sf_bf16_gemm_path(sf_bf16_native() ? 1 : 0, y, ldy, a, lda, b, bias, N, K, M, accumulate, nt);
}

/* ---- public entry points (sf.h) --------------------------------------------------------------- */
sf_status sf_bf16_matmul(float *y, const float *x, const float *w, const float *bias, int64_t N,
                         int64_t K, int64_t M, int path, int n_threads) {
    if (N < 1 || K < 1 || M < 1 || !y || !x || !w) return SF_ERR_INVALID_ARG;
    if (path == 1 && !sf_bf16_native_usable()) return SF_ERR_INVALID_ARG;
    const int64_t Kh = (K + 1) / 2;
    uint32_t *a = malloc((size_t)(N * Kh) * sizeof(uint32_t));
    uint32_t *b = malloc((size_t)sf_bf16_pack_words(K, M) * sizeof(uint32_t));
    if (!a || !b) { free(a); free(b); return SF_ERR_NOMEM; }
    const int nt = sf_threads_resolve(n_threads);
    sf_bf16_pack_a(a, Kh, x, K, 1, N, K, nt);
    sf_bf16_pack_b(b, w, 1, K, K, M, nt);
    if (path < 0) sf_bf16_gemm(y, M, a, Kh, b, bias, N, K, M, 0, nt);
    else sf_bf16_gemm_path(path, y, M, a, Kh, b, bias, N, K, M, 0, nt);
    free(a);
    free(b);
    return SF_OK;
}

#include <time.h>
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double sf_bf16_gemm_bench(int64_t N, int64_t K, int64_t M, int reps, int n_threads) {
    if (N < 1 || K < 1 || M < 1 || reps < 1) return -1.0;
    const int64_t Kh = (K + 1) / 2;
    uint32_t *a = malloc((size_t)(N * Kh) * sizeof(uint32_t));
    uint32_t *b = malloc((size_t)sf_bf16_pack_words(K, M) * sizeof(uint32_t));
    float *y = malloc((size_t)(N * M) * sizeof(float));
    if (!a || !b || !y) { free(a); free(b); free(y); return -1.0; }
    /* operands: small bf16 values from a fixed LCG (the timing does not depend on them) */
    uint32_t s = 12345u;
    for (int64_t i = 0; i < N * Kh; i++) { s = s * 1664525u + 1013904223u; a[i] = (s & 0x00FF00FFu) | 0x3C003C00u; }
    for (int64_t i = 0; i < sf_bf16_pack_words(K, M); i++) { s = s * 1664525u + 1013904223u; b[i] = (s & 0x00FF00FFu) | 0x3C003C00u; }
    const int nt = sf_threads_resolve(n_threads);
    sf_bf16_gemm(y, M, a, Kh, b, NULL, N, K, M, 0, nt); /* warm up */
    double best = 1e300;
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        sf_bf16_gemm(y, M, a, Kh, b, NULL, N, K, M, 0, nt);
        double t = now_s() - t0;
        if (t < best) best = t;
    }
    free(a); free(b); free(y);
    return best;
}

/* ---- the model's bf16 mode (compute_dtype = "bfloat16"; run state in sf_stack.h) ----------
 * At a call's start every Linear weight is converted from the fp32 master copy and packed once:
 * W^T panels for the forward and, in a train step, W panels for the input gradient. The copy
 * lives in the call's workspace (the model's train or forward workspace), so weights written
 * through NumPy views between calls are always seen, and concurrent forward calls never share
 * a buffer. Activations are packed per product (they change every product). */
#include "sf_stack.h"

struct sf_bf16_weight {
    const float *w;
    int64_t M, K;           /* w is (M, K): out x in */
    uint32_t *fwd, *bwd;    /* W^T panels (K x M), W panels (M x K; training only) */
};

/* Every weight linear() multiplies by: (view, M, K) in the stack's terms. The views are NULL
 * when sizing a workspace without a model (sf_train_workspace_bytes). Must list every weight
 * passed to linear / linear_bwd: sf_bf16_linear falls back to fp32 for one it cannot find,
 * and tests/test_bf16.py checks every Linear tensor's product is bf16. */
static int64_t list_weights(const run *R, struct sf_bf16_weight *out) {
    const sf_config *c = R->c;
    const sf_model *m = R->m;
    int64_t n = 0;
    /* the conditions are sf_params.c's; with a model, a view it does not have is skipped (so
     * the list can never point at a missing tensor) */
#define ADD(view, MM, KK)                                                                      \
    do {                                                                                       \
        if (m->layers && !(view)) break;                                                       \
        if (out) out[n] = (struct sf_bf16_weight){(view), (MM), (KK), NULL, NULL};             \
        n++;                                                                                   \
    } while (0)
    for (int64_t i = 0; i < c->n_layers; i++) {
        const sf_layer_views *Lv = m->layers ? &m->layers[i] : NULL;
        const int last = i == c->n_layers - 1;
        ADD(Lv ? Lv->q_w : NULL, R->qd, R->d);
        ADD(Lv ? Lv->k_w : NULL, R->kvd, R->d);
        ADD(Lv ? Lv->v_w : NULL, R->kvd, R->d);
        ADD(Lv ? Lv->o_w : NULL, R->d, R->qd);
        if (c->moda && c->moda_depth_kv == SF_DKV_EXTRA && !last) { /* attention's own depth K/V */
            ADD(Lv ? Lv->attn_depth_k_w : NULL, R->kvd, R->d);
            ADD(Lv ? Lv->attn_depth_v_w : NULL, R->kvd, R->d);
        }
        if (c->act == SF_ACT_SWIGLU) ADD(Lv ? Lv->gate_w : NULL, R->F, R->d);
        ADD(Lv ? Lv->up_w : NULL, R->F, R->d);
        ADD(Lv ? Lv->down_w : NULL, R->d, R->F);
        if (c->moda && c->moda_depth_kv != SF_DKV_ATTN && !last) {
            ADD(Lv ? Lv->depth_k_w : NULL, R->kvd, R->d);
            ADD(Lv ? Lv->depth_v_w : NULL, R->kvd, R->d);
        }
    }
    if (out) out[n] = (struct sf_bf16_weight){m->lm_head, R->V, R->d, NULL, NULL}; /* the head (tok_emb when tied) */
    n++;
#undef ADD
    return n;
}

static int cmp_weight(const void *a, const void *b) {
    const float *x = ((const struct sf_bf16_weight *)a)->w, *y = ((const struct sf_bf16_weight *)b)->w;
    return x < y ? -1 : x > y;
}

void sf_bf16_layout(run *R, bump *bp) {
    int bad = 0;
    const int64_t n = list_weights(R, NULL);
    R->bf_n = n;
    R->bf_list = (struct sf_bf16_weight *)take(bp, cmul(&bad, n, (int64_t)((sizeof(struct sf_bf16_weight) + 3) / 4)));
    struct sf_bf16_weight *sz = malloc((size_t)(n > 0 ? n : 1) * sizeof *sz);
    if (!sz) { bp->bad = 1; return; }
    list_weights(R, sz); /* sizes (and, with a model, the views) */
    for (int64_t i = 0; i < n; i++) {
        uint32_t *f = (uint32_t *)take(bp, sf_bf16_pack_words(sz[i].K, sz[i].M));
        uint32_t *g = R->training ? (uint32_t *)take(bp, sf_bf16_pack_words(sz[i].M, sz[i].K)) : NULL;
        if (R->bf_list) { R->bf_list[i] = sz[i]; R->bf_list[i].fwd = f; R->bf_list[i].bwd = g; }
    }
    free(sz);
    const int64_t kmax = max64(max64(max64(R->d, R->qd), max64(R->kvd, R->F)), R->V);
    const int64_t N = R->N;
    R->bf_a = (uint32_t *)take(bp, max64(cmul(&bad, N, (kmax + 1) / 2), cmul(&bad, kmax, (N + 1) / 2)));
    R->bf_b = R->training ? (uint32_t *)take(bp, sf_bf16_pack_words(N, kmax)) : NULL;
    R->bf_g = R->training ? NULL : (uint32_t *)take(bp, cmul(&bad, N, (R->F + 1) / 2));
    if (bad) bp->bad = 1;
}

/* once per call, after the layout: pack every weight, then sort the list for find_weight */
void sf_bf16_convert_weights(run *R) {
    struct sf_bf16_weight *L = R->bf_list;
    for (int64_t i = 0; i < R->bf_n; i++) {
        sf_bf16_pack_b(L[i].fwd, L[i].w, 1, L[i].K, L[i].K, L[i].M, R->nt);
        if (L[i].bwd) sf_bf16_pack_b(L[i].bwd, L[i].w, L[i].K, 1, L[i].M, L[i].K, R->nt);
    }
    qsort(L, (size_t)R->bf_n, sizeof *L, cmp_weight);
}

static const struct sf_bf16_weight *find_weight(const run *R, const float *w) {
    int64_t lo = 0, hi = R->bf_n - 1;
    while (lo <= hi) {
        int64_t mid = (lo + hi) / 2;
        if (R->bf_list[mid].w == w) return &R->bf_list[mid];
        if (R->bf_list[mid].w < w) lo = mid + 1; else hi = mid - 1;
    }
    return NULL;
}

void sf_bf16_linear(const run *R, float *y, const float *x, const float *w, const float *b,
                    int64_t K, int64_t M) {
    const struct sf_bf16_weight *e = find_weight(R, w);
    if (!e || e->M != M || e->K != K) { /* not a listed weight: fp32 (see list_weights) */
        sf_matmul(y, x, w, b, R->N, K, M, 0, R->pack, R->nt);
        return;
    }
    const int64_t Kh = (K + 1) / 2;
    sf_bf16_pack_a(R->bf_a, Kh, x, K, 1, R->N, K, R->nt);
    sf_bf16_gemm(y, M, R->bf_a, Kh, e->fwd, b, R->N, K, M, 0, R->nt);
}

void sf_bf16_linear_act(const run *R, float *y, float *act_out, int act, const float *x,
                        const float *w, const float *b, int64_t K, int64_t M) {
    const struct sf_bf16_weight *e = find_weight(R, w);
    if (!e || e->M != M || e->K != K) { /* not a listed weight: fp32 (see list_weights) */
        sf_matmul_act(y, act_out, act, x, w, b, R->N, K, M, R->pack, R->nt);
        return;
    }
    const int64_t Kh = (K + 1) / 2;
    sf_bf16_pack_a(R->bf_a, Kh, x, K, 1, R->N, K, R->nt);
    gemm_path_act(sf_bf16_native() ? 1 : 0, y ? y : act_out, M, R->bf_a, Kh, e->fwd, b, R->N, K, M, 0,
                  R->nt, act, act_out);
}

int sf_bf16_mlp_forward(const run *R, float *y, int act, const float *u, const float *up_w,
                        const float *up_b, const float *down_w, const float *down_b, int64_t d,
                        int64_t F) {
    if (R->training || !R->bf_g) return 0;
    const struct sf_bf16_weight *eu = find_weight(R, up_w), *ed = find_weight(R, down_w);
    if (!eu || eu->M != F || eu->K != d || !ed || ed->M != d || ed->K != F) return 0;
    const int64_t dh = (d + 1) / 2, Fh = (F + 1) / 2;
    sf_bf16_pack_a(R->bf_a, dh, u, d, 1, R->N, d, R->nt);
    gemm_path_act_pack(sf_bf16_native() ? 1 : 0, R->bf_g, Fh, R->bf_a, dh, eu->fwd, up_b, R->N, d, F, R->nt, act);
    sf_bf16_gemm(y, d, R->bf_g, Fh, ed->fwd, down_b, R->N, F, d, 0, R->nt);
    return 1;
}

void sf_bf16_linear_same_x(const run *R, int n, float *const *y, const float *x,
                           const float *const *w, const float *const *b, int64_t K,
                           const int64_t *M) {
    const int64_t Kh = (K + 1) / 2;
    int packed = 0;
    for (int i = 0; i < n; i++) {
        const struct sf_bf16_weight *e = find_weight(R, w[i]);
        if (!e || e->M != M[i] || e->K != K) {
            sf_matmul(y[i], x, w[i], b[i], R->N, K, M[i], 0, R->pack, R->nt);
            continue;
        }
        if (!packed) sf_bf16_pack_a(R->bf_a, Kh, x, K, 1, R->N, K, R->nt);
        packed = 1;
        sf_bf16_gemm(y[i], M[i], R->bf_a, Kh, e->fwd, b[i], R->N, K, M[i], 0, R->nt);
    }
}

void sf_bf16_linear_bwd(const run *R, float *dx, int dx_accumulate, const float *dy,
                        const float *x, const float *w, int64_t K, int64_t M) {
    const struct sf_bf16_weight *e = find_weight(R, w);
    const int64_t N = R->N;
    if (!e || !e->bwd || e->M != M || e->K != K) {
        sf_gemm(GRAD(R, w), K, dy, 1, M, x, 0, NULL, M, N, K, 1, R->pack, R->nt);
        if (dx) sf_gemm(dx, K, dy, M, 1, w, 0, NULL, N, M, K, dx_accumulate, R->pack, R->nt);
        return;
    }
    /* dW (M x K) += dy^T (M x N) . x (N x K): the reduction runs over tokens */
    const int64_t Nh = (N + 1) / 2, Mh = (M + 1) / 2;
    sf_bf16_pack_a(R->bf_a, Nh, dy, 1, M, M, N, R->nt);
    sf_bf16_pack_b(R->bf_b, x, K, 1, N, K, R->nt);
    sf_bf16_gemm(GRAD(R, w), K, R->bf_a, Nh, R->bf_b, NULL, M, N, K, 1, R->nt);
    /* dx (N x K) (+)= dy (N x M) . W (M x K) */
    if (dx) {
        sf_bf16_pack_a(R->bf_a, Mh, dy, M, 1, N, M, R->nt);
        sf_bf16_gemm(dx, K, R->bf_a, Mh, e->bwd, NULL, N, M, K, dx_accumulate, R->nt);
    }
}
