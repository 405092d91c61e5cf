/* The stack: embedding, n blocks of (attention, MLP) sublayers wired by plain residuals or by
 * Attention Residuals, optional Mixture-of-Depths attention, final norm, head; and traces.
 *
 * One forward call allocates one workspace (sized from B, T and the config), runs, and frees
 * it: concurrent calls on one model never share mutable state, and nothing is allocated inside
 * the layer loop. See DEVELOPERS.md for the math.
 */
#include "sf_internal.h"
#include "sf_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int64_t sf_depth_cols(const sf_config *c, int64_t layer) {
    return c->moda ? 2 * layer * c->moda_chunk : 0;
}

int64_t sf_attnres_num_sources(const sf_config *c, int64_t k) {
    int64_t L = 2 * c->n_layers;
    if (c->residual == SF_RES_ATTNRES_FULL) return k + 1;
    if (c->residual != SF_RES_ATTNRES_BLOCK) return 0;
    int64_t S = c->attnres_block_size;
    if (k >= L) return 1 + (L + S - 1) / S; /* output: b_0 .. b_N */
    return 1 + k / S + (k % S != 0);
}

/* ---- workspace ---------------------------------------------------------------------------- */

typedef struct {
    float *x, *hin, *u, *y, *q, *k, *v, *att, *f1, *f2, *pack, *attn_scratch;
    float *depth_k, *depth_v;         /* MoDA arena (N, n_slots, kvd) */
    float *src;                       /* AttnRes sources: Full (L+1) x (N,d); Block (nb+1) x (N,d) */
    float *src_inv_rms;               /* matching (nsrc_max) x (N) */
    float *partial, *partial_inv_rms; /* Block AttnRes running partial sum of the current block */
    float *p1_m, *p1_l, *p1_o, *p1_qg, *p1_logits; /* Block two-phase state */
    float *running;                   /* AttnRes: plain running sum, only for the rms trace */
    float *ar_scratch;
    const float **src_ptr, **rms_ptr; /* pointer tables for the aggregation kernels */
    void *block;
} workspace;

typedef struct { int64_t n; float **slot; } ws_item;

static int64_t pack_need(int64_t K, int64_t M, int64_t cur) {
    int64_t p = sf_matmul_pack_floats(K, M);
    return p > cur ? p : cur;
}

static int64_t cmul(int *bad, int64_t a, int64_t b) {
    int64_t r = 0;
    if (sf_mul_ok(a, b, &r)) { *bad = 1; return 0; }
    return r;
}

/* Lay every buffer out in one allocation; returns SF_OK or NOMEM/OVERFLOW. */
static sf_status workspace_alloc(workspace *w, const sf_config *c, int64_t B, int64_t T,
                                 int want_rms, int want_alpha, int two_phase, int nt, char *err,
                                 size_t errlen) {
    memset(w, 0, sizeof *w);
    int64_t N = B * T, d = c->d_model, dh = d / c->n_heads, qd = c->n_heads * dh;
    int64_t kvd = c->n_kv_heads * dh, F = c->d_ff, V = c->vocab_size, L = 2 * c->n_layers;
    int attnres = c->residual != SF_RES_PLAIN, block = c->residual == SF_RES_ATTNRES_BLOCK;
    int64_t S = c->attnres_block_size, nblocks = (L + S - 1) / S;
    int64_t nsrc_max = !attnres ? 0 : block ? nblocks + 1 : L + 1;
    int64_t n_slots = c->moda ? 2 * (c->n_layers - 1) : 0;
    int64_t pack = 0;
    pack = pack_need(d, qd, pack); pack = pack_need(d, kvd, pack); pack = pack_need(qd, d, pack);
    pack = pack_need(d, F, pack); pack = pack_need(F, d, pack); pack = pack_need(d, V, pack);
    sf_attn_args aa = {0};
    aa.T = T; aa.n_read = c->moda ? 2 * (c->n_layers - 1) : 0; aa.chunk = c->moda_chunk;
    int64_t nq = S < L ? S : L;

    /* sizes in floats; checked products */
    int64_t sz[20] = {0};
    int bad = 0;
#define MUL(a, b) cmul(&bad, (a), (b))
    int64_t Nd = MUL(N, d);
    sz[0] = Nd;                 /* x */
    sz[1] = Nd;                 /* hin */
    sz[2] = Nd;                 /* u */
    sz[3] = Nd;                 /* y */
    sz[4] = MUL(N, qd);         /* q */
    sz[5] = MUL(N, kvd);        /* k */
    sz[6] = MUL(N, kvd);        /* v */
    sz[7] = MUL(N, qd);         /* att */
    sz[8] = MUL(N, F);          /* f1 */
    sz[9] = c->act == SF_ACT_SWIGLU ? MUL(N, F) : 0; /* f2 */
    sz[10] = pack;
    sz[11] = sf_attention_scratch_floats(&aa, nt);
    sz[12] = c->moda ? MUL(MUL(N, n_slots), kvd) : 0; /* depth_k */
    sz[13] = sz[12];                                  /* depth_v */
    sz[14] = attnres ? MUL(nsrc_max, Nd) : 0;         /* src */
    sz[15] = attnres ? MUL(nsrc_max + 1, N) : 0;      /* src_inv_rms (+1: partial) */
    sz[16] = block ? Nd : 0;                          /* partial */
    sz[17] = (block && two_phase) ? MUL(nq, MUL(N, d + 2) + d) : 0; /* m, l, o, qg */
    sz[18] = (block && two_phase && want_alpha) ? MUL(MUL(nq, N), nsrc_max) : 0; /* logits */
    sz[19] = (attnres && want_rms) ? Nd : 0;          /* running */
    int64_t ar_scratch = attnres ? sf_attnres_scratch_floats(nsrc_max, d, nt) : 0;
#undef MUL
    int64_t total = ar_scratch;
    for (int i = 0; i < 20; i++) bad |= sf_add_ok(total, sz[i] + 16, &total); /* +16: 64B align */
    int64_t ptr_bytes = 2 * (nsrc_max + 2) * (int64_t)sizeof(float *);
    int64_t bytes;
    if (bad || sf_mul_ok(total, (int64_t)sizeof(float), &bytes) || sf_add_ok(bytes, ptr_bytes, &bytes))
        return sf_fail(err, errlen, SF_ERR_OVERFLOW, "workspace size for B=%lld, T=%lld overflows",
                       (long long)B, (long long)T);
    if (bytes > ((int64_t)1 << 40))
        return sf_fail(err, errlen, SF_ERR_NOMEM, "forward pass would need %.1f GiB of workspace",
                       (double)bytes / 1073741824.0);
    char *blk = malloc((size_t)bytes);
    if (!blk)
        return sf_fail(err, errlen, SF_ERR_NOMEM, "cannot allocate %.1f MiB of workspace",
                       (double)bytes / 1048576.0);
    w->block = blk;
    w->src_ptr = (const float **)blk;
    w->rms_ptr = w->src_ptr + (nsrc_max + 2);
    float *p = (float *)(blk + ptr_bytes);
    float **slots[20] = {&w->x, &w->hin, &w->u, &w->y, &w->q, &w->k, &w->v, &w->att, &w->f1,
                         &w->f2, &w->pack, &w->attn_scratch, &w->depth_k, &w->depth_v,
                         &w->src, &w->src_inv_rms, &w->partial, &w->p1_m, &w->p1_logits,
                         &w->running};
    for (int i = 0; i < 20; i++) {
        uintptr_t a = (uintptr_t)p;
        p = (float *)((a + 63) & ~(uintptr_t)63);
        *slots[i] = sz[i] ? p : NULL;
        p += sz[i];
    }
    w->ar_scratch = ar_scratch ? p : NULL;
    if (block) w->partial_inv_rms = w->src_inv_rms + nsrc_max * N;
    if (w->p1_m) {
        w->p1_l = w->p1_m + nq * N;
        w->p1_o = w->p1_l + nq * N;
        w->p1_qg = w->p1_o + nq * N * d;
    }
    return SF_OK;
}

/* ---- pieces of a block -------------------------------------------------------------------- */

typedef struct {
    const sf_model *m;
    const sf_config *c;
    workspace *w;
    int64_t B, T, N, d, dh, qd, kvd, F, n_slots;
    const uint8_t *pad;
    int nt;
} ctx;

static void norm(const ctx *X, float *y, const float *x, const float *w, const float *b) {
    if (X->c->norm == SF_NORM_LAYERNORM) sf_layernorm(y, x, w, b, X->N, X->d, X->c->norm_eps, X->nt);
    else sf_rmsnorm(y, x, w, X->N, X->d, X->c->norm_eps, X->nt);
}

static void linear(const ctx *X, float *y, const float *x, const float *w, const float *b,
                   int64_t K, int64_t M) {
    sf_matmul(y, x, w, b, X->N, K, M, 0, X->w->pack, X->nt);
}

/* Copy rows (N, kvd) into depth slot `slot` of the arena (N, n_slots, kvd). */
static void write_depth(const ctx *X, float *arena, int64_t slot, const float *rows) {
    for (int64_t r = 0; r < X->N; r++)
        memcpy(arena + (r * X->n_slots + slot) * X->kvd, rows + r * X->kvd,
               (size_t)X->kvd * sizeof(float));
}

/* y = Attn_i(u): projections, RoPE, (MoDA) depth slots, attention, output projection. */
static void attention_sublayer(const ctx *X, int64_t i, const float *u, float *y, float *probs,
                               float *depth_mass) {
    const sf_layer_views *Lv = &X->m->layers[i];
    const sf_config *c = X->c;
    workspace *w = X->w;
    linear(X, w->q, u, Lv->q_w, Lv->q_b, X->d, X->qd);
    linear(X, w->k, u, Lv->k_w, Lv->k_b, X->d, X->kvd);
    linear(X, w->v, u, Lv->v_w, Lv->v_b, X->d, X->kvd);
    if (c->pos == SF_POS_ROPE) {
        sf_rope(w->q, X->N, X->T, c->n_heads, X->dh, X->qd, c->rope_theta, X->nt);
        sf_rope(w->k, X->N, X->T, c->n_kv_heads, X->dh, X->kvd, c->rope_theta, X->nt);
    }
    sf_attn_args a = {X->B, X->T, c->n_heads, c->n_kv_heads, X->dh, c->causal, X->pad,
                      w->depth_k, w->depth_v, X->n_slots, 0, c->moda_chunk, c->moda_depth_only};
    if (c->moda) {
        a.n_read = 2 * i;
        if (i < c->n_layers - 1) { /* this layer's (rotated) K and V become depth slot 2i */
            write_depth(X, w->depth_k, 2 * i, w->k);
            write_depth(X, w->depth_v, 2 * i, w->v);
        }
    }
    sf_attention_forward(&a, w->q, w->k, w->v, w->att, probs, depth_mass, w->attn_scratch, X->nt);
    linear(X, y, w->att, Lv->o_w, Lv->o_b, X->qd, X->d);
}

/* y = MLP_i(u); under MoDA also writes depth slot 2i+1 = (u Wdk^T, u Wdv^T). */
static void mlp_sublayer(const ctx *X, int64_t i, const float *u, float *y) {
    const sf_layer_views *Lv = &X->m->layers[i];
    const sf_config *c = X->c;
    workspace *w = X->w;
    int64_t nF = X->N * X->F;
    if (c->act == SF_ACT_SWIGLU) {
        linear(X, w->f1, u, Lv->gate_w, Lv->gate_b, X->d, X->F);
        linear(X, w->f2, u, Lv->up_w, Lv->up_b, X->d, X->F);
        sf_swiglu(w->f1, w->f2, nF, X->nt);
    } else {
        linear(X, w->f1, u, Lv->up_w, Lv->up_b, X->d, X->F);
        if (c->act == SF_ACT_GELU) sf_gelu(w->f1, nF, X->nt);
        else if (c->act == SF_ACT_GELU_TANH) sf_gelu_tanh(w->f1, nF, X->nt);
        else sf_relu(w->f1, nF, X->nt);
    }
    linear(X, y, w->f1, Lv->down_w, Lv->down_b, X->F, X->d);
    if (c->moda && i < c->n_layers - 1) {
        linear(X, w->k, u, Lv->depth_k_w, NULL, X->d, X->kvd);
        linear(X, w->v, u, Lv->depth_v_w, NULL, X->d, X->kvd);
        write_depth(X, w->depth_k, 2 * i + 1, w->k);
        write_depth(X, w->depth_v, 2 * i + 1, w->v);
    }
}

static void embed(const ctx *X, const sf_forward_args *args, float *x0) {
    const sf_config *c = X->c;
    int64_t d = X->d;
    for (int64_t r = 0; r < X->N; r++) {
        int64_t t = r % X->T;
        float *xr = x0 + r * d;
        if (args->tokens) memcpy(xr, X->m->tok_emb + (int64_t)args->tokens[r] * d, (size_t)d * sizeof(float));
        else memcpy(xr, args->embeds + r * d, (size_t)d * sizeof(float));
        if (c->pos == SF_POS_LEARNED) {
            const float *pe = X->m->pos_emb + t * d;
            for (int64_t j = 0; j < d; j++) xr[j] += pe[j];
        } else if (c->pos == SF_POS_SINUSOIDAL) {
            for (int64_t j = 0; j < d; j += 2) {
                double ang = (double)t / pow(10000.0, (double)j / (double)d);
                xr[j] += (float)sin(ang);
                xr[j + 1] += (float)cos(ang);
            }
        }
    }
}

static void copy_if(float *dst, const float *src, int64_t n) {
    if (dst) memcpy(dst, src, (size_t)n * sizeof(float));
}

/* ---- forward ------------------------------------------------------------------------------ */

sf_status sf_forward(const sf_model *m, const sf_forward_args *args, float *out_logits,
                     float *out_hidden, sf_trace *trace, char *err, size_t errlen) {
    if (!m || !args) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "model or args is NULL");
    const sf_config *c = &m->cfg;
    const int64_t B = args->B, T = args->T, d = c->d_model;
    if (B < 1 || T < 1) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "batch and sequence length must be >= 1 (got B=%lld, T=%lld)", (long long)B, (long long)T);
    if (T > c->max_seq_len) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "sequence length %lld exceeds max_seq_len %lld", (long long)T, (long long)c->max_seq_len);
    if (!args->tokens == !args->embeds) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "exactly one of tokens and embeds must be given");
    int64_t N;
    if (sf_mul_ok(B, T, &N)) return sf_fail(err, errlen, SF_ERR_OVERFLOW, "B*T overflows");
    if (args->tokens) {
        for (int64_t r = 0; r < N; r++) {
            int32_t tok = args->tokens[r];
            if (tok < 0 || tok >= c->vocab_size)
                return sf_fail(err, errlen, SF_ERR_TOKEN_RANGE, "token id %d at [%lld, %lld] is outside [0, vocab_size=%lld)", (int)tok, (long long)(r / T), (long long)(r % T), (long long)c->vocab_size);
        }
    } else {
        for (int64_t r = 0; r < N * d; r++)
            if (!isfinite(args->embeds[r]))
                return sf_fail(err, errlen, SF_ERR_NONFINITE, "embeds contain NaN or inf at flat index %lld", (long long)r);
    }
    const int nt = sf_threads_resolve(args->n_threads);
    const int attnres = c->residual != SF_RES_PLAIN, block = c->residual == SF_RES_ATTNRES_BLOCK;
    const int two_phase = block && args->attnres_two_phase;
    const int64_t L = 2 * c->n_layers, S = c->attnres_block_size;
    sf_trace none = {0};
    sf_trace *tr = trace ? trace : &none;

    workspace w;
    sf_status st = workspace_alloc(&w, c, B, T, tr->rms != NULL, tr->alpha != NULL, two_phase, nt, err, errlen);
    if (st != SF_OK) return st;

    ctx X = {m, c, &w, B, T, N, d, d / c->n_heads, 0, 0, c->d_ff, 0, args->key_padding_mask, nt};
    X.qd = c->n_heads * X.dh;
    X.kvd = c->n_kv_heads * X.dh;
    X.n_slots = c->moda ? 2 * (c->n_layers - 1) : 0;
    const int64_t Nd = N * d;

    /* sources: Full: v_0..v_L at src + i*Nd; Block: b_0..b_nb at src + i*Nd */
    float *x0 = attnres ? w.src : w.x;
    embed(&X, args, x0);
    int64_t nsrc = 0; /* completed sources so far (Full: v's, Block: b's) */
    if (attnres) {
        sf_attnres_inv_rms(w.src_inv_rms, x0, N, d, c->attnres_eps, nt);
        nsrc = 1;
        if (w.running) memcpy(w.running, x0, (size_t)Nd * sizeof(float));
    }

    for (int64_t k = 0; k < L; k++) {
        const int64_t i = k / 2;
        const int is_attn = (k % 2) == 0;
        const sf_layer_views *Lv = &m->layers[i];
        const float *nw = is_attn ? Lv->attn_norm_w : Lv->mlp_norm_w;
        const float *nb = is_attn ? Lv->attn_norm_b : Lv->mlp_norm_b;

        /* 1. what sublayer k reads */
        const float *in = w.x;
        if (attnres) {
            const float *q = is_attn ? Lv->attn_res_q : Lv->mlp_res_q;
            const float *g = is_attn ? Lv->attn_res_g : Lv->mlp_res_g;
            float *alpha = tr->alpha ? tr->alpha[k] : NULL;
            for (int64_t s = 0; s < nsrc; s++) {
                w.src_ptr[s] = w.src + s * Nd;
                w.rms_ptr[s] = w.src_inv_rms + s * N;
            }
            int64_t pos_in_block = block ? k % S : 0;
            if (two_phase) {
                int64_t nq = (L - k) < S ? (L - k) : S; /* queries of this (maybe short) block */
                if (pos_in_block == 0) {
                    /* phase 1 at block start: all of the block's queries vs completed blocks */
                    for (int64_t j = 0; j < nq; j++) {
                        int64_t kk = k + j;
                        const sf_layer_views *Lj = &m->layers[kk / 2];
                        const float *qj = (kk % 2 == 0) ? Lj->attn_res_q : Lj->mlp_res_q;
                        const float *gj = (kk % 2 == 0) ? Lj->attn_res_g : Lj->mlp_res_g;
                        for (int64_t e = 0; e < d; e++) w.p1_qg[j * d + e] = qj[e] * gj[e];
                    }
                    sf_attnres_phase1(w.p1_m, w.p1_l, w.p1_o, w.p1_logits, w.src_ptr, w.rms_ptr,
                                      nsrc, w.p1_qg, nq, N, d, nt);
                }
                int64_t j = pos_in_block;
                sf_attnres_phase2(w.hin, alpha, w.p1_m + j * N, w.p1_l + j * N, w.p1_o + j * Nd,
                                  w.p1_logits ? w.p1_logits + j * N * nsrc : NULL, nsrc,
                                  pos_in_block ? w.partial : NULL, w.partial_inv_rms,
                                  w.p1_qg + j * d, N, d, nt);
            } else {
                int64_t ns = nsrc;
                if (block && pos_in_block > 0) { /* the running partial sum joins the sources */
                    w.src_ptr[ns] = w.partial;
                    w.rms_ptr[ns] = w.partial_inv_rms;
                    ns++;
                }
                sf_attnres_aggregate(w.hin, alpha, w.src_ptr, w.rms_ptr, ns, q, g, N, d,
                                     w.ar_scratch, nt);
            }
            in = w.hin;
        }
        if (is_attn && tr->hidden) copy_if(tr->hidden[i], in, Nd);
        if (tr->rms) tr->rms[k * SF_RMS_COLS + SF_RMS_INPUT] = (float)sf_rms(in, Nd);

        /* 2. the sublayer: f(Norm(in)) pre-norm, f(in) post-norm */
        const float *fin = in;
        if (c->pre_norm) { norm(&X, w.u, in, nw, nb); fin = w.u; }
        float *y = (attnres && !block) ? w.src + (k + 1) * Nd : w.y; /* Full: write v_{k+1} in place */
        if (is_attn)
            attention_sublayer(&X, i, fin, y,
                               tr->attention ? tr->attention[i] : NULL,
                               tr->depth_mass ? tr->depth_mass[i] : NULL);
        else
            mlp_sublayer(&X, i, fin, y);

        /* 3. where the output goes */
        if (!attnres) {
            copy_if(is_attn ? (tr->attn_out ? tr->attn_out[i] : NULL) : (tr->mlp_out ? tr->mlp_out[i] : NULL), y, Nd);
            if (tr->rms) tr->rms[k * SF_RMS_COLS + SF_RMS_OUTPUT] = (float)sf_rms(y, Nd);
            sf_add(w.x, y, Nd, nt);
            if (!c->pre_norm) norm(&X, w.x, w.x, nw, nb);
            if (tr->rms) tr->rms[k * SF_RMS_COLS + SF_RMS_STREAM] = (float)sf_rms(w.x, Nd);
        } else {
            if (!c->pre_norm) norm(&X, y, y, nw, nb); /* post-norm AttnRes: v = Norm(F(h)) */
            copy_if(is_attn ? (tr->attn_out ? tr->attn_out[i] : NULL) : (tr->mlp_out ? tr->mlp_out[i] : NULL), y, Nd);
            if (tr->rms) {
                tr->rms[k * SF_RMS_COLS + SF_RMS_OUTPUT] = (float)sf_rms(y, Nd);
                sf_add(w.running, y, Nd, nt);
                tr->rms[k * SF_RMS_COLS + SF_RMS_STREAM] = (float)sf_rms(w.running, Nd);
            }
            if (!block) {
                sf_attnres_inv_rms(w.src_inv_rms + nsrc * N, y, N, d, c->attnres_eps, nt);
                nsrc++;
            } else {
                int64_t p = k % S;
                if (p == 0) memcpy(w.partial, y, (size_t)Nd * sizeof(float));
                else sf_add(w.partial, y, Nd, nt);
                if (p == S - 1 || k == L - 1) { /* block complete: b_m = partial */
                    memcpy(w.src + nsrc * Nd, w.partial, (size_t)Nd * sizeof(float));
                    sf_attnres_inv_rms(w.src_inv_rms + nsrc * N, w.partial, N, d, c->attnres_eps, nt);
                    nsrc++;
                } else {
                    sf_attnres_inv_rms(w.partial_inv_rms, w.partial, N, d, c->attnres_eps, nt);
                }
            }
        }
    }

    /* output: the stream (plain) or a final aggregation over every source (AttnRes) */
    const float *fin = w.x;
    if (attnres) {
        for (int64_t s = 0; s < nsrc; s++) {
            w.src_ptr[s] = w.src + s * Nd;
            w.rms_ptr[s] = w.src_inv_rms + s * N;
        }
        sf_attnres_aggregate(w.hin, tr->alpha ? tr->alpha[L] : NULL, w.src_ptr, w.rms_ptr, nsrc,
                             m->out_res_q, m->out_res_g, N, d, w.ar_scratch, nt);
        fin = w.hin;
    }
    if (tr->hidden) copy_if(tr->hidden[c->n_layers], fin, Nd);
    if (tr->rms) {
        tr->rms[L * SF_RMS_COLS + SF_RMS_INPUT] = (float)sf_rms(fin, Nd);
        tr->rms[L * SF_RMS_COLS + SF_RMS_OUTPUT] = NAN;
        tr->rms[L * SF_RMS_COLS + SF_RMS_STREAM] = NAN;
    }
    if (c->final_norm) { norm(&X, w.u, fin, m->final_norm_w, m->final_norm_b); fin = w.u; }
    copy_if(out_hidden, fin, Nd);
    if (out_logits) sf_matmul(out_logits, fin, m->lm_head, NULL, N, d, c->vocab_size, 0, w.pack, nt);
    free(w.block);
    return SF_OK;
}
