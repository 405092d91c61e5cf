/* Call loops for the OpenBLAS yardstick in benchmarks/bench.py (built at run time, like peak.c:
 *   cc -O2 -shared -fPIC gemm_loop.c -o libsfgemmloop.so).
 *
 * Why a C loop: the per-head attention products are small (a 128 x 32 x 128 product is ~1
 * MFLOP, ~10 us); timing one ctypes call per product would add ctypes' own ~1 us per call to
 * both libraries and blur exactly the call overhead this comparison is about. Python makes one
 * call per batch of heads; the loop calls the library once per head, as an attention layer
 * built on a BLAS would.
 *
 * Both functions get the library's function pointer from the caller (ctypes), so this file
 * links against neither library. Heads are stored one after another:
 *   which 0 (scores S = Q K^T): a = Q (heads, T, dh), b = K (heads, T, dh), y = S (heads, T, T)
 *   which 1 (output O = P V):   a = P (heads, T, T),  b = V (heads, T, dh), y = O (heads, T, dh)
 */
#include <stdint.h>

typedef void (*sf_gemm_fn)(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs,
                           const float *w, int trans_w, const float *b, int64_t N, int64_t K,
                           int64_t M, int accumulate, float *pack, int n_threads);
/* cblas_sgemm(order, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) */
typedef void (*cblas_sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                               const float *, int, float, float *, int);
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

void loop_sf(void *fn, int which, int64_t heads, int64_t T, int64_t dh, const float *a,
             const float *b, float *y, float *pack, int n_threads, int reps) {
    sf_gemm_fn f = (sf_gemm_fn)fn;
    for (int r = 0; r < reps; r++)
        for (int64_t h = 0; h < heads; h++) {
            if (which == 0) /* S (T,T) = Q (T,dh) K^T: K is (T,dh) row-major = the Linear layout */
                f(y + h * T * T, T, a + h * T * dh, dh, 1, b + h * T * dh, 1, 0, T, dh, T, 0, pack,
                  n_threads);
            else /* O (T,dh) = P (T,T) V (T,dh) */
                f(y + h * T * dh, dh, a + h * T * T, T, 1, b + h * T * dh, 0, 0, T, T, dh, 0, pack,
                  n_threads);
        }
}

void loop_blas(void *fn, int which, int64_t heads, int64_t T, int64_t dh, const float *a,
               const float *b, float *y, int reps) {
    cblas_sgemm_fn f = (cblas_sgemm_fn)fn;
    int t = (int)T, d = (int)dh;
    for (int r = 0; r < reps; r++)
        for (int64_t h = 0; h < heads; h++) {
            if (which == 0)
                f(ROW_MAJOR, NO_TRANS, TRANS, t, t, d, 1.0f, a + h * T * dh, d, b + h * T * dh, d,
                  0.0f, y + h * T * T, t);
            else
                f(ROW_MAJOR, NO_TRANS, NO_TRANS, t, d, t, 1.0f, a + h * T * T, t, b + h * T * dh, d,
                  0.0f, y + h * T * dh, d);
        }
}
