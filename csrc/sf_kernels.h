/* stackformer kernels: the few numeric building blocks everything else is made of.
 * All buffers float32, row-major, contiguous. Kernels never allocate; the ones that need
 * scratch take it as an argument with its size documented. */
#ifndef SF_KERNELS_H
#define SF_KERNELS_H

#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* This thread's index in the current OpenMP team and the team's size (0 and 1 outside a
 * parallel region, or built without OpenMP). */
static inline int sf_team_tid(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}
static inline int sf_team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* ---- inline building blocks for hot loops ---------------------------------------------------
 * Written so the compiler vectorizes them (the package builds with AVX2/FMA where the machine
 * has it): dot products keep 8 independent partial sums (a fixed reassociation, so results stay
 * deterministic), and exp is a branch-free Cephes-style polynomial instead of a libm call. */

/* The fixed combination of eight partial sums every 8-lane reduction here ends with. */
static inline float sf_hsum8(const float acc[8]) {
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static inline float sf_dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = sf_hsum8(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* 8 floats as one value (GCC/Clang vector extension): one AVX register, or two SSE ones */
typedef float sf_v8 __attribute__((vector_size(32)));

static inline float sf_sum(const float *a, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j];
    float s = sf_hsum8(acc);
    for (; i < n; i++) s += a[i];
    return s;
}

/* Σ x² in double: eight partial sums combined in sf_hsum8's order (one running sum is a chain
 * of n dependent double adds) */
static inline double sf_sumsq_d(const float *x, int64_t n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += (double)x[i + j] * x[i + j];
    double s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

static inline void sf_axpy(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* exp(x) with ~2 ulp error; exactly 0 below -87.3 (so exp(-inf) = 0), NaN stays NaN. */
static inline float sf_expf(float x) {
    float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f; /* x - n ln2, ln2 split in two */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float y = p * scale;
    y = x < -87.3f ? 0.0f : y;
    return x != x ? x : y;
}

/* Dropout keep-scale for element idx of stream `stream`: 0 with probability rate, else
 * 1/(1-rate). A counter-based hash (splitmix64) so the backward pass recomputes the mask. */
static inline float sf_dropout_scale(uint64_t seed, uint64_t stream, uint64_t idx, float rate) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * (stream * 0x100000001B3ull + idx + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = (float)(z >> 40) * (1.0f / 16777216.0f);
    return u < rate ? 0.0f : 1.0f / (1.0f - rate);
}

/* erf with |error| < 1.5e-7 (Abramowitz & Stegun 7.1.26), branch-free */
static inline float sf_erf_abs(float ax, float e) { /* erf(ax) for ax >= 0, given e = exp(-ax^2) */
    float t = 1.0f / (1.0f + 0.3275911f * ax);
    float y = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
    return 1.0f - y * e;
}
static inline float sf_erff(float x) {
    float ax = x < 0.0f ? -x : x;
    float r = sf_erf_abs(ax, sf_expf(-ax * ax));
    return x < 0.0f ? -r : r;
}

/* tanh via exp: 1 - 2/(exp(2x)+1); saturates cleanly at +-1 */
static inline float sf_tanhf(float x) { return 1.0f - 2.0f / (sf_expf(2.0f * x) + 1.0f); }

/* The activations of one element: every path that applies them (sf_activation, the matmul
 * epilogue) calls these, so they agree bit for bit. */
static inline float sf_gelu1(float x) { return 0.5f * x * (1.0f + sf_erff(x * 0.70710678118654752f)); }
static inline float sf_gelu_tanh1(float x) {
    return 0.5f * x * (1.0f + sf_tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
static inline float sf_relu1(float x) { return x > 0.0f ? x : 0.0f; }

/* Attention's softmax rows: s[u] = sf_expf(s[u]*scale - shift), u < n; and the backward's
 * p = sf_expf(s[u]*scale - lse), dp[u] = p (dp[u] - D) scale, s[u] = p. Element-wise, so every
 * vector width gives the same bits. */
void sf_exp_row(float *s, int64_t n, float scale, float shift);
void sf_softmax_grad_row(float *s, float *dp, int64_t n, float scale, float lse, float D);

/* Threads for the parallel kernels (0 = library default). */
int sf_threads_resolve(int n_threads);

/* ---- between the product engine (sf_gemm.c) and the optional BLAS backend (sf_blas.c) ---- */
/* 1 when a BLAS sgemm is installed (sf_set_blas_sgemm). */
int sf_blas_active(void);
/* sf_gemm's product through the installed BLAS; 0 when none is installed or the strides/sizes
 * need the tiles (the caller then runs it itself). */
int sf_blas_gemm(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs,
                 const float *w, int trans_w, const float *b, int64_t N, int64_t K, int64_t M,
                 int accumulate, int nt, int act, float *act_out);
/* out[i] = act(pre[i]) for i < n (GELU, tanh-GELU or ReLU; the matmul epilogue's loop). */
void sf_act_row(int act, float *out, const float *pre, int64_t n);
/* act_out = act(y) on rows [n0, n0+mr) x columns [m0, m0+mw) (act < 0: nothing). */
void sf_act_block(int act, float *act_out, const float *y, int64_t ldy, int64_t n0, int64_t mr,
                  int64_t m0, int64_t mw);

/* y(N,M) = x(N,K) · w(M,K)^T + b(M)   (b may be NULL; accumulate=1 adds into y instead).
 * pack: scratch of at least sf_matmul_pack_floats(K, M) floats (W^T packed in 16-wide panels).
 * Each y element is accumulated in ascending k order by exactly one thread, so results are
 * bitwise identical for any thread count. */
int64_t sf_matmul_pack_floats(int64_t K, int64_t M);
void sf_matmul(float *y, const float *x, const float *w, const float *b, int64_t N, int64_t K,
               int64_t M, int accumulate, float *pack, int n_threads);
/* General form: y(N,M) (row stride ldy) = A(N,K) · B(K,M) + b, where A's element (n,k) is
 * a[n*a_rs + k*a_cs] (so A may be a transposed view) and B is w^T when trans_w (w stored
 * (M,K)) or w (stored (K,M)). pack needs sf_gemm_pack_floats(N, K, M, a_cs != 1) floats.
 * Same determinism guarantee as sf_matmul. Used by the backward pass: dx = dy·W (trans_w=0) and
 * dW += dyᵀ·x (A = dy viewed transposed: a_rs = 1, a_cs = M). */
void sf_gemm(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs, const float *w,
             int trans_w, const float *b, int64_t N, int64_t K, int64_t M, int accumulate,
             float *pack, int n_threads);
/* Scratch floats sf_gemm needs for pack: the B panels (a_cs == 1: the same as
 * sf_matmul_pack_floats(K, M)), or when A is strided (a_cs != 1) a K chunk of A in row panels
 * and a chunk of one B panel per thread. */
int64_t sf_gemm_pack_floats(int64_t N, int64_t K, int64_t M, int a_strided);
/* sf_matmul with an activation epilogue: y = x W^T + b, act_out = act(y) (act as in
 * sf_activation), applied to each register tile's output while it is still in L1 instead of
 * in a second pass over y. y may be NULL (only act(y) is wanted): act_out then holds y until
 * its tile is transformed in place. Bitwise the same as sf_matmul, then sf_activation. */
void sf_matmul_act(float *y, float *act_out, int act, const float *x, const float *w,
                   const float *b, int64_t N, int64_t K, int64_t M, float *pack, int n_threads);
/* Building blocks for kernels that tile their own products (attention), in sf_gemm's layout:
 * B (K x M) packed into 16-column panels, panel p at pack + p*K*SF_GEMM_NR (k-major, columns
 * past M zero); B = w^T when trans_w (w stored (M, K), row stride ldw) else w (stored (K, M),
 * row stride ldw). Needs sf_matmul_pack_floats(K, M) floats. A k-prefix of a panel is itself a
 * valid panel for a shorter reduction. */
#define SF_GEMM_NR 16
#define SF_GEMM_MR 6
void sf_pack_panels(float *pack, const float *w, int64_t ldw, int trans_w, int64_t K, int64_t M);
/* One register tile, single-threaded: y[mr x mw] (row stride ldy) = A[mr x K] * panel[K x mw]
 * (+ b), or += when accumulate, with A(r,k) = a[r*a_rs + k*a_cs]; mr <= 6, mw <= 16. Same
 * per-element operation order as sf_gemm. */
void sf_gemm_tile(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs, int64_t K,
                  const float *panel, const float *b, int64_t mr, int64_t mw, int accumulate);
/* The register tile's height the CPU runs best: 8 rows with AVX-512, else 6. */
int sf_gemm_tile_rows(void);
/* sf_gemm_tile over up to two panels: mr <= sf_gemm_tile_rows(), mw <= 32, columns 16.. from
 * the panel panel_stride floats after the first (K * SF_GEMM_NR for sf_pack_panels' layout).
 * Same per-element operations as sf_gemm_tile. */
void sf_gemm_tile2(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs, int64_t K,
                   const float *panel, int64_t panel_stride, const float *b, int64_t mr, int64_t mw,
                   int accumulate);
/* Plain triple loop, for tests. */
void sf_matmul_naive(float *y, const float *x, const float *w, const float *b, int64_t N,
                     int64_t K, int64_t M, int accumulate);

/* Row-wise norms over the last dim d. w may be NULL (=1), b may be NULL (=0). y may alias x. */
void sf_layernorm(float *y, const float *x, const float *w, const float *b, int64_t N, int64_t d,
                  float eps, int n_threads);
void sf_rmsnorm(float *y, const float *x, const float *w, int64_t N, int64_t d, float eps,
                int n_threads);

/* Elementwise activations, in place over n floats. */
void sf_gelu(float *x, int64_t n, int n_threads);
void sf_gelu_tanh(float *x, int64_t n, int n_threads);
void sf_relu(float *x, int64_t n, int n_threads);
/* out = silu(gate) * up (out may alias gate) */
void sf_swiglu(float *out, const float *gate, const float *up, int64_t n, int n_threads);
/* out = act(pre) for act in SF_ACT_GELU / SF_ACT_GELU_TANH / SF_ACT_RELU (out may alias pre):
 * one pass */
void sf_activation(int act, float *out, const float *pre, int64_t n, int n_threads);

/* y += x, n floats */
void sf_add(float *y, const float *x, int64_t n, int n_threads);

/* RoPE, half-split convention. sf_rope_table fills cs (T * dh floats: cos, sin per position
 * and pair) for positions pos0 .. pos0+T-1; sf_rope rotates x in place, viewed as (N rows,
 * n_heads, dh) with row stride ld floats, row r at table position r % T. */
void sf_rope_table(float *cs, int64_t T, int64_t pos0, int64_t dh, float theta, int n_threads);
void sf_rope(float *x, int64_t N, int64_t T, int64_t n_heads, int64_t dh, int64_t ld,
             const float *cs, int n_threads);

/* ---- backward ---- (dx: accumulate=1 adds into dx; dw/db always accumulate; may be NULL)
 * stats: scratch of 2N (layernorm) or N (rmsnorm) floats. */
void sf_layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                           const float *w, int64_t N, int64_t d, float eps, float *stats,
                           int accumulate, int n_threads);
void sf_rmsnorm_backward(float *dx, float *dw, const float *dy, const float *x, const float *w,
                         int64_t N, int64_t d, float eps, float *stats, int accumulate,
                         int n_threads);
/* act: SF_ACT_GELU / SF_ACT_GELU_TANH / SF_ACT_RELU; dpre = dpost * act'(pre) */
void sf_act_backward(int act, float *dpre, const float *dpost, const float *pre, int64_t n,
                     int n_threads);
void sf_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, int64_t n, int n_threads);
void sf_rope_backward(float *dx, int64_t N, int64_t T, int64_t n_heads, int64_t dh, int64_t ld,
                      const float *cs, int n_threads);
void sf_cross_entropy(float *logits, const int32_t *targets, int64_t N, int64_t V,
                      int32_t ignore_index, double *loss_sum, int64_t *count, float *row_loss,
                      int n_threads);

/* db(M) += column sums of x(N, M) */
void sf_colsum(float *db, const float *x, int64_t N, int64_t M, int n_threads);

/* sqrt(mean(x^2)) over n floats, accumulated in double. */
double sf_rms(const float *x, int64_t n);

#endif
