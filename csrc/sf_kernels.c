/* stackformer kernels. See sf_kernels.h for contracts. */
#include "sf_kernels.h"
#include "sf_internal.h"
#include "sf_cpu.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>


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
        sf_act_row(act, out + i0, pre + i0, n - i0 < chunk ? n - i0 : chunk);
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
    float scale = cnt ? 1.0f / (float)cnt : 0.0f;
    /* The rows' losses are summed in row order, whatever the thread count: an OpenMP
     * reduction adds per-thread partials, so its last bits depended on the thread count (the
     * returned loss of any B > 1 step differed between 1 and 2 threads). With a team, each row
     * keeps its loss in rl and one thread sums them afterwards (N doubles per call, next to
     * N x V logits); with one thread, or if rl cannot be had, the rows run serially. */
    const int team = nt > 1 && N * V > 32768;
    double *rl = team ? malloc((size_t)N * sizeof(double)) : NULL;
    double total = 0.0;
#pragma omp parallel for schedule(static) num_threads(nt) if (rl != NULL)
    for (int64_t n = 0; n < N; n++) {
        float *z = logits + n * V;
        int32_t tgt = targets[n];
        if (tgt == ignore_index) {
            memset(z, 0, (size_t)V * sizeof(float));
            if (row_loss) row_loss[n] = NAN;
            if (rl) rl[n] = 0.0;
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
        if (rl) rl[n] = l;
        else total += l; /* serial: the same order as the sum below */
        if (row_loss) row_loss[n] = (float)l;
        double inv = 1.0 / se;
        for (int64_t j = 0; j < V; j++) z[j] = (float)((double)z[j] * inv) * scale;
        z[tgt] -= scale;
    }
    if (rl) {
        for (int64_t n = 0; n < N; n++)
            if (targets[n] != ignore_index) total += rl[n];
        free(rl);
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
