/* stackformer C tests: kernels (matmul/gemm tiles, BLAS backend, norms, activations, RoPE) vs double loops. See check.h for the framework; test_main.c runs them. */
#include "check.h"

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

void test_matmul(void) {
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

/* sf_gemm_tile2 (attention's tiles: up to 8 rows, two panels) against an fmaf loop in
 * ascending k: A with unit k-stride and with unit row stride, both panel strides, with and
 * without bias / accumulate, every height and width; the floats around the tile untouched. */
static void gemm_tile2_cases(void) {
    const int64_t K = 37, lda = 45, ps = K * SF_GEMM_NR + 16, ldy = 40;
    float *a = falloc(lda * lda), *pn = falloc(2 * ps), *b = falloc(32), *y0 = falloc(10 * ldy);
    float *y = falloc(10 * ldy), *want = falloc(10 * ldy);
    fill(a, lda * lda, -1, 1);
    fill(pn, 2 * ps, -1, 1);
    fill(b, 32, -1, 1);
    fill(y0, 10 * ldy, -1, 1);
    int64_t bad = 0;
    for (int unit_k = 0; unit_k <= 1; unit_k++)
        for (int mode = 0; mode < 3; mode++)
            for (int64_t mr = 1; mr <= 8; mr++)
                for (int64_t mw = 1; mw <= 32; mw++) {
                    const int64_t rs = unit_k ? lda : 1, cs = unit_k ? 1 : lda;
                    const float *bp = mode == 0 ? b : NULL;
                    memcpy(want, y0, (size_t)(10 * ldy) * sizeof(float));
                    for (int64_t r = 0; r < mr; r++)
                        for (int64_t c = 0; c < mw; c++) {
                            const float *col = pn + (c / SF_GEMM_NR) * ps + c % SF_GEMM_NR;
                            float s = mode == 2 ? y0[(r + 1) * ldy + c + 2] : (bp ? bp[c] : 0.0f);
                            for (int64_t k = 0; k < K; k++) s = fmaf(a[r * rs + k * cs], col[k * SF_GEMM_NR], s);
                            want[(r + 1) * ldy + c + 2] = s;
                        }
                    memcpy(y, y0, (size_t)(10 * ldy) * sizeof(float));
                    sf_gemm_tile2(y + ldy + 2, ldy, a, rs, cs, K, pn, ps, bp, mr, mw, mode == 2);
                    bad += memcmp(y, want, (size_t)(10 * ldy) * sizeof(float)) != 0;
                }
    CHECK(bad == 0, "sf_gemm_tile2: %lld of %d tiles differ from the ascending-k fmaf loop (or wrote outside)",
          (long long)bad, 2 * 3 * 8 * 32);
    free(a); free(pn); free(b); free(y0); free(y); free(want);
}

void test_gemm(void) {
    static const int64_t acts_shapes[][3] = {{1, 7, 9}, {4, 33, 40}, {5, 16, 16}, {13, 20, 37}, {300, 64, 96}};
    for (int i = 0; i < 5; i++) matmul_act_case(acts_shapes[i][0], acts_shapes[i][1], acts_shapes[i][2]);
    static const int64_t dims[] = {1, 5, 6, 7, 16, 17, 33};
    for (int i = 0; i < 7; i++)
        for (int j = 0; j < 7; j++)
            for (int k = 0; k < 7; k++) gemm_case(dims[i], dims[j], dims[k]);
    gemm_case(150, 64, 70); /* threaded */
    gemm_case(40, 300, 33); /* several K chunks of the strided-A path, edge tiles */
    gemm_case(97, 257, 48);
    gemm_case(40, 300, 130); /* strided A read in place, shared out by panels over 3 threads */
    gemm_case(24, 520, 200); /* mHC's dPhi shape: 3 row tiles, 13 panels */
    gemm_case(24, 520, 208); /* ... with whole panels: B read in place, several K chunks */
    gemm_case(32, 300, 64);  /* the most row tiles that read B in place (4 of 8 rows) */
    gemm_case(33, 300, 64);  /* one more: B copied again */
    gemm_tile2_cases();
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

void test_blas_backend(void) {
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

void test_norms(void) {
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

void test_activations(void) {
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

void test_rope(void) {
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

