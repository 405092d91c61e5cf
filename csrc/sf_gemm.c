/* stackformer matrix products: packed register tiles (AVX-512, AVX2/FMA, portable C), the
 * small-N path and the activation epilogue. Every output element is accumulated in ascending k
 * by one thread, so products are bitwise identical for any thread count (see sf_kernels.h). */
#include "sf_kernels.h"
#include "sf_internal.h"
#include "sf_cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


/* ---- matmul ------------------------------------------------------------------------------ */
/* Why packed outer products: y = x W^T with W (M,K) row-major means each output is a dot
 * product of two contiguous rows, which vectorizes only by reassociating the sum (and pays a
 * horizontal add per output). Packing W^T into K x 16 panels instead lets a 6x16 register tile
 * accumulate with one broadcast + two vector FMAs per k: no reassociation, each output summed
 * in plain ascending k order, which also makes results independent of the thread count. */

#define SF_NR 16 /* panel width (two AVX vectors) */
#define SF_MR 6  /* rows per register tile */
/* K chunk for a strided A (the dW = dy^T x products, K = tokens): the tile then reads one
 * cache line per k, and over all of K those lines (and the K x 16 panel) fall out of L1 and
 * the TLB before the next row tile reuses them. 128-deep chunks keep both resident; y carries
 * the partial sums between chunks, so each element still sees one fma per k in ascending
 * order (bitwise the same result). Measured 1.4-2.5x faster on dW shapes; for contiguous A,
 * chunking only re-streams y and was slower, so it is off there. */
#ifndef SF_KC
#define SF_KC 128
#endif
/* 6-row tiles per block of A that the contiguous-A products keep in L2 across panels. */
#define SF_ROW_BLOCK 16
/* Largest B (floats) the contiguous-A products read in place when it needs no transpose. */
#define SF_DIRECT_FLOATS (64 * 256)
/* a strided-A product with at most this many row tiles reads a plain B in place (gemm_part) */
#ifndef SF_B_INPLACE_TILES
#define SF_B_INPLACE_TILES 4
#endif

int64_t sf_matmul_pack_floats(int64_t K, int64_t M) {
    return K * ((M + SF_NR - 1) / SF_NR) * SF_NR;
}

#ifdef SF_X86
/* c[i] = (src[0*ld + i], src[1*ld + i], ..., src[7*ld + i]): an 8x8 block transposed in
 * registers (8 loads, 24 shuffles), for reading rows of w as columns without gathers. */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
transpose8_avx2(const float *src, int64_t ld, __m256 c[8]) {
    __m256 r0 = _mm256_loadu_ps(src + 0 * ld), r1 = _mm256_loadu_ps(src + 1 * ld);
    __m256 r2 = _mm256_loadu_ps(src + 2 * ld), r3 = _mm256_loadu_ps(src + 3 * ld);
    __m256 r4 = _mm256_loadu_ps(src + 4 * ld), r5 = _mm256_loadu_ps(src + 5 * ld);
    __m256 r6 = _mm256_loadu_ps(src + 6 * ld), r7 = _mm256_loadu_ps(src + 7 * ld);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    c[0] = _mm256_permute2f128_ps(u0, u4, 0x20); c[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    c[2] = _mm256_permute2f128_ps(u2, u6, 0x20); c[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    c[4] = _mm256_permute2f128_ps(u0, u4, 0x31); c[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    c[6] = _mm256_permute2f128_ps(u2, u6, 0x31); c[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* One full panel of w^T: dst[k][j] = w[j*ldw + k], j < 16. Packing the forward's W^T (and
 * attention's K^T) element by element is a strided gather, ~1/8 of the tiles' time for
 * K = 32-64 products; two 8x8 register transposes per 8 k make it a copy. */
__attribute__((target("avx2,fma"))) static void pack_panel_t_avx2(float *dst, const float *w,
                                                                  int64_t ldw, int64_t K) {
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int h = 0; h < 2; h++) {
            __m256 c[8];
            transpose8_avx2(w + h * 8 * ldw + k, ldw, c);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(dst + (k + i) * SF_NR + h * 8, c[i]);
        }
    for (; k < K; k++)
        for (int j = 0; j < SF_NR; j++) dst[k * SF_NR + j] = w[j * ldw + k];
}
#endif

/* dst[k][j] = B[k][p*16 + j], zero-padded past M, where B (K x M) is w^T when trans_w (w
 * stored (M, K) with row stride ldw, the Linear-weight layout) or w itself (stored (K, M) with
 * row stride ldw): panel p alone. */
static inline void pack_panel(float *dst, const float *w, int64_t ldw, int trans_w, int64_t K,
                              int64_t M, int64_t p) {
    int64_t m0 = p * SF_NR, mw = M - m0 < SF_NR ? M - m0 : SF_NR;
#ifdef SF_X86
    if (trans_w && mw == SF_NR && sf_cpu_avx2_fma()) {
        pack_panel_t_avx2(dst, w + m0 * ldw, ldw, K);
        return;
    }
#endif
    if (!trans_w && mw == SF_NR) { /* rows of w are the panel's rows: 64-byte copies */
        for (int64_t k = 0; k < K; k++) memcpy(dst + k * SF_NR, w + k * ldw + m0, SF_NR * sizeof(float));
        return;
    }
    for (int64_t k = 0; k < K; k++) {
        float *d = dst + k * SF_NR;
        int64_t j = 0;
        if (trans_w) for (; j < mw; j++) d[j] = w[(m0 + j) * ldw + k];
        else for (; j < mw; j++) d[j] = w[k * ldw + m0 + j];
        for (; j < SF_NR; j++) d[j] = 0.0f;
    }
}

/* Panels [p0, p1) of B, panel p at pack + p*K*16. */
static inline void pack_panels(float *pack, const float *w, int64_t ldw, int trans_w, int64_t K,
                               int64_t M, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p++) pack_panel(pack + p * K * SF_NR, w, ldw, trans_w, K, M, p);
}

void sf_pack_panels(float *pack, const float *w, int64_t ldw, int trans_w, int64_t K, int64_t M) {
    pack_panels(pack, w, ldw, trans_w, K, M, 0, (M + SF_NR - 1) / SF_NR);
}

/* Generic tile: rows mr <= 6, columns mw <= 16 of panel `pp` (rows ps floats apart; all 16
 * columns are read, those past mw are not stored). Same operation order per
 * element as the vector tile (init, then one fused multiply-add per k, ascending). */
static inline __attribute__((always_inline)) void
tile_generic_body(float *y, int64_t ldy, const float *x, int64_t rs, int64_t cs, int64_t K,
                  const float *pp, int64_t ps, const float *b, int64_t mr, int64_t mw, int accumulate) {
    float acc[SF_MR][SF_NR];
    for (int64_t r = 0; r < mr; r++)
        for (int64_t j = 0; j < SF_NR; j++)
            acc[r][j] = j < mw ? (accumulate ? y[r * ldy + j] : (b ? b[j] : 0.0f)) : 0.0f;
    for (int64_t k = 0; k < K; k++) {
        const float *wk = pp + k * ps;
        for (int64_t r = 0; r < mr; r++) {
            float xv = x[r * rs + k * cs];
            for (int64_t j = 0; j < SF_NR; j++) acc[r][j] = fmaf(xv, wk[j], acc[r][j]);
        }
    }
    for (int64_t r = 0; r < mr; r++)
        for (int64_t j = 0; j < mw; j++) y[r * ldy + j] = acc[r][j];
}

static void tile_generic(float *y, int64_t ldy, const float *x, int64_t rs, int64_t cs,
                         int64_t K, const float *pp, int64_t ps, const float *b, int64_t mr, int64_t mw,
                         int accumulate) {
    tile_generic_body(y, ldy, x, rs, cs, K, pp, ps, b, mr, mw, accumulate);
}
#if defined(__x86_64__) || defined(__i386__)
/* Same body with hardware FMA, so edge tiles round exactly like the AVX2 tile. */
__attribute__((target("avx2,fma"))) static void
tile_generic_fma(float *y, int64_t ldy, const float *x, int64_t rs, int64_t cs, int64_t K,
                 const float *pp, int64_t ps, const float *b, int64_t mr, int64_t mw, int accumulate) {
    tile_generic_body(y, ldy, x, rs, cs, K, pp, ps, b, mr, mw, accumulate);
}
#endif

#ifdef SF_X86
/* The main 6x16 tile, written out register by register: the same loop with mr = 6 as a
 * compile-time constant (tile_avx2_rows below) spills its 12 accumulators and measured 2.5x
 * slower. */
__attribute__((target("avx2,fma"))) static void tile_avx2(float *y, int64_t ldy, const float *x,
                                                          int64_t rs, int64_t cs, int64_t K,
                                                          const float *pp, int64_t ps,
                                                          const float *b, int accumulate) {
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    if (accumulate) {
        c00 = _mm256_loadu_ps(y + 0 * ldy); c01 = _mm256_loadu_ps(y + 0 * ldy + 8);
        c10 = _mm256_loadu_ps(y + 1 * ldy); c11 = _mm256_loadu_ps(y + 1 * ldy + 8);
        c20 = _mm256_loadu_ps(y + 2 * ldy); c21 = _mm256_loadu_ps(y + 2 * ldy + 8);
        c30 = _mm256_loadu_ps(y + 3 * ldy); c31 = _mm256_loadu_ps(y + 3 * ldy + 8);
        c40 = _mm256_loadu_ps(y + 4 * ldy); c41 = _mm256_loadu_ps(y + 4 * ldy + 8);
        c50 = _mm256_loadu_ps(y + 5 * ldy); c51 = _mm256_loadu_ps(y + 5 * ldy + 8);
    } else {
        __m256 b0 = b ? _mm256_loadu_ps(b) : _mm256_setzero_ps();
        __m256 b1 = b ? _mm256_loadu_ps(b + 8) : _mm256_setzero_ps();
        c00 = c10 = c20 = c30 = c40 = c50 = b0;
        c01 = c11 = c21 = c31 = c41 = c51 = b1;
    }
    const float *x0 = x, *x1 = x + rs, *x2 = x + 2 * rs, *x3 = x + 3 * rs, *x4 = x + 4 * rs,
                *x5 = x + 5 * rs;
    for (int64_t k = 0; k < K; k++) {
        __m256 w0 = _mm256_loadu_ps(pp + k * ps), w1 = _mm256_loadu_ps(pp + k * ps + 8);
        __m256 a;
        int64_t o = k * cs;
        a = _mm256_broadcast_ss(x0 + o); c00 = _mm256_fmadd_ps(a, w0, c00); c01 = _mm256_fmadd_ps(a, w1, c01);
        a = _mm256_broadcast_ss(x1 + o); c10 = _mm256_fmadd_ps(a, w0, c10); c11 = _mm256_fmadd_ps(a, w1, c11);
        a = _mm256_broadcast_ss(x2 + o); c20 = _mm256_fmadd_ps(a, w0, c20); c21 = _mm256_fmadd_ps(a, w1, c21);
        a = _mm256_broadcast_ss(x3 + o); c30 = _mm256_fmadd_ps(a, w0, c30); c31 = _mm256_fmadd_ps(a, w1, c31);
        a = _mm256_broadcast_ss(x4 + o); c40 = _mm256_fmadd_ps(a, w0, c40); c41 = _mm256_fmadd_ps(a, w1, c41);
        a = _mm256_broadcast_ss(x5 + o); c50 = _mm256_fmadd_ps(a, w0, c50); c51 = _mm256_fmadd_ps(a, w1, c51);
    }
    _mm256_storeu_ps(y + 0 * ldy, c00); _mm256_storeu_ps(y + 0 * ldy + 8, c01);
    _mm256_storeu_ps(y + 1 * ldy, c10); _mm256_storeu_ps(y + 1 * ldy + 8, c11);
    _mm256_storeu_ps(y + 2 * ldy, c20); _mm256_storeu_ps(y + 2 * ldy + 8, c21);
    _mm256_storeu_ps(y + 3 * ldy, c30); _mm256_storeu_ps(y + 3 * ldy + 8, c31);
    _mm256_storeu_ps(y + 4 * ldy, c40); _mm256_storeu_ps(y + 4 * ldy + 8, c41);
    _mm256_storeu_ps(y + 5 * ldy, c50); _mm256_storeu_ps(y + 5 * ldy + 8, c51);
}

/* Edge row tiles (mr < 6 rows, full 16 columns): the same loop with mr fixed at compile time,
 * so the accumulators stay in registers; same operation order as tile_avx2. */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
tile_avx2_rows(float *y, int64_t ldy, const float *x, int64_t rs, int64_t cs, int64_t K,
               const float *pp, int64_t ps, const float *b, int accumulate, const int mr) {
    __m256 c0[SF_MR], c1[SF_MR];
    for (int r = 0; r < mr; r++) {
        if (accumulate) { c0[r] = _mm256_loadu_ps(y + r * ldy); c1[r] = _mm256_loadu_ps(y + r * ldy + 8); }
        else {
            c0[r] = b ? _mm256_loadu_ps(b) : _mm256_setzero_ps();
            c1[r] = b ? _mm256_loadu_ps(b + 8) : _mm256_setzero_ps();
        }
    }
    for (int64_t k = 0; k < K; k++) {
        __m256 w0 = _mm256_loadu_ps(pp + k * ps), w1 = _mm256_loadu_ps(pp + k * ps + 8);
        for (int r = 0; r < mr; r++) {
            __m256 a = _mm256_broadcast_ss(x + r * rs + k * cs);
            c0[r] = _mm256_fmadd_ps(a, w0, c0[r]);
            c1[r] = _mm256_fmadd_ps(a, w1, c1[r]);
        }
    }
    for (int r = 0; r < mr; r++) { _mm256_storeu_ps(y + r * ldy, c0[r]); _mm256_storeu_ps(y + r * ldy + 8, c1[r]); }
}

__attribute__((target("avx2,fma"))) static void
tile_avx2_edge(float *y, int64_t ldy, const float *x, int64_t rs, int64_t cs, int64_t K,
               const float *pp, int64_t ps, const float *b, int accumulate, int64_t mr) {
    switch (mr) {
    case 1: tile_avx2_rows(y, ldy, x, rs, cs, K, pp, ps, b, accumulate, 1); break;
    case 2: tile_avx2_rows(y, ldy, x, rs, cs, K, pp, ps, b, accumulate, 2); break;
    case 3: tile_avx2_rows(y, ldy, x, rs, cs, K, pp, ps, b, accumulate, 3); break;
    case 4: tile_avx2_rows(y, ldy, x, rs, cs, K, pp, ps, b, accumulate, 4); break;
    default: tile_avx2_rows(y, ldy, x, rs, cs, K, pp, ps, b, accumulate, 5); break;
    }
}

/* The AVX-512 tile: up to 8 rows x 32 columns (two panels), two zmm accumulators per row.
 * On Zen 4, whose 512-bit FMAs take both 256-bit pipes, the peak is AVX2's, but a k step
 * issues half the instructions per multiply-add, and eight rows need only eight row pointers
 * (sixteen rows of one panel kept most of them on the stack: 103 against 113 GFLOP/s on S's
 * per-head P V). np = 1 or 2 panels, the second np1 floats after the first. Same per-element
 * operations as tile_avx2 (init, one fma per k ascending): the same bits. */
__attribute__((target("avx512f"))) static inline __attribute__((always_inline)) void
tile_avx512_rows(float *y, int64_t ldy, const float *x, int64_t rs, int64_t K, const float *pp,
                 int64_t ps, int64_t np1, const float *b, int accumulate, const int mr, const int np,
                 const int packed) {
    __m512 c0[8], c1[8];
#pragma GCC unroll 8
    for (int r = 0; r < mr; r++) {
        if (accumulate) {
            c0[r] = _mm512_loadu_ps(y + r * ldy);
            c1[r] = np == 2 ? _mm512_loadu_ps(y + r * ldy + 16) : _mm512_setzero_ps();
        } else {
            c0[r] = b ? _mm512_loadu_ps(b) : _mm512_setzero_ps();
            c1[r] = b && np == 2 ? _mm512_loadu_ps(b + 16) : _mm512_setzero_ps();
        }
    }
    for (int64_t k = 0; k < K; k++) {
        __m512 w0 = _mm512_loadu_ps(pp + k * ps);
        __m512 w1 = np == 2 ? _mm512_loadu_ps(pp + np1 + k * ps) : w0;
#pragma GCC unroll 8
        for (int r = 0; r < mr; r++) {
            /* packed: a strided A, k-th row rs floats on (the dW products), one pointer for all rows */
            __m512 a = _mm512_set1_ps(packed ? x[k * rs + r] : x[r * rs + k]);
            c0[r] = _mm512_fmadd_ps(a, w0, c0[r]);
            if (np == 2) c1[r] = _mm512_fmadd_ps(a, w1, c1[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < mr; r++) {
        _mm512_storeu_ps(y + r * ldy, c0[r]);
        if (np == 2) _mm512_storeu_ps(y + r * ldy + 16, c1[r]);
    }
}

/* packed = 0: rows of A rs floats apart (the contiguous products); packed = 1: a strided A's
 * rows k rs floats apart, each holding the tile's 8 rows (a row panel [k][8], rs = 8, or dy
 * itself for the dW products), rows past mr unread. */
__attribute__((target("avx512f"))) static void
tile_avx512(float *y, int64_t ldy, const float *x, int64_t rs, int64_t K, const float *pp,
            int64_t ps, int64_t np1, const float *b, int accumulate, int64_t mr, int np, int packed) {
#define SF_T512_P(n, p)                                                                          \
    if (np == 2) tile_avx512_rows(y, ldy, x, rs, K, pp, ps, np1, b, accumulate, n, 2, p);        \
    else tile_avx512_rows(y, ldy, x, rs, K, pp, ps, np1, b, accumulate, n, 1, p);
#define SF_T512(n)                                                                               \
    case n:                                                                                      \
        if (packed) { SF_T512_P(n, 1) } else { SF_T512_P(n, 0) }                                 \
        break;
    switch (mr) {
    SF_T512(1) SF_T512(2) SF_T512(3) SF_T512(4) SF_T512(5) SF_T512(6) SF_T512(7)
    default: SF_T512(8)
    }
#undef SF_T512
#undef SF_T512_P
}
#endif

const char *sf_matmul_kernel(void) {
    if (sf_blas_active()) return "blas";
#ifdef SF_X86
    if (sf_cpu_avx512()) return "avx512";
    if (sf_cpu_avx2_fma()) return "avx2";
#endif
    return "generic";
}

void sf_gemm_tile(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs, int64_t K,
                  const float *panel, const float *b, int64_t mr, int64_t mw, int accumulate) {
    if (mr <= 0 || mw <= 0) return;
    if (K <= 0) { /* empty reduction */
        if (!accumulate)
            for (int64_t r = 0; r < mr; r++)
                for (int64_t j = 0; j < mw; j++) y[r * ldy + j] = b ? b[j] : 0.0f;
        return;
    }
#ifdef SF_X86
    if (sf_cpu_avx2_fma()) {
        if (mr == SF_MR && mw == SF_NR) tile_avx2(y, ldy, a, a_rs, a_cs, K, panel, SF_NR, b, accumulate);
        else if (mw == SF_NR) tile_avx2_edge(y, ldy, a, a_rs, a_cs, K, panel, SF_NR, b, accumulate, mr);
        else tile_generic_fma(y, ldy, a, a_rs, a_cs, K, panel, SF_NR, b, mr, mw, accumulate);
        return;
    }
#endif
    tile_generic(y, ldy, a, a_rs, a_cs, K, panel, SF_NR, b, mr, mw, accumulate);
}

int sf_gemm_tile_rows(void) {
#ifdef SF_X86
    if (sf_cpu_avx512()) return 8;
#endif
    return SF_MR;
}

/* Up to two panels at once: on a CPU with full-width AVX-512 the 6 x 16 AVX2 tile runs at
 * half the peak (attention's products, which tile themselves, were ~35% of it at M). */
void sf_gemm_tile2(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs, int64_t K,
                   const float *panel, int64_t panel_stride, const float *b, int64_t mr, int64_t mw,
                   int accumulate) {
    if (mr <= 0 || mw <= 0) return;
    int64_t c = 0;
#ifdef SF_X86
    if (K > 0 && mw >= SF_NR && (a_cs == 1 || a_rs == 1) && sf_cpu_avx512()) {
        const int np = mw >= 2 * SF_NR ? 2 : 1, packed = a_cs != 1; /* packed: A's k-th row a_cs on */
        tile_avx512(y, ldy, a, packed ? a_cs : a_rs, K, panel, SF_NR, panel_stride, b, accumulate, mr, np, packed);
        c = np * SF_NR;
    }
#endif
    for (; c < mw; c += SF_NR)
        for (int64_t i = 0; i < mr; i += SF_MR)
            sf_gemm_tile(y + i * ldy + c, ldy, a + i * a_rs, a_rs, a_cs, K, panel + (c / SF_NR) * panel_stride,
                         b ? b + c : NULL, mr - i < SF_MR ? mr - i : SF_MR, mw - c < SF_NR ? mw - c : SF_NR,
                         accumulate);
}

/* A few rows times a Linear weight (decoding: one token per sequence). Packing would copy the
 * whole weight for a handful of rows, so instead 8 output columns gather their weights at each
 * k straight from w (M, K). Each output is still init + one fma per k in ascending k, so the
 * bits equal the packed kernel's. */
#define SF_SMALL_N 4
static inline __attribute__((always_inline)) void
small_n_body(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs, const float *w,
             const float *b, int64_t N, int64_t K, int64_t m0, int64_t mw, int accumulate) {
    for (int64_t n = 0; n < N; n++) {
        float acc[8];
        for (int64_t j = 0; j < 8; j++)
            acc[j] = j < mw ? (accumulate ? y[n * ldy + m0 + j] : (b ? b[m0 + j] : 0.0f)) : 0.0f;
        const float *xn = a + n * a_rs;
        for (int64_t k = 0; k < K; k++) {
            float xv = xn[k * a_cs];
            for (int64_t j = 0; j < mw; j++) acc[j] = fmaf(xv, w[(m0 + j) * K + k], acc[j]);
        }
        for (int64_t j = 0; j < mw; j++) y[n * ldy + m0 + j] = acc[j];
    }
}
static void small_n_generic(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs,
                            const float *w, const float *b, int64_t N, int64_t K, int64_t m0,
                            int64_t mw, int accumulate) {
    small_n_body(y, ldy, a, a_rs, a_cs, w, b, N, K, m0, mw, accumulate);
}
#ifdef SF_X86
__attribute__((target("avx2,fma"))) static void
small_n_avx2(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs, const float *w,
             const float *b, int64_t N, int64_t K, int64_t m0, int64_t mw, int accumulate) {
    if (mw < 8 || K * 8 > 0x7fffffff) { /* edge block or indices past int32: plain loop */
        small_n_body(y, ldy, a, a_rs, a_cs, w, b, N, K, m0, mw, accumulate);
        return;
    }
    const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                           _mm256_set1_epi32((int)K));
    const float *wb = w + m0 * K;
    __m256 acc[SF_SMALL_N];
    for (int64_t n = 0; n < N; n++)
        acc[n] = accumulate ? _mm256_loadu_ps(y + n * ldy + m0)
                            : (b ? _mm256_loadu_ps(b + m0) : _mm256_setzero_ps());
    int64_t k = 0;
    /* 8 k at a time: load 8 contiguous weights from each of the 8 rows and transpose them in
     * registers (row j's w[k..k+8) -> column vectors c_i = (w[m0..m0+8)[k+i])), instead of
     * gathering: the weights stream once, and each row of x reuses the transposed block */
    for (; k + 8 <= K; k += 8) {
        __m256 c[8];
        transpose8_avx2(wb + k, K, c);
        for (int64_t n = 0; n < N; n++) {
            const float *xn = a + n * a_rs + k * a_cs;
            for (int i = 0; i < 8; i++) acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(xn[i * a_cs]), c[i], acc[n]);
        }
    }
    for (; k < K; k++) {
        __m256 wv = _mm256_i32gather_ps(wb + k, idx, 4);
        for (int64_t n = 0; n < N; n++)
            acc[n] = _mm256_fmadd_ps(_mm256_set1_ps(a[n * a_rs + k * a_cs]), wv, acc[n]);
    }
    for (int64_t n = 0; n < N; n++) _mm256_storeu_ps(y + n * ldy + m0, acc[n]);
}
#endif

/* One tile of sf_gemm (mr <= 6 rows; panel rows ps floats apart), dispatched on shape and CPU. */
static inline void run_tile(float *y, int64_t ldy, const float *x, int64_t rs, int64_t cs, int64_t K,
                            const float *pp, int64_t ps, const float *b, int64_t mr, int64_t mw,
                            int acc, int use_avx) {
#ifdef SF_X86
    if (use_avx) {
        if (mr == SF_MR && mw == SF_NR) tile_avx2(y, ldy, x, rs, cs, K, pp, ps, b, acc);
        else if (mw == SF_NR) tile_avx2_edge(y, ldy, x, rs, cs, K, pp, ps, b, acc, mr);
        else tile_generic_fma(y, ldy, x, rs, cs, K, pp, ps, b, mr, mw, acc);
        return;
    }
#endif
    (void)use_avx;
    tile_generic(y, ldy, x, rs, cs, K, pp, ps, b, mr, mw, acc);
}

/* A row tile of the contiguous-A products: mr <= mrt rows (8 with AVX-512, else 6) times np
 * panels (2 only with AVX-512, both full; panel 2 starts np1 floats after panel 1). Partial
 * panels, and CPUs without AVX-512, take 6-row tiles. */
static inline void run_rows(float *y, int64_t ldy, const float *x, int64_t rs, int64_t K,
                            const float *pp, int64_t ps, int64_t np1, const float *b, int64_t mr,
                            int64_t mw, int np, int acc, int use_avx, int use512) {
#ifdef SF_X86
    if (use512 && mw == SF_NR) {
        tile_avx512(y, ldy, x, rs, K, pp, ps, np1, b, acc, mr, np, 0);
        return;
    }
#endif
    (void)use512; (void)np; (void)np1;
    for (int64_t i = 0; i < mr; i += SF_MR)
        run_tile(y + i * ldy, ldy, x + i * rs, rs, 1, K, pp, ps, b, mr - i < SF_MR ? mr - i : SF_MR,
                 mw, acc, use_avx);
}

int64_t sf_gemm_pack_floats(int64_t N, int64_t K, int64_t M, int a_strided) {
    /* strided A: per row tile a K chunk of A (6 x 128), and per thread (never more threads
     * than row tiles) one chunk of one B panel (128 x 16) */
    /* (with AVX-512: 8-row panels and two B panels per thread, the larger of the two) */
    const int64_t six = (N + SF_MR - 1) / SF_MR * SF_KC * (SF_MR + SF_NR), eight = (N + 7) / 8 * SF_KC * (8 + 2 * SF_NR);
    return a_strided ? (six > eight ? six : eight) : sf_matmul_pack_floats(K, M);
}

/* out[i] = act(pre[i]), i < n; one loop per activation so each vectorizes */
static inline __attribute__((always_inline)) void act_row_body(int act, float *out, const float *pre,
                                                               int64_t n) {
    if (act == SF_ACT_GELU) for (int64_t i = 0; i < n; i++) out[i] = sf_gelu1(pre[i]);
    else if (act == SF_ACT_GELU_TANH) for (int64_t i = 0; i < n; i++) out[i] = sf_gelu_tanh1(pre[i]);
    else for (int64_t i = 0; i < n; i++) out[i] = sf_relu1(pre[i]);
}
#ifdef SF_X86
/* The element-wise activations compiled again for 512-bit vectors: the same operations per
 * element (the same bits), with half the instructions of the AVX2 loop. GELU on Zen 4:
 * 1.15 -> 0.82 ns per element in a hot loop. */
SF_TARGET_AVX512_WIDE static void act_row_avx512(int act, float *out, const float *pre, int64_t n) {
    act_row_body(act, out, pre, n);
}
#endif
void sf_act_row(int act, float *out, const float *pre, int64_t n) {
    SF_WIDE_OR(act_row_avx512(act, out, pre, n), act_row_body(act, out, pre, n));
}

/* The epilogue on rows [n0, n0+mr) x columns [m0, m0+mw) of y (act < 0: none); act_out has
 * y's row stride. */
static inline void act_block(int act, float *act_out, const float *y, int64_t ldy, int64_t n0,
                             int64_t mr, int64_t m0, int64_t mw) {
    if (act < 0) return;
    for (int64_t r = n0; r < n0 + mr; r++) sf_act_row(act, act_out + r * ldy + m0, y + r * ldy + m0, mw);
}

/* The same epilogue for the BLAS backend's rows (sf_blas.c). */
void sf_act_block(int act, float *act_out, const float *y, int64_t ldy, int64_t n0, int64_t mr,
                  int64_t m0, int64_t mw) {
    act_block(act, act_out, y, ldy, n0, mr, m0, mw);
}

/* What one thread of a contiguous or strided-A product needs (gemm below). */
typedef struct {
    float *y, *pack, *act_out;
    const float *a, *w, *b;
    int64_t ldy, a_rs, a_cs, N, K, M, np, ldw, mrt, rblk, nr, kc_max;
    int trans_w, accumulate, act, a_packed, use_avx, use512, direct;
} gemm_plan;

/* Thread tid of T's share of a product. Called directly when the product runs on one
 * thread: entering a parallel region of one thread still allocated a team and woke a futex
 * (~5% of a 128 x 128 x 32 product). */
static void gemm_part(const gemm_plan *g, int tid, int T) {
    float *y = g->y, *pack = g->pack, *act_out = g->act_out;
    const float *a = g->a, *w = g->w, *b = g->b;
    const int64_t ldy = g->ldy, a_rs = g->a_rs, a_cs = g->a_cs, N = g->N, K = g->K, M = g->M;
    const int64_t np = g->np, ldw = g->ldw, mrt = g->mrt, rblk = g->rblk, nr = g->nr, kc_max = g->kc_max;
    const int trans_w = g->trans_w, accumulate = g->accumulate, act = g->act, a_packed = g->a_packed;
    const int use_avx = g->use_avx, use512 = g->use512, direct = g->direct;
    /* Each thread owns a contiguous range of panels (or of row tiles: see below) and walks
     * panels in the outer loop, so one K x 16 panel stays in L1/L2 while its row tiles
     * stream through. Owning panels, a thread packs exactly the panels it reads: no barrier,
     * and no panel crosses to the other core's cache (for small products that transfer cost
     * more than the tiles). Row ranges are used when the panels do not split evenly, and
     * for a strided A whose row panels must be copied per thread.
     * A strided A with unit row stride (dW = dy^T x: k-th row of the tile is 8 consecutive
     * floats of dy's row k) is read in place instead, and its products are shared out by
     * panels: then every B slice is copied by one thread only. With rows shared out, both
     * threads copied every slice of B (x, up to 12.6 MB at M) and S's dW products, 128-512
     * rows, spent a quarter of their time packing. dW, 2 threads: S's shapes 370-415 -> 435-475
     * GFLOP/s, M's 418-455 -> 448-474, mHC's 24-row dPhi 180 -> 295. */
    int64_t r0 = 0, r1 = nr, p0 = 0, p1 = np;
    const int a_inplace = a_packed && a_rs == 1;
    const int by_rows = nr >= T && (a_packed ? !(a_inplace && np >= 2 * T) : (np % T != 0 && np < 4 * T));
    if (by_rows) { r0 = nr * tid / T; r1 = nr * (tid + 1) / T; }
    else { p0 = np * tid / T; p1 = np * (tid + 1) / T; }
    if (a_packed) {
        /* strided A (unless read in place, above): per K chunk, copy this thread's rows of A
         * into row panels [tile][k][mrt] (8 rows with AVX-512, else 6) so the tiles read A
         * contiguously; y carries the sums across chunks. With AVX-512 the tile is 8 x 32
         * like the contiguous products' (two B slices per thread): on a CPU whose 512-bit
         * FMAs run at full width the 6 x 16 AVX2 tile left dW at half the peak (207 against
         * ~500 GFLOP/s at M).
         * B is copied one (chunk, panel) slice at a time into this thread's own 8 KB, right
         * before its tiles read it from L1. Packing all of B up front wrote and re-read K x M
         * floats through L3 (x, 3 MB for M's dW), and on two threads half of the panels
         * crossed cores. dW at M's shapes: 153 -> 186 GFLOP/s on 2 threads, 93 -> 97 on one. */
        float *ap = pack + r0 * mrt * SF_KC;
        float *bs = pack + nr * mrt * SF_KC + (int64_t)tid * 2 * SF_KC * SF_NR;
        /* With few row tiles (mHC's 24-row dPhi: three) a copied B slice is read only that
         * often, and copying it cost about as much as the tiles: a B that is not transposed
         * and fills whole panels is then read in place, its rows ldw apart. */
        const int b_inplace = !trans_w && M % SF_NR == 0 && nr <= SF_B_INPLACE_TILES;
        const int64_t bps = b_inplace ? ldw : SF_NR, bnp1 = b_inplace ? SF_NR : SF_KC * SF_NR;
        for (int64_t k0 = 0; k0 < K; k0 += SF_KC) {
            int64_t kc = K - k0 < SF_KC ? K - k0 : SF_KC;
            int acc = accumulate || k0 > 0;
            for (int64_t r = r0; r < r1 && !a_inplace; r++) {
                int64_t n0 = r * mrt, mr = N - n0 < mrt ? N - n0 : mrt;
                float *dst = ap + (r - r0) * kc * mrt;
                for (int64_t k = 0; k < kc; k++) {
                    const float *src = a + n0 * a_rs + (k0 + k) * a_cs;
                    for (int64_t i = 0; i < mr; i++) dst[k * mrt + i] = src[i * a_rs];
                }
            }
            for (int64_t p = p0, two; p < p1; p += 1 + two) {
                int64_t m0 = p * SF_NR, mw = M - m0 < SF_NR ? M - m0 : SF_NR;
                two = use512 && p + 1 < p1 && M - m0 >= 2 * SF_NR; /* AVX-512: 8 x 32 tiles */
                if (!b_inplace) {
                    pack_panel(bs, trans_w ? w + k0 : w + k0 * ldw, ldw, trans_w, kc, M, p);
                    if (two) pack_panel(bs + SF_KC * SF_NR, trans_w ? w + k0 : w + k0 * ldw, ldw, trans_w, kc, M, p + 1);
                }
                const float *bsl = b_inplace ? w + k0 * ldw + m0 : bs;
                const float *bp = (b && k0 == 0) ? b + m0 : NULL;
                for (int64_t r = r0; r < r1; r++) {
                    int64_t n0 = r * mrt, mr = N - n0 < mrt ? N - n0 : mrt;
                    const float *at = a_inplace ? a + n0 + k0 * a_cs : ap + (r - r0) * kc * mrt;
                    const int64_t acs = a_inplace ? a_cs : mrt;
#ifdef SF_X86
                    if (use512 && mw == SF_NR) {
                        tile_avx512(y + n0 * ldy + m0, ldy, at, acs, kc, bsl, bps, bnp1, bp, acc, mr, two ? 2 : 1, 1);
                        continue;
                    }
#endif
                    for (int64_t i = 0; i < mr; i += SF_MR) /* 6-row tiles over the panel's rows */
                        run_tile(y + (n0 + i) * ldy + m0, ldy, at + i, 1, acs, kc, bsl, bps, bp,
                                 mr - i < SF_MR ? mr - i : SF_MR, mw, acc, use_avx);
                }
            }
        }
        for (int64_t r = r0; r < r1; r++) {
            int64_t n0 = r * mrt;
            act_block(act, act_out, y, ldy, n0, N - n0 < mrt ? N - n0 : mrt, 0, M);
        }
    } else if (!direct) {
        if (by_rows) {
            /* packing shares the team (one fork/join per product, not two); the barrier at
             * the end of the loop makes every panel visible before any tile reads it */
#pragma omp for schedule(static)
            for (int64_t p = 0; p < np; p++) pack_panels(pack, w, ldw, trans_w, K, M, p, p + 1);
        } else {
            pack_panels(pack, w, ldw, trans_w, K, M, p0, p1);
        }
    }
    if (!a_packed) {
        /* Row blocks of 96 rows of A (147 KB at K = 384, 590 KB at K = 1536) stay in L2
         * while every panel of this thread passes over them; walking all rows per panel
         * streamed A from L3 once per panel (24 times at M's shapes). M's Linear products:
         * 97 -> 105 GFLOP/s on one core, 197 -> 207 on two. */
        for (int64_t rb = r0; rb < r1; rb += rblk) {
            int64_t rb1 = rb + rblk < r1 ? rb + rblk : r1;
            for (int64_t p = p0, two; p < p1; p += 1 + two) {
                int64_t m0 = p * SF_NR, mw = M - m0 < SF_NR ? M - m0 : SF_NR;
                two = use512 && p + 1 < p1 && M - m0 >= 2 * SF_NR; /* AVX-512: two full panels at once */
                const int64_t ps = direct ? ldw : SF_NR, np1 = direct ? SF_NR : K * SF_NR;
                for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
                    int64_t kc = K - k0 < kc_max ? K - k0 : kc_max;
                    int acc = accumulate || k0 > 0; /* later chunks continue the partial sums in y */
                    const float *pp = direct ? w + k0 * ldw + m0 : pack + p * K * SF_NR + k0 * SF_NR;
                    const float *bp = (b && k0 == 0) ? b + m0 : NULL;
                    for (int64_t r = rb; r < rb1; r++) {
                        int64_t n0 = r * mrt, mr = N - n0 < mrt ? N - n0 : mrt;
                        run_rows(y + n0 * ldy + m0, ldy, a + n0 * a_rs + k0, a_rs, kc, pp, ps, np1, bp,
                                 mr, mw, two ? 2 : 1, acc, use_avx, use512);
                    }
                }
            }
            /* The epilogue once per row of the block, over all of this thread's columns
             * (the block is still in L2). Per 6x16 tile it ran 16-wide loops that reloaded
             * their ~20 constants for every row and measured 1.6x the cost per element: the
             * GELU was 15% of S's forward. */
            if (act >= 0) {
                int64_t c0 = p0 * SF_NR, c1 = p1 * SF_NR < M ? p1 * SF_NR : M;
                int64_t n0 = rb * mrt, n1 = rb1 * mrt < N ? rb1 * mrt : N;
                if (c1 > c0) act_block(act, act_out, y, ldy, n0, n1 - n0, c0, c1 - c0);
            }
        }
    }
}

static void gemm(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs, const float *w,
                 int trans_w, const float *b, int64_t N, int64_t K, int64_t M, int accumulate,
                 float *pack, int n_threads, int act, float *act_out) {
    if (N <= 0 || M <= 0) return;
    int nt = sf_threads_resolve(n_threads);
    if (K <= 0) { /* empty reduction: y = b (or unchanged) */
        if (!accumulate)
            for (int64_t n = 0; n < N; n++)
                for (int64_t m = 0; m < M; m++) y[n * ldy + m] = b ? b[m] : 0.0f;
        act_block(act, act_out, y, ldy, 0, N, 0, M);
        return;
    }
    if (sf_blas_gemm(y, ldy, a, a_rs, a_cs, w, trans_w, b, N, K, M, accumulate, nt, act, act_out)) return;
    if (N <= SF_SMALL_N && trans_w) {
#ifdef SF_X86
        const int use_avx_small = sf_cpu_avx2_fma();
#endif
        int64_t nb = (M + 7) / 8;
#pragma omp parallel for schedule(static) num_threads(nt) if (N * K * M > (1 << 17))
        for (int64_t blk = 0; blk < nb; blk++) {
            int64_t m0 = blk * 8, mw = M - m0 < 8 ? M - m0 : 8;
#ifdef SF_X86
            if (use_avx_small) { small_n_avx2(y, ldy, a, a_rs, a_cs, w, b, N, K, m0, mw, accumulate); continue; }
#endif
            small_n_generic(y, ldy, a, a_rs, a_cs, w, b, N, K, m0, mw, accumulate);
        }
        act_block(act, act_out, y, ldy, 0, N, 0, M);
        return;
    }
    int64_t np = (M + SF_NR - 1) / SF_NR;
    const int64_t ldw = trans_w ? K : M;
    /* strided A gets packed row panels, and threads split its row tiles */
    const int a_packed = a_cs != 1;
    int use_avx = 0, use512 = 0;
#ifdef SF_X86
    use_avx = sf_cpu_avx2_fma();
    use512 = sf_cpu_avx512();
#endif
    const int64_t mrt = use512 ? 8 : SF_MR;                /* rows per row tile */
    const int64_t rblk = SF_ROW_BLOCK * SF_MR / mrt;       /* row tiles per L2 block (96 rows) */
    int64_t nr = (N + mrt - 1) / mrt;
    /* A small B (K x M) that is not transposed and whose columns fill whole panels is read in
     * place, its rows ldw apart, instead of copied into panels: it stays in L1/L2 anyway, and
     * for a per-head P V (128 x 32) the copy was ~5% of the product. */
    const int direct = !a_packed && !trans_w && M % SF_NR == 0 && K * M <= SF_DIRECT_FLOATS;
    int64_t kc_max = a_cs != 1 ? SF_KC : K;
    int nthreads = (N * K * M < (1 << 20)) ? 1 : nt; /* below ~1M MACs a team costs more than it saves */
    if (a_packed && nthreads > nr) nthreads = (int)nr;
    const gemm_plan g = {y, pack, act_out, a, w, b, ldy, a_rs, a_cs, N, K, M, np, ldw, mrt, rblk, nr,
                         kc_max, trans_w, accumulate, act, a_packed, use_avx, use512, direct};
    if (nthreads == 1) {
        gemm_part(&g, 0, 1);
        return;
    }
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = sf_team_tid(), T = sf_team_size();
        gemm_part(&g, tid, T);
    }
}

void sf_gemm(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs, const float *w,
             int trans_w, const float *b, int64_t N, int64_t K, int64_t M, int accumulate,
             float *pack, int n_threads) {
    gemm(y, ldy, a, a_rs, a_cs, w, trans_w, b, N, K, M, accumulate, pack, n_threads, -1, NULL);
}

void sf_matmul(float *y, const float *x, const float *w, const float *b, int64_t N, int64_t K,
               int64_t M, int accumulate, float *pack, int n_threads) {
    sf_gemm(y, M, x, K, 1, w, 1, b, N, K, M, accumulate, pack, n_threads);
}

void sf_matmul_act(float *y, float *act_out, int act, const float *x, const float *w,
                   const float *b, int64_t N, int64_t K, int64_t M, float *pack, int n_threads) {
    gemm(y ? y : act_out, M, x, K, 1, w, 1, b, N, K, M, 0, pack, n_threads, act, act_out);
}

void sf_matmul_naive(float *y, const float *x, const float *w, const float *b, int64_t N,
                     int64_t K, int64_t M, int accumulate) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            double acc = accumulate ? y[n * M + m] : (b ? b[m] : 0.0);
            for (int64_t k = 0; k < K; k++) acc += (double)x[n * K + k] * w[m * K + k];
            y[n * M + m] = (float)acc;
        }
}
