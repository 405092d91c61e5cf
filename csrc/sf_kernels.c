/* stackformer kernels. See sf_kernels.h for contracts. */
#include "sf_kernels.h"
#include "sf_internal.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SF_X86 1
#endif

/* ---- threads ----------------------------------------------------------------------------- */

static int g_num_threads = 0; /* 0: ask OpenMP (OMP_NUM_THREADS or the core count) */

void sf_set_num_threads(int n) { g_num_threads = n > 0 ? n : 0; }

int sf_get_num_threads(void) {
    if (g_num_threads > 0) return g_num_threads;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int sf_threads_resolve(int n_threads) { return n_threads > 0 ? n_threads : sf_get_num_threads(); }

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
static int have_avx2_fma(void);
#endif
static int blas_active(void);

/* dst[k][j] = B[k][p*16 + j], zero-padded past M, where B (K x M) is w^T when trans_w (w
 * stored (M, K) with row stride ldw, the Linear-weight layout) or w itself (stored (K, M) with
 * row stride ldw): panel p alone. */
static inline void pack_panel(float *dst, const float *w, int64_t ldw, int trans_w, int64_t K,
                              int64_t M, int64_t p) {
    int64_t m0 = p * SF_NR, mw = M - m0 < SF_NR ? M - m0 : SF_NR;
#ifdef SF_X86
    if (trans_w && mw == SF_NR && have_avx2_fma()) {
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
                 int64_t ps, int64_t np1, const float *b, int accumulate, const int mr, const int np) {
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
            __m512 a = _mm512_set1_ps(x[r * rs + k]);
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

__attribute__((target("avx512f"))) static void
tile_avx512(float *y, int64_t ldy, const float *x, int64_t rs, int64_t K, const float *pp,
            int64_t ps, int64_t np1, const float *b, int accumulate, int64_t mr, int np) {
#define SF_T512(n)                                                                               \
    case n:                                                                                      \
        if (np == 2) tile_avx512_rows(y, ldy, x, rs, K, pp, ps, np1, b, accumulate, n, 2);       \
        else tile_avx512_rows(y, ldy, x, rs, K, pp, ps, np1, b, accumulate, n, 1);               \
        break;
    switch (mr) {
    SF_T512(1) SF_T512(2) SF_T512(3) SF_T512(4) SF_T512(5) SF_T512(6) SF_T512(7)
    default: SF_T512(8)
    }
#undef SF_T512
}

/* STACKFORMER_NO_AVX2=1 in the environment makes the kernels take their generic paths, as on a
 * CPU without AVX2/FMA (so those paths can be tested on any machine). */
static int have_avx2_fma(void) {
    /* atomic: the first calls can come from several threads at once (all store the same) */
    static _Atomic int cached = -1;
    int have = atomic_load_explicit(&cached, memory_order_relaxed);
    if (have < 0) {
        const char *off = getenv("STACKFORMER_NO_AVX2");
        __builtin_cpu_init();
        have = !(off && strcmp(off, "1") == 0) && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma");
        atomic_store_explicit(&cached, have, memory_order_relaxed);
    }
    return have;
}

/* STACKFORMER_NO_AVX512=1 keeps the products on the AVX2 tiles (same bits, so tests compare
 * the two paths on one machine). */
static int have_avx512(void) {
    static _Atomic int cached = -1;
    int have = atomic_load_explicit(&cached, memory_order_relaxed);
    if (have < 0) {
        const char *off = getenv("STACKFORMER_NO_AVX512");
        __builtin_cpu_init();
        have = have_avx2_fma() && !(off && strcmp(off, "1") == 0) && __builtin_cpu_supports("avx512f");
        atomic_store_explicit(&cached, have, memory_order_relaxed);
    }
    return have;
}
#endif

const char *sf_matmul_kernel(void) {
    if (blas_active()) return "blas";
#ifdef SF_X86
    if (have_avx512()) return "avx512";
    if (have_avx2_fma()) return "avx2";
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
    if (have_avx2_fma()) {
        if (mr == SF_MR && mw == SF_NR) tile_avx2(y, ldy, a, a_rs, a_cs, K, panel, SF_NR, b, accumulate);
        else if (mw == SF_NR) tile_avx2_edge(y, ldy, a, a_rs, a_cs, K, panel, SF_NR, b, accumulate, mr);
        else tile_generic_fma(y, ldy, a, a_rs, a_cs, K, panel, SF_NR, b, mr, mw, accumulate);
        return;
    }
#endif
    tile_generic(y, ldy, a, a_rs, a_cs, K, panel, SF_NR, b, mr, mw, accumulate);
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
        tile_avx512(y, ldy, x, rs, K, pp, ps, np1, b, acc, mr, np);
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
    return a_strided ? (N + SF_MR - 1) / SF_MR * SF_KC * (SF_MR + SF_NR) : sf_matmul_pack_floats(K, M);
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
#if defined(__clang__)
#define SF_TARGET_AVX512_WIDE __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw"), min_vector_width(512)))
#else
#define SF_TARGET_AVX512_WIDE __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,prefer-vector-width=512")))
#endif
SF_TARGET_AVX512_WIDE static void act_row_avx512(int act, float *out, const float *pre, int64_t n) {
    act_row_body(act, out, pre, n);
}
/* the 512-bit clone's call where the CPU allows it (have_avx512), else the plain body's */
#define SF_WIDE_OR(wide_call, plain_call) \
    do { if (have_avx512()) wide_call; else plain_call; } while (0)
#else
#define SF_WIDE_OR(wide_call, plain_call) plain_call
#endif
static inline void act_row(int act, float *out, const float *pre, int64_t n) {
    SF_WIDE_OR(act_row_avx512(act, out, pre, n), act_row_body(act, out, pre, n));
}

/* The epilogue on rows [n0, n0+mr) x columns [m0, m0+mw) of y (act < 0: none); act_out has
 * y's row stride. */
static inline void act_block(int act, float *act_out, const float *y, int64_t ldy, int64_t n0,
                             int64_t mr, int64_t m0, int64_t mw) {
    if (act < 0) return;
    for (int64_t r = n0; r < n0 + mr; r++) act_row(act, act_out + r * ldy + m0, y + r * ldy + m0, mw);
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
     * for a strided A, whose row panels are copied per thread. */
    int64_t r0 = 0, r1 = nr, p0 = 0, p1 = np;
    const int by_rows = nr >= T && (a_packed || (np % T != 0 && np < 4 * T));
    if (by_rows) { r0 = nr * tid / T; r1 = nr * (tid + 1) / T; }
    else { p0 = np * tid / T; p1 = np * (tid + 1) / T; }
    if (a_packed) {
        /* strided A (dW = dy^T x): per K chunk, copy this thread's rows of A into row panels
         * [tile][k][6] so the tiles read A contiguously; y carries the sums across chunks.
         * B is copied one (chunk, panel) slice at a time into this thread's own 8 KB, right
         * before its tiles read it from L1. Packing all of B up front wrote and re-read K x M
         * floats through L3 (x, 3 MB for M's dW), and on two threads half of the panels
         * crossed cores; both threads now copy every slice, ~1% of the tiles' work. dW at
         * M's shapes: 153 -> 186 GFLOP/s on 2 threads, 93 -> 97 on one. */
        float *ap = pack + r0 * SF_MR * SF_KC;
        float *bs = pack + nr * SF_MR * SF_KC + (int64_t)tid * SF_KC * SF_NR;
        for (int64_t k0 = 0; k0 < K; k0 += SF_KC) {
            int64_t kc = K - k0 < SF_KC ? K - k0 : SF_KC;
            int acc = accumulate || k0 > 0;
            for (int64_t r = r0; r < r1; r++) {
                int64_t n0 = r * SF_MR, mr = N - n0 < SF_MR ? N - n0 : SF_MR;
                float *dst = ap + (r - r0) * kc * SF_MR;
                for (int64_t k = 0; k < kc; k++) {
                    const float *src = a + n0 * a_rs + (k0 + k) * a_cs;
                    for (int64_t i = 0; i < mr; i++) dst[k * SF_MR + i] = src[i * a_rs];
                }
            }
            for (int64_t p = p0; p < p1; p++) {
                int64_t m0 = p * SF_NR, mw = M - m0 < SF_NR ? M - m0 : SF_NR;
                pack_panel(bs, trans_w ? w + k0 : w + k0 * ldw, ldw, trans_w, kc, M, p);
                const float *bp = (b && k0 == 0) ? b + m0 : NULL;
                for (int64_t r = r0; r < r1; r++) {
                    int64_t n0 = r * SF_MR, mr = N - n0 < SF_MR ? N - n0 : SF_MR;
                    run_tile(y + n0 * ldy + m0, ldy, ap + (r - r0) * kc * SF_MR, 1, SF_MR, kc, bs,
                             SF_NR, bp, mr, mw, acc, use_avx);
                }
            }
        }
        for (int64_t r = r0; r < r1; r++) {
            int64_t n0 = r * SF_MR;
            act_block(act, act_out, y, ldy, n0, N - n0 < SF_MR ? N - n0 : SF_MR, 0, M);
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

/* ---- optional BLAS backend -------------------------------------------------------------- */
/* The library links no BLAS. A caller that has loaded one (stackformer.use_blas) hands over
 * its cblas_sgemm, and every sf_gemm product then runs there instead of on the tiles: for a
 * CPU without AVX2 (the tiles' portable path is several times slower than a tuned BLAS) or
 * to compare against one. Attention keeps its own tiles (sf_gemm_tile). Two slots, one per
 * integer width, so a product never pairs a function with the other width's signature even
 * while another thread switches backends; the 64-bit slot wins when both are set. */
typedef void (*cblas32_fn)(int, int, int, int32_t, int32_t, int32_t, float, const float *,
                           int32_t, const float *, int32_t, float, float *, int32_t);
typedef void (*cblas64_fn)(int, int, int, int64_t, int64_t, int64_t, float, const float *,
                           int64_t, const float *, int64_t, float, float *, int64_t);
static _Atomic(uintptr_t) g_blas32, g_blas64;
enum { CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111, CBLAS_TRANS = 112 };

/* The backend to use for one product: the 64-bit slot if set, else the 32-bit one; loaded
 * once per product, so all of its calls go to one function even if the backend changes. */
typedef struct { uintptr_t fn; int is64; } blas_fn;
static blas_fn blas_pick(void) {
    blas_fn f = {atomic_load_explicit(&g_blas64, memory_order_acquire), 1};
    if (!f.fn) f = (blas_fn){atomic_load_explicit(&g_blas32, memory_order_acquire), 0};
    return f;
}

/* C (rows x cols, row stride ldc) = op(A) op(B) + beta C (f.fn set, sizes checked) */
static void blas_call(blas_fn f, int ta, int tb, int64_t rows, int64_t cols, int64_t K,
                      const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                      int64_t ldc) {
    if (f.is64)
        ((cblas64_fn)f.fn)(CBLAS_ROW_MAJOR, ta, tb, rows, cols, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
    else
        ((cblas32_fn)f.fn)(CBLAS_ROW_MAJOR, ta, tb, (int32_t)rows, (int32_t)cols, (int32_t)K, 1.0f, A,
                           (int32_t)lda, B, (int32_t)ldb, beta, C, (int32_t)ldc);
}

static int blas_active(void) { return blas_pick().fn != 0; }

/* Rows [n0, n1) of a product through the BLAS: the bias copied into y and kept with beta = 1
 * (CBLAS has no bias), the product, then the activation epilogue. */
static void blas_rows(blas_fn f, int ta, int tb, float *y, int64_t ldy, const float *a,
                      int64_t a_rs, int64_t lda, const float *w, int64_t ldb, const float *b,
                      int64_t n0, int64_t n1, int64_t K, int64_t M, int accumulate, int act,
                      float *act_out) {
    float beta = accumulate ? 1.0f : 0.0f;
    if (!accumulate && b) {
        for (int64_t n = n0; n < n1; n++) memcpy(y + n * ldy, b, (size_t)M * sizeof(float));
        beta = 1.0f;
    }
    blas_call(f, ta, tb, n1 - n0, M, K, a + n0 * a_rs, lda, w, ldb, beta, y + n0 * ldy, ldy);
    act_block(act, act_out, y, ldy, n0, n1 - n0, 0, M);
}

/* sf_gemm's product through the BLAS, if one is set: A contiguous along K (a_cs == 1) or
 * along N (a_rs == 1, the weight gradient's dy^T); other strides, and sizes CBLAS would
 * reject, stay on the tiles (returns 0). Our threads split the rows, each calling the BLAS
 * on its slice (use_blas sets an OpenBLAS to one thread): one pool. With the BLAS's own
 * threads, which spin ~0.1 s after each call, every OpenMP region in between lost a core
 * (S's train step 1.6x slower). */
static int blas_gemm(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs,
                     const float *w, int trans_w, const float *b, int64_t N, int64_t K, int64_t M,
                     int accumulate, int nt, int act, float *act_out) {
    const blas_fn f = blas_pick();
    if (!f.fn) return 0;
    int ta;
    int64_t lda;
    if (a_cs == 1 && (a_rs >= K || N == 1)) { ta = CBLAS_NO_TRANS; lda = a_rs > K ? a_rs : K; }
    else if (a_rs == 1 && a_cs >= N) { ta = CBLAS_TRANS; lda = a_cs; }
    else return 0;
    const int64_t ldb = trans_w ? K : M, lim = INT32_MAX;
    if (ldy < M) return 0;
    if (!f.is64 && (N > lim || M > lim || K > lim || lda > lim || ldb > lim || ldy > lim)) return 0;
    const int tb = trans_w ? CBLAS_TRANS : CBLAS_NO_TRANS;
    const int T = (N * K * M < (1 << 20) || N < 2 * 16) ? 1 : (int)(nt < N / 16 ? nt : N / 16);
    if (T <= 1) {
        blas_rows(f, ta, tb, y, ldy, a, a_rs, lda, w, ldb, b, 0, N, K, M, accumulate, act, act_out);
        return 1;
    }
#pragma omp parallel num_threads(T)
    {
        const int tid = sf_team_tid(), nth = sf_team_size();
        /* row ranges in multiples of 16, so slices start on whole register tiles */
        int64_t n0 = N / 16 * tid / nth * 16, n1 = tid == nth - 1 ? N : N / 16 * (tid + 1) / nth * 16;
        if (n1 > n0)
            blas_rows(f, ta, tb, y, ldy, a, a_rs, lda, w, ldb, b, n0, n1, K, M, accumulate, act, act_out);
    }
    return 1;
}

/* Probe a candidate before it is installed: three small products (both transposes of A and
 * B, a bias-like beta = 1) against a double-precision loop. A function with another signature
 * or ABI shows up as wrong numbers (or, unluckily, a crash; the Python side reads the integer
 * width from the library first). */
static int blas_probe(blas_fn f, char *err, size_t errlen) {
    enum { R = 5, C = 7, KK = 3 };
    float A[R * KK], At[KK * R], B[KK * C], Bt[C * KK], Y[R * C];
    for (int i = 0; i < R * KK; i++) A[i] = (float)((i * 7) % 11) - 5.0f;
    for (int i = 0; i < KK * C; i++) B[i] = (float)((i * 5) % 13) * 0.5f - 3.0f;
    for (int r = 0; r < R; r++)
        for (int k = 0; k < KK; k++) At[k * R + r] = A[r * KK + k];
    for (int k = 0; k < KK; k++)
        for (int c = 0; c < C; c++) Bt[c * KK + k] = B[k * C + c];
    for (int t = 0; t < 3; t++) {
        for (int i = 0; i < R * C; i++) Y[i] = t == 2 ? 1.0f : -99.0f;
        if (t == 0) blas_call(f, CBLAS_NO_TRANS, CBLAS_TRANS, R, C, KK, A, KK, Bt, KK, 0.0f, Y, C);
        else if (t == 1) blas_call(f, CBLAS_TRANS, CBLAS_NO_TRANS, R, C, KK, At, R, B, C, 0.0f, Y, C);
        else blas_call(f, CBLAS_NO_TRANS, CBLAS_NO_TRANS, R, C, KK, A, KK, B, C, 1.0f, Y, C);
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) {
                double ref = t == 2 ? 1.0 : 0.0;
                for (int k = 0; k < KK; k++) ref += (double)A[r * KK + k] * B[k * C + c];
                if (fabs(Y[r * C + c] - ref) > 1e-4 * (1.0 + fabs(ref))) {
                    sf_fail(err, errlen, SF_ERR_INVALID_ARG,
                            "BLAS probe: product %d gave %g at (%d, %d), expected %g: not a "
                             "row-major cblas_sgemm with %s-bit integers", t, (double)Y[r * C + c],
                             r, c, ref, f.is64 ? "64" : "32");
                    return 0;
                }
            }
    }
    return 1;
}

sf_status sf_set_blas_sgemm(void *cblas_sgemm, int ilp64, char *err, size_t errlen) {
    if (!cblas_sgemm) {
        atomic_store(&g_blas64, 0);
        atomic_store(&g_blas32, 0);
        return SF_OK;
    }
    if (ilp64 != 0 && ilp64 != 1) {
        return sf_fail(err, errlen, SF_ERR_INVALID_ARG,
                       "ilp64 must be 0 (32-bit integers) or 1 (64-bit), got %d", ilp64);
    }
    const blas_fn f = {(uintptr_t)cblas_sgemm, ilp64};
    if (!blas_probe(f, err, errlen)) return SF_ERR_INVALID_ARG; /* the previous backend stays */
    /* the new function first, then clear the other slot: a product starting on another
     * thread meanwhile picks either the old or the new one, each with its own signature */
    if (ilp64) { atomic_store(&g_blas64, f.fn); atomic_store(&g_blas32, 0); }
    else { atomic_store(&g_blas32, f.fn); atomic_store(&g_blas64, 0); }
    return SF_OK;
}

/* sf_gemm, and act_out = act(y) when act >= 0 */
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
    if (blas_gemm(y, ldy, a, a_rs, a_cs, w, trans_w, b, N, K, M, accumulate, nt, act, act_out)) return;
    if (N <= SF_SMALL_N && trans_w) {
#ifdef SF_X86
        const int use_avx_small = have_avx2_fma();
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
    use_avx = have_avx2_fma();
    use512 = !a_packed && have_avx512();
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

/* ---- norms ------------------------------------------------------------------------------- */

/* Mean and 1/sqrt(var + eps) of one row: two passes (mean, then squared deviations) with
 * eight float partial sums each, which vectorize; accurate to a few ulp for any d we use
 * (the two-pass form avoids the cancellation of E[x^2] - E[x]^2). */
static inline void row_mean_rstd(const float *x, int64_t d, float eps, float *mu, float *rstd) {
    float m = sf_sum(x, d) / (float)d;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
        for (int j = 0; j < 8; j++) { float t = x[i + j] - m; acc[j] += t * t; }
    float v = sf_hsum8(acc);
    for (; i < d; i++) { float t = x[i] - m; v += t * t; }
    *mu = m;
    *rstd = 1.0f / sqrtf(v / (float)d + eps);
}

void sf_layernorm(float *y, const float *x, const float *w, const float *b, int64_t N, int64_t d,
                  float eps, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (N * d > 65536)
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * d;
        float *yr = y + n * d;
        float mu, rstd;
        row_mean_rstd(xr, d, eps, &mu, &rstd);
        if (w && b) for (int64_t i = 0; i < d; i++) yr[i] = (xr[i] - mu) * rstd * w[i] + b[i];
        else if (w) for (int64_t i = 0; i < d; i++) yr[i] = (xr[i] - mu) * rstd * w[i];
        else for (int64_t i = 0; i < d; i++) yr[i] = (xr[i] - mu) * rstd + (b ? b[i] : 0.0f);
    }
}

void sf_rmsnorm(float *y, const float *x, const float *w, int64_t N, int64_t d, float eps,
                int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (N * d > 65536)
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * d;
        float *yr = y + n * d;
        float r = 1.0f / sqrtf(sf_dot(xr, xr, d) / (float)d + eps);
        if (w) for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * r * w[i];
        else for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * r;
    }
}

/* ---- activations ------------------------------------------------------------------------- */

void sf_activation(int act, float *out, const float *pre, int64_t n, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
    const int64_t chunk = 4096;
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
    for (int64_t c = 0; c < (n + chunk - 1) / chunk; c++) {
        int64_t i0 = c * chunk;
        act_row(act, out + i0, pre + i0, n - i0 < chunk ? n - i0 : chunk);
    }
}

void sf_gelu(float *x, int64_t n, int n_threads) { sf_activation(SF_ACT_GELU, x, x, n, n_threads); }
void sf_gelu_tanh(float *x, int64_t n, int n_threads) { sf_activation(SF_ACT_GELU_TANH, x, x, n, n_threads); }
void sf_relu(float *x, int64_t n, int n_threads) { sf_activation(SF_ACT_RELU, x, x, n, n_threads); }

void sf_swiglu(float *out, const float *gate, const float *up, int64_t n, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + sf_expf(-g)) * up[i];
    }
}


void sf_add(float *y, const float *x, int64_t n, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

/* ---- rope -------------------------------------------------------------------------------- */

/* cos/sin of RoPE's angles for positions pos0 .. pos0+T-1: cs[(t*half + j)*2 + {0, 1}]. One
 * table per forward call serves every layer, q and k, forward and backward: computing the
 * angles per row and layer was 1-2% of a forward at M (pow, cos and sin per element). */
void sf_rope_table(float *cs, int64_t T, int64_t pos0, int64_t dh, float theta, int n_threads) {
    int64_t half = dh / 2;
#pragma omp parallel for schedule(static) num_threads(sf_threads_resolve(n_threads)) if (T * half > 4096)
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < half; j++) {
            /* angles in double: t * theta^(-2j/dh) loses digits in float at long T */
            double ang = (double)(pos0 + t) * pow((double)theta, -2.0 * (double)j / (double)dh);
            cs[(t * half + j) * 2] = (float)cos(ang);
            cs[(t * half + j) * 2 + 1] = (float)sin(ang);
        }
}

/* Rotate pairs (j, j + half) of every head of rows x[r*ld ...] (position r % T of the table)
 * by +angle, or by -angle (direction -1: the inverse, which is the backward). */
static void rope_rotate(float *x, int64_t N, int64_t T, int64_t n_heads, int64_t dh, int64_t ld,
                        const float *cs, float direction, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
    int64_t half = dh / 2;
#pragma omp parallel for schedule(static) num_threads(nt) if (N * n_heads * dh > 65536)
    for (int64_t r = 0; r < N; r++) {
        const float *row = cs + (r % T) * half * 2;
        for (int64_t j = 0; j < half; j++) {
            float c = row[2 * j], s = direction * row[2 * j + 1];
            for (int64_t h = 0; h < n_heads; h++) {
                float *xh = x + r * ld + h * dh;
                float a = xh[j], bb = xh[j + half];
                xh[j] = a * c - bb * s;
                xh[j + half] = bb * c + a * s;
            }
        }
    }
}

void sf_rope(float *x, int64_t N, int64_t T, int64_t n_heads, int64_t dh, int64_t ld,
             const float *cs, int n_threads) {
    rope_rotate(x, N, T, n_heads, dh, ld, cs, 1.0f, n_threads);
}

double sf_rms(const float *x, int64_t n) {
    if (n <= 0) return 0.0;
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    return sqrt(ss / (double)n);
}

/* ---- backward kernels --------------------------------------------------------------------- */
/* Norm weight/bias gradients are reductions over rows; they are computed column-parallel in
 * a second pass (each thread owns a range of columns, rows summed in ascending order), so
 * they are deterministic for any thread count and need no per-thread scratch. */

void sf_layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                           const float *w, int64_t N, int64_t d, float eps, float *stats,
                           int accumulate, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (N * d > 32768)
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * d, *dyr = dy + n * d;
        float *dxr = dx + n * d;
        float mu, rstd;
        row_mean_rstd(xr, d, eps, &mu, &rstd);
        stats[2 * n] = mu;
        stats[2 * n + 1] = rstd;
        float a1[8] = {0, 0, 0, 0, 0, 0, 0, 0}, a2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0; /* mean(dxhat), mean(dxhat * xhat), eight partial sums each */
        for (; i + 8 <= d; i += 8)
            for (int j = 0; j < 8; j++) {
                float xh = (xr[i + j] - mu) * rstd, g = dyr[i + j] * (w ? w[i + j] : 1.0f);
                a1[j] += g;
                a2[j] += g * xh;
            }
        float s1 = sf_hsum8(a1);
        float s2 = sf_hsum8(a2);
        for (; i < d; i++) {
            float xh = (xr[i] - mu) * rstd, g = dyr[i] * (w ? w[i] : 1.0f);
            s1 += g;
            s2 += g * xh;
        }
        float m1 = s1 / (float)d, m2 = s2 / (float)d;
        for (int64_t i = 0; i < d; i++) {
            float xh = (xr[i] - mu) * rstd, g = dyr[i] * (w ? w[i] : 1.0f);
            float v = rstd * (g - m1 - xh * m2);
            dxr[i] = accumulate ? dxr[i] + v : v;
        }
    }
    if (!dw && !db) return;
    int64_t nchunks = (d + 63) / 64;
#pragma omp parallel for schedule(static) num_threads(nt) if (N * d > 32768)
    for (int64_t ch = 0; ch < nchunks; ch++) {
        int64_t i0 = ch * 64, w = d - i0 < 64 ? d - i0 : 64;
        float sw[64] = {0}, sb[64] = {0};
        for (int64_t n = 0; n < N; n++) {
            const float *g = dy + n * d + i0, *xr = x + n * d + i0;
            float mu = stats[2 * n], rstd = stats[2 * n + 1];
            for (int64_t i = 0; i < w; i++) {
                sw[i] += g[i] * (xr[i] - mu) * rstd;
                sb[i] += g[i];
            }
        }
        for (int64_t i = 0; i < w; i++) {
            if (dw) dw[i0 + i] += sw[i];
            if (db) db[i0 + i] += sb[i];
        }
    }
}

void sf_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                         int64_t N, int64_t d, float eps, float *stats, int accumulate,
                         int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (N * d > 32768)
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * d, *dyr = dy + n * d;
        float *dxr = dx + n * d;
        float r = 1.0f / sqrtf(sf_dot(xr, xr, d) / (float)d + eps); /* as in the forward */
        stats[n] = r;
        double s = 0.0; /* mean(dxhat * x) */
        for (int64_t i = 0; i < d; i++) s += (double)(dyr[i] * (w ? w[i] : 1.0f)) * xr[i];
        float m = (float)(s / (double)d) * r * r;
        for (int64_t i = 0; i < d; i++) {
            float v = r * (dyr[i] * (w ? w[i] : 1.0f) - xr[i] * m);
            dxr[i] = accumulate ? dxr[i] + v : v;
        }
    }
    if (!dw) return;
    int64_t nchunks = (d + 63) / 64;
#pragma omp parallel for schedule(static) num_threads(nt) if (N * d > 32768)
    for (int64_t ch = 0; ch < nchunks; ch++) {
        int64_t i0 = ch * 64, w = d - i0 < 64 ? d - i0 : 64;
        float sw[64] = {0};
        for (int64_t n = 0; n < N; n++) {
            const float *g = dy + n * d + i0, *xr = x + n * d + i0;
            float r = stats[n];
            for (int64_t i = 0; i < w; i++) sw[i] += g[i] * xr[i] * r;
        }
        for (int64_t i = 0; i < w; i++) dw[i0 + i] += sw[i];
    }
}

/* dpre = dpost * act'(pre) */
/* dpre[i] = dpost[i] * act'(pre[i]), i < n; one loop per activation so each vectorizes */
static inline __attribute__((always_inline)) void act_backward_body(int act, float *dpre, const float *dpost,
                                                                    const float *pre, int64_t n) {
    if (act == SF_ACT_GELU) {
        for (int64_t i = 0; i < n; i++) {
            /* Phi(x) + x phi(x); erf's polynomial needs exp(-x^2/2) too, so compute it once */
            float x = pre[i], ax = (x < 0.0f ? -x : x) * 0.70710678118654752f, e = sf_expf(-ax * ax);
            float erf_abs = sf_erf_abs(ax, e);
            float cdf = 0.5f * (1.0f + (x < 0.0f ? -erf_abs : erf_abs));
            dpre[i] = dpost[i] * (cdf + x * e * 0.3989422804014327f);
        }
    } else if (act == SF_ACT_GELU_TANH) {
        const float c = 0.7978845608028654f;
        for (int64_t i = 0; i < n; i++) {
            float x = pre[i];
            float t = sf_tanhf(c * (x + 0.044715f * x * x * x));
            float g = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * x * x);
            dpre[i] = dpost[i] * g;
        }
    } else {
        for (int64_t i = 0; i < n; i++) dpre[i] = pre[i] > 0.0f ? dpost[i] : 0.0f * dpost[i];
    }
}
#ifdef SF_X86
SF_TARGET_AVX512_WIDE static void act_backward_avx512(int act, float *dpre, const float *dpost,
                                                      const float *pre, int64_t n) {
    act_backward_body(act, dpre, dpost, pre, n);
}
#endif

void sf_act_backward(int act, float *dpre, const float *dpost, const float *pre, int64_t n,
                     int n_threads) {
    int nt = sf_threads_resolve(n_threads);
    const int64_t chunk = 4096;
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
    for (int64_t c = 0; c < (n + chunk - 1) / chunk; c++) {
        int64_t i0 = c * chunk, m = n - i0 < chunk ? n - i0 : chunk;
        SF_WIDE_OR(act_backward_avx512(act, dpre + i0, dpost + i0, pre + i0, m),
                   act_backward_body(act, dpre + i0, dpost + i0, pre + i0, m));
    }
}

/* Attention's row passes (sf_attention.c), here beside the activations for the same 512-bit
 * clones: the exps are most of a softmax row's cost. */
static inline __attribute__((always_inline)) void exp_row_body(float *s, int64_t n, float scale, float shift) {
    for (int64_t u = 0; u < n; u++) s[u] = sf_expf(s[u] * scale - shift);
}
static inline __attribute__((always_inline)) void softmax_grad_row_body(float *s, float *dp, int64_t n, float scale,
                                                                        float lse, float D) {
    for (int64_t u = 0; u < n; u++) {
        float p = sf_expf(s[u] * scale - lse);
        dp[u] = p * (dp[u] - D) * scale;
        s[u] = p;
    }
}
#ifdef SF_X86
SF_TARGET_AVX512_WIDE static void exp_row_avx512(float *s, int64_t n, float scale, float shift) {
    exp_row_body(s, n, scale, shift);
}
SF_TARGET_AVX512_WIDE static void softmax_grad_row_avx512(float *s, float *dp, int64_t n, float scale, float lse,
                                                          float D) {
    softmax_grad_row_body(s, dp, n, scale, lse, D);
}
#endif

void sf_exp_row(float *s, int64_t n, float scale, float shift) {
    SF_WIDE_OR(exp_row_avx512(s, n, scale, shift), exp_row_body(s, n, scale, shift));
}

void sf_softmax_grad_row(float *s, float *dp, int64_t n, float scale, float lse, float D) {
    SF_WIDE_OR(softmax_grad_row_avx512(s, dp, n, scale, lse, D), softmax_grad_row_body(s, dp, n, scale, lse, D));
}

/* out = silu(gate) * up:  dgate = dout * up * silu'(gate), dup = dout * silu(gate) */
void sf_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, int64_t n, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i], s = 1.0f / (1.0f + sf_expf(-g));
        dgate[i] = dout[i] * up[i] * s * (1.0f + g * (1.0f - s));
        dup[i] = dout[i] * g * s;
    }
}

void sf_rope_backward(float *dx, int64_t N, int64_t T, int64_t n_heads, int64_t dh, int64_t ld,
                      const float *cs, int n_threads) {
    rope_rotate(dx, N, T, n_heads, dh, ld, cs, -1.0f, n_threads);
}

/* Mean cross-entropy over rows whose target != ignore_index. Overwrites logits with
 * dloss/dlogits (already divided by the count). Returns the summed loss in *loss_sum and the
 * count in *count; per-row loss into row_loss when non-NULL (NaN for ignored rows). */
void sf_cross_entropy(float *logits, const int32_t *targets, int64_t N, int64_t V,
                      int32_t ignore_index, double *loss_sum, int64_t *count, float *row_loss,
                      int n_threads) {
    int nt = sf_threads_resolve(n_threads);
    int64_t cnt = 0;
    for (int64_t n = 0; n < N; n++) cnt += targets[n] != ignore_index;
    double total = 0.0;
    float scale = cnt ? 1.0f / (float)cnt : 0.0f;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(+ : total) if (N * V > 32768)
    for (int64_t n = 0; n < N; n++) {
        float *z = logits + n * V;
        int32_t tgt = targets[n];
        if (tgt == ignore_index) {
            memset(z, 0, (size_t)V * sizeof(float));
            if (row_loss) row_loss[n] = NAN;
            continue;
        }
        float mx = z[0];
        for (int64_t j = 1; j < V; j++) mx = z[j] > mx ? z[j] : mx;
        const float zt = z[tgt];
        double se = 0.0;
        /* one exp per logit: e_j = exp(z_j - mx) is kept (in z) for the gradient
         * softmax_j = e_j / se; a second exp(z_j - lse) per logit was ~1% of S's train step */
        for (int64_t j = 0; j < V; j++) {
            double e = exp((double)(z[j] - mx));
            se += e;
            z[j] = (float)e;
        }
        double l = ((double)mx + log(se)) - (double)zt; /* lse - z_tgt */
        total += l;
        if (row_loss) row_loss[n] = (float)l;
        double inv = 1.0 / se;
        for (int64_t j = 0; j < V; j++) z[j] = (float)((double)z[j] * inv) * scale;
        z[tgt] -= scale;
    }
    *loss_sum = total;
    *count = cnt;
}

/* db(M) += column sums of x(N, M); column-parallel, rows summed in order (deterministic). */
/* Column chunks of 64: rows outer, columns inner, so the inner loop is a vector add while
 * each column is still summed over rows in ascending order. */
#define SF_COLCHUNK 64
void sf_colsum(float *db, const float *x, int64_t N, int64_t M, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
    int64_t nchunks = (M + SF_COLCHUNK - 1) / SF_COLCHUNK;
#pragma omp parallel for schedule(static) num_threads(nt) if (N * M > 65536)
    for (int64_t ch = 0; ch < nchunks; ch++) {
        int64_t j0 = ch * SF_COLCHUNK, w = M - j0 < SF_COLCHUNK ? M - j0 : SF_COLCHUNK;
        float acc[SF_COLCHUNK] = {0};
        for (int64_t n = 0; n < N; n++) {
            const float *xr = x + n * M + j0;
            for (int64_t j = 0; j < w; j++) acc[j] += xr[j];
        }
        for (int64_t j = 0; j < w; j++) db[j0 + j] += acc[j];
    }
}
