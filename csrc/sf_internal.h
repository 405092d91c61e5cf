/* Internal definitions shared by the C core's translation units (not part of the API). */
#ifndef SF_INTERNAL_H
#define SF_INTERNAL_H

#include "sf.h"
#include <stdio.h>
#include <stdatomic.h>
#include <stddef.h>

/* Named views into the flat parameter buffer for one transformer block. NULL = absent. */
typedef struct {
    float *attn_norm_w, *attn_norm_b;
    float *q_w, *q_b, *k_w, *k_b, *v_w, *v_b, *o_w, *o_b;
    float *mlp_norm_w, *mlp_norm_b;
    float *gate_w, *gate_b, *up_w, *up_b, *down_w, *down_b;
    float *depth_k_w, *depth_v_w;             /* MoDA, blocks 0..n-2 (FFN slots) */
    float *attn_depth_k_w, *attn_depth_v_w;   /* MoDA attn+ffn+extra, blocks 0..n-2 */
    float *attn_res_q, *attn_res_g;           /* AttnRes pseudo-query (d) and key gain (d) */
    float *mlp_res_q, *mlp_res_g;
    float *dwa_w;                             /* DenseFormer: block i's DWA weights (1, n_i) */
    /* Hyper-Connections and mHC, [0] the attention's, [1] the MLP's (docs/WIRINGS.md): HC static
     * alpha (n, n+1), beta (n); HC dynamic the copies' norm, proj (n+2, d), scale (2); mHC proj
     * (n^2+2n, n d), base (n^2+2n), scale (3) */
    float *hc_alpha[2], *hc_beta[2], *hc_nw[2], *hc_nb[2], *hc_proj[2], *hc_scale[2], *hc_base[2];
} sf_layer_views;

struct sf_model {
    sf_config cfg;
    /* >= 0: number of running readers (forward); -1: a writer (train step) holds it */
    _Atomic int state;
    float *params;
    float *grads, *adam_m, *adam_v; /* one allocation of 3*num_params, made at create */
    int64_t step;
    /* training workspace kept between train steps (only touched under the write guard), so
     * the step loop allocates and page-faults nothing after the first step */
    void *train_mem;
    int64_t train_mem_bytes;
    /* forward workspace kept between forward calls. Forward calls may run concurrently (they
     * share the read guard), so a call takes it only when fwd_busy was 0, and the others
     * allocate their own. Without it every forward above glibc's mmap threshold (32 MiB: M's
     * forward needs ~65 MiB) maps fresh pages and faults on each one (3% of M's forward). */
    void *fwd_mem;
    int64_t fwd_mem_bytes;
    _Atomic int fwd_busy;
    int64_t num_params;
    sf_tensor_info *tensors;
    int32_t num_tensors;
    /* model-level views */
    float *tok_emb, *pos_emb, *final_norm_w, *final_norm_b, *out_res_q, *out_res_g, *lm_head;
    sf_layer_views *layers;
    /* the registry of live models (sf_lifecycle.c), walked by the fork child handler */
    struct sf_model *reg_prev, *reg_next;
};

/* Reader/writer guard: forward calls share the model, a train step needs it alone. */
int sf_model_acquire_read(sf_model *m);
void sf_model_release_read(sf_model *m);
int sf_model_acquire_write(sf_model *m);
void sf_model_release_write(sf_model *m);
/* the read guard for calls that wait their turn instead of failing fast (sf_lifecycle.c) */
void sf_model_acquire_read_wait(sf_model *m);

/* fork (sf_threads.c's pthread_atfork handlers): the registry's lock is held across fork() so
 * the child's walk sees a whole list; in the child, every model's guard and forward-workspace
 * flag are reset (the threads that held them exist only in the parent). */
void sf_models_registry_lock(void);
void sf_models_registry_unlock(void);
void sf_models_after_fork(void);
/* 1 in a child forked after its parent ran a team of threads: it runs on one thread */
int sf_threads_forked_single(void);

/* Write a formatted message into err (if non-NULL) and return status. */
sf_status sf_fail(char *err, size_t errlen, sf_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/* Overflow-checked size arithmetic: returns 0 and sets *out, or 1 on overflow/negative. */
int sf_mul_ok(int64_t a, int64_t b, int64_t *out);
int sf_add_ok(int64_t a, int64_t b, int64_t *out);

/* ---- the parameter table (sf_params.c) ---- */
/* Walk the table in its one canonical order. `emit` is called per tensor; when `out` is NULL
 * only the count/size is computed. Returns total floats, or -1 on overflow. */
typedef struct {
    sf_tensor_info *out;
    int32_t n;
    int64_t total;
    int overflow;
    size_t *views; /* with out: each tensor's view (SF_LAYER_VIEW / SF_MODEL_VIEW, 0 = none) */
} sf_table_builder;
/* The named view the stack reads a tensor through: a field of sf_layer_views (block tensors)
 * or of sf_model (model-level ones), stored +1 so that 0 means none. */
#define SF_LAYER_VIEW(field) (offsetof(sf_layer_views, field) + 1)
#define SF_MODEL_VIEW(field) (offsetof(sf_model, field) + 1)
void sf_params_table(const sf_config *c, sf_table_builder *tb);
/* Append one tensor (ndim 1: d0 floats; 2: d0 x d1) to the table; no_decay exempts it from
 * AdamW's weight decay. */
void sf_params_emit(sf_table_builder *tb, const char *name, int layer, int ndim, int64_t d0,
                    int64_t d1, int no_decay, sf_init init, size_t view);
/* Seeded init of every tensor of the table (sf_params.c). */
void sf_params_init(sf_model *m, uint64_t seed);

/* ---- RNG: xoshiro256** seeded by splitmix64; normals by Box-Muller (sf_rng.c) ---- */
typedef struct { uint64_t s[4]; int has_spare; double spare; } sf_rng;
void sf_rng_seed(sf_rng *r, uint64_t seed);
double sf_rng_uniform(sf_rng *r); /* (0, 1] */
double sf_rng_normal(sf_rng *r);

/* ---- attention (sf_attention.c) ---- */
typedef struct {
    int64_t B, Tq, Tk;   /* queries per batch row, keys per batch row */
    int64_t q_pos0;      /* absolute position of query row 0 (keys sit at 0 .. Tk-1) */
    int64_t H, Hkv, dh;
    int causal;
    const uint8_t *key_padding_mask; /* (B, Tk) or NULL */
    /* key/value row (b, u) at k + b*kv_bstride + u*Hkv*dh (a cache may hold more rows) */
    const float *k, *v;
    int64_t kv_bstride;
    /* MoDA depth slots, (B, Hkv, n_slots, depth_len, dh): slot i of position u of batch b,
     * kv head g at depth + b*depth_bstride + ((g*n_slots + i)*depth_len + u)*dh, so one slot of
     * a run of positions is one contiguous stream; this layer reads slots [0, n_read). */
    const float *depth_k, *depth_v;
    int64_t depth_bstride, depth_len, n_slots, n_read, chunk;
    int depth_only;
    /* the query rows the depth logits use (B,Tq,H*dh), NULL = q itself. moda_depth_rope='none'
     * passes the pre-RoPE queries here; the backward then puts the depth columns' part of dq
     * into dq_depth (like q, overwritten) instead of dq, for the caller to add after the
     * inverse rotation. */
    const float *q_depth;
    float *dq_depth;
    /* interventions (forward only): depth slot i removed from every row's read when
     * depth_drop[i] (its logits -inf), or NULL */
    const uint8_t *depth_drop;
    /* attention dropout (training): probabilities p become p * keep(row, col) */
    float dropout;
    uint64_t dropout_seed, dropout_stream;
    /* compute_dtype bfloat16: the sequence columns' products (Q K^T, P V; backward dO V^T,
     * dS K, dS^T Q, P^T dO) take bf16 operands with fp32 accumulation (sf_bf16.h); MoDA's depth
     * columns, the softmax and its gradient stay fp32. Set it before sizing the scratch. */
    int bf16;
} sf_attn_args;
/* Scratch floats the attention kernels need (needs Tk, dh, n_read, chunk set): per thread,
 * packed K / V panels of one head and two 48-row blocks of Tk + n_read*chunk columns. */
int64_t sf_attention_scratch_floats(const sf_attn_args *a, int n_threads);
/* q (B,Tq,H*dh) -> out (B,Tq,H*dh). Optional: lse (B,H,Tq) row log-sum-exp for the backward
 * pass, probs (B,H,Tq,Tk+n_read*chunk) and depth_mass (B,H,Tq) recordings. */
void sf_attention_forward(const sf_attn_args *a, const float *q, float *out, float *lse,
                          float *probs, float *depth_mass, float *scratch, int n_threads);
/* Gradients: dq (like q) and dk, dv (like k, v) are overwritten; ddepth_k/v (like the depth
 * arena) are accumulated for the slots this layer reads. */
void sf_attention_backward(const sf_attn_args *a, const float *q, const float *out,
                           const float *dout, const float *lse, float *dq, float *dk, float *dv,
                           float *ddepth_k, float *ddepth_v, float *scratch, int n_threads);

/* ---- Attention Residuals (sf_attnres.c) ---- */
/* h(N,d) = sum_i alpha_i src_i with alpha = softmax_i((q ⊙ g) · src_i * inv_rms_i).
 * inv_rms[i] is (N) 1/sqrt(mean(src_i^2)+eps) per token. alpha_out (N, nsrc) optional. */
int64_t sf_attnres_scratch_floats(int64_t nsrc, int64_t d, int n_threads);
void sf_attnres_aggregate(float *h, float *alpha_out, const float *const *src,
                          const float *const *inv_rms, int64_t nsrc, const float *q,
                          const float *g, int64_t N, int64_t d, float *scratch, int n_threads);
/* The same with sigmoid gates (sigmoid 1): alpha_i = 1 / (1 + exp(-s_i)), no normalisation. */
void sf_attnres_aggregate_mix(float *h, float *alpha_out, const float *const *src,
                              const float *const *inv_rms, int64_t nsrc, const float *q,
                              const float *g, int64_t N, int64_t d, int sigmoid, float *scratch,
                              int n_threads);
/* inv_rms(N) of one source */
void sf_attnres_inv_rms(float *inv_rms, const float *src, int64_t N, int64_t d, float eps,
                        int n_threads);
/* Two-phase Block AttnRes, phase 1: for the nq sublayers of a block, an online-softmax
 * state over the completed block representations src[0..nsrc): running max m (nq,N),
 * normalizer l (nq,N), unnormalized sum o (nq,N,d), and the raw logits (nq, N, nsrc) kept
 * for traces (may be NULL). qg: (nq, d) premultiplied pseudo-query ⊙ gain rows. */
void sf_attnres_phase1(float *m, float *l, float *o, float *logits, const float *const *src,
                       const float *const *inv_rms, int64_t nsrc, const float *qg, int64_t nq,
                       int64_t N, int64_t d, int n_threads);
/* Phase 2 for query j: merge with the partial sum (or none when partial == NULL) into h;
 * alpha_out (N, nsrc + [partial]) optional. */
void sf_attnres_phase2(float *h, float *alpha_out, const float *m, const float *l,
                       const float *o, const float *logits, int64_t nsrc, const float *partial,
                       const float *partial_inv_rms, const float *qg, int64_t N, int64_t d,
                       int n_threads);

/* Backward of sf_attnres_aggregate for nr aggregations ("readers") at once, over nsrc of
 * their sources: dsrc[i] (N, d) (=, or += when accumulate) Σ_j d h_j / d src_i, including the
 * path through each source's RMS; source i is column col0 + i of every reader's alpha. Each
 * reader's e (d floats per lane: SF_AR_LANES fixed runs of rows, at e + lane * e_tstride)
 * accumulates Σ_n ds r src over its lane's rows; its
 * dq = g ⊙ e and dg = q ⊙ e once all of its sources are done. */
/* row runs with their own e accumulators: a constant, so the sums do not depend on threads */
#define SF_AR_LANES 16
typedef struct {
    const float *dh;    /* (N, d) the reader's input gradient */
    const float *alpha; /* (N, ld) its forward weights */
    int64_t ld;
    const float *S;     /* (N) dh · h: Σ_i alpha_i (dh · src_i), since h = Σ_i alpha_i src_i */
    const float *qg;    /* (d) q ⊙ g */
    float *e;           /* (d) thread 0's accumulator */
    int sigmoid;        /* its weights are sigmoid gates: ds = a (1 - a) dh·x (S unused) */
} sf_attnres_reader;
/* key_norm 0 (attnres_key_norm=False): the keys are the sources themselves, inv_rms holds
 * ones and there is no path through an RMS. */
void sf_attnres_sources_backward(float *const *dsrc, const float *const *src,
                                 const float *const *inv_rms, int64_t nsrc, int64_t col0,
                                 int accumulate, const sf_attnres_reader *rd, int64_t nr,
                                 int64_t e_tstride, int64_t N, int64_t d, int key_norm,
                                 int n_threads);
/* S (N) = row-wise dot products of a and b (N, d): a reader's dh · h */
void sf_attnres_row_dots(float *S, const float *a, const float *b, int64_t N, int64_t d,
                         int n_threads);

/* ---- the general AttnRes read (sf_attnres.c): every Table 4 ablation that changes the
 * logits' shape (attnres_heads, attnres_query="input", attnres_mixing="static",
 * attnres_window) runs on this one pair of kernels; the default read keeps the tuned ones
 * above, bit for bit. Per token t, head h (d/H contiguous columns), source i:
 *     s_{t,h,i} = r_{t,i} Σ_{e in h} qg_{t,e} src_{i,t,e}     (static: s_{h,i} = b_{h,i})
 *     alpha_{t,h,.} = softmax_i(s) | sigmoid(s) ,   h_{t,e} = Σ_i alpha_{t,h(e),i} src_{i,t,e}
 * with r the per-token inverse RMS of the whole source (ones without the key norm) and qg the
 * query ⊙ key gain: one row shared by all tokens (qg_ld 0) or one row per token (qg_ld d). */
typedef struct {
    int64_t H;            /* heads (1: one softmax over the whole d) */
    int mixing;           /* sf_attnres_mixing */
    const float *qg;      /* (d) or (N, d) at row stride qg_ld; NULL with static mixing */
    int64_t qg_ld;
    const float *logits;  /* static mixing: (H, nsrc) */
    /* interventions (sf_patch, forward only): the weights themselves (N, H, nsrc) instead of
     * computing them, or sources removed from the read (drop[i] = 1: its logit is -inf, so
     * the softmax renormalises over the rest; a sigmoid gate is 0) */
    const float *alpha_in;
    const uint8_t *drop;
} sf_attnres_read;
int64_t sf_attnres_general_scratch_floats(int64_t nsrc, int64_t H, int n_threads);
/* h (N, d); alpha_out (N, H, nsrc) optional */
void sf_attnres_general_forward(float *h, float *alpha_out, const float *const *src,
                                const float *const *inv_rms, int64_t nsrc, const sf_attnres_read *rd,
                                int64_t N, int64_t d, float *scratch, int n_threads);
/* Backward of one general read with input gradient dh and its forward weights alpha (N, H,
 * nsrc): dsrc[i] += its source gradient (value path, and the key path through the logits and
 * the RMS unless static); the query gradient d(qg) into dqg_lanes (shared query: SF_AR_LANES
 * fixed row runs, lane l at dqg_lanes + l * lane_stride, summed by the caller in lane order)
 * or dqg_rows (N, d) (one query per token); static mixing: d logits (H, nsrc) into
 * dlogit_lanes the same way. Every sum has a fixed order: the same bits for any threads. */
void sf_attnres_general_backward(float *const *dsrc, const float *const *src,
                                 const float *const *inv_rms, int64_t nsrc, const sf_attnres_read *rd,
                                 const float *alpha, const float *dh, int key_norm, float *dqg_lanes,
                                 float *dqg_rows, float *dlogit_lanes, int64_t lane_stride, int64_t N,
                                 int64_t d, float *scratch, int n_threads);

#endif
