/* stackformer kernels. See sf_kernels.h for contracts. */
#include "sf_kernels.h"
#include "sf.h"

#include <math.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

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

int64_t sf_matmul_pack_floats(int64_t K, int64_t M) {
    return K * ((M + SF_NR - 1) / SF_NR) * SF_NR;
}

/* pack[p][k][j] = w[(p*16 + j), k], zero-padded past M. */
static void pack_wt(float *pack, const float *w, int64_t K, int64_t M, int nt) {
    int64_t np = (M + SF_NR - 1) / SF_NR;
#pragma omp parallel for schedule(static) num_threads(nt) if (np * K > 32768)
    for (int64_t p = 0; p < np; p++) {
        float *dst = pack + p * K * SF_NR;
        int64_t m0 = p * SF_NR, mw = M - m0 < SF_NR ? M - m0 : SF_NR;
        for (int64_t k = 0; k < K; k++) {
            float *d = dst + k * SF_NR;
            int64_t j = 0;
            for (; j < mw; j++) d[j] = w[(m0 + j) * K + k];
            for (; j < SF_NR; j++) d[j] = 0.0f;
        }
    }
}

/* Generic tile: rows mr <= 6, columns mw <= 16 of panel `pp`. Same operation order per
 * element as the vector tile (init, then one fused multiply-add per k, ascending). */
static inline __attribute__((always_inline)) void
tile_generic_body(float *y, int64_t ldy, const float *x, int64_t K, const float *pp,
                  const float *b, int64_t mr, int64_t mw, int accumulate) {
    float acc[SF_MR][SF_NR];
    for (int64_t r = 0; r < mr; r++)
        for (int64_t j = 0; j < SF_NR; j++)
            acc[r][j] = j < mw ? (accumulate ? y[r * ldy + j] : (b ? b[j] : 0.0f)) : 0.0f;
    for (int64_t k = 0; k < K; k++) {
        const float *wk = pp + k * SF_NR;
        for (int64_t r = 0; r < mr; r++) {
            float xv = x[r * K + k];
            for (int64_t j = 0; j < SF_NR; j++) acc[r][j] = fmaf(xv, wk[j], acc[r][j]);
        }
    }
    for (int64_t r = 0; r < mr; r++)
        for (int64_t j = 0; j < mw; j++) y[r * ldy + j] = acc[r][j];
}

static void tile_generic(float *y, int64_t ldy, const float *x, int64_t K, const float *pp,
                         const float *b, int64_t mr, int64_t mw, int accumulate) {
    tile_generic_body(y, ldy, x, K, pp, b, mr, mw, accumulate);
}
#if defined(__x86_64__) || defined(__i386__)
/* Same body with hardware FMA, so edge tiles round exactly like the AVX2 tile. */
__attribute__((target("avx2,fma"))) static void
tile_generic_fma(float *y, int64_t ldy, const float *x, int64_t K, const float *pp,
                 const float *b, int64_t mr, int64_t mw, int accumulate) {
    tile_generic_body(y, ldy, x, K, pp, b, mr, mw, accumulate);
}
#endif

#ifdef SF_X86
__attribute__((target("avx2,fma"))) static void tile_avx2(float *y, int64_t ldy, const float *x,
                                                          int64_t K, const float *pp,
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
    const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K, *x4 = x + 4 * K,
                *x5 = x + 5 * K;
    for (int64_t k = 0; k < K; k++) {
        __m256 w0 = _mm256_loadu_ps(pp + k * SF_NR), w1 = _mm256_loadu_ps(pp + k * SF_NR + 8);
        __m256 a;
        a = _mm256_broadcast_ss(x0 + k); c00 = _mm256_fmadd_ps(a, w0, c00); c01 = _mm256_fmadd_ps(a, w1, c01);
        a = _mm256_broadcast_ss(x1 + k); c10 = _mm256_fmadd_ps(a, w0, c10); c11 = _mm256_fmadd_ps(a, w1, c11);
        a = _mm256_broadcast_ss(x2 + k); c20 = _mm256_fmadd_ps(a, w0, c20); c21 = _mm256_fmadd_ps(a, w1, c21);
        a = _mm256_broadcast_ss(x3 + k); c30 = _mm256_fmadd_ps(a, w0, c30); c31 = _mm256_fmadd_ps(a, w1, c31);
        a = _mm256_broadcast_ss(x4 + k); c40 = _mm256_fmadd_ps(a, w0, c40); c41 = _mm256_fmadd_ps(a, w1, c41);
        a = _mm256_broadcast_ss(x5 + k); c50 = _mm256_fmadd_ps(a, w0, c50); c51 = _mm256_fmadd_ps(a, w1, c51);
    }
    _mm256_storeu_ps(y + 0 * ldy, c00); _mm256_storeu_ps(y + 0 * ldy + 8, c01);
    _mm256_storeu_ps(y + 1 * ldy, c10); _mm256_storeu_ps(y + 1 * ldy + 8, c11);
    _mm256_storeu_ps(y + 2 * ldy, c20); _mm256_storeu_ps(y + 2 * ldy + 8, c21);
    _mm256_storeu_ps(y + 3 * ldy, c30); _mm256_storeu_ps(y + 3 * ldy + 8, c31);
    _mm256_storeu_ps(y + 4 * ldy, c40); _mm256_storeu_ps(y + 4 * ldy + 8, c41);
    _mm256_storeu_ps(y + 5 * ldy, c50); _mm256_storeu_ps(y + 5 * ldy + 8, c51);
}

static int have_avx2_fma(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return cached;
}
#endif

void sf_matmul(float *y, const float *x, const float *w, const float *b, int64_t N, int64_t K,
               int64_t M, int accumulate, float *pack, int n_threads) {
    if (N <= 0 || M <= 0) return;
    int nt = sf_threads_resolve(n_threads);
    if (K <= 0) { /* empty reduction: y = b (or unchanged) */
        if (!accumulate)
            for (int64_t n = 0; n < N; n++)
                for (int64_t m = 0; m < M; m++) y[n * M + m] = b ? b[m] : 0.0f;
        return;
    }
    pack_wt(pack, w, K, M, nt);
    int64_t np = (M + SF_NR - 1) / SF_NR;
    int64_t nr = (N + SF_MR - 1) / SF_MR;
    int use_avx = 0;
#ifdef SF_X86
    use_avx = have_avx2_fma();
#endif
    /* Split the (row tile, panel) grid over threads; each thread walks panels in the outer
     * loop so one K x 16 panel stays in L1 while its row tiles stream through. */
    int nthreads = (N * K * M < 65536) ? 1 : nt;
#pragma omp parallel num_threads(nthreads)
    {
        int tid = 0, T = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        /* contiguous chunks of row tiles per thread when there are enough, else of panels */
        int64_t r0 = 0, r1 = nr, p0 = 0, p1 = np;
        if (nr >= T) { r0 = nr * tid / T; r1 = nr * (tid + 1) / T; }
        else { p0 = np * tid / T; p1 = np * (tid + 1) / T; }
        for (int64_t p = p0; p < p1; p++) {
            const float *pp = pack + p * K * SF_NR;
            int64_t m0 = p * SF_NR, mw = M - m0 < SF_NR ? M - m0 : SF_NR;
            const float *bp = b ? b + m0 : NULL;
            for (int64_t r = r0; r < r1; r++) {
                int64_t n0 = r * SF_MR, mr = N - n0 < SF_MR ? N - n0 : SF_MR;
                float *yt = y + n0 * M + m0;
                const float *xt = x + n0 * K;
#ifdef SF_X86
                if (use_avx) {
                    if (mr == SF_MR && mw == SF_NR) tile_avx2(yt, M, xt, K, pp, bp, accumulate);
                    else tile_generic_fma(yt, M, xt, K, pp, bp, mr, mw, accumulate);
                    continue;
                }
#endif
                tile_generic(yt, M, xt, K, pp, bp, mr, mw, accumulate);
            }
        }
    }
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

void sf_layernorm(float *y, const float *x, const float *w, const float *b, int64_t N, int64_t d,
                  float eps, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (N * d > 65536)
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * d;
        float *yr = y + n * d;
        double mean = 0.0, var = 0.0;
        for (int64_t i = 0; i < d; i++) mean += xr[i];
        mean /= (double)d;
        for (int64_t i = 0; i < d; i++) { double t = xr[i] - mean; var += t * t; }
        var /= (double)d;
        float rstd = (float)(1.0 / sqrt(var + (double)eps)), mu = (float)mean;
        for (int64_t i = 0; i < d; i++) {
            float t = (xr[i] - mu) * rstd;
            if (w) t *= w[i];
            if (b) t += b[i];
            yr[i] = t;
        }
    }
}

void sf_rmsnorm(float *y, const float *x, const float *w, int64_t N, int64_t d, float eps,
                int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (N * d > 65536)
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * d;
        float *yr = y + n * d;
        double ss = 0.0;
        for (int64_t i = 0; i < d; i++) ss += (double)xr[i] * xr[i];
        float r = (float)(1.0 / sqrt(ss / (double)d + (double)eps));
        for (int64_t i = 0; i < d; i++) yr[i] = w ? xr[i] * r * w[i] : xr[i] * r;
    }
}

/* ---- activations ------------------------------------------------------------------------- */

void sf_gelu(float *x, int64_t n, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
    for (int64_t i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

void sf_gelu_tanh(float *x, int64_t n, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
}

void sf_relu(float *x, int64_t n, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
    for (int64_t i = 0; i < n; i++) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

void sf_swiglu(float *gate, const float *up, int64_t n, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void sf_add(float *y, const float *x, int64_t n, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (n > 65536)
    for (int64_t i = 0; i < n; i++) y[i] += x[i];
}

/* ---- rope -------------------------------------------------------------------------------- */

void sf_rope(float *x, int64_t N, int64_t T, int64_t n_heads, int64_t dh, int64_t ld,
             float theta, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
    int64_t half = dh / 2;
#pragma omp parallel for schedule(static) num_threads(nt) if (N * n_heads * dh > 65536)
    for (int64_t r = 0; r < N; r++) {
        double t = (double)(r % T);
        for (int64_t j = 0; j < half; j++) {
            /* angles in double: t * theta^(-2j/dh) loses digits in float at long T */
            double ang = t * pow((double)theta, -2.0 * (double)j / (double)dh);
            float c = (float)cos(ang), s = (float)sin(ang);
            for (int64_t h = 0; h < n_heads; h++) {
                float *xh = x + r * ld + h * dh;
                float a = xh[j], bb = xh[j + half];
                xh[j] = a * c - bb * s;
                xh[j + half] = bb * c + a * s;
            }
        }
    }
}

double sf_rms(const float *x, int64_t n) {
    if (n <= 0) return 0.0;
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    return sqrt(ss / (double)n);
}
