/* Attention Residuals (Kimi Team, arXiv 2603.15031): sublayer k reads a learned softmax
 * mixture of earlier outputs instead of their sum,
 *
 *     h_k = sum_i alpha_{k,i} v_i,   alpha_k = softmax_i( (q_k ⊙ g_k) · v_i / RMS(v_i) )    (eq. 3-5)
 *
 * with v_0 the embedding, v_{j+1} sublayer j's output (post-norm: Norm_j of it), q_k a learned
 * pseudo-query (zero at init: uniform mixing) and g_k the key norm's gain; the head reads
 * the same kind of aggregate (k = L). Full AttnRes mixes every earlier output; Block AttnRes
 * (sec. 3.2) mixes the completed block sums b_m = v_{mS+1} + ... + v_{(m+1)S} (b_0 = v_0) and
 * the running partial sum of the current block, computed with the paper's two-phase schedule
 * (phase 1 once per block over the completed blocks for all its queries, phase 2 per
 * sublayer). The kernels are in sf_attnres.c; this file is the bookkeeping: where each source
 * lives, which sources a sublayer reads, and the backward walk that gathers each source's
 * gradient from all of its readers. See sf_wiring.h for the hooks' contract and
 * DEVELOPERS.md for the math. */
#include "../sf_wiring.h"

#include <math.h>
#include <stdlib.h>

/* Full AttnRes backward: sources whose gradients one pass over their readers gathers together
 * (full_source_grad). At M (25 readers, 2 threads, kernel microbenchmark): 60-66 -> 57-58 ms. */
#define SF_AR_GROUP 4

/* One call's AttnRes state (R->ws). */
typedef struct {
    int block, two_phase;   /* Block AttnRes; its two-phase schedule */
    int64_t S, nb, nsrc_max; /* block size, blocks, most sources a reader mixes */
    float *src, *src_rms;   /* Full (L+1) sources, Block (nb+1) completed blocks; 1/RMS per row */
    float *part, *part_rms; /* Block: partial sum read by sublayer k (training: L of them) */
    float *vtmp;            /* Block/post-norm: a sublayer's output before it joins a sum */
    float *running;         /* rms trace: the plain running sum */
    float *alpha_out;       /* the output aggregator's weights (training) */
    float *ar_scratch;
    float *p1_m, *p1_l, *p1_o, *p1_qg, *p1_logits; /* two-phase: phase 1 state of one block */
    const float **src_ptr, **rms_ptr;
    float **dsrc_ptr;
    /* backward */
    sf_attnres_reader *readers;         /* the L+1 aggregations (sublayers, output) */
    float *ar_S, *ar_qg, *ar_e;         /* their dh·h (L+1, N), q⊙g (L+1, d), e (SF_AR_LANES, L+1, d) */
    float *ar_dh, *ar_alpha;            /* Block: one block's readers' dh and (checkpointing) alpha */
    float *ar_part, *ar_pbuf[SF_AR_GROUP - 1]; /* Full: partial source gradients (see full_source_grad) */
    int64_t ar_top;                     /* Full: the top source of the group gathered last */
    float *d_src, *d_acc;               /* source gradients; Block: the running partials' */
    float *dv;                          /* dL/dv_{k+1} of the sublayer being walked (rotates) */
    float *ones;                        /* attnres_key_norm=False: d ones, the gain there is none */
    /* the general read (Table 4 ablations: heads, input query, static weights, window; see
     * sf_attnres_general_forward): backward scatters each reader's source gradients at once */
    int general;
    int64_t H;                          /* heads */
    float *g_scratch, *g_qg;            /* kernel scratch; a shared query's q ⊙ g (d) */
    float *g_q, *g_qgt, *g_dq;          /* input query: q = x W^T, q ⊙ g, d(q ⊙ g) (N, d) each */
    float *g_dh;                        /* the reader's input gradient, consumed at once */
    float *g_dlogit;                    /* static: d logits (SF_AR_LANES, L+1, H nsrc_max) */
} ar_state;

/* an AttnRes read other than the tuned default (sf_attnres.c's general kernels) */
static int general_read(const sf_config *c) {
    return c->attnres_heads > 1 || c->attnres_query == SF_ARQ_INPUT || c->attnres_mixing == SF_MIX_STATIC ||
           c->attnres_window > 0;
}

/* sources before the window */
static int64_t all_sources(const sf_config *c, int64_t k) {
    int64_t L = 2 * c->n_layers;
    if (c->residual == SF_RES_ATTNRES_FULL) return k + 1;
    int64_t S = c->attnres_block_size;
    if (k >= L) return 1 + (L + S - 1) / S; /* output: b_0 .. b_N */
    return 1 + k / S + (k % S != 0);
}

/* attnres_window = W: the embedding (b_0) and the last W of the others */
static int64_t num_sources(const sf_config *c, int64_t k) {
    int64_t n = all_sources(c, k), W = c->attnres_window;
    return W > 0 && n > 1 + W ? 1 + W : n;
}

/* ---- parameters: per sublayer a pseudo-query (1, d) and a key-norm gain (d), zero (uniform
 * mixing, the paper's mandatory init) and one at init, no weight decay; the same pair for the
 * output aggregator ---- */

/* One reader's query parameters (the view *_res_q): the pseudo-query "<pfx>_res_proj.weight"
 * (1, d); with attnres_query="input" the projection q_t = W x_t, (d, d) under the same name (a
 * Linear d -> d instead of d -> 1); with attnres_mixing="static" its logits
 * "<pfx>_res_logits.weight" (H, n_sources) instead (no keys, so no key norm either). All zero
 * at init (uniform mixing), none decayed. */
static void emit_reader(const sf_config *c, sf_table_builder *tb, const char *pfx, int layer, int64_t k,
                        size_t qview, size_t gview) {
    const int64_t d = c->d_model;
    char nm[SF_NAME_MAX];
    if (c->attnres_mixing == SF_MIX_STATIC) {
        snprintf(nm, sizeof nm, "%.40s_res_logits.weight", pfx);
        sf_params_emit(tb, nm, layer, 2, c->attnres_heads, num_sources(c, k), 1, SF_INIT_ZEROS, qview);
        return;
    }
    snprintf(nm, sizeof nm, "%.40s_res_proj.weight", pfx);
    sf_params_emit(tb, nm, layer, 2, c->attnres_query == SF_ARQ_INPUT ? d : 1, d, 1, SF_INIT_ZEROS, qview);
    snprintf(nm, sizeof nm, "%.40s_res_norm.weight", pfx); /* the key norm's gains exist only with the norm */
    if (c->attnres_key_norm) sf_params_emit(tb, nm, layer, 1, d, 0, 1, SF_INIT_ONES, gview);
}

static void table_layer(const sf_config *c, int i, sf_table_builder *tb) {
    char pfx[40];
    snprintf(pfx, sizeof pfx, "layers.%d.attn", i);
    emit_reader(c, tb, pfx, i, 2 * (int64_t)i, SF_LAYER_VIEW(attn_res_q), SF_LAYER_VIEW(attn_res_g));
    snprintf(pfx, sizeof pfx, "layers.%d.mlp", i);
    emit_reader(c, tb, pfx, i, 2 * (int64_t)i + 1, SF_LAYER_VIEW(mlp_res_q), SF_LAYER_VIEW(mlp_res_g));
}

static void table_model(const sf_config *c, sf_table_builder *tb) {
    emit_reader(c, tb, "output", -1, 2 * c->n_layers, SF_MODEL_VIEW(out_res_q), SF_MODEL_VIEW(out_res_g));
}

/* ---- per call ---- */

static sf_status init(run *R) {
    const sf_config *c = R->c;
    ar_state *ar = calloc(1, sizeof *ar);
    if (!ar) return SF_ERR_NOMEM;
    R->ws = ar;
    ar->block = c->residual == SF_RES_ATTNRES_BLOCK;
    ar->general = general_read(c);
    ar->H = c->attnres_heads;
    /* the two-phase schedule is an online softmax with one shared query; sigmoid gates and the
     * general read take the direct path */
    ar->two_phase = ar->block && R->two_phase && R->c->attnres_mixing == SF_MIX_SOFTMAX && !ar->general;
    ar->S = c->attnres_block_size;
    ar->nb = (R->L + ar->S - 1) / ar->S;
    ar->nsrc_max = ar->block ? ar->nb + 1 : R->L + 1;
    int64_t nptr = ar->nsrc_max + 2;
    ar->src_ptr = calloc((size_t)nptr, sizeof *ar->src_ptr);
    ar->rms_ptr = calloc((size_t)nptr, sizeof *ar->rms_ptr);
    ar->dsrc_ptr = calloc((size_t)nptr, sizeof *ar->dsrc_ptr);
    ar->readers = calloc((size_t)R->L + 1, sizeof *ar->readers); /* every sublayer, the output */
    if (!ar->src_ptr || !ar->rms_ptr || !ar->dsrc_ptr || !ar->readers) return SF_ERR_NOMEM;
    return SF_OK;
}

static void free_state(run *R) {
    ar_state *ar = R->ws;
    if (!ar) return;
    free(ar->src_ptr);
    free(ar->rms_ptr);
    free(ar->dsrc_ptr);
    free(ar->readers);
    free(ar);
    R->ws = NULL;
}

/* Pre-norm outputs are kept as they are (v = y), so the sublayer writes them straight to where
 * they are kept (out_buf); post-norm keeps y for the norm's backward. */
static void layout_block(run *R, bump *bp, block_acts *A) {
    ar_state *ar = R->ws;
    const int64_t N = R->N, Nd = N * R->d;
    const int pre = R->c->pre_norm;
    int bad = 0;
    A->y_a = pre ? NULL : take(bp, Nd);
    A->y_m = pre ? NULL : take(bp, Nd);
    A->alpha_a = (ar->block && R->training) ? take(bp, cmul(&bad, N, ar->nsrc_max * ar->H)) : NULL;
    A->alpha_m = (ar->block && R->training) ? take(bp, cmul(&bad, N, ar->nsrc_max * ar->H)) : NULL;
    if (bad) bp->bad = 1;
}

static void layout(run *R, bump *bp, want w) {
    ar_state *ar = R->ws;
    int bad = 0;
    const int64_t N = R->N, d = R->d, Nd = cmul(&bad, N, d), L = R->L;
    int64_t nsrc_store = ar->block ? ar->nb + 1 : L + 1;
    int64_t npart = ar->block ? (R->training ? L : 1) : 0;
    ar->src = take(bp, cmul(&bad, nsrc_store, Nd));
    ar->src_rms = take(bp, cmul(&bad, nsrc_store, N));
    ar->part = take(bp, cmul(&bad, npart, Nd));
    ar->part_rms = take(bp, cmul(&bad, npart, N));
    ar->vtmp = take(bp, Nd);
    ar->running = w.rms ? take(bp, Nd) : NULL;
    const int64_t H = ar->H;
    ar->alpha_out = (ar->block && R->training) ? take(bp, cmul(&bad, N, ar->nsrc_max * H)) : NULL;
    if (R->training) {
        if (!ar->block) {
            /* Full: the gathered backward reads every reader's weights at every source, so all
             * of them are kept (also when checkpointing), reader j's (N, H, <= j+1) at
             * N H j(j+1)/2 */
            float *al = take(bp, cmul(&bad, cmul(&bad, N, H), (L + 1) * (L + 2) / 2));
            for (int64_t j = 0; al && j <= L; j++) {
                float *aj = al + N * H * (j * (j + 1) / 2);
                if (j == L) ar->alpha_out = aj;
                else if (j % 2 == 0) R->acts[j / 2].alpha_a = aj;
                else R->acts[j / 2].alpha_m = aj;
            }
        } else {
            /* Block: the readers of one block wait for their batched backward; with
             * checkpointing their alphas are copied out of the shared block activations */
            ar->ar_dh = take(bp, cmul(&bad, ar->S, Nd));
            ar->ar_alpha = R->per_block ? NULL : take(bp, cmul(&bad, cmul(&bad, ar->S, N), ar->nsrc_max));
        }
        ar->ar_S = take(bp, cmul(&bad, L + 1, N));
        ar->ar_qg = take(bp, cmul(&bad, L + 1, d));
        ar->ar_e = take(bp, cmul(&bad, SF_AR_LANES, cmul(&bad, L + 1, d)));
        ar->d_src = take(bp, cmul(&bad, nsrc_store, Nd));
        ar->d_acc = ar->block ? take(bp, Nd) : NULL;
        ar->ar_part = !ar->block ? take(bp, cmul(&bad, SF_AR_GROUP - 1, Nd)) : NULL;
    }
    ar->ar_scratch = take(bp, sf_attnres_scratch_floats(ar->nsrc_max, d, R->nt));
    /* the general read's scratch: also for the default read of a patched forward (small) */
    ar->g_scratch = take(bp, sf_attnres_general_scratch_floats(ar->nsrc_max, H, R->nt));
    ar->g_qg = take(bp, d);
    if (ar->general) {
        const int inq = R->c->attnres_query == SF_ARQ_INPUT;
        ar->g_qgt = inq ? take(bp, Nd) : NULL;
        ar->g_q = inq && R->training ? take(bp, Nd) : NULL;
        ar->g_dq = inq && R->training ? take(bp, Nd) : NULL;
        ar->g_dh = R->training ? take(bp, Nd) : NULL;
        ar->g_dlogit = R->training && R->c->attnres_mixing == SF_MIX_STATIC
                           ? take(bp, cmul(&bad, SF_AR_LANES, cmul(&bad, L + 1, H * ar->nsrc_max))) : NULL;
    }
    ar->ones = R->c->attnres_key_norm ? NULL : take(bp, d);
    for (int64_t j = 0; ar->ones && j < d; j++) ar->ones[j] = 1.0f;
    if (ar->two_phase) {
        int64_t nq = ar->S < L ? ar->S : L;
        ar->p1_m = take(bp, cmul(&bad, nq, N));
        ar->p1_l = take(bp, cmul(&bad, nq, N));
        ar->p1_o = take(bp, cmul(&bad, nq, Nd));
        ar->p1_qg = take(bp, cmul(&bad, nq, d));
        ar->p1_logits = w.alpha ? take(bp, cmul(&bad, cmul(&bad, nq, N), ar->nsrc_max)) : NULL;
    }
    if (bad) bp->bad = 1;
}

/* ---- bookkeeping ---- */

/* A source's per-token key scale: 1/RMS, or ones without the key norm (then every product
 * with it is exact and the keys are the sources themselves). */
static void source_inv_rms(const run *R, float *inv_rms, const float *src) {
    if (R->c->attnres_key_norm) sf_attnres_inv_rms(inv_rms, src, R->N, R->d, R->c->attnres_eps, R->nt);
    else for (int64_t n = 0; n < R->N; n++) inv_rms[n] = 1.0f;
}

static int64_t part_index(const run *R, int64_t k) { return R->training ? k : 0; }

/* Point src_ptr/rms_ptr (and dsrc_ptr in training) at sublayer k's sources; returns count.
 * k == L is the output aggregator. */
static int64_t gather_sources(const run *R, int64_t k) {
    ar_state *ar = R->ws;
    const int64_t Nd = R->N * R->d, N = R->N;
    int64_t ns;
    if (!ar->block) ns = (k < R->L) ? k + 1 : R->L + 1;
    else ns = (k < R->L) ? k / ar->S + 1 : ar->nb + 1;
    for (int64_t j = 0; j < ns; j++) {
        ar->src_ptr[j] = ar->src + j * Nd;
        ar->rms_ptr[j] = ar->src_rms + j * N;
        if (ar->d_src) ar->dsrc_ptr[j] = ar->d_src + j * Nd;
    }
    if (ar->block && k < R->L && k % ar->S != 0) { /* the running partial sum of this block */
        int64_t p = part_index(R, k);
        ar->src_ptr[ns] = ar->part + p * Nd;
        ar->rms_ptr[ns] = ar->part_rms + p * N;
        if (ar->d_src) ar->dsrc_ptr[ns] = ar->d_acc;
        ns++;
    }
    const int64_t W = R->c->attnres_window;
    if (W > 0 && ns > 1 + W) { /* the window: source 0 and the last W */
        for (int64_t j = 1; j <= W; j++) {
            ar->src_ptr[j] = ar->src_ptr[ns - W - 1 + j];
            ar->rms_ptr[j] = ar->rms_ptr[ns - W - 1 + j];
            ar->dsrc_ptr[j] = ar->dsrc_ptr[ns - W - 1 + j];
        }
        ns = 1 + W;
    }
    return ns;
}

static const float *res_q(const run *R, int64_t k) {
    if (k >= R->L) return R->m->out_res_q;
    const sf_layer_views *Lv = &R->m->layers[k / 2];
    return k % 2 == 0 ? Lv->attn_res_q : Lv->mlp_res_q;
}
static const float *res_g(const run *R, int64_t k) {
    if (!R->c->attnres_key_norm) return ((const ar_state *)R->ws)->ones; /* q ⊙ 1 = q exactly */
    if (k >= R->L) return R->m->out_res_g;
    const sf_layer_views *Lv = &R->m->layers[k / 2];
    return k % 2 == 0 ? Lv->attn_res_g : Lv->mlp_res_g;
}

/* The forward weights aggregation j (sublayer j, or j = L the output) keeps for training */
static float *reader_alpha(const run *R, int64_t j) {
    ar_state *ar = R->ws;
    if (j >= R->L) return ar->alpha_out;
    return j % 2 == 0 ? R->acts[j / 2].alpha_a : R->acts[j / 2].alpha_m;
}

/* The general read's description for reader k over the ns sources gather_sources pointed at:
 * its query (shared: q ⊙ g in g_qg; input: q_t = x_t W^T from the newest source x, then ⊙ g,
 * in g_qgt, with q itself kept in q_out when given) or its static logits. */
static sf_attnres_read general_desc(run *R, int64_t k, int64_t ns, float *q_out) {
    ar_state *ar = R->ws;
    const int64_t N = R->N, d = R->d;
    const float *q = res_q(R, k), *g = res_g(R, k);
    sf_attnres_read rd = {.H = ar->H, .mixing = R->c->attnres_mixing};
    if (rd.mixing == SF_MIX_STATIC) {
        rd.logits = q;
        return rd;
    }
    if (R->c->attnres_query == SF_ARQ_INPUT) {
        /* an AttnRes product: fp32 also in bfloat16 mode (the aggregation stays fp32) */
        float *qt = ar->g_qgt;
        sf_matmul(qt, ar->src_ptr[ns - 1], q, NULL, N, d, d, 0, R->pack, R->nt);
        if (q_out) copy(q_out, qt, N * d);
        for (int64_t n = 0; n < N; n++)
            for (int64_t e = 0; e < d; e++) qt[n * d + e] *= g[e];
        rd.qg = qt;
        rd.qg_ld = d;
        return rd;
    }
    for (int64_t e = 0; e < d; e++) ar->g_qg[e] = q[e] * g[e];
    rd.qg = ar->g_qg;
    return rd;
}

/* the caller's intervention on read k (forward only): its weights, its removed sources */
static const float *patch_alpha(const run *R, int64_t k) {
    return R->patch && R->patch->alpha ? R->patch->alpha[k] : NULL;
}
static const uint8_t *patch_drop(const run *R, int64_t k) {
    return R->patch && R->patch->ablate ? R->patch->ablate[k] : NULL;
}

/* h = AttnRes_k(sources); alpha (N, nsrc) optional (general read: (N, H, nsrc)) */
static void attnres_input(run *R, int64_t k, float *h, float *alpha) {
    ar_state *ar = R->ws;
    const int64_t N = R->N, d = R->d;
    if (ar->general || patch_alpha(R, k) || patch_drop(R, k)) {
        int64_t ns = gather_sources(R, k);
        sf_attnres_read rd = general_desc(R, k, ns, NULL);
        rd.alpha_in = patch_alpha(R, k);
        rd.drop = patch_drop(R, k);
        sf_attnres_general_forward(h, alpha, ar->src_ptr, ar->rms_ptr, ns, &rd, N, d, ar->g_scratch, R->nt);
        return;
    }
    int64_t pos = ar->block ? k % ar->S : 0;
    if (ar->two_phase && k < R->L) {
        int64_t nsrc = k / ar->S + 1; /* completed blocks b_0 .. b_{m-1} */
        gather_sources(R, k);
        if (pos == 0) { /* phase 1 at block start: all of the block's queries at once */
            int64_t nq = (R->L - k) < ar->S ? (R->L - k) : ar->S;
            for (int64_t j = 0; j < nq; j++) {
                const float *q = res_q(R, k + j), *g = res_g(R, k + j);
                for (int64_t e = 0; e < d; e++) ar->p1_qg[j * d + e] = q[e] * g[e];
            }
            sf_attnres_phase1(ar->p1_m, ar->p1_l, ar->p1_o, ar->p1_logits, ar->src_ptr, ar->rms_ptr,
                              nsrc, ar->p1_qg, nq, N, d, R->nt);
        }
        sf_attnres_phase2(h, alpha, ar->p1_m + pos * N, ar->p1_l + pos * N, ar->p1_o + pos * N * d,
                          ar->p1_logits ? ar->p1_logits + pos * N * nsrc : NULL, nsrc,
                          pos ? ar->part : NULL, ar->part_rms, ar->p1_qg + pos * d, N, d, R->nt);
        return;
    }
    int64_t ns = gather_sources(R, k);
    sf_attnres_aggregate_mix(h, alpha, ar->src_ptr, ar->rms_ptr, ns, res_q(R, k), res_g(R, k), N, d,
                             R->c->attnres_mixing == SF_MIX_SIGMOID, ar->ar_scratch, R->nt);
}

/* Where sublayer k's output v is kept: Full, its source slot k+1; Block, the staging row. */
static float *attnres_v(const run *R, int64_t k) {
    ar_state *ar = R->ws;
    return ar->block ? ar->vtmp : ar->src + (k + 1) * R->N * R->d;
}

/* Sublayer k produced y; store its output v (post-norm: Norm(y)) where later readers find it. */
static void attnres_output(run *R, int64_t k, const float *y, const float *nw, const float *nb,
                           float *trace_out) {
    ar_state *ar = R->ws;
    const int64_t N = R->N, d = R->d, Nd = N * d;
    float *v = attnres_v(R, k);
    if (R->c->pre_norm) copy(v, y, Nd); /* nothing to copy when y was written there */
    else norm_fwd(R, v, y, nw, nb);
    resid_dropout(R, v, k);
    sub_out_hook(R, k, v, trace_out);
    if (ar->running) sf_add(ar->running, v, Nd, R->nt);
    if (!ar->block) {
        source_inv_rms(R, ar->src_rms + (k + 1) * N, v);
        return;
    }
    int64_t pos = k % ar->S;
    const float *prev = pos ? ar->part + part_index(R, k) * Nd : NULL;
    float *dst, *dst_rms;
    if (pos == ar->S - 1 || k == R->L - 1) { /* block complete: b_m */
        int64_t m = k / ar->S + 1;
        dst = ar->src + m * Nd;
        dst_rms = ar->src_rms + m * N;
    } else { /* the partial sum the next sublayer reads */
        dst = ar->part + part_index(R, k + 1) * Nd;
        dst_rms = ar->part_rms + part_index(R, k + 1) * N;
    }
    if (prev) add3(R, dst, prev, v, Nd);
    else copy(dst, v, Nd);
    source_inv_rms(R, dst_rms, dst);
}

/* ---- forward hooks ---- */

/* the embedding is source 0 */
static float *embed_dst(run *R) {
    ar_state *ar = R->ws;
    return ar->src;
}

static void begin(run *R, float *x0) {
    ar_state *ar = R->ws;
    source_inv_rms(R, ar->src_rms, x0);
    if (ar->running) copy(ar->running, x0, R->N * R->d);
}

static void read(run *R, int64_t k, float *h, float *alpha_trace) {
    float *alpha = alpha_trace;
    if (!alpha) alpha = k % 2 == 0 ? R->acts[k / 2].alpha_a : R->acts[k / 2].alpha_m;
    attnres_input(R, k, h, alpha);
}

/* Where sublayer k writes its output: under pre-norm straight to where it is kept (Full: its
 * source slot; Block: the staging row), instead of to its activation buffer and a copy. */
static float *out_buf(run *R, int64_t k, float *own) {
    return R->c->pre_norm ? attnres_v(R, k) : own;
}

static void write(run *R, int64_t k, float *y, float *next, float *trace_out, float *rms) {
    ar_state *ar = R->ws;
    const float *nw, *nb;
    sub_norm(R, k, &nw, &nb);
    attnres_output(R, k, y, nw, nb, trace_out);
    if (rms) {
        const int64_t Nd = R->N * R->d;
        rms[SF_RMS_OUTPUT] = rms_of(attnres_v(R, k), Nd);
        rms[SF_RMS_STREAM] = rms_of(ar->running, Nd);
    }
}

/* the head reads the output aggregate h_L */
static void final(run *R, float *alpha_trace) {
    ar_state *ar = R->ws;
    attnres_input(R, R->L, R->fin_h, alpha_trace ? alpha_trace : ar->alpha_out);
}

/* ---- backward ---- */

/* Full: dv_s (N, d) of source s (the embedding, or sublayer s-1's output) into ar->dv, gathered
 * from its readers s .. L, whose input gradients are all known by the time it is needed.
 * Sources are gathered SF_AR_GROUP at a time: when the walk reaches the top source s of a
 * group, one pass over readers s .. L serves the group's sources s-G+1 .. s too (each reader's
 * dh rows come from memory once per group instead of once per source: these L²/2 reads are
 * the pass's cost), and each lower source s' keeps that partial sum until the walk reaches it
 * and adds its last readers s' .. s-1. The partials rotate with ar->dv, so none is copied. */
static void full_source_grad(run *R, int64_t s) {
    ar_state *ar = R->ws;
    const int64_t N = R->N, d = R->d, Nd = N * d, L = R->L, G = SF_AR_GROUP;
    const int64_t top = ar->ar_top;
    if (top > s && top - s < G) {
        float **part = &ar->ar_pbuf[top - s - 1], *done;
        const float *x = ar->src + s * Nd, *r = ar->src_rms + s * N;
        sf_attnres_sources_backward(part, &x, &r, 1, s, 1, ar->readers + s, top - s, (L + 1) * d, N,
                                    d, R->c->attnres_key_norm, R->nt);
        done = *part;
        *part = ar->dv;
        ar->dv = done;
        return;
    }
    const int64_t lo = s - G + 1 < 0 ? 0 : s - G + 1, n = s - lo + 1;
    for (int64_t i = 0; i < n; i++) {
        int64_t si = lo + i;
        ar->src_ptr[i] = ar->src + si * Nd;
        ar->rms_ptr[i] = ar->src_rms + si * N;
        ar->dsrc_ptr[i] = si == s ? ar->dv : ar->ar_pbuf[s - si - 1];
    }
    sf_attnres_sources_backward(ar->dsrc_ptr, ar->src_ptr, ar->rms_ptr, n, lo, 0, ar->readers + s,
                                L + 1 - s, (L + 1) * d, N, d, R->c->attnres_key_norm, R->nt);
    ar->ar_top = s;
}

/* The general read's backward for reader k with input gradient dh: every source's gradient at
 * once into its accumulator (gather_sources' dsrc_ptr: Full d_src slots, Block d_src block
 * slots or d_acc for the partial sum), the query's into ar_e lanes (shared, finished in
 * backward_end), W and g (input query) or the logits' lanes (static). */
static void general_backward(run *R, int64_t k, const float *dh) {
    ar_state *ar = R->ws;
    const int64_t N = R->N, d = R->d, L = R->L, Nd = N * d;
    int64_t ns = gather_sources(R, k);
    const int inq = R->c->attnres_query == SF_ARQ_INPUT, stat = R->c->attnres_mixing == SF_MIX_STATIC;
    sf_attnres_read rd = general_desc(R, k, ns, ar->g_q);
    const int64_t hw = ar->H * ar->nsrc_max;
    if (inq) memset(ar->g_dq, 0, (size_t)Nd * sizeof(float));
    sf_attnres_general_backward(ar->dsrc_ptr, ar->src_ptr, ar->rms_ptr, ns, &rd, reader_alpha(R, k), dh,
                                R->c->attnres_key_norm, (inq || stat) ? NULL : ar->ar_e + k * d,
                                inq ? ar->g_dq : NULL, stat ? ar->g_dlogit + k * hw : NULL,
                                stat ? (L + 1) * hw : (L + 1) * d, N, d, ar->g_scratch, R->nt);
    if (!inq) return;
    /* qg_t = (x_t W^T) ⊙ g: dg += Σ_t dqg_t ⊙ q_t (tokens in order), dq = dqg ⊙ g, then the
     * Linear's dW += dq^T x and dx += dq W into the newest source's gradient */
    const float *g = res_g(R, k), *W = res_q(R, k), *x = ar->src_ptr[ns - 1];
    float *dg = R->c->attnres_key_norm ? GRAD(R, g) : NULL, *dq = ar->g_dq;
    for (int64_t n = 0; dg && n < N; n++)
        for (int64_t e = 0; e < d; e++) dg[e] += dq[n * d + e] * ar->g_q[n * d + e];
    for (int64_t n = 0; n < N; n++)
        for (int64_t e = 0; e < d; e++) dq[n * d + e] *= g[e];
    sf_gemm(GRAD(R, W), d, dq, 1, d, x, 0, NULL, d, N, d, 1, R->pack, R->nt);
    sf_gemm(ar->dsrc_ptr[ns - 1], d, dq, d, 1, W, 0, NULL, N, d, d, 1, R->pack, R->nt);
}

/* Block: the waiting readers of block m+1 (or the output, m = nb) over the completed blocks
 * they read, b_0 .. b_m; afterwards d b_m is complete. */
static void block_flush(run *R, int64_t m) {
    ar_state *ar = R->ws;
    const int64_t N = R->N, d = R->d, Nd = N * d, L = R->L;
    int64_t j0 = m == ar->nb ? L : m * ar->S, nr = m == ar->nb ? 1 : (L - j0 < ar->S ? L - j0 : ar->S);
    for (int64_t c = 0; c <= m; c++) {
        ar->src_ptr[c] = ar->src + c * Nd;
        ar->rms_ptr[c] = ar->src_rms + c * N;
        ar->dsrc_ptr[c] = ar->d_src + c * Nd;
    }
    sf_attnres_sources_backward(ar->dsrc_ptr, ar->src_ptr, ar->rms_ptr, m + 1, 0, 1, ar->readers + j0, nr,
                                (L + 1) * d, N, d, R->c->attnres_key_norm, R->nt);
}

/* The walk back from the output aggregation. Each aggregation ("reader": sublayer j, or the
 * output, j = L) leaves its input gradient dh_j and dh_j·h_j; the gradients of the sources it
 * read are then computed in batches (sf_attnres_sources_backward): Full gathers each source
 * from all of its readers when the walk reaches the sublayer that wrote it; Block runs one
 * block's readers at once over the completed blocks when the walk leaves that block, and
 * each reader's partial-sum source right away. */
static void backward_begin(run *R, const float *dfin_h) {
    ar_state *ar = R->ws;
    const int64_t N = R->N, d = R->d, Nd = N * d, L = R->L, S = ar->S;
    ar->dv = R->dy;
    if (ar->general) { /* every reader scatters into zeroed source gradients as it is walked */
        memset(ar->d_src, 0, (size_t)((ar->block ? ar->nb + 1 : L + 1) * Nd) * sizeof(float));
        memset(ar->ar_e, 0, (size_t)(SF_AR_LANES * (L + 1) * d) * sizeof(float));
        if (ar->g_dlogit)
            memset(ar->g_dlogit, 0, (size_t)(SF_AR_LANES * (L + 1) * ar->H * ar->nsrc_max) * sizeof(float));
        general_backward(R, L, dfin_h);
        return;
    }
    for (int64_t j = 0; j <= L; j++) {
        const float *q = res_q(R, j), *g = res_g(R, j);
        float *qg = ar->ar_qg + j * d;
        for (int64_t e = 0; e < d; e++) qg[e] = q[e] * g[e];
        sf_attnres_reader *rd = &ar->readers[j];
        *rd = (sf_attnres_reader){.S = ar->ar_S + j * N, .qg = qg, .e = ar->ar_e + j * d,
                                  .sigmoid = R->c->attnres_mixing == SF_MIX_SIGMOID};
        if (!ar->block) {
            rd->dh = ar->d_src + j * Nd;
            rd->alpha = reader_alpha(R, j);
            rd->ld = j + 1;
        } else {
            rd->ld = j == L ? ar->nb + 1 : j / S + 1 + (j % S != 0);
        }
    }
    memset(ar->ar_e, 0, (size_t)(SF_AR_LANES * (L + 1) * d) * sizeof(float));
    if (!ar->block) {
        for (int64_t i = 0; i < SF_AR_GROUP - 1; i++) ar->ar_pbuf[i] = ar->ar_part + i * Nd;
        ar->ar_top = -1;
    }
    float *dh_out = ar->block ? ar->ar_dh : ar->d_src + L * Nd; /* Block: the output waits alone */
    if (ar->block) {
        memset(ar->d_src, 0, (size_t)((ar->nb + 1) * Nd) * sizeof(float));
        ar->readers[L].dh = dh_out;
        ar->readers[L].alpha = reader_alpha(R, L);
    }
    copy(dh_out, dfin_h, Nd);
    sf_attnres_row_dots(ar->ar_S + L * N, dfin_h, R->fin_h, N, d, R->nt);
}

/* dL/dy_k: first dL/dv_{k+1} (Full: gathered from its readers; Block: d b_m plus the later
 * partial sums of its block), through the dropout mask (v = y * keep) and under post-norm
 * through v = Norm_k(y). ar->dv is this sublayer's own copy, masked in place. */
static const float *write_backward(run *R, int64_t k) {
    ar_state *ar = R->ws;
    const int64_t Nd = R->N * R->d, S = ar->S;
    if (!ar->block) {
        if (ar->general) ar->dv = ar->d_src + (k + 1) * Nd; /* complete: its readers are walked */
        else full_source_grad(R, k + 1);
    } else {
        int64_t m = k / S + 1;
        if (k % S == S - 1 || k == R->L - 1) { /* entering block m from above */
            if (!ar->general) block_flush(R, m);
            memset(ar->d_acc, 0, (size_t)Nd * sizeof(float));
        }
        add3(R, ar->dv, ar->d_src + m * Nd, ar->d_acc, Nd); /* d v_k = d b_m + later partials */
    }
    resid_dropout(R, ar->dv, k);
    if (R->c->pre_norm) return ar->dv;
    const float *y = k % 2 == 0 ? R->acts[k / 2].y_a : R->acts[k / 2].y_m, *nw, *nb;
    sub_norm(R, k, &nw, &nb);
    norm_bwd(R, R->dx, ar->dv, y, nw, nb, 0);
    return R->dx;
}

/* this sublayer's input gradient: reader k's dh, kept until its sources' gradients are
 * gathered (Full: d_src slot k; Block: its slot among the block's waiting readers) */
static float *read_grad_dst(run *R, int64_t k, int *accumulate) {
    ar_state *ar = R->ws;
    const int64_t Nd = R->N * R->d;
    *accumulate = 0;
    if (ar->general) return ar->g_dh;
    return !ar->block ? ar->d_src + k * Nd : ar->ar_dh + (k % ar->S) * Nd;
}

static void read_backward(run *R, int64_t k) {
    ar_state *ar = R->ws;
    const int64_t N = R->N, d = R->d, L = R->L;
    int acc;
    const float *dh = read_grad_dst(R, k, &acc), *h = sub_in(R, k);
    if (ar->general) {
        general_backward(R, k, dh);
        return;
    }
    sf_attnres_row_dots(ar->ar_S + k * N, dh, h, N, d, R->nt);
    if (!ar->block) return;
    sf_attnres_reader *rd = &ar->readers[k];
    rd->dh = dh;
    rd->alpha = reader_alpha(R, k);
    if (ar->ar_alpha) { /* checkpointing: the next recompute reuses the block activations */
        float *keep = ar->ar_alpha + (k % ar->S) * N * ar->nsrc_max;
        copy(keep, rd->alpha, N * rd->ld);
        rd->alpha = keep;
    }
    if (k % ar->S != 0) { /* the partial sum it read: its gradient joins d_acc now */
        int64_t p = part_index(R, k);
        const float *ps = ar->part + p * N * d, *pr = ar->part_rms + p * N;
        float *dacc = ar->d_acc;
        sf_attnres_sources_backward(&dacc, &ps, &pr, 1, k / ar->S + 1, 1, rd, 1, (L + 1) * d, N, d,
                                    R->c->attnres_key_norm, R->nt);
    }
}

/* the embedding is source 0: its gradient is complete once its readers are walked */
static const float *embed_grad(run *R) {
    ar_state *ar = R->ws;
    if (ar->general) return ar->d_src; /* slot 0 */
    if (!ar->block) {
        full_source_grad(R, 0);
        return ar->dv;
    }
    block_flush(R, 0);
    return ar->d_src;
}

static void backward_end(run *R) {
    ar_state *ar = R->ws;
    const int64_t d = R->d, L = R->L;
    if (R->c->attnres_query == SF_ARQ_INPUT) return; /* W and g: done per reader */
    if (ar->g_dlogit) { /* static logits: the lanes' partials in order */
        const int64_t hw = ar->H * ar->nsrc_max;
        for (int64_t j = 0; j <= L; j++) {
            const int64_t n = ar->H * num_sources(R->c, j);
            float *db = GRAD(R, res_q(R, j));
            for (int t = 0; t < SF_AR_LANES; t++) {
                const float *p = ar->g_dlogit + ((int64_t)t * (L + 1) + j) * hw;
                for (int64_t i = 0; i < n; i++) db[i] += p[i];
            }
        }
        return;
    }
    for (int64_t j = 0; j <= L; j++) { /* dq = g ⊙ e, dg = q ⊙ e, the lanes' partials in order */
        const float *q = res_q(R, j), *g = res_g(R, j);
        float *dq = GRAD(R, q), *dg = R->c->attnres_key_norm ? GRAD(R, g) : NULL;
        for (int t = 0; t < SF_AR_LANES; t++) {
            const float *e = ar->ar_e + ((int64_t)t * (L + 1) + j) * d;
            if (dg) for (int64_t i = 0; i < d; i++) { dq[i] += g[i] * e[i]; dg[i] += q[i] * e[i]; }
            else for (int64_t i = 0; i < d; i++) dq[i] += g[i] * e[i];
        }
    }
}

#define SF_ATTNRES_HOOKS                  \
    .save_block_input = 0, /* every source is kept */ \
    .table_layer = table_layer,           \
    .table_model = table_model,           \
    .num_sources = num_sources,           \
    .init = init,                         \
    .free = free_state,                   \
    .layout_block = layout_block,         \
    .layout = layout,                     \
    .embed_dst = embed_dst,               \
    .begin = begin,                       \
    .read = read,                         \
    .out_buf = out_buf,                   \
    .write = write,                       \
    .final = final,                       \
    .backward_begin = backward_begin,     \
    .write_backward = write_backward,     \
    .read_grad_dst = read_grad_dst,       \
    .read_backward = read_backward,       \
    .embed_grad = embed_grad,             \
    .backward_end = backward_end

const sf_wiring sf_wiring_attnres_full = {.name = "attnres_full", SF_ATTNRES_HOOKS};
const sf_wiring sf_wiring_attnres_block = {.name = "attnres_block", SF_ATTNRES_HOOKS};
