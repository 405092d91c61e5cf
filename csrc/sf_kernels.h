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
/* gate <- silu(gate) * up */
void sf_swiglu(float *gate, const float *up, int64_t n, int n_threads);

/* y += x, n floats */
void sf_add(float *y, const float *x, int64_t n, int n_threads);

/* RoPE, half-split convention, in place on x viewed as (N rows, n_heads, dh) with row stride
 * ld floats; row r has position pos[r] (or r % T when pos is NULL). */
void sf_rope(float *x, int64_t N, int64_t T, int64_t n_heads, int64_t dh, int64_t ld,
             float theta, int n_threads);

/* sqrt(mean(x^2)) over n floats, accumulated in double. */
double sf_rms(const float *x, int64_t n);

#endif
