/* stackformer kernels: the few numeric building blocks everything else is made of.
 * All buffers float32, row-major, contiguous. Kernels never allocate; the ones that need
 * scratch take it as an argument with its size documented. */
#ifndef SF_KERNELS_H
#define SF_KERNELS_H

#include <stdint.h>

/* Threads for the parallel kernels (0 = library default). */
int sf_threads_resolve(int n_threads);

/* y(N,M) = x(N,K) · w(M,K)^T + b(M)   (b may be NULL; accumulate=1 adds into y instead).
 * pack: scratch of at least sf_matmul_pack_floats(K, M) floats (W^T packed in 16-wide panels).
 * Each y element is accumulated in ascending k order by exactly one thread, so results are
 * bitwise identical for any thread count. */
int64_t sf_matmul_pack_floats(int64_t K, int64_t M);
void sf_matmul(float *y, const float *x, const float *w, const float *b, int64_t N, int64_t K,
               int64_t M, int accumulate, float *pack, int n_threads);
/* General form: y(N,M) (row stride ldy) = A(N,K) · B(K,M) + b, where A's element (n,k) is
 * a[n*a_rs + k*a_cs] (so A may be a transposed view) and B is w^T when trans_w (w stored
 * (M,K)) or w (stored (K,M)). pack needs sf_matmul_pack_floats(K, M) floats. Same
 * determinism guarantee as sf_matmul. Used by the backward pass: dx = dy·W (trans_w=0) and
 * dW += dyᵀ·x (A = dy viewed transposed: a_rs = 1, a_cs = M). */
void sf_gemm(float *y, int64_t ldy, const float *a, int64_t a_rs, int64_t a_cs, const float *w,
             int trans_w, const float *b, int64_t N, int64_t K, int64_t M, int accumulate,
             float *pack, int n_threads);
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
/* out = act(pre) for act in SF_ACT_GELU / SF_ACT_GELU_TANH / SF_ACT_RELU (out may alias pre) */
void sf_activation(int act, float *out, const float *pre, int64_t n, int n_threads);

/* y += x, n floats */
void sf_add(float *y, const float *x, int64_t n, int n_threads);

/* RoPE, half-split convention, in place on x viewed as (N rows, n_heads, dh) with row stride
 * ld floats; row r has position pos0 + r % T. */
void sf_rope(float *x, int64_t N, int64_t T, int64_t pos0, int64_t n_heads, int64_t dh,
             int64_t ld, float theta, int n_threads);

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
void sf_rope_backward(float *dx, int64_t N, int64_t T, int64_t pos0, int64_t n_heads,
                      int64_t dh, int64_t ld, float theta, int n_threads);
void sf_cross_entropy(float *logits, const int32_t *targets, int64_t N, int64_t V,
                      int32_t ignore_index, double *loss_sum, int64_t *count, float *row_loss,
                      int n_threads);

/* db(M) += column sums of x(N, M) */
void sf_colsum(float *db, const float *x, int64_t N, int64_t M, int n_threads);

/* sqrt(mean(x^2)) over n floats, accumulated in double. */
double sf_rms(const float *x, int64_t n);

#endif
