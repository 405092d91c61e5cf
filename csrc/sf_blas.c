/* stackformer's optional BLAS backend (see the comment below). */
#include "sf_kernels.h"
#include "sf_internal.h"

#include <stdatomic.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

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

int sf_blas_active(void) { return blas_pick().fn != 0; }

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
    sf_act_block(act, act_out, y, ldy, n0, n1 - n0, 0, M);
}

/* sf_gemm's product through the BLAS, if one is set: A contiguous along K (a_cs == 1) or
 * along N (a_rs == 1, the weight gradient's dy^T); other strides, and sizes CBLAS would
 * reject, stay on the tiles (returns 0). Our threads split the rows, each calling the BLAS
 * on its slice (use_blas sets an OpenBLAS to one thread): one pool. With the BLAS's own
 * threads, which spin ~0.1 s after each call, every OpenMP region in between lost a core
 * (S's train step 1.6x slower). */
int sf_blas_gemm(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs,
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
