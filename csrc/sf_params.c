/* The parameter table — per tensor its name, shape, offset, init, weight decay and the named
 * view the stack reads it through — and the seeded init that follows it. The stack's own
 * tensors are listed here; each depth wiring lists its own (table_layer / table_model hooks in
 * csrc/wiring/). */
#include "sf_wiring.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* ---- the parameter table ------------------------------------------------------------------ */

void sf_params_emit(sf_table_builder *tb, const char *name, int layer, int ndim, int64_t d0, int64_t d1,
                    int no_decay, sf_init init, size_t view) {
    int64_t numel = d0, next;
    if (ndim == 2 && sf_mul_ok(d0, d1, &numel)) { tb->overflow = 1; return; }
    if (sf_add_ok(tb->total, numel, &next)) { tb->overflow = 1; return; }
    if (tb->out) {
        sf_tensor_info *t = &tb->out[tb->n];
        snprintf(t->name, SF_NAME_MAX, "%s", name);
        t->offset = tb->total;
        t->numel = numel;
        t->ndim = ndim;
        t->shape[0] = d0;
        t->shape[1] = ndim == 2 ? d1 : 0;
        t->layer = layer;
        t->no_decay = no_decay;
        t->init = init;
        if (tb->views) tb->views[tb->n] = view;
    }
    tb->n++;
    tb->total = next;
}

void sf_params_table(const sf_config *c, sf_table_builder *tb) {
    int64_t d = c->d_model, dh = c->d_model / c->n_heads;
    int64_t qd = c->n_heads * dh, kvd = c->n_kv_heads * dh, F = c->d_ff, V = c->vocab_size;
    int ln_bias = c->bias && c->norm == SF_NORM_LAYERNORM;
    const sf_wiring *W = sf_wiring_of(c);
    char nm[SF_NAME_MAX];
    /* E(layer, ndim, d0, d1, no_decay, init, view, name...): N normal(0, 0.02), R the residual
     * projections' normal(0, 0.02/sqrt(2n)) (GPT-2), 1 ones, 0 zeros; L(f)/M(f) the view */
#define E(layer, nd, a, b, nodecay, init, view, ...) \
    do { snprintf(nm, sizeof nm, __VA_ARGS__); sf_params_emit(tb, nm, layer, nd, a, b, nodecay, init, view); } while (0)
#define N SF_INIT_NORMAL
#define R SF_INIT_NORMAL_RESID
#define I1 SF_INIT_ONES
#define I0 SF_INIT_ZEROS
#define L(f) SF_LAYER_VIEW(f)
#define M(f) SF_MODEL_VIEW(f)
    E(-1, 2, V, d, 0, N, M(tok_emb), "tok_emb.weight");
    if (c->pos == SF_POS_LEARNED) E(-1, 2, c->max_seq_len, d, 0, N, M(pos_emb), "pos_emb.weight");
    for (int i = 0; i < (int)c->n_layers; i++) {
        E(i, 1, d, 0, 1, I1, L(attn_norm_w), "layers.%d.attn_norm.weight", i);
        if (ln_bias) E(i, 1, d, 0, 1, I0, L(attn_norm_b), "layers.%d.attn_norm.bias", i);
        E(i, 2, qd, d, 0, N, L(q_w), "layers.%d.attn.q_proj.weight", i);
        if (c->bias) E(i, 1, qd, 0, 1, I0, L(q_b), "layers.%d.attn.q_proj.bias", i);
        E(i, 2, kvd, d, 0, N, L(k_w), "layers.%d.attn.k_proj.weight", i);
        if (c->bias) E(i, 1, kvd, 0, 1, I0, L(k_b), "layers.%d.attn.k_proj.bias", i);
        E(i, 2, kvd, d, 0, N, L(v_w), "layers.%d.attn.v_proj.weight", i);
        if (c->bias) E(i, 1, kvd, 0, 1, I0, L(v_b), "layers.%d.attn.v_proj.bias", i);
        E(i, 2, d, qd, 0, R, L(o_w), "layers.%d.attn.o_proj.weight", i);
        if (c->bias) E(i, 1, d, 0, 1, I0, L(o_b), "layers.%d.attn.o_proj.bias", i);
        if (c->moda && c->moda_depth_kv == SF_DKV_EXTRA && i < c->n_layers - 1) {
            E(i, 2, kvd, d, 0, N, L(attn_depth_k_w), "layers.%d.attn.depth_k_proj.weight", i);
            E(i, 2, kvd, d, 0, N, L(attn_depth_v_w), "layers.%d.attn.depth_v_proj.weight", i);
        }
        E(i, 1, d, 0, 1, I1, L(mlp_norm_w), "layers.%d.mlp_norm.weight", i);
        if (ln_bias) E(i, 1, d, 0, 1, I0, L(mlp_norm_b), "layers.%d.mlp_norm.bias", i);
        if (c->act == SF_ACT_SWIGLU) {
            E(i, 2, F, d, 0, N, L(gate_w), "layers.%d.mlp.gate_proj.weight", i);
            if (c->bias) E(i, 1, F, 0, 1, I0, L(gate_b), "layers.%d.mlp.gate_proj.bias", i);
        }
        E(i, 2, F, d, 0, N, L(up_w), "layers.%d.mlp.up_proj.weight", i);
        if (c->bias) E(i, 1, F, 0, 1, I0, L(up_b), "layers.%d.mlp.up_proj.bias", i);
        E(i, 2, d, F, 0, R, L(down_w), "layers.%d.mlp.down_proj.weight", i);
        if (c->bias) E(i, 1, d, 0, 1, I0, L(down_b), "layers.%d.mlp.down_proj.bias", i);
        if (c->moda && c->moda_depth_kv != SF_DKV_ATTN && i < c->n_layers - 1) {
            E(i, 2, kvd, d, 0, N, L(depth_k_w), "layers.%d.mlp.depth_k_proj.weight", i);
            E(i, 2, kvd, d, 0, N, L(depth_v_w), "layers.%d.mlp.depth_v_proj.weight", i);
        }
        W->table_layer(c, i, tb); /* the depth wiring's tensors of block i */
    }
    W->table_model(c, tb); /* its model-level tensors */
    if (c->final_norm) {
        E(-1, 1, d, 0, 1, I1, M(final_norm_w), "final_norm.weight");
        if (ln_bias) E(-1, 1, d, 0, 1, I0, M(final_norm_b), "final_norm.bias");
    }
    if (!c->tie_embeddings) E(-1, 2, V, d, 0, N, M(lm_head), "lm_head.weight");
#undef E
#undef N
#undef R
#undef I1
#undef I0
#undef L
#undef M
}

int64_t sf_config_num_params(const sf_config *c) {
    sf_table_builder tb = {0};
    sf_params_table(c, &tb);
    return tb.overflow ? -1 : tb.total;
}

void sf_params_init(sf_model *m, uint64_t seed) {
    sf_rng rng;
    sf_rng_seed(&rng, seed);
    /* the normal draws follow the table's order, one stream for the whole model */
    double resid_std = 0.02 / sqrt(2.0 * (double)m->cfg.n_layers);
    for (int32_t i = 0; i < m->num_tensors; i++) {
        const sf_tensor_info *t = &m->tensors[i];
        float *p = m->params + t->offset;
        switch ((sf_init)t->init) {
        case SF_INIT_ZEROS: memset(p, 0, (size_t)t->numel * sizeof(float)); break;
        case SF_INIT_ONES: for (int64_t j = 0; j < t->numel; j++) p[j] = 1.0f; break;
        case SF_INIT_LAST_ONE:
            memset(p, 0, (size_t)t->numel * sizeof(float));
            p[t->numel - 1] = 1.0f;
            break;
        case SF_INIT_HC_ALPHA_ATTN:
        case SF_INIT_HC_ALPHA_MLP: { /* (n, n+1): column 0 = e_{k mod n}, columns 1..n = I */
            const int64_t n = t->shape[0], k = 2 * (int64_t)t->layer + (t->init == SF_INIT_HC_ALPHA_MLP);
            memset(p, 0, (size_t)t->numel * sizeof(float));
            p[(k % n) * (n + 1)] = 1.0f;
            for (int64_t j = 0; j < n; j++) p[j * (n + 1) + 1 + j] = 1.0f;
            break;
        }
        case SF_INIT_HC_SCALE: for (int64_t j = 0; j < t->numel; j++) p[j] = 0.01f; break;
        case SF_INIT_MHC_BASE: { /* (n^2 + 2n): [b_pre (n) | b_post (n) | b_res (n^2)] */
            const int64_t n = m->cfg.hc_expansion;
            memset(p, 0, (size_t)t->numel * sizeof(float));
            for (int64_t j = 0; j < n; j++) p[j] = (float)-log((double)(n - 1));
            break;
        }
        case SF_INIT_NORMAL:
        case SF_INIT_NORMAL_RESID: {
            double std = t->init == SF_INIT_NORMAL_RESID ? resid_std : 0.02;
            for (int64_t j = 0; j < t->numel; j++) p[j] = (float)(std * sf_rng_normal(&rng));
            break;
        }
        }
    }
}
