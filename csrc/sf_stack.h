/* The stack's per-call state, shared by the stack (sf_model.c) and the depth wirings
 * (the files in csrc/wiring/) — private to the C core.
 *
 * One call (a forward, or a forward + backward) lays every buffer out in one allocation (see
 * `layout` in sf_model.c; a wiring adds its own through its `layout` hook) made before the
 * layer loop, so nothing is allocated inside it. The small helpers at the end are inline so
 * wiring files and the stack share them without calling each other.
 */
#ifndef SF_STACK_H
#define SF_STACK_H

#include "sf_internal.h"
#include "sf_kernels.h"

#include <string.h>

struct sf_wiring;

/* Activations of one transformer block the backward pass needs. Inference (and gradient
 * checkpointing) give all blocks one shared set, training without checkpointing each its own.
 * in_*: what the sublayer reads (the wiring's read); u_*: after the pre-norm (== in_* under
 * post-norm); y_*, z_*, alpha_*: the wiring's (it lays them out: see its layout_block). */
typedef struct {
    float *in_a, *u_a, *q, *k, *v, *att, *lse, *y_a, *z_a; /* attention sublayer */
    float *in_m, *u_m, *f1, *f2, *g, *y_m, *z_m;            /* MLP sublayer */
    float *alpha_a, *alpha_m;                               /* AttnRes weights (N, nsrc) */
    float *q_pre; /* MoDA, moda_depth_rope='none': the pre-RoPE queries of the depth logits */
} block_acts;

typedef struct run {
    const sf_model *m;
    const sf_config *c;
    const struct sf_wiring *W; /* the depth wiring (sf_wiring.h) */
    void *ws;                  /* its per-call state (W->init allocates it, W->free frees it) */
    int64_t B, T, N, d, dh, qd, kvd, F, V, L, n_slots;
    int nt, training, per_block, two_phase;
    const uint8_t *pad;
    sf_cache *cache;
    int64_t pos0;           /* absolute position of row 0 (cache length before the call) */
    block_acts *acts;       /* n_layers entries (shared pointers when !per_block) */
    float *x_in;            /* checkpointing, wirings with save_block_input: (n, N, d) block inputs */
    float *fin_h, *fin_u, *logits; /* final stream/aggregate, after final norm, head output */
    float *kvtmp;                  /* MoDA: an FFN's depth k or v rows before they are placed */
    float *depth_k, *depth_v; /* MoDA arena (own, or the cache's) */
    int64_t depth_bstride, depth_len, kv_bstride;
    float *pack, *attn_scratch, *stats;
    float *rope; /* RoPE cos/sin for this call's T positions (sf_rope_table), or NULL */
    float *copy_rms; /* trace: (L+1, E) per-copy stream RMS (E-copy wirings), or NULL */
    /* backward */
    float *dx, *du, *dy, *dq, *dk, *dv, *datt, *df1, *df2, *dg, *dfin;
    float *ddepth_k, *ddepth_v, *dtmp_kv;
    float *dq_depth; /* moda_depth_rope='none': the depth columns' part of dq (pre-RoPE) */
    float *dmask;                       /* residual dropout: a masked copy of a gradient */
    float attn_p, resid_p;              /* dropout rates (0 outside training) */
    uint64_t drop_seed;
    /* compute_dtype = bfloat16 (sf_gemm_bf16.c): every Linear weight packed as bf16 panels once
     * at the call's start (bf_list: sorted by weight, for the lookup), A / B scratch */
    int bf16;
    struct sf_bf16_weight *bf_list;
    int64_t bf_n;
    uint32_t *bf_a, *bf_b;
    uint32_t *bf_g; /* forward calls: the MLP activation, packed as the down product's A */
    void *mem; /* the one allocation */
    int fwd_cached; /* mem is the model's cached forward workspace (give it back, do not free) */
    const volatile int *cancel; /* the caller's stop flag (sf_forward_args.cancel), or NULL */
    const sf_patch *patch;      /* the caller's interventions (sf_forward_args.patch), or NULL */
    const sf_trace *tr;         /* the forward call's recordings, or NULL (depth slots, which
                                   are written deep inside the sublayers) */
} run;

/* the caller asked the call to stop (checked between blocks: a check costs one load) */
static inline int run_cancelled(const run *R) { return R->cancel && *R->cancel; }

/* bump allocator over floats: measure with base == NULL, then assign */
typedef struct { float *base; int64_t used; int bad; } bump;

static inline float *take(bump *b, int64_t n) {
    if (n <= 0) return NULL;
    int64_t start = (b->used + 15) & ~(int64_t)15, end; /* 64-byte aligned */
    if (sf_add_ok(start, n, &end)) { b->bad = 1; return NULL; }
    b->used = end;
    return b->base ? b->base + start : NULL;
}

static inline int64_t cmul(int *bad, int64_t a, int64_t b) {
    int64_t r = 0;
    if (sf_mul_ok(a, b, &r)) { *bad = 1; return 0; }
    return r;
}

static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* what a forward call records that changes the layout */
typedef struct { int rms, alpha; } want;

/* ---- helpers every sublayer and wiring uses --------------------------------------------- */

#define GRAD(R, p) ((p) ? ((sf_model *)(R)->m)->grads + ((p) - (R)->m->params) : NULL)

static inline void norm_fwd(const run *R, float *y, const float *x, const float *w, const float *b) {
    if (R->c->norm == SF_NORM_LAYERNORM) sf_layernorm(y, x, w, b, R->N, R->d, R->c->norm_eps, R->nt);
    else sf_rmsnorm(y, x, w, R->N, R->d, R->c->norm_eps, R->nt);
}

/* dx (=|+=) d Norm(x) / dx · dy; weight/bias gradients accumulate into the model's grads. */
static inline void norm_bwd(const run *R, float *dx, const float *dy, const float *x, const float *w,
                     const float *b, int accumulate) {
    if (R->c->norm == SF_NORM_LAYERNORM)
        sf_layernorm_backward(dx, GRAD(R, w), GRAD(R, b), dy, x, w, R->N, R->d, R->c->norm_eps, R->stats, accumulate, R->nt);
    else
        sf_rmsnorm_backward(dx, GRAD(R, w), dy, x, w, R->N, R->d, R->c->norm_eps, R->stats, accumulate, R->nt);
}

/* bfloat16 mode's products (sf_gemm_bf16.c): the same contracts as linear / linear_bwd */
void sf_bf16_linear(const run *R, float *y, const float *x, const float *w, const float *b,
                    int64_t K, int64_t M);
void sf_bf16_linear_bwd(const run *R, float *dx, int dx_accumulate, const float *dy,
                        const float *x, const float *w, int64_t K, int64_t M);
/* y = x W^T + b and act_out = act(y), the activation applied to each tile in cache (y may be
 * NULL: act_out only); bitwise the same as sf_bf16_linear, then sf_activation */
void sf_bf16_linear_act(const run *R, float *y, float *act_out, int act, const float *x,
                        const float *w, const float *b, int64_t K, int64_t M);
/* Forward calls (not training): y = act(u W_up^T + b_up) W_down^T + b_down with the activation
 * packed straight from each up-product tile into the down product's bf16 rows (R->bf_g), never
 * written as fp32; the same bits as sf_bf16_linear_act then sf_bf16_linear. Returns 0 (nothing
 * done) when it does not apply: the caller then runs those two. */
int sf_bf16_mlp_forward(const run *R, float *y, int act, const float *u, const float *up_w,
                        const float *up_b, const float *down_w, const float *down_b, int64_t d,
                        int64_t F);
/* y[i] = x W_i^T + b_i for n weights sharing the input x (packed once): the same bits as n
 * sf_bf16_linear calls */
void sf_bf16_linear_same_x(const run *R, int n, float *const *y, const float *x,
                           const float *const *w, const float *const *b, int64_t K,
                           const int64_t *M);
/* lay out the packed weights and scratch (bf16 mode only), and fill the weights */
void sf_bf16_layout(run *R, bump *bp);
void sf_bf16_convert_weights(run *R);

static inline void linear(const run *R, float *y, const float *x, const float *w, const float *b,
                   int64_t K, int64_t M) {
    if (R->bf16) { sf_bf16_linear(R, y, x, w, b, K, M); return; }
    sf_matmul(y, x, w, b, R->N, K, M, 0, R->pack, R->nt);
}

/* Backward of y = x W^T + b (W (M,K)): dW += dy^T x, db += colsum(dy), dx (=|+=) dy W. */
static inline void linear_bwd(const run *R, float *dx, int dx_accumulate, const float *dy,
                       const float *x, const float *w, const float *b, int64_t K, int64_t M) {
    if (R->bf16) {
        sf_bf16_linear_bwd(R, dx, dx_accumulate, dy, x, w, K, M);
        if (b) sf_colsum(GRAD(R, b), dy, R->N, M, R->nt);
        return;
    }
    sf_gemm(GRAD(R, w), K, dy, 1, M, x, 0, NULL, M, R->N, K, 1, R->pack, R->nt);
    if (b) sf_colsum(GRAD(R, b), dy, R->N, M, R->nt);
    if (dx) sf_gemm(dx, K, dy, M, 1, w, 0, NULL, R->N, M, K, dx_accumulate, R->pack, R->nt);
}

static inline void copy(float *dst, const float *src, int64_t n) {
    if (dst && dst != src) memcpy(dst, src, (size_t)n * sizeof(float));
}

/* out = a + b over n floats (residual adds: memory-bound, so both cores' bandwidth helps) */
static inline void add3(const run *R, float *out, const float *a, const float *b, int64_t n) {
#pragma omp parallel for schedule(static) num_threads(R->nt) if (n > 65536)
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

/* Residual dropout of sublayer k's output (stream 4i+1 attention, 4i+2 MLP): x *= keep. The
 * same call on a gradient applies the same mask (the mask is a hash, not stored). */
static inline void resid_dropout(const run *R, float *x, int64_t k) {
    if (R->resid_p <= 0.0f) return;
    const uint64_t stream = 4 * (uint64_t)(k / 2) + 1 + (uint64_t)(k % 2);
    const int64_t n = R->N * R->d;
#pragma omp parallel for schedule(static) num_threads(R->nt) if (n > 65536)
    for (int64_t j = 0; j < n; j++) x[j] *= sf_dropout_scale(R->drop_seed, stream, (uint64_t)j, R->resid_p);
}


static inline float rms_of(const float *x, int64_t n) { return (float)sf_rms(x, n); }

/* Sublayer k's norm (k even: the attention's, odd: the MLP's): the pre-norm before it, or
 * under post-norm the norm after its residual add. */
static inline void sub_norm(const run *R, int64_t k, const float **w, const float **b) {
    const sf_layer_views *Lv = &R->m->layers[k / 2];
    *w = k % 2 == 0 ? Lv->attn_norm_w : Lv->mlp_norm_w;
    *b = k % 2 == 0 ? Lv->attn_norm_b : Lv->mlp_norm_b;
}

/* What sublayer k reads (block k/2's in_a or in_m). */
/* Sublayer k's output v as the wiring takes it (where the trace records attn_out/mlp_out):
 * replaced by the caller's patch if it has one, then recorded. */
static inline void sub_out_hook(const run *R, int64_t k, float *v, float *trace_out) {
    const float *const *p = R->patch ? (k % 2 == 0 ? R->patch->attn_out : R->patch->mlp_out) : NULL;
    if (p && p[k / 2]) copy(v, p[k / 2], R->N * R->d);
    copy(trace_out, v, R->N * R->d);
}

static inline float *sub_in(const run *R, int64_t k) {
    return k % 2 == 0 ? R->acts[k / 2].in_a : R->acts[k / 2].in_m;
}

#endif
