/* stackformer C core: the library's own tests.
 *
 * Every kernel is compared with a plain double-precision loop written here from the contract in
 * sf_kernels.h / sf_internal.h / DEVELOPERS.md (never with another optimized kernel), and the
 * model-level API is checked for the properties it promises: validation with messages, the
 * parameter table layout, finite outputs, causality, padding, thread-count determinism, the
 * equivalences between AttnRes schedules, and cached decoding = one full pass.
 *
 *   make -C csrc test    build and run
 *   make -C csrc asan    the same under AddressSanitizer + UndefinedBehaviorSanitizer
 *
 * Buffers are allocated at exactly their documented sizes so the sanitizer build catches any
 * out-of-bounds access. Each CHECK counts; a failure prints file:line and the values involved;
 * main returns 1 when anything failed.
 */
#include "sf.h"
#include "sf_internal.h"
#include "sf_kernels.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <string.h>

/* ============================================================================================
 * A tiny check framework
 * ============================================================================================ */

static long g_checks = 0, g_failed = 0;
enum { MAX_PRINTED = 200 }; /* a broken kernel fails thousands of cases: print the first few */

#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
static void check_failed(const char *file, int line, const char *expr, const char *fmt, ...) {
    g_failed++;
    if (g_failed > MAX_PRINTED) {
        if (g_failed == MAX_PRINTED + 1) printf("... (further failures are counted, not printed)\n");
        return;
    }
    printf("%s:%d: CHECK(%s) failed: ", file, line, expr);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
}

/* CHECK(condition, printf-style message with the failing values) */
#define CHECK(cond, ...)                                                                 \
    do {                                                                                 \
        g_checks++;                                                                      \
        if (!(cond)) check_failed(__FILE__, __LINE__, #cond, __VA_ARGS__);               \
    } while (0)

/* The worst element of |got - want| / (atol + rtol |want|); a non-finite got is infinitely bad. */
typedef struct { int64_t i; double ratio; } worst;

static worst worst_vs_double(const float *got, const double *want, int64_t n, double atol,
                             double rtol) {
    worst w = {0, 0.0};
    for (int64_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - want[i]);
        double r = isfinite(got[i]) && isfinite(err) ? err / (atol + rtol * fabs(want[i])) : INFINITY;
        if (r > w.ratio) { w.i = i; w.ratio = r; }
    }
    return w;
}

static worst worst_vs_float(const float *got, const float *want, int64_t n, double atol,
                            double rtol) {
    worst w = {0, 0.0};
    for (int64_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - (double)want[i]);
        double r = isfinite(got[i]) && isfinite(err) ? err / (atol + rtol * fabs((double)want[i])) : INFINITY;
        if (r > w.ratio) { w.i = i; w.ratio = r; }
    }
    return w;
}

/* got (float) close to want (double) elementwise */
#define CHECK_CLOSE(what, got, want, n, atol, rtol)                                                \
    do {                                                                                           \
        worst w_ = worst_vs_double((got), (want), (n), (atol), (rtol));                           \
        CHECK(w_.ratio <= 1.0, "%s: worst at [%lld]: got %.9g, want %.9g (|err|/tol = %.3g)",     \
              (what), (long long)w_.i, (double)(got)[w_.i], (double)(want)[w_.i], w_.ratio);     \
    } while (0)

/* got (float) close to want (float) elementwise */
#define CHECK_CLOSE_F(what, got, want, n, atol, rtol)                                              \
    do {                                                                                           \
        worst w_ = worst_vs_float((got), (want), (n), (atol), (rtol));                            \
        CHECK(w_.ratio <= 1.0, "%s: worst at [%lld]: got %.9g, want %.9g (|err|/tol = %.3g)",     \
              (what), (long long)w_.i, (double)(got)[w_.i], (double)(want)[w_.i], w_.ratio);     \
    } while (0)

static int64_t first_difference(const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0) return i;
    return -1;
}

/* a and b bitwise identical */
#define CHECK_SAME(what, a, b, n)                                                                  \
    do {                                                                                           \
        int64_t d_ = first_difference((a), (b), (n));                                             \
        CHECK(d_ < 0, "%s: first difference at [%lld]: %.9g vs %.9g", (what), (long long)d_,     \
              (double)(a)[d_ < 0 ? 0 : d_], (double)(b)[d_ < 0 ? 0 : d_]);                        \
    } while (0)

static int all_finite(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* ============================================================================================
 * Helpers: allocation, a deterministic RNG
 * ============================================================================================ */

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) { fprintf(stderr, "test_sf: out of memory\n"); exit(2); }
    return p;
}
static float *falloc(int64_t n) { return xmalloc((size_t)n * sizeof(float)); }
static double *dalloc(int64_t n) { return xmalloc((size_t)n * sizeof(double)); }
static float *fdup(const float *x, int64_t n) {
    float *p = falloc(n);
    memcpy(p, x, (size_t)n * sizeof(float));
    return p;
}

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static double urand(void) { /* xorshift64*, uniform [0, 1) */
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return (double)((g_rng * 0x2545F4914F6CDD1Dull) >> 11) * (1.0 / 9007199254740992.0);
}
static float frand(float lo, float hi) { return lo + (hi - lo) * (float)urand(); }
static void fill(float *x, int64_t n, float lo, float hi) {
    for (int64_t i = 0; i < n; i++) x[i] = frand(lo, hi);
}

/* ============================================================================================
 * 1. Matmul: y(N,M) = x(N,K) W(M,K)^T + b, or y += x W^T with accumulate=1 (b unused then)
 * ============================================================================================ */

/* One (N, K, M) shape: every bias/accumulate combination, threads 1/2/3 against the naive
 * double-accumulating loop, and threads 1/2/4 bitwise against each other. */
static void matmul_case(int64_t N, int64_t K, int64_t M) {
    float *x = falloc(N * K), *w = falloc(M * K), *b = falloc(M), *y0 = falloc(N * M);
    float *ref = falloc(N * M), *y = falloc(N * M), *y1 = falloc(N * M);
    float *pack = falloc(sf_matmul_pack_floats(K, M));
    double *mag = dalloc(N * M); /* sum_k |x w|: the scale the rounding error is relative to */
    fill(x, N * K, -1, 1);
    fill(w, M * K, -1, 1);
    fill(b, M, -1, 1);
    fill(y0, N * M, -1, 1);
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            double s = 0.0;
            for (int64_t k = 0; k < K; k++) s += fabs((double)x[n * K + k] * w[m * K + k]);
            mag[n * M + m] = s;
        }
    const double rel = 1e-5 * sqrt((double)K);
    char what[160];
    for (int with_bias = 0; with_bias <= 1; with_bias++)
        for (int acc = 0; acc <= 1; acc++) {
            const float *bp = with_bias ? b : NULL;
            memcpy(ref, y0, (size_t)(N * M) * sizeof(float));
            sf_matmul_naive(ref, x, w, bp, N, K, M, acc);
            static const int threads[] = {1, 2, 3};
            for (int ti = 0; ti < 3; ti++) {
                memcpy(y, y0, (size_t)(N * M) * sizeof(float));
                sf_matmul(y, x, w, bp, N, K, M, acc, pack, threads[ti]);
                int64_t bad = -1;
                double worst_ratio = 0.0;
                for (int64_t e = 0; e < N * M; e++) {
                    double start = acc ? fabs((double)y0[e]) : (bp ? fabs((double)bp[e % M]) : 0.0);
                    double tol = rel * (mag[e] + start) + 1e-30;
                    double r = isfinite(y[e]) ? fabs((double)y[e] - (double)ref[e]) / tol : INFINITY;
                    if (r > worst_ratio) { worst_ratio = r; bad = e; }
                }
                snprintf(what, sizeof what, "matmul N=%lld K=%lld M=%lld bias=%d acc=%d threads=%d",
                         (long long)N, (long long)K, (long long)M, with_bias, acc, threads[ti]);
                CHECK(worst_ratio <= 1.0, "%s: worst at [%lld]: got %.9g, naive %.9g (|err|/tol = %.3g)",
                      what, (long long)bad, (double)y[bad < 0 ? 0 : bad],
                      (double)ref[bad < 0 ? 0 : bad], worst_ratio);
            }
            /* the kernel promises bitwise-identical results for any thread count */
            memcpy(y1, y0, (size_t)(N * M) * sizeof(float));
            sf_matmul(y1, x, w, bp, N, K, M, acc, pack, 1);
            static const int more[] = {2, 4};
            for (int ti = 0; ti < 2; ti++) {
                memcpy(y, y0, (size_t)(N * M) * sizeof(float));
                sf_matmul(y, x, w, bp, N, K, M, acc, pack, more[ti]);
                snprintf(what, sizeof what, "matmul N=%lld K=%lld M=%lld bias=%d acc=%d: threads 1 vs %d",
                         (long long)N, (long long)K, (long long)M, with_bias, acc, more[ti]);
                CHECK_SAME(what, y1, y, N * M);
            }
        }
    free(x); free(w); free(b); free(y0); free(ref); free(y); free(y1); free(pack); free(mag);
}

/* A few rows (the decode path: no packing, weights transposed in registers) must give the
 * same bits as the same rows inside a big product (packed tiles): cached decoding relies on it. */
static void matmul_small_n_bits(void) {
    static const int64_t Ks[] = {1, 5, 8, 13, 64, 100}, Ms[] = {3, 8, 16, 33};
    const int64_t NB = 12;
    for (int ki = 0; ki < 6; ki++)
        for (int mi = 0; mi < 4; mi++)
            for (int acc = 0; acc <= 1; acc++) {
                const int64_t K = Ks[ki], M = Ms[mi];
                float *x = falloc(NB * K), *w = falloc(M * K), *b = falloc(M), *y0 = falloc(NB * M);
                float *big = falloc(NB * M), *small = falloc(4 * M), *pack = falloc(sf_matmul_pack_floats(K, M));
                fill(x, NB * K, -1, 1);
                fill(w, M * K, -1, 1);
                fill(b, M, -1, 1);
                fill(y0, NB * M, -1, 1);
                memcpy(big, y0, (size_t)(NB * M) * sizeof(float));
                sf_matmul(big, x, w, b, NB, K, M, acc, pack, 2);
                for (int64_t n = 1; n <= 4; n++) {
                    const int64_t r0 = NB - n; /* the last n rows */
                    memcpy(small, y0 + r0 * M, (size_t)(n * M) * sizeof(float));
                    sf_matmul(small, x + r0 * K, w, b, n, K, M, acc, pack, 2);
                    char what[120];
                    snprintf(what, sizeof what, "matmul decode rows N=%lld K=%lld M=%lld acc=%d vs packed",
                             (long long)n, (long long)K, (long long)M, acc);
                    CHECK_SAME(what, small, big + r0 * M, n * M);
                }
                free(x); free(w); free(b); free(y0); free(big); free(small); free(pack);
            }
}

static void test_matmul(void) {
    matmul_small_n_bits();
    static const int64_t dims[] = {1, 2, 5, 6, 7, 13, 16, 17, 31, 64, 100};
    const int nd = (int)(sizeof dims / sizeof dims[0]);
    for (int i = 0; i < nd; i++)
        for (int j = 0; j < nd; j++)
            for (int k = 0; k < nd; k++) matmul_case(dims[i], dims[j], dims[k]);
    /* big enough to really run threaded: threads split row tiles (N large) or, with fewer row
     * tiles than threads, 16-wide panels (N small) */
    matmul_case(300, 50, 33);
    matmul_case(7, 300, 200);
    matmul_case(1, 512, 160);

    CHECK(sf_matmul_pack_floats(5, 17) >= 5 * 17, "pack floats %lld", (long long)sf_matmul_pack_floats(5, 17));

    /* K = 0 is an empty sum: y = b (or 0), and accumulate leaves y as it was */
    float b[3] = {1.5f, -2.0f, 0.25f}, y[6], y0[6] = {1, 2, 3, 4, 5, 6}, pack[1];
    float want_b[6] = {1.5f, -2.0f, 0.25f, 1.5f, -2.0f, 0.25f}, zeros[6] = {0};
    memcpy(y, y0, sizeof y);
    sf_matmul(y, NULL, NULL, b, 2, 0, 3, 0, pack, 1);
    CHECK_SAME("matmul K=0 with bias", y, want_b, 6);
    memcpy(y, y0, sizeof y);
    sf_matmul(y, NULL, NULL, NULL, 2, 0, 3, 0, pack, 1);
    CHECK_SAME("matmul K=0 without bias", y, zeros, 6);
    memcpy(y, y0, sizeof y);
    sf_matmul(y, NULL, NULL, b, 2, 0, 3, 1, pack, 1);
    CHECK_SAME("matmul K=0 accumulate", y, y0, 6);
}

/* sf_gemm, the general form: y (row stride ldy) = A B (+ b), where A is a strided view
 * (here: stored transposed, a_rs = 1, a_cs = N, as the backward pass's dW = dy^T x uses it)
 * and B is w (stored (K, M), trans_w = 0) or w^T (w stored (M, K), trans_w = 1). It must be
 * the same arithmetic as sf_matmul on explicitly transposed copies, bit for bit, and leave the
 * columns of y past M alone. */
static void gemm_case(int64_t N, int64_t K, int64_t M) {
    const int64_t ldy = M + 3;
    float *at = falloc(K * N), *w_km = falloc(K * M), *b = falloc(M), *y0 = falloc(N * ldy);
    float *a_nk = falloc(N * K), *w_mk = falloc(M * K), *y0c = falloc(N * M);
    float *want = falloc(N * M), *y = falloc(N * ldy), *ref = falloc(N * M);
    int64_t pk = sf_gemm_pack_floats(N, K, M, 1), pk_matmul = sf_matmul_pack_floats(K, M);
    float *pack = falloc(pk > pk_matmul ? pk : pk_matmul); /* sf_gemm here, sf_matmul for want */
    fill(at, K * N, -1, 1);
    fill(w_km, K * M, -1, 1);
    fill(b, M, -1, 1);
    fill(y0, N * ldy, -1, 1);
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) a_nk[n * K + k] = at[k * N + n];
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) w_mk[m * K + k] = w_km[k * M + m];
    for (int64_t n = 0; n < N; n++) memcpy(y0c + n * M, y0 + n * ldy, (size_t)M * sizeof(float));
    char what[160];
    for (int acc = 0; acc <= 1; acc++) {
        const float *bp = acc ? NULL : b;
        memcpy(want, y0c, (size_t)(N * M) * sizeof(float));
        sf_matmul(want, a_nk, w_mk, bp, N, K, M, acc, pack, 1);
        memcpy(ref, y0c, (size_t)(N * M) * sizeof(float));
        sf_matmul_naive(ref, a_nk, w_mk, bp, N, K, M, acc);
        for (int trans_w = 0; trans_w <= 1; trans_w++)
            for (int nt = 1; nt <= 3; nt += 2) {
                memcpy(y, y0, (size_t)(N * ldy) * sizeof(float));
                sf_gemm(y, ldy, at, 1, N, trans_w ? w_mk : w_km, trans_w, bp, N, K, M, acc, pack, nt);
                int64_t differ = 0, gap = 0, far = 0;
                for (int64_t n = 0; n < N; n++) {
                    differ += first_difference(y + n * ldy, want + n * M, M) >= 0;
                    for (int64_t m = 0; m < M; m++)
                        far += !(fabs((double)y[n * ldy + m] - ref[n * M + m]) <= 1e-4 * sqrt((double)K) + 1e-6);
                    for (int64_t m = M; m < ldy; m++) gap += y[n * ldy + m] != y0[n * ldy + m];
                }
                snprintf(what, sizeof what, "gemm N=%lld K=%lld M=%lld acc=%d trans_w=%d threads=%d",
                         (long long)N, (long long)K, (long long)M, acc, trans_w, nt);
                CHECK(differ == 0, "%s: %lld rows differ from sf_matmul on transposed copies", what, (long long)differ);
                CHECK(far == 0, "%s: %lld values far from the naive loop", what, (long long)far);
                CHECK(gap == 0, "%s: %lld floats past column M of y modified", what, (long long)gap);
            }
    }
    free(at); free(w_km); free(b); free(y0); free(a_nk); free(w_mk); free(y0c); free(want);
    free(y); free(ref); free(pack);
}

/* sf_matmul_act = sf_matmul then sf_activation, bit for bit: every path (the decode rows
 * N <= 4, full and edge tiles, a team of threads), with y kept and with y NULL (in place). */
static void matmul_act_case(int64_t N, int64_t K, int64_t M) {
    float *x = falloc(N * K), *w = falloc(M * K), *b = falloc(M), *pack = falloc(sf_matmul_pack_floats(K, M));
    float *pre = falloc(N * M), *want = falloc(N * M), *y = falloc(N * M), *post = falloc(N * M);
    fill(x, N * K, -2, 2);
    fill(w, M * K, -1, 1);
    fill(b, M, -1, 1);
    sf_matmul(pre, x, w, b, N, K, M, 0, pack, 1);
    static const int acts[] = {SF_ACT_GELU, SF_ACT_GELU_TANH, SF_ACT_RELU};
    char what[160];
    for (int a = 0; a < 3; a++) {
        sf_activation(acts[a], want, pre, N * M, 1);
        for (int nt = 1; nt <= 3; nt += 2) {
            fill(y, N * M, -9, 9);
            fill(post, N * M, -9, 9);
            sf_matmul_act(y, post, acts[a], x, w, b, N, K, M, pack, nt);
            snprintf(what, sizeof what, "matmul_act N=%lld K=%lld M=%lld act=%d threads=%d: y",
                     (long long)N, (long long)K, (long long)M, acts[a], nt);
            CHECK_SAME(what, y, pre, N * M);
            snprintf(what, sizeof what, "matmul_act N=%lld K=%lld M=%lld act=%d threads=%d: act(y)",
                     (long long)N, (long long)K, (long long)M, acts[a], nt);
            CHECK_SAME(what, post, want, N * M);
            fill(post, N * M, -9, 9);
            sf_matmul_act(NULL, post, acts[a], x, w, b, N, K, M, pack, nt);
            snprintf(what, sizeof what, "matmul_act N=%lld K=%lld M=%lld act=%d threads=%d: y NULL",
                     (long long)N, (long long)K, (long long)M, acts[a], nt);
            CHECK_SAME(what, post, want, N * M);
        }
    }
    free(x); free(w); free(b); free(pack); free(pre); free(want); free(y); free(post);
}

/* sf_gemm with a contiguous A (row stride lda > K), against the operation order it promises:
 * each output starts at b (or 0, or y when accumulating) and takes one fmaf per k in ascending
 * order, written here as a scalar loop. Bitwise, so every tile path must agree with it: the
 * AVX-512 8 x 32 tiles (panel pairs, lone and partial panels, row edges), the AVX2 6 x 16
 * tiles (STACKFORMER_NO_AVX512=1) and the generic ones (STACKFORMER_NO_AVX2=1); B packed or,
 * small and untransposed, read in place; one thread or a team. */
static void gemm_order_case(int64_t N, int64_t K, int64_t M, int64_t nt) {
    const int64_t lda = K + 5, ldy = M + 3;
    float *a = falloc(N * lda), *w = falloc(K * M), *b = falloc(M), *y0 = falloc(N * ldy);
    float *y = falloc(N * ldy), *want = falloc(N * ldy), *pack = falloc(sf_gemm_pack_floats(N, K, M, 0));
    fill(a, N * lda, -1, 1);
    fill(w, K * M, -1, 1);
    fill(b, M, -1, 1);
    fill(y0, N * ldy, -1, 1);
    for (int trans_w = 0; trans_w <= 1; trans_w++)
        for (int mode = 0; mode < 3; mode++) { /* 0: bias, 1: no bias, 2: accumulate */
            const float *bp = mode == 0 ? b : NULL;
            const int acc = mode == 2;
            memcpy(want, y0, (size_t)(N * ldy) * sizeof(float));
            for (int64_t n = 0; n < N; n++)
                for (int64_t m = 0; m < M; m++) {
                    float s = acc ? y0[n * ldy + m] : (bp ? bp[m] : 0.0f);
                    for (int64_t k = 0; k < K; k++)
                        s = fmaf(a[n * lda + k], trans_w ? w[m * K + k] : w[k * M + m], s);
                    want[n * ldy + m] = s;
                }
            memcpy(y, y0, (size_t)(N * ldy) * sizeof(float));
            sf_gemm(y, ldy, a, lda, 1, w, trans_w, bp, N, K, M, acc, pack, (int)nt);
            char what[160];
            snprintf(what, sizeof what, "gemm order N=%lld K=%lld M=%lld trans_w=%d mode=%d threads=%lld",
                     (long long)N, (long long)K, (long long)M, trans_w, mode, (long long)nt);
            CHECK_SAME(what, y, want, N * ldy); /* also: the columns past M are left alone */
        }
    free(a); free(w); free(b); free(y0); free(y); free(want); free(pack);
}

static void test_gemm(void) {
    static const int64_t acts_shapes[][3] = {{1, 7, 9}, {4, 33, 40}, {5, 16, 16}, {13, 20, 37}, {300, 64, 96}};
    for (int i = 0; i < 5; i++) matmul_act_case(acts_shapes[i][0], acts_shapes[i][1], acts_shapes[i][2]);
    static const int64_t dims[] = {1, 5, 6, 7, 16, 17, 33};
    for (int i = 0; i < 7; i++)
        for (int j = 0; j < 7; j++)
            for (int k = 0; k < 7; k++) gemm_case(dims[i], dims[j], dims[k]);
    gemm_case(150, 64, 70); /* threaded */
    gemm_case(40, 300, 33); /* several K chunks of the strided-A path, edge tiles */
    gemm_case(97, 257, 48);
    /* rows: one 8-row tile, edges of 1-7 rows, 6-row AVX2 edges; columns: one panel, a pair,
     * a pair and a lone panel, a partial panel; K from 1 past the in-place limit for B */
    static const int64_t on[] = {1, 7, 8, 13, 16, 37}, ok[] = {1, 9, 32, 128}, om[] = {5, 16, 32, 48, 64, 72};
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < 4; j++)
            for (int k = 0; k < 6; k++) gemm_order_case(on[i], ok[j], om[k], 1);
    gemm_order_case(128, 128, 32, 1);  /* S's per-head P V: B read in place */
    gemm_order_case(130, 600, 64, 2);  /* B too big to read in place, packed; a team of two */
    gemm_order_case(200, 96, 176, 3);  /* 11 panels over three threads */
    gemm_order_case(300, 64, 96, 2);   /* threads split rows */
}

/* The optional BLAS backend (sf_set_blas_sgemm), with a reference cblas_sgemm written here
 * in both integer widths: it reads its operands exactly as CBLAS defines them (so under
 * AddressSanitizer a wrong leading dimension or transpose flag from sf_gemm reads out of
 * bounds), and counts its calls (so a product that silently stayed on the tiles fails). */
static _Atomic long g_blas_calls; /* products split over threads call it from each */
static int g_blas_broken; /* 1: ignore transB, as a function with another layout would */
static void ref_sgemm(int order, int ta, int tb, int64_t R, int64_t C, int64_t K, float alpha,
                      const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *Y,
                      int64_t ldc) {
    g_blas_calls++;
    if (order != 101) return;
    if (g_blas_broken) tb = 111;
    for (int64_t r = 0; r < R; r++)
        for (int64_t c = 0; c < C; c++) {
            double s = 0.0;
            for (int64_t k = 0; k < K; k++)
                s += (double)(ta == 111 ? A[r * lda + k] : A[k * lda + r]) *
                     (tb == 111 ? B[k * ldb + c] : B[c * ldb + k]);
            Y[r * ldc + c] = (float)(alpha * s + (beta != 0.0f ? beta * (double)Y[r * ldc + c] : 0.0));
        }
}
static void ref_cblas32(int o, int ta, int tb, int32_t R, int32_t C, int32_t K, float al,
                        const float *A, int32_t lda, const float *B, int32_t ldb, float be, float *Y,
                        int32_t ldc) {
    ref_sgemm(o, ta, tb, R, C, K, al, A, lda, B, ldb, be, Y, ldc);
}
static void ref_cblas64(int o, int ta, int tb, int64_t R, int64_t C, int64_t K, float al,
                        const float *A, int64_t lda, const float *B, int64_t ldb, float be, float *Y,
                        int64_t ldc) {
    ref_sgemm(o, ta, tb, R, C, K, al, A, lda, B, ldb, be, Y, ldc);
}

/* One product through sf_gemm with the backend set: A stored (N, lda) (a_rs = lda, a_cs = 1),
 * transposed (a_rs = 1, a_cs = N) or with both strides > 1 (stays on the tiles, bit for bit),
 * each with bias / no bias / accumulate and both layouts of w; against a double loop. */
static void blas_gemm_case(int64_t N, int64_t K, int64_t M) {
    const int64_t lda = K + 2, ldy = M + 3;
    float *a = falloc(N * lda), *at = falloc(K * N), *a2 = falloc(2 * N * K), *w = falloc(K * M);
    float *b = falloc(M), *y0 = falloc(N * ldy), *y = falloc(N * ldy), *tiles = falloc(N * ldy);
    float *pack = falloc(sf_gemm_pack_floats(N, K, M, 1) + sf_gemm_pack_floats(N, K, M, 0));
    fill(a, N * lda, -1, 1);
    fill(w, K * M, -1, 1);
    fill(b, M, -1, 1);
    fill(y0, N * ldy, -1, 1);
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) {
            at[k * N + n] = a[n * lda + k];
            a2[n * 2 * K + 2 * k] = a[n * lda + k]; /* a_rs = 2K, a_cs = 2 */
        }
    char what[200];
    for (int layout = 0; layout < 3; layout++)
        for (int trans_w = 0; trans_w <= 1; trans_w++)
            for (int mode = 0; mode < 3; mode++) { /* 0: bias, 1: none, 2: accumulate */
                const float *bp = mode == 0 ? b : NULL, *ap = layout == 0 ? a : layout == 1 ? at : a2;
                const int64_t rs = layout == 0 ? lda : layout == 1 ? 1 : 2 * K, cs = layout == 0 ? 1 : layout == 1 ? N : 2;
                const int acc = mode == 2;
                memcpy(y, y0, (size_t)(N * ldy) * sizeof(float));
                long calls = g_blas_calls;
                sf_gemm(y, ldy, ap, rs, cs, w, trans_w, bp, N, K, M, acc, pack, 2);
                int64_t far = 0, gap = 0;
                for (int64_t n = 0; n < N; n++) {
                    for (int64_t m = 0; m < M; m++) {
                        double s = acc ? y0[n * ldy + m] : (bp ? bp[m] : 0.0);
                        for (int64_t k = 0; k < K; k++)
                            s += (double)a[n * lda + k] * (trans_w ? w[m * K + k] : w[k * M + m]);
                        far += !(fabs(y[n * ldy + m] - s) <= 1e-5 * (sqrt((double)K) + fabs(s)));
                    }
                    for (int64_t m = M; m < ldy; m++) gap += y[n * ldy + m] != y0[n * ldy + m];
                }
                snprintf(what, sizeof what, "blas gemm N=%lld K=%lld M=%lld layout=%d trans_w=%d mode=%d",
                         (long long)N, (long long)K, (long long)M, layout, trans_w, mode);
                CHECK(far == 0, "%s: %lld values far from the double loop", what, (long long)far);
                CHECK(gap == 0, "%s: %lld floats past column M of y modified", what, (long long)gap);
                long n_calls = g_blas_calls - calls;
                CHECK(layout < 2 ? n_calls >= 1 && n_calls <= 2 : n_calls == 0, "%s: %ld BLAS calls", what, n_calls);
                if (layout == 2) { /* general strides stay on the tiles: their exact bits */
                    memcpy(tiles, y0, (size_t)(N * ldy) * sizeof(float));
                    sf_set_blas_sgemm(NULL, 0, NULL, 0);
                    sf_gemm(tiles, ldy, ap, rs, cs, w, trans_w, bp, N, K, M, acc, pack, 2);
                    sf_set_blas_sgemm((void *)ref_cblas32, 0, NULL, 0);
                    CHECK_SAME(what, y, tiles, N * ldy);
                }
            }
    /* the activation epilogue after the BLAS: post = act(y) bit for bit */
    float *xx = falloc(N * K), *ww = falloc(M * K), *pre = falloc(N * M), *post = falloc(N * M), *want = falloc(N * M);
    fill(xx, N * K, -2, 2);
    fill(ww, M * K, -1, 1);
    sf_matmul_act(pre, post, SF_ACT_GELU, xx, ww, b, N, K, M, pack, 2);
    sf_activation(SF_ACT_GELU, want, pre, N * M, 1);
    snprintf(what, sizeof what, "blas matmul_act N=%lld K=%lld M=%lld", (long long)N, (long long)K, (long long)M);
    CHECK_SAME(what, post, want, N * M);
    free(a); free(at); free(a2); free(w); free(b); free(y0); free(y); free(tiles); free(pack);
    free(xx); free(ww); free(pre); free(post); free(want);
}

static void test_blas_backend(void) {
    const char *tile = sf_matmul_kernel();
    char err[256] = "";
    CHECK(sf_set_blas_sgemm((void *)ref_cblas32, 0, err, sizeof err) == SF_OK, "32-bit reference refused: %s", err);
    CHECK(strcmp(sf_matmul_kernel(), "blas") == 0, "kernel with a BLAS set: %s", sf_matmul_kernel());
    static const int64_t dims[] = {1, 4, 5, 17, 40};
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 5; j++)
            for (int k = 0; k < 5; k++) blas_gemm_case(dims[i], dims[j], dims[k]);
    blas_gemm_case(200, 96, 80); /* past the one-thread limit: two threads split the rows */
    blas_gemm_case(37, 300, 100); /* 33 rows or fewer: too few to split */
    /* the 64-bit signature */
    CHECK(sf_set_blas_sgemm((void *)ref_cblas64, 1, err, sizeof err) == SF_OK, "64-bit reference refused: %s", err);
    blas_gemm_case(33, 20, 18);
    /* a function that gets products wrong is refused, and the previous one stays */
    g_blas_broken = 1;
    err[0] = 0;
    sf_status st = sf_set_blas_sgemm((void *)ref_cblas32, 0, err, sizeof err);
    g_blas_broken = 0;
    CHECK(st == SF_ERR_INVALID_ARG && strstr(err, "probe"), "broken BLAS: status %d, message '%s'", (int)st, err);
    long calls = g_blas_calls;
    blas_gemm_case(6, 7, 8);
    CHECK(g_blas_calls > calls, "after a refused BLAS the previous one (64-bit) stopped running");
    CHECK(sf_set_blas_sgemm((void *)ref_cblas64, 2, err, sizeof err) == SF_ERR_INVALID_ARG, "ilp64 = 2 accepted");
    /* NULL: back to the tiles */
    CHECK(sf_set_blas_sgemm(NULL, 0, err, sizeof err) == SF_OK, "NULL refused");
    CHECK(strcmp(sf_matmul_kernel(), tile) == 0, "kernel after NULL: %s, before: %s", sf_matmul_kernel(), tile);
    calls = g_blas_calls;
    gemm_order_case(13, 9, 37, 2);
    CHECK(g_blas_calls == calls, "BLAS still called after NULL");
}

/* ============================================================================================
 * 2. Norms, activations, RoPE, small helpers
 * ============================================================================================ */

/* tol: what float32 arithmetic may lose per element. Centering costs about one rounding of
 * the mean, ulp(|x|); the normalization multiplies that by 1/std, which is large when a row's
 * values nearly coincide (var ~ eps). */
static void layernorm_naive(double *y, double *tol, const float *x, const float *w,
                            const float *b, int64_t N, int64_t d, double eps) {
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * d;
        double mean = 0.0, var = 0.0;
        for (int64_t i = 0; i < d; i++) mean += xr[i];
        mean /= (double)d;
        for (int64_t i = 0; i < d; i++) var += (xr[i] - mean) * (xr[i] - mean);
        var /= (double)d;
        const double rstd = 1.0 / sqrt(var + eps);
        for (int64_t i = 0; i < d; i++) {
            double wi = w ? w[i] : 1.0;
            y[n * d + i] = (xr[i] - mean) * rstd * wi + (b ? b[i] : 0.0);
            tol[n * d + i] = 1e-5 * (1.0 + fabs(y[n * d + i])) +
                             4.0 * FLT_EPSILON * (fabs(xr[i]) + fabs(mean)) * rstd * fabs(wi);
        }
    }
}

static void rmsnorm_naive(double *y, const float *x, const float *w, int64_t N, int64_t d,
                          double eps) {
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * d;
        double ss = 0.0;
        for (int64_t i = 0; i < d; i++) ss += (double)xr[i] * xr[i];
        for (int64_t i = 0; i < d; i++) y[n * d + i] = xr[i] / sqrt(ss / (double)d + eps) * (w ? w[i] : 1.0);
    }
}

static void test_norms(void) {
    static const int64_t dims[] = {1, 2, 7, 64, 100};
    static const int64_t rows[] = {1, 5, 700}; /* 700 x 100 crosses the threading threshold */
    const float eps = 1e-5f;
    char what[160];
    for (int di = 0; di < 5; di++)
        for (int ri = 0; ri < 3; ri++) {
            int64_t d = dims[di], N = rows[ri];
            float *x = falloc(N * d), *w = falloc(d), *b = falloc(d), *y = falloc(N * d);
            float *y1 = falloc(N * d);
            double *ref = dalloc(N * d), *tol = dalloc(N * d);
            fill(x, N * d, 1.0f, 5.0f); /* a mean far from 0: the centering matters */
            fill(w, d, 0.5f, 1.5f);
            fill(b, d, -1.0f, 1.0f);
            for (int affine = 0; affine < 4; affine++) {
                const float *wp = (affine & 1) ? w : NULL, *bp = (affine & 2) ? b : NULL;
                layernorm_naive(ref, tol, x, wp, bp, N, d, eps);
                for (int nt = 1; nt <= 3; nt += 2) {
                    sf_layernorm(y, x, wp, bp, N, d, eps, nt);
                    snprintf(what, sizeof what, "layernorm N=%lld d=%lld w=%d b=%d threads=%d",
                             (long long)N, (long long)d, wp != NULL, bp != NULL, nt);
                    int64_t worst_i = 0;
                    double worst_r = 0.0;
                    for (int64_t e = 0; e < N * d; e++) {
                        double r = isfinite(y[e]) ? fabs(y[e] - ref[e]) / tol[e] : INFINITY;
                        if (r > worst_r) { worst_r = r; worst_i = e; }
                    }
                    CHECK(worst_r <= 1.0, "%s: worst at [%lld]: got %.9g, want %.9g (|err|/tol = %.3g)",
                          what, (long long)worst_i, (double)y[worst_i], ref[worst_i], worst_r);
                }
                /* in place (y aliases x) gives the same bits */
                memcpy(y1, x, (size_t)(N * d) * sizeof(float));
                sf_layernorm(y1, y1, wp, bp, N, d, eps, 1);
                snprintf(what, sizeof what, "layernorm in place N=%lld d=%lld", (long long)N, (long long)d);
                CHECK_SAME(what, y1, y, N * d);
            }
            for (int affine = 0; affine < 2; affine++) {
                const float *wp = affine ? w : NULL;
                rmsnorm_naive(ref, x, wp, N, d, eps);
                for (int nt = 1; nt <= 3; nt += 2) {
                    sf_rmsnorm(y, x, wp, N, d, eps, nt);
                    snprintf(what, sizeof what, "rmsnorm N=%lld d=%lld w=%d threads=%d",
                             (long long)N, (long long)d, wp != NULL, nt);
                    CHECK_CLOSE(what, y, ref, N * d, 1e-6, 1e-5);
                }
                memcpy(y1, x, (size_t)(N * d) * sizeof(float));
                sf_rmsnorm(y1, y1, wp, N, d, eps, 1);
                snprintf(what, sizeof what, "rmsnorm in place N=%lld d=%lld", (long long)N, (long long)d);
                CHECK_SAME(what, y1, y, N * d);
            }
            free(x); free(w); free(b); free(y); free(y1); free(ref); free(tol);
        }
}

static double gelu_ref(double x) { return 0.5 * x * (1.0 + erf(x / sqrt(2.0))); }
static double gelu_tanh_ref(double x) {
    const double k = 0.79788456080286535588; /* sqrt(2/pi) */
    return 0.5 * x * (1.0 + tanh(k * (x + 0.044715 * x * x * x)));
}
static double relu_ref(double x) { return x > 0.0 ? x : 0.0; }

static void test_activations(void) {
    const int64_t n = 70001; /* above the elementwise threading threshold (65536) */
    float *x = falloc(n), *up = falloc(n), *y = falloc(n), *y1 = falloc(n);
    double *ref = dalloc(n);
    /* a dense grid over [-10, 10], a few extremes, then random values */
    for (int64_t i = 0; i < 2001; i++) x[i] = -10.0f + 0.01f * (float)i;
    const float extremes[] = {0.0f, -0.0f, 30.0f, -30.0f, 88.0f, -88.0f, 100.0f, -100.0f, 1e-30f, -1e-30f};
    memcpy(x + 2001, extremes, sizeof extremes);
    fill(x + 2011, n - 2011, -6.0f, 6.0f);
    fill(up, n, -2.0f, 2.0f);

    struct { const char *name; void (*fn)(float *, int64_t, int); double (*ref)(double); } acts[] = {
        {"gelu", sf_gelu, gelu_ref},
        {"gelu_tanh", sf_gelu_tanh, gelu_tanh_ref},
        {"relu", sf_relu, relu_ref},
    };
    char what[96];
    for (int a = 0; a < 3; a++) {
        for (int64_t i = 0; i < n; i++) ref[i] = acts[a].ref(x[i]);
        memcpy(y1, x, (size_t)n * sizeof(float));
        acts[a].fn(y1, n, 1);
        snprintf(what, sizeof what, "%s vs double formula", acts[a].name);
        CHECK_CLOSE(what, y1, ref, n, 1e-6, 1e-5);
        /* every vector path (AVX-512, AVX2, portable) gives the scalar function's bits */
        float (*one)(float) = a == 0 ? sf_gelu1 : a == 1 ? sf_gelu_tanh1 : sf_relu1;
        int64_t differ = 0;
        for (int64_t i = 0; i < n; i++) {
            volatile float v = one(x[i]); /* volatile: one value at a time, as written */
            float vv = v;
            differ += memcmp(&vv, &y1[i], sizeof(float)) != 0;
        }
        CHECK(differ == 0, "%s: %lld values differ from the scalar function", acts[a].name, (long long)differ);
        memcpy(y, x, (size_t)n * sizeof(float));
        acts[a].fn(y, n, 3);
        snprintf(what, sizeof what, "%s threads 1 vs 3", acts[a].name);
        CHECK_SAME(what, y1, y, n);
    }
    /* relu is exact */
    memcpy(y, x, (size_t)n * sizeof(float));
    sf_relu(y, n, 1);
    int64_t inexact = 0;
    for (int64_t i = 0; i < n; i++) inexact += y[i] != (x[i] > 0.0f ? x[i] : 0.0f);
    CHECK(inexact == 0, "relu: %lld values not exactly max(x, 0)", (long long)inexact);

    /* swiglu: out = silu(gate) * up; out may alias gate */
    for (int64_t i = 0; i < n; i++) ref[i] = x[i] / (1.0 + exp(-(double)x[i])) * up[i];
    sf_swiglu(y1, x, up, n, 1);
    CHECK_CLOSE("swiglu vs double formula", y1, ref, n, 1e-6, 1e-5);
    memcpy(y, x, (size_t)n * sizeof(float));
    sf_swiglu(y, y, up, n, 3);
    CHECK_SAME("swiglu in place, threads 1 vs 3", y1, y, n);

    /* sf_add: y += x, exact */
    memcpy(y, x, (size_t)n * sizeof(float));
    sf_add(y, up, n, 3);
    inexact = 0;
    for (int64_t i = 0; i < n; i++) inexact += y[i] != x[i] + up[i];
    CHECK(inexact == 0, "sf_add: %lld values differ from x + y", (long long)inexact);

    /* sf_rms: sqrt(mean(x^2)) in double; 0 for an empty input */
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)up[i] * up[i];
    double want = sqrt(ss / (double)n), got = sf_rms(up, n);
    CHECK(fabs(got - want) <= 1e-12 * want, "sf_rms: got %.17g, want %.17g", got, want);
    CHECK(sf_rms(up, 0) == 0.0, "sf_rms of nothing: %g", sf_rms(up, 0));

    free(x); free(up); free(y); free(y1); free(ref);
}

/* RoPE, half-split ("rotate_half"): for j < dh/2, angle = t * theta^(-2j/dh) with
 * t = pos0 + row % T, (x_j, x_{j+dh/2}) -> (x_j cos - x_{j+dh/2} sin, x_{j+dh/2} cos + x_j sin). */
static void rope_naive(double *y, const float *x, int64_t N, int64_t T, int64_t pos0, int64_t H,
                       int64_t dh, int64_t ld, double theta) {
    for (int64_t r = 0; r < N; r++) {
        for (int64_t c = 0; c < ld; c++) y[r * ld + c] = x[r * ld + c]; /* stride gap untouched */
        for (int64_t h = 0; h < H; h++)
            for (int64_t j = 0; j < dh / 2; j++) {
                double ang = (double)(pos0 + r % T) * pow(theta, -2.0 * (double)j / (double)dh);
                double a = x[r * ld + h * dh + j], b = x[r * ld + h * dh + j + dh / 2];
                y[r * ld + h * dh + j] = a * cos(ang) - b * sin(ang);
                y[r * ld + h * dh + j + dh / 2] = b * cos(ang) + a * sin(ang);
            }
    }
}

static void test_rope(void) {
    struct { int64_t N, T, pos0, H, dh, gap; float theta; } cases[] = {
        {22, 11, 0, 3, 2, 5, 10000.0f},
        {22, 11, 0, 3, 8, 0, 10000.0f},
        {14, 7, 0, 2, 16, 3, 500.0f},
        {6, 1, 9, 2, 8, 0, 10000.0f},  /* decoding: one new position per row, after 9 cached */
        {12, 3, 40, 4, 8, 2, 10000.0f},
        {2000, 1000, 0, 4, 16, 1, 10000.0f}, /* long positions, and large enough to thread */
    };
    char what[160];
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        int64_t N = cases[ci].N, T = cases[ci].T, pos0 = cases[ci].pos0, H = cases[ci].H;
        int64_t dh = cases[ci].dh;
        int64_t ld = H * dh + cases[ci].gap;
        float *x = falloc(N * ld), *y = falloc(N * ld), *y1 = falloc(N * ld);
        double *ref = dalloc(N * ld);
        fill(x, N * ld, -1.0f, 1.0f);
        rope_naive(ref, x, N, T, pos0, H, dh, ld, cases[ci].theta);
        memcpy(y1, x, (size_t)(N * ld) * sizeof(float));
        float *cs = falloc(T * dh);
        sf_rope_table(cs, T, pos0, dh, cases[ci].theta, 2);
        sf_rope(y1, N, T, H, dh, ld, cs, 1);
        snprintf(what, sizeof what, "rope N=%lld T=%lld pos0=%lld H=%lld dh=%lld ld=%lld theta=%g",
                 (long long)N, (long long)T, (long long)pos0, (long long)H, (long long)dh,
                 (long long)ld, (double)cases[ci].theta);
        CHECK_CLOSE(what, y1, ref, N * ld, 1e-5, 1e-5);
        int64_t gap_touched = 0; /* columns past H*dh in each row must keep their bits */
        for (int64_t r = 0; r < N; r++)
            for (int64_t c = H * dh; c < ld; c++) gap_touched += y1[r * ld + c] != x[r * ld + c];
        CHECK(gap_touched == 0, "%s: %lld stride-gap floats modified", what, (long long)gap_touched);
        memcpy(y, x, (size_t)(N * ld) * sizeof(float));
        sf_rope(y, N, T, H, dh, ld, cs, 3);
        CHECK_SAME(what, y1, y, N * ld);
        sf_rope_backward(y, N, T, H, dh, ld, cs, 2); /* the inverse rotation gives x back */
        CHECK_CLOSE_F(what, y, x, N * ld, 1e-5, 1e-5);
        free(x); free(y); free(y1); free(ref); free(cs);
    }
}

/* ============================================================================================
 * 3. Attention (with MoDA depth slots) vs a direct double-precision implementation
 * ============================================================================================ */

/* Column col of query row (b, kv head g, position t) under the contract below: its float
 * offset into (k, v) when a sequence column, into (depth_k, depth_v) when a depth column
 * (returns 1 then), and the key position u it belongs to. */
static int naive_column(const sf_attn_args *a, int64_t b, int64_t g, int64_t t, int64_t col,
                        int64_t *off, int64_t *u) {
    const int64_t Tk = a->Tk, nd = a->n_read, C = a->chunk, dh = a->dh, Hkv = a->Hkv;
    if (col < Tk) {
        *u = col;
        *off = b * a->kv_bstride + (col * Hkv + g) * dh;
        return 0;
    }
    int64_t c = col - Tk, i = c % nd;
    *u = (t / C) * C + c / nd;
    *off = b * a->depth_bstride + ((g * a->depth_len + *u) * a->n_slots + i) * dh; /* (B, Hkv, len, n_slots, dh) */
    return 1;
}

/* The contract (sf_internal.h, DEVELOPERS.md "The math", moda_visibility in tests/reference.py):
 * query row (b, h, tq) sits at absolute position t = q_pos0 + tq and has Tk + n_read*chunk
 * columns; query head h reads kv head h / (H/Hkv).
 *   sequence column u < Tk: visible iff !(depth_only && n_read > 0), (!causal || u <= t), and
 *     key u is not padding;
 *   depth column c: slot i = c % n_read of position u = chunk_start(t) + c / n_read, visible iff
 *     u <= t and position u is not padding (a padded position exposes no keys at all).
 * logits q.k/sqrt(dh); one softmax over the visible columns; a row with nothing visible has
 * p = 0, output 0 and lse = -inf. depth_mass = sum of p over the depth columns. */
static void attention_naive(const sf_attn_args *a, const float *q, double *out, double *lse,
                            double *probs, double *depth_mass) {
    const int64_t B = a->B, Tq = a->Tq, Tk = a->Tk, H = a->H, Hkv = a->Hkv, dh = a->dh;
    const int64_t G = H / Hkv, nd = a->n_read, C = a->chunk, W = Tk + nd * C;
    const double scale = 1.0 / sqrt((double)dh);
    double *logit = dalloc(W);
    int *vis = xmalloc((size_t)W * sizeof(int));
    const float **keys = xmalloc((size_t)W * sizeof(float *));
    const float **vals = xmalloc((size_t)W * sizeof(float *));
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t tq = 0; tq < Tq; tq++) {
                const int64_t row = (b * H + h) * Tq + tq, g = h / G;
                const int64_t t = a->q_pos0 + tq;
                const float *qt = q + (b * Tq + tq) * H * dh + h * dh;
                double mx = -INFINITY;
                for (int64_t col = 0; col < W; col++) {
                    int64_t u, off;
                    const int depth = naive_column(a, b, g, t, col, &off, &u);
                    const float *kb = depth ? a->depth_k : a->k, *vb = depth ? a->depth_v : a->v;
                    vis[col] = depth ? u <= t : !(a->depth_only && nd > 0) && (!a->causal || u <= t);
                    if (vis[col] && a->key_padding_mask && !a->key_padding_mask[b * Tk + u]) vis[col] = 0;
                    if (!vis[col]) continue;
                    keys[col] = kb + off;
                    vals[col] = vb + off;
                    double s = 0.0;
                    for (int64_t e = 0; e < dh; e++) s += (double)qt[e] * keys[col][e];
                    logit[col] = s * scale;
                    if (logit[col] > mx) mx = logit[col];
                }
                double sum = 0.0;
                for (int64_t col = 0; col < W; col++) sum += vis[col] ? exp(logit[col] - mx) : 0.0;
                lse[row] = mx == -INFINITY ? -INFINITY : mx + log(sum);
                double *ot = out + (b * Tq + tq) * H * dh + h * dh, dmass = 0.0;
                for (int64_t e = 0; e < dh; e++) ot[e] = 0.0;
                for (int64_t col = 0; col < W; col++) {
                    double p = vis[col] ? exp(logit[col] - mx) / sum : 0.0;
                    probs[row * W + col] = p;
                    if (p == 0.0) continue;
                    if (col >= Tk) dmass += p;
                    for (int64_t e = 0; e < dh; e++) ot[e] += p * vals[col][e];
                }
                depth_mass[row] = dmass;
            }
    free(logit); free(vis); free(keys); free(vals);
}

/* Gradients of that contract in double, from the naive probabilities and output: with
 * D = dO . out and dS_c = p_c (dO . v_c - D) / sqrt(dh), dq += dS_c k_c, dk_c += dS_c q,
 * dv_c += p_c dO. dq, dk, dv (sequence keys) and ddk, ddv (arena-shaped) are overwritten. */
static void attention_naive_backward(const sf_attn_args *a, const float *q, const float *dout,
                                     const double *out, const double *probs, double *dq,
                                     double *dk, double *dv, double *ddk, double *ddv,
                                     int64_t arena) {
    const int64_t B = a->B, Tq = a->Tq, Tk = a->Tk, H = a->H, Hkv = a->Hkv, dh = a->dh;
    const int64_t G = H / Hkv, nd = a->n_read, C = a->chunk, W = Tk + nd * C;
    const double scale = 1.0 / sqrt((double)dh);
    memset(dq, 0, (size_t)(B * Tq * H * dh) * sizeof(double));
    memset(dk, 0, (size_t)(B * a->kv_bstride) * sizeof(double));
    memset(dv, 0, (size_t)(B * a->kv_bstride) * sizeof(double));
    memset(ddk, 0, (size_t)arena * sizeof(double));
    memset(ddv, 0, (size_t)arena * sizeof(double));
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t tq = 0; tq < Tq; tq++) {
                const int64_t row = (b * H + h) * Tq + tq, g = h / G;
                const int64_t t = a->q_pos0 + tq;
                const float *qt = q + (b * Tq + tq) * H * dh + h * dh;
                const float *go = dout + (b * Tq + tq) * H * dh + h * dh;
                const double *ot = out + (b * Tq + tq) * H * dh + h * dh;
                double *dqt = dq + (b * Tq + tq) * H * dh + h * dh, D = 0.0;
                for (int64_t e = 0; e < dh; e++) D += (double)go[e] * ot[e];
                for (int64_t col = 0; col < W; col++) {
                    const double p = probs[row * W + col];
                    if (p == 0.0) continue; /* invisible */
                    int64_t off, u;
                    const int depth = naive_column(a, b, g, t, col, &off, &u);
                    const float *kb = depth ? a->depth_k : a->k, *vb = depth ? a->depth_v : a->v;
                    double *gk = depth ? ddk : dk, *gv = depth ? ddv : dv;
                    double dpv = 0.0;
                    for (int64_t e = 0; e < dh; e++) dpv += (double)go[e] * vb[off + e];
                    const double ds = p * (dpv - D) * scale;
                    for (int64_t e = 0; e < dh; e++) {
                        dqt[e] += ds * kb[off + e];
                        gk[off + e] += ds * qt[e];
                        gv[off + e] += p * go[e];
                    }
                }
            }
}

typedef struct {
    int64_t B, T, H, Hkv, dh, n_slots;
    const uint8_t *mask;
    const char *mask_name;
} attn_shape;

/* Copy rows (B, T, row) into a buffer of capacity (B, cap, row), the layout of a cache. */
static float *to_capacity(const float *x, int64_t B, int64_t T, int64_t cap, int64_t row) {
    float *y = falloc(B * cap * row);
    fill(y, B * cap * row, 1e6f, 1e6f); /* never read: would show up in any output */
    for (int64_t b = 0; b < B; b++) memcpy(y + b * cap * row, x + b * T * row, (size_t)(T * row) * sizeof(float));
    return y;
}

/* One attention configuration over T queries and T keys: compare out / lse / probs /
 * depth_mass with the naive version and check the probability rows; then the same attention
 * evaluated for the last 2 queries only (q_pos0 = T-2) with keys, values and depth slots held
 * in larger cache-like buffers must reproduce those rows bit for bit. */
static void attention_case(const attn_shape *s, int causal, int64_t n_read, int64_t chunk,
                           int depth_only, int nt) {
    const int64_t B = s->B, T = s->T, H = s->H, Hkv = s->Hkv, dh = s->dh, ns = s->n_slots;
    const int64_t W = T + n_read * chunk, rows = B * H * T, qd = H * dh, kvd = Hkv * dh;
    const int64_t arena = B * T * ns * kvd;
    float *q = falloc(B * T * qd), *k = falloc(B * T * kvd), *v = falloc(B * T * kvd);
    float *dk = falloc(arena), *dv = falloc(arena);
    fill(q, B * T * qd, -2.0f, 2.0f); /* |q| ~ 1: peaked but not one-hot softmax rows */
    fill(k, B * T * kvd, -1.0f, 1.0f);
    fill(v, B * T * kvd, -1.0f, 1.0f);
    fill(dk, arena, -1.0f, 1.0f);
    fill(dv, arena, -1.0f, 1.0f);
    sf_attn_args a = {.B = B, .Tq = T, .Tk = T, .q_pos0 = 0, .H = H, .Hkv = Hkv, .dh = dh,
                      .causal = causal, .key_padding_mask = s->mask, .k = k, .v = v,
                      .kv_bstride = T * kvd, .depth_k = dk, .depth_v = dv,
                      .depth_bstride = T * ns * kvd, .depth_len = T, .n_slots = ns, .n_read = n_read,
                      .chunk = chunk, .depth_only = depth_only};

    float *out = falloc(B * T * qd), *out2 = falloc(B * T * qd), *lse = falloc(rows);
    float *probs = falloc(rows * W), *dmass = falloc(rows);
    float *scratch = falloc(sf_attention_scratch_floats(&a, nt));
    double *rout = dalloc(B * T * qd), *rlse = dalloc(rows), *rprobs = dalloc(rows * W);
    double *rdmass = dalloc(rows);
    sf_attention_forward(&a, q, out, lse, probs, dmass, scratch, nt);
    attention_naive(&a, q, rout, rlse, rprobs, rdmass);

    char what[200], sub[260];
    snprintf(what, sizeof what,
             "attention B=%lld T=%lld H=%lld Hkv=%lld dh=%lld causal=%d mask=%s n_read=%lld "
             "chunk=%lld depth_only=%d threads=%d",
             (long long)B, (long long)T, (long long)H, (long long)Hkv, (long long)dh, causal,
             s->mask_name, (long long)n_read, (long long)chunk, depth_only, nt);
    snprintf(sub, sizeof sub, "%s: out", what);
    CHECK_CLOSE(sub, out, rout, B * T * qd, 1e-5, 0.0);
    snprintf(sub, sizeof sub, "%s: probs", what);
    CHECK_CLOSE(sub, probs, rprobs, rows * W, 1e-6, 0.0);
    snprintf(sub, sizeof sub, "%s: depth_mass", what);
    CHECK_CLOSE(sub, dmass, rdmass, rows, 1e-6, 0.0);
    int64_t bad_lse = 0; /* finite rows close, empty rows exactly -inf */
    for (int64_t r = 0; r < rows; r++)
        bad_lse += isinf(rlse[r]) ? !(isinf(lse[r]) && lse[r] < 0) : !(fabs(lse[r] - rlse[r]) <= 1e-5 * (1.0 + fabs(rlse[r])));
    CHECK(bad_lse == 0, "%s: %lld wrong log-sum-exp values", what, (long long)bad_lse);

    /* each row: invisible columns exactly 0; visible ones sum to 1, or the row is all zeros
     * (output exactly 0) when nothing is visible */
    int64_t leaked = 0, bad_sum = 0, empty_not_zero = 0;
    for (int64_t r = 0; r < rows; r++) {
        double sum = 0.0;
        int any = 0;
        for (int64_t c = 0; c < W; c++) {
            if (rprobs[r * W + c] == 0.0 && probs[r * W + c] != 0.0) leaked++;
            sum += probs[r * W + c];
            any |= rprobs[r * W + c] != 0.0;
        }
        if (any && fabs(sum - 1.0) > 1e-5) bad_sum++;
        if (!any) {
            int64_t b = r / (H * T), h = (r / T) % H, t = r % T;
            const float *ot = out + (b * T + t) * qd + h * dh;
            for (int64_t e = 0; e < dh; e++) empty_not_zero += ot[e] != 0.0f;
            empty_not_zero += dmass[r] != 0.0f || sum != 0.0;
        }
    }
    CHECK(leaked == 0, "%s: %lld invisible columns got probability", what, (long long)leaked);
    CHECK(bad_sum == 0, "%s: %lld rows whose probabilities do not sum to 1", what, (long long)bad_sum);
    CHECK(empty_not_zero == 0, "%s: %lld nonzero values in rows with nothing visible", what,
          (long long)empty_not_zero);

    /* recordings are optional and never change the output */
    sf_attention_forward(&a, q, out2, NULL, NULL, NULL, scratch, nt);
    snprintf(sub, sizeof sub, "%s: out without recordings", what);
    CHECK_SAME(sub, out, out2, B * T * qd);
    if (nt != 1) { /* every row is computed by one thread: identical for any thread count */
        float *s1 = falloc(sf_attention_scratch_floats(&a, 1));
        sf_attention_forward(&a, q, out2, NULL, NULL, NULL, s1, 1);
        snprintf(sub, sizeof sub, "%s: threads %d vs 1", what, nt);
        CHECK_SAME(sub, out, out2, B * T * qd);
        free(s1);
    }

    /* the last Tq = 2 queries alone, keys/values/depth slots in buffers of capacity T + 3 */
    if (T >= 2) {
        const int64_t Tq = 2, cap = T + 3;
        float *qd_rows = falloc(B * Tq * qd);
        for (int64_t b = 0; b < B; b++)
            memcpy(qd_rows + b * Tq * qd, q + (b * T + T - Tq) * qd, (size_t)(Tq * qd) * sizeof(float));
        float *kc = to_capacity(k, B, T, cap, kvd), *vc = to_capacity(v, B, T, cap, kvd);
        /* depth arenas are (B, Hkv, len, n_slots, dh): B*Hkv runs of T positions */
        float *dkc = to_capacity(dk, B * Hkv, T, cap, ns * dh), *dvc = to_capacity(dv, B * Hkv, T, cap, ns * dh);
        sf_attn_args a2 = a;
        a2.Tq = Tq;
        a2.q_pos0 = T - Tq;
        a2.k = kc; a2.v = vc; a2.kv_bstride = cap * kvd;
        a2.depth_k = dkc; a2.depth_v = dvc; a2.depth_bstride = cap * ns * kvd; a2.depth_len = cap;
        float *o2 = falloc(B * Tq * qd), *p2 = falloc(B * H * Tq * W), *l2 = falloc(B * H * Tq);
        float *sc2 = falloc(sf_attention_scratch_floats(&a2, nt));
        sf_attention_forward(&a2, qd_rows, o2, l2, p2, NULL, sc2, nt);
        int64_t diff = 0;
        for (int64_t b = 0; b < B; b++) {
            diff += first_difference(o2 + b * Tq * qd, out + (b * T + T - Tq) * qd, Tq * qd) >= 0;
            for (int64_t h = 0; h < H; h++) {
                const int64_t r2 = (b * H + h) * Tq, r1 = (b * H + h) * T + T - Tq;
                diff += first_difference(p2 + r2 * W, probs + r1 * W, Tq * W) >= 0;
                diff += first_difference(l2 + r2, lse + r1, Tq) >= 0;
            }
        }
        CHECK(diff == 0, "%s: last 2 queries at q_pos0 = T-2 from cache-sized buffers differ from "
              "the full pass in %lld (batch, head) blocks", what, (long long)diff);
        free(qd_rows); free(kc); free(vc); free(dkc); free(dvc); free(o2); free(p2); free(l2); free(sc2);
    }
    /* backward against the naive gradients, and identical for any thread count */
    {
        float *dout = falloc(B * T * qd), *gq = falloc(B * T * qd), *gk = falloc(B * T * kvd);
        float *gv = falloc(B * T * kvd), *gdk = falloc(arena), *gdv = falloc(arena);
        double *rq = dalloc(B * T * qd), *rk = dalloc(B * T * kvd), *rv = dalloc(B * T * kvd);
        double *rdk = dalloc(arena), *rdv = dalloc(arena);
        fill(dout, B * T * qd, -1.0f, 1.0f);
        fill(gq, B * T * qd, 7.0f, 7.0f); /* overwritten */
        fill(gk, B * T * kvd, 7.0f, 7.0f);
        fill(gv, B * T * kvd, 7.0f, 7.0f);
        memset(gdk, 0, (size_t)arena * sizeof(float)); /* accumulated */
        memset(gdv, 0, (size_t)arena * sizeof(float));
        sf_attention_backward(&a, q, out, dout, lse, gq, gk, gv, gdk, gdv, scratch, nt);
        attention_naive_backward(&a, q, dout, rout, rprobs, rq, rk, rv, rdk, rdv, arena);
        snprintf(sub, sizeof sub, "%s: backward dq", what);
        CHECK_CLOSE(sub, gq, rq, B * T * qd, 3e-5, 1e-4);
        snprintf(sub, sizeof sub, "%s: backward dk", what);
        CHECK_CLOSE(sub, gk, rk, B * T * kvd, 3e-5, 1e-4);
        snprintf(sub, sizeof sub, "%s: backward dv", what);
        CHECK_CLOSE(sub, gv, rv, B * T * kvd, 3e-5, 1e-4);
        snprintf(sub, sizeof sub, "%s: backward d(depth k)", what);
        CHECK_CLOSE(sub, gdk, rdk, arena, 3e-5, 1e-4);
        snprintf(sub, sizeof sub, "%s: backward d(depth v)", what);
        CHECK_CLOSE(sub, gdv, rdv, arena, 3e-5, 1e-4);
        if (nt != 1) {
            float *s1 = falloc(sf_attention_scratch_floats(&a, 1));
            float *q1 = falloc(B * T * qd), *k1 = falloc(B * T * kvd), *v1 = falloc(B * T * kvd);
            float *dk1 = falloc(arena), *dv1 = falloc(arena);
            memset(dk1, 0, (size_t)arena * sizeof(float));
            memset(dv1, 0, (size_t)arena * sizeof(float));
            sf_attention_backward(&a, q, out, dout, lse, q1, k1, v1, dk1, dv1, s1, 1);
            snprintf(sub, sizeof sub, "%s: backward threads %d vs 1", what, nt);
            CHECK_SAME(sub, gq, q1, B * T * qd);
            CHECK_SAME(sub, gk, k1, B * T * kvd);
            CHECK_SAME(sub, gv, v1, B * T * kvd);
            CHECK_SAME(sub, gdk, dk1, arena);
            CHECK_SAME(sub, gdv, dv1, arena);
            free(s1); free(q1); free(k1); free(v1); free(dk1); free(dv1);
        }
        free(dout); free(gq); free(gk); free(gv); free(gdk); free(gdv);
        free(rq); free(rk); free(rv); free(rdk); free(rdv);
    }
    free(q); free(k); free(v); free(dk); free(dv); free(out); free(out2); free(lse); free(probs);
    free(dmass); free(scratch); free(rout); free(rlse); free(rprobs); free(rdmass);
}

static void test_attention(void) {
    enum { B = 2, T = 7 };
    /* holes: b0 pads keys 1 and 4, b1 pads key 0 (a causal query 0 sees no sequence key) and 6;
     * empty_row: b0 pads key 3, b1 is padding throughout (every row of b1 sees nothing) */
    static const uint8_t holes[B * T] = {1, 0, 1, 1, 0, 1, 1, /**/ 0, 1, 1, 1, 1, 1, 0};
    static const uint8_t empty_row[B * T] = {1, 1, 1, 0, 1, 1, 1, /**/ 0, 0, 0, 0, 0, 0, 0};
    struct { const uint8_t *mask; const char *name; } masks[] = {
        {NULL, "none"}, {holes, "holes"}, {empty_row, "empty_row"}};
    /* (n_read, chunk, depth_only): plain attention, depth_only without slots (= plain), and
     * depth slots read by chunk 1 / 2 / 3 (T = 7: the last chunk is short) */
    struct { int64_t n_read, chunk; int depth_only; } moda[] = {
        {0, 1, 0}, {0, 1, 1}, {3, 1, 0}, {3, 2, 0}, {3, 3, 0}, {3, 1, 1}, {3, 2, 1}};
    static const int64_t kv_heads[] = {4, 2, 1}; /* MHA, GQA, MQA */
    for (int hi = 0; hi < 3; hi++)
        for (int causal = 0; causal <= 1; causal++)
            for (int mi = 0; mi < 3; mi++)
                for (size_t di = 0; di < sizeof moda / sizeof moda[0]; di++) {
                    /* n_slots = 5 > n_read: slots are strided by n_slots, not n_read */
                    attn_shape s = {B, T, 4, kv_heads[hi], 8, 5, masks[mi].mask, masks[mi].name};
                    attention_case(&s, causal, moda[di].n_read, moda[di].chunk, moda[di].depth_only,
                                   1 + (int)(di % 2));
                }
    /* big enough for the threaded path */
    uint8_t big_mask[2 * 40];
    for (int i = 0; i < 80; i++) big_mask[i] = (i % 7) != 3;
    attn_shape big = {2, 40, 4, 2, 16, 4, big_mask, "every 7th"};
    attention_case(&big, 1, 4, 2, 0, 3);
    attention_case(&big, 0, 4, 3, 0, 3);
    attn_shape big_nomask = {2, 40, 4, 2, 16, 4, NULL, "none"};
    attention_case(&big_nomask, 1, 0, 1, 0, 3);
    /* several 48-row query blocks, key tiles past 16 columns, d_head not a multiple of 16 */
    uint8_t long_mask[2 * 100];
    for (int i = 0; i < 200; i++) long_mask[i] = (i % 11) != 5 && i < 190;
    attn_shape lng = {2, 100, 4, 2, 24, 4, long_mask, "every 11th + tail"};
    attention_case(&lng, 1, 4, 1, 0, 2);
    attention_case(&lng, 0, 4, 2, 0, 2);
    attention_case(&lng, 1, 0, 1, 0, 1);
    attn_shape lng_nomask = {1, 97, 4, 4, 32, 2, NULL, "none"};
    attention_case(&lng_nomask, 1, 2, 3, 0, 2);
    attention_case(&lng_nomask, 1, 2, 1, 1, 3);
    /* a single position */
    attn_shape one = {1, 1, 4, 2, 8, 2, NULL, "none"};
    attention_case(&one, 1, 2, 1, 0, 1);
}

/* ============================================================================================
 * 4. Attention Residuals: aggregation and the two-phase Block schedule
 * ============================================================================================ */

/* h = sum_i alpha_i src_i, alpha = softmax_i((q ⊙ g) . src_i * inv_rms_i), per token. */
static void attnres_naive(double *h, double *alpha, const float *const *src,
                          const float *const *inv_rms, int64_t nsrc, const float *q,
                          const float *g, int64_t N, int64_t d) {
    double *s = dalloc(nsrc);
    for (int64_t n = 0; n < N; n++) {
        double mx = -INFINITY, sum = 0.0;
        for (int64_t i = 0; i < nsrc; i++) {
            double dot = 0.0;
            for (int64_t j = 0; j < d; j++) dot += (double)q[j] * g[j] * src[i][n * d + j];
            s[i] = dot * inv_rms[i][n];
            if (s[i] > mx) mx = s[i];
        }
        for (int64_t i = 0; i < nsrc; i++) sum += exp(s[i] - mx);
        for (int64_t j = 0; j < d; j++) h[n * d + j] = 0.0;
        for (int64_t i = 0; i < nsrc; i++) {
            double al = exp(s[i] - mx) / sum;
            alpha[n * nsrc + i] = al;
            for (int64_t j = 0; j < d; j++) h[n * d + j] += al * src[i][n * d + j];
        }
    }
    free(s);
}

/* nsrc sources (N, d), source i scaled by (i + 1) / 2 so the RMS normalization matters */
static float **make_sources(int64_t nsrc, int64_t N, int64_t d) {
    float **src = xmalloc((size_t)(nsrc + 1) * sizeof(float *));
    for (int64_t i = 0; i < nsrc; i++) {
        src[i] = falloc(N * d);
        float sc = 0.5f * (float)(i + 1);
        fill(src[i], N * d, -sc, sc);
    }
    return src;
}
static void free_sources(float **src, int64_t nsrc) {
    for (int64_t i = 0; i < nsrc; i++) free(src[i]);
    free(src);
}

static void attnres_aggregate_case(int64_t nsrc, int64_t N, int64_t d, int nt) {
    const float eps = 1e-6f;
    float **src = make_sources(nsrc, N, d), **irms = xmalloc((size_t)nsrc * sizeof(float *));
    float *q = falloc(d), *g = falloc(d);
    fill(q, d, -1.0f, 1.0f);
    fill(g, d, 0.5f, 1.5f);
    char what[160], sub[220];
    snprintf(what, sizeof what, "attnres nsrc=%lld N=%lld d=%lld threads=%d", (long long)nsrc,
             (long long)N, (long long)d, nt);
    /* inv_rms = 1/sqrt(mean(x^2) + eps) per token */
    double *rir = dalloc(N);
    for (int64_t i = 0; i < nsrc; i++) {
        irms[i] = falloc(N);
        sf_attnres_inv_rms(irms[i], src[i], N, d, eps, nt);
        for (int64_t n = 0; n < N; n++) {
            double ss = 0.0;
            for (int64_t j = 0; j < d; j++) ss += (double)src[i][n * d + j] * src[i][n * d + j];
            rir[n] = 1.0 / sqrt(ss / (double)d + eps);
        }
        snprintf(sub, sizeof sub, "%s: inv_rms of source %lld", what, (long long)i);
        CHECK_CLOSE(sub, irms[i], rir, N, 0.0, 1e-6);
    }
    float *h = falloc(N * d), *h2 = falloc(N * d), *alpha = falloc(N * nsrc);
    float *scratch = falloc(sf_attnres_scratch_floats(nsrc, d, nt));
    double *rh = dalloc(N * d), *ralpha = dalloc(N * nsrc);
    const float *const *csrc = (const float *const *)src, *const *cirms = (const float *const *)irms;
    sf_attnres_aggregate(h, alpha, csrc, cirms, nsrc, q, g, N, d, scratch, nt);
    attnres_naive(rh, ralpha, csrc, cirms, nsrc, q, g, N, d);
    snprintf(sub, sizeof sub, "%s: h", what);
    CHECK_CLOSE(sub, h, rh, N * d, 1e-5, 1e-5);
    snprintf(sub, sizeof sub, "%s: alpha", what);
    CHECK_CLOSE(sub, alpha, ralpha, N * nsrc, 1e-6, 1e-5);
    int64_t bad_rows = 0;
    for (int64_t n = 0; n < N; n++) {
        double s = 0.0;
        for (int64_t i = 0; i < nsrc; i++) s += alpha[n * nsrc + i];
        bad_rows += fabs(s - 1.0) > 1e-5;
    }
    CHECK(bad_rows == 0, "%s: %lld alpha rows do not sum to 1", what, (long long)bad_rows);
    /* alpha_out is optional, and every token is computed by one thread */
    float *s1 = falloc(sf_attnres_scratch_floats(nsrc, d, 1));
    sf_attnres_aggregate(h2, NULL, csrc, cirms, nsrc, q, g, N, d, s1, 1);
    snprintf(sub, sizeof sub, "%s: no alpha_out, 1 thread", what);
    CHECK_SAME(sub, h, h2, N * d);
    for (int64_t i = 0; i < nsrc; i++) free(irms[i]);
    free(irms); free(s1); free_sources(src, nsrc); free(q); free(g); free(rir); free(h); free(h2);
    free(alpha); free(scratch); free(rh); free(ralpha);
}

/* Phase 1 (online softmax over the completed blocks, all nq queries at once) followed by phase 2
 * (merge in the running partial sum, or nothing) must equal the direct aggregation over
 * [sources..., partial] with that query. */
static void attnres_two_phase_case(int64_t nsrc, int64_t nq, int64_t N, int64_t d, int nt) {
    const float eps = 1e-6f;
    float **src = make_sources(nsrc + 1, N, d); /* src[nsrc] is the partial */
    float **irms = xmalloc((size_t)(nsrc + 1) * sizeof(float *));
    for (int64_t i = 0; i <= nsrc; i++) {
        irms[i] = falloc(N);
        sf_attnres_inv_rms(irms[i], src[i], N, d, eps, 1);
    }
    const float *const *csrc = (const float *const *)src, *const *cirms = (const float *const *)irms;
    float *qg = falloc(nq * d), *ones = falloc(d);
    fill(qg, nq * d, -1.5f, 1.5f);
    for (int64_t j = 0; j < d; j++) ones[j] = 1.0f;

    float *m = falloc(nq * N), *l = falloc(nq * N), *o = falloc(nq * N * d);
    float *logits = falloc(nq * N * nsrc);
    float *m2 = falloc(nq * N), *l2 = falloc(nq * N), *o2 = falloc(nq * N * d);
    sf_attnres_phase1(m, l, o, logits, csrc, cirms, nsrc, qg, nq, N, d, nt);
    sf_attnres_phase1(m2, l2, o2, NULL, csrc, cirms, nsrc, qg, nq, N, d, 1);
    char what[160], sub[240];
    snprintf(what, sizeof what, "attnres two-phase nsrc=%lld nq=%lld N=%lld d=%lld threads=%d",
             (long long)nsrc, (long long)nq, (long long)N, (long long)d, nt);
    snprintf(sub, sizeof sub, "%s: phase-1 state without logits / 1 thread", what);
    CHECK_SAME(sub, m, m2, nq * N);
    CHECK_SAME(sub, l, l2, nq * N);
    CHECK_SAME(sub, o, o2, nq * N * d);

    float *h = falloc(N * d), *hd = falloc(N * d), *h2 = falloc(N * d);
    float *alpha = falloc(N * (nsrc + 1)), *alpha_d = falloc(N * (nsrc + 1));
    float *scratch = falloc(sf_attnres_scratch_floats(nsrc + 1, d, 1));
    double *rh = dalloc(N * d), *ralpha = dalloc(N * (nsrc + 1));
    for (int64_t j = 0; j < nq; j++)
        for (int with_partial = 0; with_partial <= 1; with_partial++) {
            int64_t na = nsrc + with_partial;
            const float *partial = with_partial ? src[nsrc] : NULL;
            const float *pirms = with_partial ? irms[nsrc] : NULL;
            sf_attnres_phase2(h, alpha, m + j * N, l + j * N, o + j * N * d, logits + j * N * nsrc,
                              nsrc, partial, pirms, qg + j * d, N, d, nt);
            /* direct: q = qg_j with unit gains (q ⊙ 1 is exact) over [sources..., partial] */
            sf_attnres_aggregate(hd, alpha_d, csrc, cirms, na, qg + j * d, ones, N, d, scratch, 1);
            attnres_naive(rh, ralpha, csrc, cirms, na, qg + j * d, ones, N, d);
            snprintf(sub, sizeof sub, "%s: query %lld partial=%d: h vs direct aggregate", what,
                     (long long)j, with_partial);
            CHECK_CLOSE_F(sub, h, hd, N * d, 1e-6, 1e-6);
            snprintf(sub, sizeof sub, "%s: query %lld partial=%d: alpha vs direct aggregate", what,
                     (long long)j, with_partial);
            CHECK_CLOSE_F(sub, alpha, alpha_d, N * na, 1e-6, 1e-6);
            snprintf(sub, sizeof sub, "%s: query %lld partial=%d: h vs naive", what, (long long)j,
                     with_partial);
            CHECK_CLOSE(sub, h, rh, N * d, 1e-5, 1e-5);
            snprintf(sub, sizeof sub, "%s: query %lld partial=%d: alpha vs naive", what,
                     (long long)j, with_partial);
            CHECK_CLOSE(sub, alpha, ralpha, N * na, 1e-6, 1e-5);
            /* without the alpha recording (and so without logits) h is unchanged */
            sf_attnres_phase2(h2, NULL, m + j * N, l + j * N, o + j * N * d, NULL, nsrc, partial,
                              pirms, qg + j * d, N, d, 1);
            snprintf(sub, sizeof sub, "%s: query %lld partial=%d: without alpha", what,
                     (long long)j, with_partial);
            CHECK_SAME(sub, h, h2, N * d);
        }
    for (int64_t i = 0; i <= nsrc; i++) free(irms[i]);
    free(irms); free_sources(src, nsrc + 1); free(qg); free(ones); free(m); free(l); free(o);
    free(logits); free(m2); free(l2); free(o2); free(h); free(hd); free(h2); free(alpha);
    free(alpha_d); free(scratch); free(rh); free(ralpha);
}

/* sf_attnres_sources_backward against the formula in double: per token, source x (r its
 * inv_rms) and reader j (weight a, input gradient g, S_j, qg_j):
 *   ds = a (g·x − S);  dx += a g + ds r (qg − (qg·x) r² x / d);  e_j += ds r x.
 * Sizes cover partial token tiles, d with and without a vector-chunk tail, more readers than
 * one group, several sources with accumulate (Block), and threads (dx and the lanes' e
 * partials the same bits for any count). */
static void attnres_backward_case(int64_t nsrc, int64_t nr, int64_t N, int64_t d, int accumulate,
                                  int nt) {
    const int64_t col0 = 1, ld = col0 + nsrc + 1; /* the sources sit at columns col0.. of alpha */
    float **src = make_sources(nsrc, N, d), **irms = xmalloc((size_t)nsrc * sizeof(float *));
    float **dsrc = xmalloc((size_t)nsrc * sizeof(float *)), **dsrc1 = xmalloc((size_t)nsrc * sizeof(float *));
    float *dh = falloc(nr * N * d), *alpha = falloc(nr * N * ld), *S = falloc(nr * N);
    float *qg = falloc(nr * d), *e = falloc(SF_AR_LANES * nr * d), *e1 = falloc(SF_AR_LANES * nr * d);
    fill(dh, nr * N * d, -1.0f, 1.0f);
    fill(alpha, nr * N * ld, 0.05f, 1.0f);
    fill(S, nr * N, -1.0f, 1.0f);
    fill(qg, nr * d, -1.0f, 1.0f);
    float *init = falloc(N * d);
    fill(init, N * d, -0.5f, 0.5f);
    for (int64_t i = 0; i < nsrc; i++) {
        irms[i] = falloc(N);
        sf_attnres_inv_rms(irms[i], src[i], N, d, 1e-6f, 1);
        dsrc[i] = falloc(N * d);
        dsrc1[i] = falloc(N * d);
        memcpy(dsrc[i], init, (size_t)(N * d) * sizeof(float)); /* overwritten unless accumulate */
        memcpy(dsrc1[i], init, (size_t)(N * d) * sizeof(float));
    }
    sf_attnres_reader *rd = xmalloc((size_t)nr * sizeof *rd), *rd1 = xmalloc((size_t)nr * sizeof *rd1);
    for (int64_t j = 0; j < nr; j++) {
        rd[j] = (sf_attnres_reader){.dh = dh + j * N * d, .alpha = alpha + j * N * ld, .ld = ld,
                                    .S = S + j * N, .qg = qg + j * d, .e = e + j * d};
        rd1[j] = rd[j];
        rd1[j].e = e1 + j * d;
    }
    memset(e, 0, (size_t)(SF_AR_LANES * nr * d) * sizeof(float));
    memset(e1, 0, (size_t)(SF_AR_LANES * nr * d) * sizeof(float));
    const float *const *csrc = (const float *const *)src, *const *cirms = (const float *const *)irms;
    sf_attnres_sources_backward(dsrc, csrc, cirms, nsrc, col0, accumulate, rd, nr, nr * d, N, d, nt);
    sf_attnres_sources_backward(dsrc1, csrc, cirms, nsrc, col0, accumulate, rd1, nr, nr * d, N, d, 1);

    double *rdx = dalloc(N * d), *re = dalloc(nr * d);
    for (int64_t k = 0; k < nr * d; k++) re[k] = 0.0;
    char what[200], sub[260];
    snprintf(what, sizeof what, "attnres backward nsrc=%lld readers=%lld N=%lld d=%lld acc=%d threads=%d",
             (long long)nsrc, (long long)nr, (long long)N, (long long)d, accumulate, nt);
    for (int64_t i = 0; i < nsrc; i++) {
        double top = 0.0;
        for (int64_t n = 0; n < N; n++) {
            const float *x = src[i] + n * d;
            double r = irms[i][n];
            double *dx = rdx + n * d;
            for (int64_t k = 0; k < d; k++) dx[k] = accumulate ? init[n * d + k] : 0.0;
            for (int64_t j = 0; j < nr; j++) {
                const float *g = dh + (j * N + n) * d, *q = qg + j * d;
                double a = alpha[(j * N + n) * ld + col0 + i], gx = 0.0, qx = 0.0;
                for (int64_t k = 0; k < d; k++) { gx += (double)g[k] * x[k]; qx += (double)q[k] * x[k]; }
                double ds = a * (gx - S[j * N + n]);
                for (int64_t k = 0; k < d; k++) {
                    dx[k] += a * g[k] + ds * r * (q[k] - qx * r * r * x[k] / (double)d);
                    re[j * d + k] += ds * r * x[k];
                }
            }
            for (int64_t k = 0; k < d; k++) top = fmax(top, fabs(dx[k]));
        }
        snprintf(sub, sizeof sub, "%s: d src %lld", what, (long long)i);
        CHECK_CLOSE(sub, dsrc[i], rdx, N * d, 1e-5 * (1.0 + top), 1e-5);
        snprintf(sub, sizeof sub, "%s: d src %lld vs 1 thread", what, (long long)i);
        CHECK_SAME(sub, dsrc[i], dsrc1[i], N * d);
    }
    snprintf(sub, sizeof sub, "%s: e lanes vs 1 thread", what);
    CHECK_SAME(sub, e, e1, SF_AR_LANES * nr * d);
    for (int t = 1; t < SF_AR_LANES; t++) /* lane partials, summed in lane order */
        for (int64_t k = 0; k < nr * d; k++) e[k] += e[t * nr * d + k];
    double etop = 0.0;
    for (int64_t k = 0; k < nr * d; k++) etop = fmax(etop, fabs(re[k]));
    snprintf(sub, sizeof sub, "%s: e", what);
    CHECK_CLOSE(sub, e, re, nr * d, 1e-5 * (1.0 + etop), 1e-5);
    for (int64_t i = 0; i < nsrc; i++) { free(irms[i]); free(dsrc[i]); free(dsrc1[i]); }
    free(irms); free(dsrc); free(dsrc1); free_sources(src, nsrc); free(dh); free(alpha); free(S);
    free(qg); free(e); free(e1); free(init); free(rd); free(rd1); free(rdx); free(re);
}

static void test_attnres(void) {
    static const int64_t nsrcs[] = {1, 2, 5};
    static const int64_t Ns[] = {1, 7};
    static const int64_t ds[] = {1, 16, 33};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 2; b++)
            for (int c = 0; c < 3; c++)
                for (int nt = 1; nt <= 2; nt++) attnres_aggregate_case(nsrcs[a], Ns[b], ds[c], nt);
    attnres_aggregate_case(5, 800, 33, 3); /* threaded */

    for (int a = 0; a < 3; a++)
        for (int c = 0; c < 3; c++) attnres_two_phase_case(nsrcs[a], 3, 9, ds[c], 1 + c % 2);
    attnres_two_phase_case(4, 2, 600, 40, 3); /* threaded */

    static const int64_t bN[] = {1, 7, 37};
    static const int64_t bd[] = {1, 33, 64};
    static const int64_t bnr[] = {1, 5, 40};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++)
            for (int c = 0; c < 3; c++)
                for (int acc = 0; acc <= 1; acc++)
                    attnres_backward_case(1 + 2 * acc, bnr[c], bN[a], bd[b], acc, 1 + (a + b + c) % 3);
}

/* ============================================================================================
 * 5. Model level: config validation, parameter table, forward-pass properties
 * ============================================================================================ */

/* ---- config validation -------------------------------------------------------------------- */

static void expect_config_status(const sf_config *c, sf_status want, const char *what, int line) {
    char err[256];
    err[0] = '\0';
    sf_status st = sf_config_validate(c, err, sizeof err);
    CHECK(st == want, "line %d, %s: validate returned %s (%s), want %s", line, what,
          sf_status_name(st), err, sf_status_name(want));
    if (want != SF_OK) {
        CHECK(err[0] != '\0', "line %d, %s: empty error message", line, what);
        /* err may be NULL, and a short buffer is truncated but terminated */
        sf_status st_null = sf_config_validate(c, NULL, 0);
        CHECK(st_null == st, "line %d, %s: status with err=NULL %d vs %d", line, what, st_null, st);
        char small[8];
        memset(small, 'x', sizeof small);
        sf_config_validate(c, small, sizeof small);
        CHECK(memchr(small, '\0', sizeof small) != NULL, "line %d, %s: short message buffer not terminated", line, what);
        /* model creation reports the same failure and creates nothing */
        static char not_a_model;
        sf_model *m = (sf_model *)(void *)&not_a_model; /* must come back NULL */
        char err2[256] = "";
        sf_status st_create = sf_model_create(c, 0, &m, err2, sizeof err2);
        CHECK(st_create == st && m == NULL && err2[0] != '\0',
              "line %d, %s: sf_model_create returned %s, model %p, message '%s'", line, what,
              sf_status_name(st_create), (void *)m, err2);
        if (st_create == SF_OK) sf_model_free(m);
    }
}

/* BAD(status, statement on c): the base config with one change must fail with that status */
#define BAD(want, stmt)                                                                 \
    do {                                                                                \
        sf_config c = base;                                                             \
        stmt;                                                                           \
        expect_config_status(&c, (want), #stmt, __LINE__);                              \
    } while (0)
#define GOOD(stmt)                                                                      \
    do {                                                                                \
        sf_config c = base;                                                             \
        stmt;                                                                           \
        expect_config_status(&c, SF_OK, #stmt, __LINE__);                               \
    } while (0)

static void test_config_validation(void) {
    sf_config base;
    sf_config_default(&base, 50, 64, 4, 2, 16);
    const sf_status INVALID = SF_ERR_INVALID_CONFIG;
    const int64_t HUGE64 = INT64_MAX;

    GOOD((void)c);
    GOOD(c.pos = SF_POS_ROPE);
    GOOD(c.pos = SF_POS_SINUSOIDAL);
    GOOD((c.moda = 1, c.moda_depth_only = 1, c.moda_chunk = 16));
    GOOD((c.residual = SF_RES_ATTNRES_BLOCK, c.attnres_block_size = 1));
    GOOD((c.n_kv_heads = 1, c.act = SF_ACT_SWIGLU, c.norm = SF_NORM_RMSNORM));

    /* divisibility */
    BAD(INVALID, c.d_model = 30);                       /* 30 % 4 heads */
    BAD(INVALID, c.n_heads = 5);                        /* 64 % 5 */
    BAD(INVALID, c.n_kv_heads = 3);                     /* 4 % 3 */
    BAD(INVALID, c.n_kv_heads = 8);                     /* more kv heads than heads */
    BAD(INVALID, c.n_heads = 128);                      /* more heads than d_model */
    /* zero and negative sizes (checked before any division by them) */
    BAD(INVALID, c.vocab_size = 0);
    BAD(INVALID, c.vocab_size = -3);
    BAD(INVALID, c.d_model = 0);
    BAD(INVALID, c.n_heads = 0);
    BAD(INVALID, c.n_heads = -4);
    BAD(INVALID, c.n_kv_heads = 0);
    BAD(INVALID, c.n_layers = 0);
    BAD(INVALID, c.d_ff = 0);
    BAD(INVALID, c.max_seq_len = 0);
    BAD(INVALID, c.attnres_block_size = 0);
    BAD(INVALID, c.moda_chunk = 0);
    /* huge sizes: an error, never an overflow or a giant allocation */
    BAD(INVALID, c.vocab_size = HUGE64);
    BAD(INVALID, c.d_model = HUGE64);
    BAD(INVALID, (c.d_model = HUGE64 - 1, c.n_heads = 1, c.n_kv_heads = 1));
    BAD(INVALID, c.n_layers = HUGE64);
    BAD(INVALID, c.d_ff = HUGE64);
    BAD(INVALID, c.max_seq_len = HUGE64);
    BAD(INVALID, c.attnres_block_size = HUGE64);
    BAD(INVALID, c.moda_chunk = 17); /* > max_seq_len */
    /* every dimension within its bound, but the parameter count overflows 64 bits */
    BAD(SF_ERR_OVERFLOW, (c.vocab_size = c.d_model = c.d_ff = (int64_t)1 << 24, c.n_heads = 1,
                          c.n_kv_heads = 1, c.n_layers = 4096, c.act = SF_ACT_SWIGLU, c.moda = 1));
    /* enumerations and flags */
    BAD(INVALID, c.causal = 2);
    BAD(INVALID, c.pos = 4);
    BAD(INVALID, c.pos = -1);
    BAD(INVALID, c.act = 4);
    BAD(INVALID, c.norm = 2);
    BAD(INVALID, c.pre_norm = -1);
    BAD(INVALID, c.bias = 2);
    BAD(INVALID, c.final_norm = 2);
    BAD(INVALID, c.tie_embeddings = 2);
    BAD(INVALID, c.residual = SF_NUM_WIRINGS);
    BAD(INVALID, c.denseformer_dilation = 0);
    BAD(INVALID, c.denseformer_period = 4097);
    BAD(INVALID, c.moda = 2);
    BAD(INVALID, c.moda_depth_only = 2);
    /* floats */
    BAD(INVALID, c.norm_eps = 0.0f);
    BAD(INVALID, c.norm_eps = NAN);
    BAD(INVALID, c.norm_eps = INFINITY);
    BAD(INVALID, c.attnres_eps = -1.0f);
    BAD(INVALID, c.rope_theta = 1.0f);
    BAD(INVALID, c.rope_theta = NAN);
    /* cross-field rules */
    BAD(INVALID, c.moda_depth_only = 1);                                  /* without moda */
    BAD(INVALID, (c.pos = SF_POS_ROPE, c.d_model = 12));                  /* head dim 3 */
    BAD(INVALID, (c.pos = SF_POS_SINUSOIDAL, c.d_model = 15, c.n_heads = 3, c.n_kv_heads = 3));

    char err[256] = "";
    CHECK(sf_config_validate(NULL, err, sizeof err) == SF_ERR_INVALID_ARG && err[0],
          "NULL config: '%s'", err);
    CHECK(sf_model_create(&base, 0, NULL, err, sizeof err) == SF_ERR_INVALID_ARG,
          "sf_model_create with out = NULL");

    /* overflow is also visible through sf_config_num_params */
    sf_config c = base;
    c.vocab_size = c.d_model = c.d_ff = (int64_t)1 << 24;
    c.n_heads = c.n_kv_heads = 1;
    c.n_layers = 4096;
    c.act = SF_ACT_SWIGLU;
    c.moda = 1;
    CHECK(sf_config_num_params(&c) == -1, "num_params of an overflowing config: %lld",
          (long long)sf_config_num_params(&c));
    /* valid but absurdly large (~2^50 floats): SF_ERR_NOMEM with a message, no allocation */
    c.n_layers = 1;
    c.act = SF_ACT_GELU;
    c.moda = 0;
    CHECK(sf_config_validate(&c, err, sizeof err) == SF_OK, "huge config should validate: %s", err);
    CHECK(sf_config_num_params(&c) > ((int64_t)1 << 40), "huge config num_params %lld",
          (long long)sf_config_num_params(&c));
    sf_model *m = NULL;
    err[0] = '\0';
    sf_status st = sf_model_create(&c, 0, &m, err, sizeof err);
    CHECK(st == SF_ERR_NOMEM && m == NULL && err[0], "huge model: %s, model %p, '%s'",
          sf_status_name(st), (void *)m, err);
    if (m) sf_model_free(m);

    for (int s = SF_OK; s <= SF_ERR_BUSY; s++)
        CHECK(strcmp(sf_status_name((sf_status)s), sf_status_name((sf_status)99)) != 0,
              "status %d has no name ('%s')", s, sf_status_name((sf_status)s));
}

/* ---- the parameter table -------------------------------------------------------------------- */

/* The state_dict names in flat-buffer order, from the table in DEVELOPERS.md. */
static int expected_names(const sf_config *c, char (*out)[SF_NAME_MAX], int cap) {
    int n = 0;
    const int ln_bias = c->bias && c->norm == SF_NORM_LAYERNORM, attnres = c->residual != SF_RES_PLAIN;
#define ADD(...) do { if (n < cap) snprintf(out[n], SF_NAME_MAX, __VA_ARGS__); n++; } while (0)
    ADD("tok_emb.weight");
    if (c->pos == SF_POS_LEARNED) ADD("pos_emb.weight");
    for (int i = 0; i < (int)c->n_layers; i++) {
        ADD("layers.%d.attn_norm.weight", i);
        if (ln_bias) ADD("layers.%d.attn_norm.bias", i);
        static const char *proj[] = {"q", "k", "v", "o"};
        for (int p = 0; p < 4; p++) {
            ADD("layers.%d.attn.%s_proj.weight", i, proj[p]);
            if (c->bias) ADD("layers.%d.attn.%s_proj.bias", i, proj[p]);
        }
        ADD("layers.%d.mlp_norm.weight", i);
        if (ln_bias) ADD("layers.%d.mlp_norm.bias", i);
        static const char *mlp[] = {"gate", "up", "down"};
        for (int p = c->act == SF_ACT_SWIGLU ? 0 : 1; p < 3; p++) {
            ADD("layers.%d.mlp.%s_proj.weight", i, mlp[p]);
            if (c->bias) ADD("layers.%d.mlp.%s_proj.bias", i, mlp[p]);
        }
        if (c->moda && i < c->n_layers - 1) {
            ADD("layers.%d.mlp.depth_k_proj.weight", i);
            ADD("layers.%d.mlp.depth_v_proj.weight", i);
        }
        if (attnres) {
            ADD("layers.%d.attn_res_proj.weight", i);
            ADD("layers.%d.attn_res_norm.weight", i);
            ADD("layers.%d.mlp_res_proj.weight", i);
            ADD("layers.%d.mlp_res_norm.weight", i);
        }
    }
    if (attnres) { ADD("output_res_proj.weight"); ADD("output_res_norm.weight"); }
    if (c->final_norm) {
        ADD("final_norm.weight");
        if (ln_bias) ADD("final_norm.bias");
    }
    if (!c->tie_embeddings) ADD("lm_head.weight");
#undef ADD
    return n;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* The documented (out, in) shape of a tensor, from its name. */
static void expected_shape(const sf_config *c, const char *name, int64_t shape[2], int *ndim) {
    const int64_t d = c->d_model, dh = d / c->n_heads, qd = c->n_heads * dh, kvd = c->n_kv_heads * dh;
    *ndim = 2;
    shape[0] = -1; /* unknown name: never matches */
    shape[1] = d;
    if (ends_with(name, ".bias") || ends_with(name, "norm.weight")) {
        *ndim = 1;
        shape[1] = 0;
        shape[0] = d;
        if (strstr(name, "q_proj")) shape[0] = qd;
        if (strstr(name, "k_proj") || strstr(name, "v_proj")) shape[0] = kvd;
        if (strstr(name, "gate_proj") || strstr(name, "up_proj")) shape[0] = c->d_ff;
    } else if (!strcmp(name, "tok_emb.weight") || !strcmp(name, "lm_head.weight")) {
        shape[0] = c->vocab_size;
    } else if (!strcmp(name, "pos_emb.weight")) {
        shape[0] = c->max_seq_len;
    } else if (strstr(name, "_res_proj")) {
        shape[0] = 1;
    } else if (strstr(name, "q_proj")) {
        shape[0] = qd;
    } else if (strstr(name, "k_proj") || strstr(name, "v_proj")) { /* incl. depth_k/v_proj */
        shape[0] = kvd;
    } else if (strstr(name, "o_proj")) {
        shape[0] = d; shape[1] = qd;
    } else if (strstr(name, "gate_proj") || strstr(name, "up_proj")) {
        shape[0] = c->d_ff;
    } else if (strstr(name, "down_proj")) {
        shape[0] = d; shape[1] = c->d_ff;
    }
}

static void check_tensor_table(const sf_config *cfg, const char *label) {
    char err[256] = "";
    sf_model *m = NULL;
    sf_status st = sf_model_create(cfg, 7, &m, err, sizeof err);
    CHECK(st == SF_OK && m, "%s: sf_model_create: %s", label, err);
    if (!m) return;
    const int32_t nt = sf_model_num_tensors(m);
    enum { CAP = 512 };
    char (*want)[SF_NAME_MAX] = xmalloc(CAP * sizeof *want);
    int nwant = expected_names(cfg, want, CAP);
    CHECK(nt == nwant, "%s: %d tensors, the documented table has %d", label, nt, nwant);

    int64_t offset = 0;
    int64_t bad_name = 0, bad_dup = 0, bad_offset = 0, bad_shape = 0, bad_meta = 0, bad_init = 0;
    const float *params = sf_model_params(m);
    for (int32_t i = 0; i < nt; i++) {
        const sf_tensor_info *t = sf_model_tensor(m, i);
        if (i < nwant && strcmp(t->name, want[i]) != 0) {
            if (!bad_name) printf("  %s: tensor %d is '%s', documented '%s'\n", label, i, t->name, want[i]);
            bad_name++;
        }
        bad_dup += sf_model_find_tensor(m, t->name) != i; /* unique: the lookup finds this one */
        bad_offset += t->offset != offset;                /* contiguous, in table order */
        offset += t->numel;
        int64_t shape[2];
        int ndim;
        expected_shape(cfg, t->name, shape, &ndim);
        bad_shape += t->ndim != ndim || t->shape[0] != shape[0] || t->shape[1] != shape[1] ||
                     t->numel != (ndim == 2 ? shape[0] * shape[1] : shape[0]);
        int layer = -1;
        if (!strncmp(t->name, "layers.", 7)) layer = atoi(t->name + 7);
        int no_decay = ends_with(t->name, ".bias") || ends_with(t->name, "norm.weight") ||
                       strstr(t->name, "_res_proj") != NULL;
        bad_meta += t->layer != layer || t->no_decay != no_decay;
        /* init: pseudo-queries 0, norm gains 1, biases 0, everything else random and small */
        const float *p = params + t->offset;
        for (int64_t j = 0; j < t->numel; j++) {
            float want_v = strstr(t->name, "_res_proj") || ends_with(t->name, ".bias") ? 0.0f
                           : ends_with(t->name, "norm.weight")                          ? 1.0f
                                                                                        : NAN;
            if (isnan(want_v) ? !(fabsf(p[j]) < 0.2f) : p[j] != want_v) { bad_init++; break; }
        }
    }
    CHECK(bad_name == 0, "%s: %lld tensors out of documented order", label, (long long)bad_name);
    CHECK(bad_dup == 0, "%s: %lld duplicate names", label, (long long)bad_dup);
    CHECK(bad_offset == 0, "%s: %lld non-contiguous offsets", label, (long long)bad_offset);
    CHECK(bad_shape == 0, "%s: %lld tensors with undocumented shapes", label, (long long)bad_shape);
    CHECK(bad_meta == 0, "%s: %lld tensors with wrong layer / no_decay", label, (long long)bad_meta);
    CHECK(bad_init == 0, "%s: %lld tensors not initialized as documented", label, (long long)bad_init);
    CHECK(offset == sf_model_num_params(m) && offset == sf_config_num_params(cfg),
          "%s: sum of numel %lld, num_params %lld, config num_params %lld", label, (long long)offset,
          (long long)sf_model_num_params(m), (long long)sf_config_num_params(cfg));
    CHECK(sf_model_find_tensor(m, "no.such.tensor") == -1 && sf_model_tensor(m, -1) == NULL &&
              sf_model_tensor(m, nt) == NULL,
          "%s: lookups out of range", label);
    CHECK(memcmp(sf_model_config(m), cfg, sizeof *cfg) == 0, "%s: sf_model_config differs", label);

    /* init is a function of (config, seed) */
    sf_model *m2 = NULL, *m3 = NULL;
    sf_model_create(cfg, 7, &m2, err, sizeof err);
    sf_model_create(cfg, 8, &m3, err, sizeof err);
    if (m2 && m3) {
        CHECK(memcmp(params, sf_model_params(m2), (size_t)offset * sizeof(float)) == 0,
              "%s: same seed, different weights", label);
        CHECK(memcmp(params, sf_model_params(m3), (size_t)offset * sizeof(float)) != 0,
              "%s: different seeds, same weights", label);
    }
    sf_model_free(m2);
    sf_model_free(m3);
    free(want);
    sf_model_free(m);
}

static void test_tensor_table(void) {
    sf_config c;
    sf_config_default(&c, 37, 32, 4, 3, 12);
    check_tensor_table(&c, "table default");
    c.n_kv_heads = 2;
    c.act = SF_ACT_SWIGLU;
    c.tie_embeddings = 0;
    c.residual = SF_RES_ATTNRES_BLOCK;
    c.moda = 1;
    c.d_ff = 40;
    check_tensor_table(&c, "table gqa swiglu untied attnres moda");
    c.norm = SF_NORM_RMSNORM;
    c.pos = SF_POS_ROPE;
    c.final_norm = 0;
    c.residual = SF_RES_ATTNRES_FULL;
    c.n_layers = 1; /* moda with a single block: no depth projections */
    check_tensor_table(&c, "table rmsnorm rope no-final-norm 1 layer");
    c.norm = SF_NORM_LAYERNORM;
    c.bias = 0;
    c.pos = SF_POS_NONE;
    c.moda = 0;
    c.n_layers = 2;
    check_tensor_table(&c, "table no bias, no pos");
}

/* ---- forward-pass properties ---------------------------------------------------------------- */

typedef struct { const char *name; void (*tweak)(sf_config *); } variant;

static void v_plain(sf_config *c) { (void)c; }
static void v_post_rope_gqa_swiglu(sf_config *c) {
    c->pre_norm = 0; c->pos = SF_POS_ROPE; c->n_kv_heads = 2; c->act = SF_ACT_SWIGLU;
    c->norm = SF_NORM_RMSNORM;
}
static void v_bidir_sinusoidal(sf_config *c) {
    c->causal = 0; c->pos = SF_POS_SINUSOIDAL; c->act = SF_ACT_GELU_TANH;
}
static void v_bare_relu(sf_config *c) {
    c->pos = SF_POS_NONE; c->act = SF_ACT_RELU; c->bias = 0; c->tie_embeddings = 0; c->final_norm = 0;
}
static void v_full(sf_config *c) { c->residual = SF_RES_ATTNRES_FULL; }
static void v_full_post(sf_config *c) {
    c->residual = SF_RES_ATTNRES_FULL; c->pre_norm = 0; c->norm = SF_NORM_RMSNORM;
}
static void v_block1(sf_config *c) { c->residual = SF_RES_ATTNRES_BLOCK; c->attnres_block_size = 1; }
static void v_block2(sf_config *c) { c->residual = SF_RES_ATTNRES_BLOCK; c->attnres_block_size = 2; }
static void v_block3(sf_config *c) { c->residual = SF_RES_ATTNRES_BLOCK; c->attnres_block_size = 3; }
static void v_block4(sf_config *c) { /* L = 6 sublayers: the last block is short */
    c->residual = SF_RES_ATTNRES_BLOCK; c->attnres_block_size = 4;
}
static void v_block2_post(sf_config *c) { v_block2(c); c->pre_norm = 0; c->pos = SF_POS_ROPE; }
static void v_moda_c1(sf_config *c) { c->moda = 1; }
static void v_moda_c2_rope_mqa(sf_config *c) {
    c->moda = 1; c->moda_chunk = 2; c->pos = SF_POS_ROPE; c->n_kv_heads = 1;
}
static void v_moda_depth_only_c3(sf_config *c) { c->moda = 1; c->moda_chunk = 3; c->moda_depth_only = 1; }
static void v_moda_block3(sf_config *c) {
    c->moda = 1; c->moda_chunk = 2; c->n_kv_heads = 2;
    c->residual = SF_RES_ATTNRES_BLOCK; c->attnres_block_size = 3;
}
static void v_moda_bidir_c2(sf_config *c) { c->moda = 1; c->moda_chunk = 2; c->causal = 0; }
static void v_moda_full_post(sf_config *c) { c->moda = 1; c->residual = SF_RES_ATTNRES_FULL; c->pre_norm = 0; }

static const variant VARIANTS[] = {
    {"plain", v_plain},
    {"plain post rope gqa swiglu rmsnorm", v_post_rope_gqa_swiglu},
    {"plain bidirectional sinusoidal gelu_tanh", v_bidir_sinusoidal},
    {"plain no-pos relu no-bias untied no-final-norm", v_bare_relu},
    {"attnres_full", v_full},
    {"attnres_full post rmsnorm", v_full_post},
    {"attnres_block S=1", v_block1},
    {"attnres_block S=2", v_block2},
    {"attnres_block S=3", v_block3},
    {"attnres_block S=4", v_block4},
    {"attnres_block S=2 post rope", v_block2_post},
    {"moda chunk 1", v_moda_c1},
    {"moda chunk 2 rope mqa", v_moda_c2_rope_mqa},
    {"moda depth_only chunk 3", v_moda_depth_only_c3},
    {"moda chunk 2 + attnres_block S=3", v_moda_block3},
    {"moda bidirectional chunk 2", v_moda_bidir_c2},
    {"moda + attnres_full post", v_moda_full_post},
};
enum { N_VARIANTS = (int)(sizeof VARIANTS / sizeof VARIANTS[0]) };

/* V=37, d=32, 4 heads (dh = 8), 3 blocks (L = 6 sublayers), max_seq_len 12, d_ff 48 */
static sf_config small_config(const variant *v) {
    sf_config c;
    sf_config_default(&c, 37, 32, 4, 3, 12);
    c.d_ff = 48;
    v->tweak(&c);
    return c;
}

/* Fresh weights make every AttnRes pseudo-query 0 (uniform mixtures) and keep every bias 0:
 * randomize them so the schedules and the bias paths are actually exercised. */
static sf_model *make_model(const sf_config *c, uint64_t seed, const char *label) {
    char err[256] = "";
    sf_model *m = NULL;
    sf_status st = sf_model_create(c, seed, &m, err, sizeof err);
    CHECK(st == SF_OK && m, "%s: sf_model_create: %s (%s)", label, sf_status_name(st), err);
    if (!m) return NULL;
    float *p = sf_model_params(m);
    for (int32_t i = 0; i < sf_model_num_tensors(m); i++) {
        const sf_tensor_info *t = sf_model_tensor(m, i);
        if (strstr(t->name, "_res_proj")) fill(p + t->offset, t->numel, -0.3f, 0.3f);
        else if (ends_with(t->name, ".bias")) fill(p + t->offset, t->numel, -0.05f, 0.05f);
        else if (ends_with(t->name, "norm.weight")) fill(p + t->offset, t->numel, 0.8f, 1.2f);
    }
    return m;
}

static sf_status forward(const sf_model *m, const int32_t *tok, const float *embeds,
                         const uint8_t *pad, int64_t B, int64_t T, int two_phase, int nt,
                         float *logits, float *hidden, sf_trace *trace, char *err, size_t errlen) {
    sf_forward_args a = {.tokens = tok, .embeds = embeds, .key_padding_mask = pad, .B = B, .T = T,
                         .attnres_two_phase = two_phase, .n_threads = nt};
    return sf_forward(m, &a, logits, hidden, trace, err, errlen);
}

/* Run and require success; returns 1 when it ran. */
static int forward_ok(const sf_model *m, const int32_t *tok, const uint8_t *pad, int64_t B,
                      int64_t T, int two_phase, int nt, float *logits, float *hidden,
                      const char *label) {
    char err[256] = "";
    sf_status st = forward(m, tok, NULL, pad, B, T, two_phase, nt, logits, hidden, NULL, err, sizeof err);
    CHECK(st == SF_OK, "%s: sf_forward: %s (%s)", label, sf_status_name(st), err);
    return st == SF_OK;
}

static void random_tokens(int32_t *tok, int64_t n, int64_t V) {
    for (int64_t i = 0; i < n; i++) tok[i] = (int32_t)(urand() * (double)V);
}

/* Every property a single configuration must have. */
static void check_forward_variant(const variant *v) {
    enum { B = 2, T = 9 };
    const sf_config c = small_config(v);
    sf_model *m = make_model(&c, 1, v->name);
    if (!m) return;
    const int64_t V = c.vocab_size, d = c.d_model, NV = B * T * V;
    const int block = c.residual == SF_RES_ATTNRES_BLOCK;
    int32_t tok[B * T], tok2[B * T];
    random_tokens(tok, B * T, V);
    float *logits = falloc(NV), *logits2 = falloc(NV), *hidden = falloc(B * T * d);
    char what[200];

    /* finite outputs */
    if (!forward_ok(m, tok, NULL, B, T, 1, 1, logits, hidden, v->name)) goto done;
    CHECK(all_finite(logits, NV), "%s: non-finite logits", v->name);
    CHECK(all_finite(hidden, B * T * d), "%s: non-finite hidden", v->name);

    /* logits = hidden (after the final norm) . head^T */
    {
        int32_t hi = sf_model_find_tensor(m, c.tie_embeddings ? "tok_emb.weight" : "lm_head.weight");
        const float *head = sf_model_params(m) + sf_model_tensor(m, hi)->offset;
        double *want = dalloc(NV);
        for (int64_t r = 0; r < B * T; r++)
            for (int64_t j = 0; j < V; j++) {
                double s = 0.0;
                for (int64_t e = 0; e < d; e++) s += (double)hidden[r * d + e] * head[j * d + e];
                want[r * V + j] = s;
            }
        snprintf(what, sizeof what, "%s: logits vs hidden . head^T", v->name);
        CHECK_CLOSE(what, logits, want, NV, 1e-5, 1e-5);
        free(want);
    }

    /* thread counts give the same bits */
    for (int nt = 2; nt <= 3; nt++) {
        forward_ok(m, tok, NULL, B, T, 1, nt, logits2, NULL, v->name);
        snprintf(what, sizeof what, "%s: threads 1 vs %d", v->name, nt);
        CHECK_SAME(what, logits, logits2, NV);
    }

    /* embeddings given directly (the token rows of tok_emb) are the token path */
    {
        float *emb = falloc(B * T * d);
        const float *tok_emb = sf_model_params(m) + sf_model_tensor(m, sf_model_find_tensor(m, "tok_emb.weight"))->offset;
        for (int64_t r = 0; r < B * T; r++) memcpy(emb + r * d, tok_emb + tok[r] * d, (size_t)d * sizeof(float));
        char err[256] = "";
        sf_status st = forward(m, NULL, emb, NULL, B, T, 1, 1, logits2, NULL, NULL, err, sizeof err);
        CHECK(st == SF_OK, "%s: forward with embeds: %s", v->name, err);
        snprintf(what, sizeof what, "%s: embeds vs tokens", v->name);
        CHECK_SAME(what, logits, logits2, NV);
        free(emb);
    }

    /* Block AttnRes: the two-phase schedule is a reordering of the same sums; elsewhere the
     * flag is ignored */
    forward_ok(m, tok, NULL, B, T, 0, 1, logits2, NULL, v->name);
    snprintf(what, sizeof what, "%s: two_phase 1 vs 0", v->name);
    if (block) CHECK_CLOSE_F(what, logits, logits2, NV, 1e-5, 1e-5);
    else CHECK_SAME(what, logits, logits2, NV);

    /* causality: a new last token changes nothing before it (bitwise: rows are independent);
     * bidirectional: it changes position 0 */
    memcpy(tok2, tok, sizeof tok);
    for (int b = 0; b < B; b++) tok2[b * T + T - 1] = (tok[b * T + T - 1] + 1) % (int32_t)V;
    forward_ok(m, tok2, NULL, B, T, 1, 1, logits2, NULL, v->name);
    for (int b = 0; b < B; b++) {
        const float *a0 = logits + (int64_t)b * T * V, *a1 = logits2 + (int64_t)b * T * V;
        if (c.causal) {
            snprintf(what, sizeof what, "%s: causality, batch row %d, positions < T-1", v->name, b);
            CHECK_SAME(what, a0, a1, (T - 1) * V);
        } else {
            CHECK(first_difference(a0, a1, V) >= 0,
                  "%s: bidirectional, batch row %d: position 0 ignores the last token", v->name, b);
        }
        CHECK(first_difference(a0 + (T - 1) * V, a1 + (T - 1) * V, V) >= 0,
              "%s: batch row %d: the last position ignores its own token", v->name, b);
    }

    /* padding: the tokens at padded positions never reach a real position (b0: holes at 2, 5;
     * b1: right padding from 6) */
    {
        static const uint8_t pad[B * T] = {1, 1, 0, 1, 1, 0, 1, 1, 1, /**/ 1, 1, 1, 1, 1, 1, 0, 0, 0};
        memcpy(tok2, tok, sizeof tok);
        for (int64_t r = 0; r < B * T; r++)
            if (!pad[r]) tok2[r] = (tok[r] + 1 + (int32_t)r) % (int32_t)V;
        forward_ok(m, tok, pad, B, T, 1, 1, logits, NULL, v->name);
        forward_ok(m, tok2, pad, B, T, 1, 1, logits2, NULL, v->name);
        CHECK(all_finite(logits, NV), "%s: non-finite logits with padding", v->name);
        for (int64_t r = 0; r < B * T; r++) {
            if (!pad[r]) continue;
            snprintf(what, sizeof what, "%s: padding, real position [%lld, %lld] depends on padded tokens",
                     v->name, (long long)(r / T), (long long)(r % T));
            CHECK_SAME(what, logits + r * V, logits2 + r * V, V);
        }
    }
done:
    free(logits); free(logits2); free(hidden);
    sf_model_free(m);
}

static void test_forward_variants(void) {
    for (int i = 0; i < N_VARIANTS; i++) check_forward_variant(&VARIANTS[i]);
}

/* Block AttnRes with S = 1 is Full AttnRes: same table, same weights, same logits. */
static void test_block_s1_is_full(void) {
    sf_config full = small_config(&(variant){"full", v_full});
    sf_config blk = small_config(&(variant){"block1", v_block1});
    sf_model *mf = make_model(&full, 3, "full"), *mb = make_model(&blk, 3, "block S=1");
    if (!mf || !mb) { sf_model_free(mf); sf_model_free(mb); return; }
    int same_table = sf_model_num_tensors(mf) == sf_model_num_tensors(mb) &&
                     sf_model_num_params(mf) == sf_model_num_params(mb);
    for (int32_t i = 0; same_table && i < sf_model_num_tensors(mf); i++) {
        const sf_tensor_info *a = sf_model_tensor(mf, i), *b = sf_model_tensor(mb, i);
        same_table = !strcmp(a->name, b->name) && a->offset == b->offset && a->numel == b->numel;
    }
    CHECK(same_table, "attnres_full and attnres_block S=1 have different parameter tables");
    if (same_table) {
        memcpy(sf_model_params(mb), sf_model_params(mf), (size_t)sf_model_num_params(mf) * sizeof(float));
        enum { B = 2, T = 11 };
        const int64_t NV = B * T * full.vocab_size;
        int32_t tok[B * T];
        random_tokens(tok, B * T, full.vocab_size);
        float *lf = falloc(NV), *lb = falloc(NV);
        forward_ok(mf, tok, NULL, B, T, 0, 1, lf, NULL, "full");
        for (int two_phase = 0; two_phase <= 1; two_phase++) {
            forward_ok(mb, tok, NULL, B, T, two_phase, 1, lb, NULL, "block S=1");
            char what[96];
            snprintf(what, sizeof what, "block S=1 (two_phase=%d) vs full", two_phase);
            CHECK_CLOSE_F(what, lb, lf, NV, 1e-6, 1e-6);
        }
        free(lf); free(lb);
    }
    sf_model_free(mf);
    sf_model_free(mb);
}

/* Every trace buffer at exactly its documented shape (the sanitizer build checks the bounds);
 * the recordings agree with each other and with the documented layout. */
static void check_traces(const variant *v) {
    enum { B = 2, T = 7 };
    const sf_config c = small_config(v);
    sf_model *m = make_model(&c, 5, v->name);
    if (!m) return;
    const int64_t n = c.n_layers, L = 2 * n, H = c.n_heads, d = c.d_model, V = c.vocab_size;
    const int attnres = c.residual != SF_RES_PLAIN;
    int32_t tok[B * T];
    random_tokens(tok, B * T, V);

    float *attention[8], *hidden[9], *attn_out[8], *mlp_out[8], *alpha[17], *depth_mass[8];
    float *rms = falloc((L + 1) * SF_RMS_COLS);
    for (int64_t i = 0; i < n; i++) {
        attention[i] = falloc(B * H * T * (T + sf_depth_cols(&c, i)));
        attn_out[i] = falloc(B * T * d);
        mlp_out[i] = falloc(B * T * d);
        depth_mass[i] = falloc(B * H * T);
    }
    for (int64_t i = 0; i <= n; i++) hidden[i] = falloc(B * T * d);
    for (int64_t k = 0; k <= L; k++) alpha[k] = attnres ? falloc(B * T * sf_attnres_num_sources(&c, k)) : NULL;
    sf_trace tr = {attention, hidden, attn_out, mlp_out, attnres ? alpha : NULL,
                   c.moda ? depth_mass : NULL, rms};

    /* the documented source counts: Full k+1 (L+1 at the output); Block 1 + k/S + [k%S != 0] */
    for (int64_t k = 0; k <= L && attnres; k++) {
        int64_t S = c.attnres_block_size, want;
        if (c.residual == SF_RES_ATTNRES_FULL) want = k + 1;
        else want = k < L ? 1 + k / S + (k % S != 0) : 1 + (L + S - 1) / S;
        CHECK(sf_attnres_num_sources(&c, k) == want, "%s: sources of sublayer %lld: %lld, want %lld",
              v->name, (long long)k, (long long)sf_attnres_num_sources(&c, k), (long long)want);
    }
    for (int64_t i = 0; i < n; i++)
        CHECK(sf_depth_cols(&c, i) == (c.moda ? 2 * i * c.moda_chunk : 0), "%s: depth cols of layer %lld",
              v->name, (long long)i);

    float *logits = falloc(B * T * V), *logits2 = falloc(B * T * V);
    float *alpha0[17] = {0};
    char err[256] = "", what[200];
    for (int two_phase = 0; two_phase <= 1; two_phase++) {
        sf_status st = forward(m, tok, NULL, NULL, B, T, two_phase, 2, logits, NULL, &tr, err, sizeof err);
        CHECK(st == SF_OK, "%s: forward with traces: %s", v->name, err);
        if (st != SF_OK) continue;
        /* recording changes nothing */
        forward_ok(m, tok, NULL, B, T, two_phase, 2, logits2, NULL, v->name);
        snprintf(what, sizeof what, "%s two_phase=%d: logits with vs without traces", v->name, two_phase);
        CHECK_SAME(what, logits, logits2, B * T * V);

        for (int64_t i = 0; i < n; i++) {
            const int64_t W = T + sf_depth_cols(&c, i), Dc = W - T;
            int64_t bad_rows = 0, bad_mass = 0;
            for (int64_t r = 0; r < B * H * T; r++) {
                const float *p = attention[i] + r * W;
                double sum = 0.0, dsum = 0.0;
                for (int64_t col = 0; col < W; col++) sum += p[col];
                for (int64_t col = T; col < W; col++) dsum += p[col];
                bad_rows += fabs(sum - 1.0) > 1e-5; /* causal, unpadded: every row sees a key */
                if (c.moda) bad_mass += fabs(dsum - depth_mass[i][r]) > 1e-5;
                /* causal: no probability on later keys or later depth positions */
                const int64_t t = r % T;
                for (int64_t u = t + 1; u < T && c.causal; u++) bad_rows += p[u] != 0.0f;
                for (int64_t col = 0; col < Dc; col++) {
                    int64_t u = (t / c.moda_chunk) * c.moda_chunk + col / (2 * i);
                    bad_rows += u > t && p[T + col] != 0.0f;
                }
            }
            CHECK(bad_rows == 0, "%s two_phase=%d: layer %lld: %lld bad attention rows", v->name,
                  two_phase, (long long)i, (long long)bad_rows);
            CHECK(bad_mass == 0, "%s two_phase=%d: layer %lld: %lld depth_mass values != depth columns' sum",
                  v->name, two_phase, (long long)i, (long long)bad_mass);
            CHECK(all_finite(attn_out[i], B * T * d) && all_finite(mlp_out[i], B * T * d),
                  "%s: non-finite sublayer outputs in layer %lld", v->name, (long long)i);
        }
        for (int64_t i = 0; i <= n; i++)
            CHECK(all_finite(hidden[i], B * T * d), "%s: non-finite hidden[%lld]", v->name, (long long)i);
        for (int64_t k = 0; k < L; k++)
            CHECK(all_finite(rms + k * SF_RMS_COLS, SF_RMS_COLS), "%s: rms row %lld not finite", v->name, (long long)k);
        CHECK(isfinite(rms[L * SF_RMS_COLS + SF_RMS_INPUT]) && isnan(rms[L * SF_RMS_COLS + SF_RMS_OUTPUT]) &&
                  isnan(rms[L * SF_RMS_COLS + SF_RMS_STREAM]),
              "%s: rms output row %g %g %g (want finite, NaN, NaN)", v->name,
              (double)rms[L * SF_RMS_COLS], (double)rms[L * SF_RMS_COLS + 1], (double)rms[L * SF_RMS_COLS + 2]);
        if (!attnres) {
            /* plain residual: the stream entering block 0 is the embedding, and block i+1's
             * input is block i's input plus its two updates (pre-norm) */
            if (c.pre_norm) {
                float *x = fdup(hidden[0], B * T * d);
                for (int64_t i = 0; i < n; i++) {
                    sf_add(x, attn_out[i], B * T * d, 1);
                    sf_add(x, mlp_out[i], B * T * d, 1);
                    snprintf(what, sizeof what, "%s: hidden[%lld] = hidden[%lld] + attn_out + mlp_out",
                             v->name, (long long)i + 1, (long long)i);
                    CHECK_SAME(what, x, hidden[i + 1], B * T * d);
                    memcpy(x, hidden[i + 1], (size_t)(B * T * d) * sizeof(float));
                }
                free(x);
            }
            continue;
        }
        for (int64_t k = 0; k <= L; k++) {
            const int64_t ns = sf_attnres_num_sources(&c, k);
            int64_t bad = 0;
            for (int64_t r = 0; r < B * T; r++) {
                double s = 0.0;
                for (int64_t i = 0; i < ns; i++) s += alpha[k][r * ns + i];
                bad += fabs(s - 1.0) > 1e-5;
            }
            CHECK(bad == 0, "%s two_phase=%d: alpha[%lld]: %lld rows do not sum to 1", v->name,
                  two_phase, (long long)k, (long long)bad);
            if (two_phase == 0) {
                alpha0[k] = fdup(alpha[k], B * T * ns);
            } else if (alpha0[k]) {
                snprintf(what, sizeof what, "%s: alpha[%lld] two-phase vs direct", v->name, (long long)k);
                CHECK_CLOSE_F(what, alpha[k], alpha0[k], B * T * ns, 1e-6, 1e-5);
            }
        }
    }
    for (int64_t k = 0; k <= L; k++) { free(alpha0[k]); free(alpha[k]); }
    for (int64_t i = 0; i < n; i++) { free(attention[i]); free(attn_out[i]); free(mlp_out[i]); free(depth_mass[i]); }
    for (int64_t i = 0; i <= n; i++) free(hidden[i]);
    free(rms); free(logits); free(logits2);
    sf_model_free(m);
}

static void test_traces(void) {
    check_traces(&(variant){"traces plain", v_plain});
    check_traces(&(variant){"traces moda chunk 2 rope mqa", v_moda_c2_rope_mqa});
    check_traces(&(variant){"traces moda + attnres_block S=3", v_moda_block3});
    check_traces(&(variant){"traces attnres_block S=4", v_block4});
    check_traces(&(variant){"traces moda + attnres_full post", v_moda_full_post});
}

/* Larger model and sequence so the matmul, attention and AttnRes kernels really run threaded:
 * the forward pass is bitwise identical for 1 and 2 threads. */
static void test_forward_threads(void) {
    static const variant vs[] = {{"wide plain", v_plain},
                                 {"wide moda chunk 2 + attnres_block S=3", v_moda_block3},
                                 {"wide attnres_full post", v_full_post}};
    enum { B = 2, T = 32 };
    for (size_t vi = 0; vi < sizeof vs / sizeof vs[0]; vi++) {
        sf_config c;
        sf_config_default(&c, 300, 64, 4, 2, 32);
        c.d_ff = 256;
        vs[vi].tweak(&c);
        sf_model *m = make_model(&c, 11, vs[vi].name);
        if (!m) continue;
        int32_t tok[B * T];
        random_tokens(tok, B * T, c.vocab_size);
        const int64_t NV = B * T * c.vocab_size;
        float *l1 = falloc(NV), *l2 = falloc(NV);
        for (int two_phase = 0; two_phase <= 1; two_phase++) {
            forward_ok(m, tok, NULL, B, T, two_phase, 1, l1, NULL, vs[vi].name);
            forward_ok(m, tok, NULL, B, T, two_phase, 2, l2, NULL, vs[vi].name);
            char what[128];
            snprintf(what, sizeof what, "%s two_phase=%d: threads 1 vs 2", vs[vi].name, two_phase);
            CHECK_SAME(what, l1, l2, NV);
            CHECK(all_finite(l1, NV), "%s: non-finite logits", vs[vi].name);
        }
        free(l1); free(l2);
        sf_model_free(m);
    }
}

/* Incremental decoding: feeding a sequence through a cache in pieces (prefill 4, then 1, 1, 3
 * positions) reproduces the logits of one full pass, for every causal variant. */
static void test_cache(void) {
    enum { B = 2, T = 9 };
    static const int64_t pieces[] = {4, 1, 1, 3};
    char err[256], what[200];
    for (int vi = 0; vi < N_VARIANTS; vi++) {
        const variant *v = &VARIANTS[vi];
        const sf_config c = small_config(v);
        if (!c.causal) continue;
        sf_model *m = make_model(&c, 4, v->name);
        if (!m) continue;
        const int64_t V = c.vocab_size;
        int32_t tok[B * T], piece_tok[B * T];
        random_tokens(tok, B * T, V);
        float *full = falloc(B * T * V), *step = falloc(B * T * V);
        forward_ok(m, tok, NULL, B, T, 1, 1, full, NULL, v->name);
        sf_cache *cache = NULL;
        sf_status st = sf_cache_create(m, B, T, &cache, err, sizeof err);
        CHECK(st == SF_OK && cache, "%s: sf_cache_create: %s", v->name, err);
        if (!cache) { free(full); free(step); sf_model_free(m); continue; }
        CHECK(sf_cache_batch(cache) == B && sf_cache_len(cache) == 0, "%s: new cache: batch %lld, len %lld",
              v->name, (long long)sf_cache_batch(cache), (long long)sf_cache_len(cache));
        for (int pass = 0; pass < 2; pass++) { /* the second pass after sf_cache_reset */
            int64_t pos = 0;
            for (size_t pi = 0; pi < sizeof pieces / sizeof pieces[0]; pi++) {
                const int64_t n = pieces[pi];
                for (int64_t b = 0; b < B; b++) memcpy(piece_tok + b * n, tok + b * T + pos, (size_t)n * sizeof(int32_t));
                sf_forward_args a = {.tokens = piece_tok, .B = B, .T = n, .attnres_two_phase = 1,
                                     .n_threads = 2, .cache = cache};
                err[0] = '\0';
                st = sf_forward(m, &a, step, NULL, NULL, err, sizeof err);
                CHECK(st == SF_OK, "%s: cached step at %lld: %s", v->name, (long long)pos, err);
                for (int64_t b = 0; st == SF_OK && b < B; b++) {
                    snprintf(what, sizeof what, "%s: pass %d, positions %lld..%lld of batch row %lld, cached vs full",
                             v->name, pass, (long long)pos, (long long)(pos + n - 1), (long long)b);
                    CHECK_CLOSE_F(what, step + b * n * V, full + (b * T + pos) * V, n * V, 1e-5, 1e-5);
                }
                pos += n;
                CHECK(sf_cache_len(cache) == pos, "%s: cache length %lld, want %lld", v->name,
                      (long long)sf_cache_len(cache), (long long)pos);
            }
            /* full: one more position does not fit, and the cache is left as it was */
            sf_forward_args a = {.tokens = tok, .B = B, .T = 1, .cache = cache};
            err[0] = '\0';
            st = sf_forward(m, &a, step, NULL, NULL, err, sizeof err);
            CHECK(st == SF_ERR_INVALID_ARG && err[0] && sf_cache_len(cache) == T,
                  "%s: full cache: %s '%s', len %lld", v->name, sf_status_name(st), err,
                  (long long)sf_cache_len(cache));
            sf_cache_reset(cache);
            CHECK(sf_cache_len(cache) == 0, "%s: reset cache length %lld", v->name, (long long)sf_cache_len(cache));
        }
        sf_cache_free(cache);
        free(full); free(step);
        sf_model_free(m);
    }

    /* what a cache refuses: a mask, a trace, another batch size, another model, a
     * bidirectional model, and sizes it cannot hold */
    const sf_config c = small_config(&VARIANTS[0]);
    sf_config bc = c;
    bc.causal = 0;
    sf_model *m = make_model(&c, 4, "cache errors"), *other = make_model(&c, 5, "cache errors"),
             *bidir = make_model(&bc, 4, "cache errors");
    sf_cache *cache = NULL, *bad = NULL;
    if (m && other && bidir && sf_cache_create(m, 2, 8, &cache, err, sizeof err) == SF_OK) {
        int32_t tok[2 * 8] = {0};
        uint8_t pad[2 * 8];
        memset(pad, 1, sizeof pad);
        float *logits = falloc(2 * 8 * c.vocab_size), *hidden[4]; /* n_layers + 1 */
        for (int i = 0; i < 4; i++) hidden[i] = falloc(2 * 8 * c.d_model);
        sf_trace tr = {.hidden = hidden};
        struct { const char *what; const sf_model *m; sf_forward_args a; sf_trace *tr; } cases[] = {
            {"with a key_padding_mask", m, {.tokens = tok, .key_padding_mask = pad, .B = 2, .T = 2, .cache = cache}, NULL},
            {"with a trace", m, {.tokens = tok, .B = 2, .T = 2, .cache = cache}, &tr},
            {"with another batch size", m, {.tokens = tok, .B = 1, .T = 2, .cache = cache}, NULL},
            {"with another model", other, {.tokens = tok, .B = 2, .T = 2, .cache = cache}, NULL},
            {"longer than the cache", m, {.tokens = tok, .B = 2, .T = 9, .cache = cache}, NULL},
        };
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            err[0] = '\0';
            sf_status st = sf_forward(cases[i].m, &cases[i].a, logits, NULL, cases[i].tr, err, sizeof err);
            CHECK(st == SF_ERR_INVALID_ARG && err[0] && sf_cache_len(cache) == 0,
                  "cached forward %s: %s '%s', cache len %lld", cases[i].what, sf_status_name(st), err,
                  (long long)sf_cache_len(cache));
        }
        sf_status st = sf_cache_create(bidir, 2, 8, &bad, err, sizeof err);
        if (st == SF_OK) { /* creation may succeed; decoding a bidirectional model may not */
            sf_forward_args a = {.tokens = tok, .B = 2, .T = 1, .cache = bad};
            err[0] = '\0';
            st = sf_forward(bidir, &a, logits, NULL, NULL, err, sizeof err);
            CHECK(st == SF_ERR_INVALID_ARG && err[0], "cached forward of a bidirectional model: %s '%s'",
                  sf_status_name(st), err);
            sf_cache_free(bad);
            bad = NULL;
        }
        err[0] = '\0';
        st = sf_cache_create(m, 2, c.max_seq_len + 1, &bad, err, sizeof err);
        CHECK(st == SF_ERR_INVALID_ARG && !bad && err[0], "cache longer than max_seq_len: %s '%s'", sf_status_name(st), err);
        err[0] = '\0';
        st = sf_cache_create(m, 0, 4, &bad, err, sizeof err);
        CHECK(st == SF_ERR_INVALID_ARG && !bad && err[0], "cache with B = 0: %s '%s'", sf_status_name(st), err);
        for (int i = 0; i < 4; i++) free(hidden[i]);
        free(logits);
    } else {
        CHECK(0, "cache errors: setup failed: %s", err);
    }
    sf_cache_free(cache);
    sf_model_free(m); sf_model_free(other); sf_model_free(bidir);
}

/* Bad arguments return the right status with a message, never crash. */
static void test_forward_errors(void) {
    sf_config c = small_config(&(variant){"plain", v_plain});
    sf_model *m = make_model(&c, 2, "errors");
    if (!m) return;
    enum { B = 2, T = 5 };
    const int64_t V = c.vocab_size, Tmax = c.max_seq_len;
    int32_t tok[2 * 16];
    random_tokens(tok, 2 * 16, V);
    float *logits = falloc(2 * 16 * V), *emb = falloc(B * T * c.d_model);
    fill(emb, B * T * c.d_model, -1.0f, 1.0f);
    char err[256];
    sf_status st;
#define EXPECT(want, call)                                                                        \
    do {                                                                                          \
        err[0] = '\0';                                                                            \
        st = (call);                                                                              \
        CHECK(st == (want) && err[0] != '\0', "%s: returned %s with message '%s', want %s",       \
              #call, sf_status_name(st), err, sf_status_name(want));                              \
    } while (0)

    int32_t saved = tok[7];
    tok[7] = (int32_t)V; /* one past the vocabulary */
    EXPECT(SF_ERR_TOKEN_RANGE, forward(m, tok, NULL, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    tok[7] = -1;
    EXPECT(SF_ERR_TOKEN_RANGE, forward(m, tok, NULL, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    tok[7] = saved;
    EXPECT(SF_ERR_INVALID_ARG, forward(m, tok, NULL, NULL, 1, Tmax + 1, 1, 1, logits, NULL, NULL, err, sizeof err));
    EXPECT(SF_ERR_INVALID_ARG, forward(m, tok, NULL, NULL, 0, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    EXPECT(SF_ERR_INVALID_ARG, forward(m, tok, NULL, NULL, B, 0, 1, 1, logits, NULL, NULL, err, sizeof err));
    EXPECT(SF_ERR_INVALID_ARG, forward(m, NULL, NULL, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    EXPECT(SF_ERR_INVALID_ARG, forward(m, tok, emb, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    EXPECT(SF_ERR_INVALID_ARG, forward(NULL, tok, NULL, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    emb[3] = NAN;
    EXPECT(SF_ERR_NONFINITE, forward(m, NULL, emb, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    emb[3] = INFINITY;
    EXPECT(SF_ERR_NONFINITE, forward(m, NULL, emb, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
#undef EXPECT
    /* err may be NULL */
    tok[0] = -5;
    CHECK(forward(m, tok, NULL, NULL, B, T, 1, 1, logits, NULL, NULL, NULL, 0) == SF_ERR_TOKEN_RANGE,
          "bad token with err = NULL");
    tok[0] = 0;
    /* T = max_seq_len is fine, and nothing needs to be requested as output */
    CHECK(forward(m, tok, NULL, NULL, 2, Tmax, 1, 1, logits, NULL, NULL, err, sizeof err) == SF_OK,
          "T = max_seq_len: %s", err);
    CHECK(forward(m, tok, NULL, NULL, 2, Tmax, 1, 1, NULL, NULL, NULL, err, sizeof err) == SF_OK,
          "no outputs requested: %s", err);
    /* the default thread count (n_threads = 0) follows sf_set_num_threads */
    sf_set_num_threads(3);
    CHECK(sf_get_num_threads() == 3 && sf_threads_resolve(0) == 3 && sf_threads_resolve(2) == 2,
          "thread settings: %d %d", sf_get_num_threads(), sf_threads_resolve(0));
    sf_set_num_threads(0);
    CHECK(sf_get_num_threads() >= 1, "default threads %d", sf_get_num_threads());
    free(logits); free(emb);
    sf_model_free(m);
}

/* ============================================================================================ */

int main(void) {
    struct { const char *name; void (*fn)(void); } tests[] = {
        {"matmul", test_matmul},
        {"gemm", test_gemm},
        {"blas backend", test_blas_backend},
        {"norms", test_norms},
        {"activations", test_activations},
        {"rope", test_rope},
        {"attention", test_attention},
        {"attnres", test_attnres},
        {"config validation", test_config_validation},
        {"tensor table", test_tensor_table},
        {"forward variants", test_forward_variants},
        {"block S=1 is full", test_block_s1_is_full},
        {"traces", test_traces},
        {"forward threads", test_forward_threads},
        {"kv cache", test_cache},
        {"forward errors", test_forward_errors},
    };
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        long c0 = g_checks, f0 = g_failed;
        tests[i].fn();
        printf("%-20s %6ld checks, %ld failed\n", tests[i].name, g_checks - c0, g_failed - f0);
    }
    printf("%ld checks, %ld failed\n", g_checks, g_failed);
    return g_failed ? 1 : 0;
}
