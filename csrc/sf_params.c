/* The parameter table (names, shapes, offsets, weight decay) and the seeded init. */
#include "sf_internal.h"
#include "sf_kernels.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
/* ---- the parameter table ------------------------------------------------------------------ */


static void emit(sf_table_builder *tb, const char *name, int layer, int ndim, int64_t d0, int64_t d1,
                 int no_decay) {
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
    }
    tb->n++;
    tb->total = next;
}

void sf_params_table(const sf_config *c, sf_table_builder *tb) {
    int64_t d = c->d_model, dh = c->d_model / c->n_heads;
    int64_t qd = c->n_heads * dh, kvd = c->n_kv_heads * dh, F = c->d_ff, V = c->vocab_size;
    int ln_bias = c->bias && c->norm == SF_NORM_LAYERNORM;
    int attnres = c->residual != SF_RES_PLAIN;
    char nm[SF_NAME_MAX];
#define E(layer, nd, a, b, nodecay, ...) \
    do { snprintf(nm, sizeof nm, __VA_ARGS__); emit(tb, nm, layer, nd, a, b, nodecay); } while (0)
    E(-1, 2, V, d, 0, "tok_emb.weight");
    if (c->pos == SF_POS_LEARNED) E(-1, 2, c->max_seq_len, d, 0, "pos_emb.weight");
    for (int i = 0; i < (int)c->n_layers; i++) {
        E(i, 1, d, 0, 1, "layers.%d.attn_norm.weight", i);
        if (ln_bias) E(i, 1, d, 0, 1, "layers.%d.attn_norm.bias", i);
        E(i, 2, qd, d, 0, "layers.%d.attn.q_proj.weight", i);
        if (c->bias) E(i, 1, qd, 0, 1, "layers.%d.attn.q_proj.bias", i);
        E(i, 2, kvd, d, 0, "layers.%d.attn.k_proj.weight", i);
        if (c->bias) E(i, 1, kvd, 0, 1, "layers.%d.attn.k_proj.bias", i);
        E(i, 2, kvd, d, 0, "layers.%d.attn.v_proj.weight", i);
        if (c->bias) E(i, 1, kvd, 0, 1, "layers.%d.attn.v_proj.bias", i);
        E(i, 2, d, qd, 0, "layers.%d.attn.o_proj.weight", i);
        if (c->bias) E(i, 1, d, 0, 1, "layers.%d.attn.o_proj.bias", i);
        E(i, 1, d, 0, 1, "layers.%d.mlp_norm.weight", i);
        if (ln_bias) E(i, 1, d, 0, 1, "layers.%d.mlp_norm.bias", i);
        if (c->act == SF_ACT_SWIGLU) {
            E(i, 2, F, d, 0, "layers.%d.mlp.gate_proj.weight", i);
            if (c->bias) E(i, 1, F, 0, 1, "layers.%d.mlp.gate_proj.bias", i);
        }
        E(i, 2, F, d, 0, "layers.%d.mlp.up_proj.weight", i);
        if (c->bias) E(i, 1, F, 0, 1, "layers.%d.mlp.up_proj.bias", i);
        E(i, 2, d, F, 0, "layers.%d.mlp.down_proj.weight", i);
        if (c->bias) E(i, 1, d, 0, 1, "layers.%d.mlp.down_proj.bias", i);
        if (c->moda && i < c->n_layers - 1) {
            E(i, 2, kvd, d, 0, "layers.%d.mlp.depth_k_proj.weight", i);
            E(i, 2, kvd, d, 0, "layers.%d.mlp.depth_v_proj.weight", i);
        }
        if (attnres) {
            E(i, 2, 1, d, 1, "layers.%d.attn_res_proj.weight", i);
            E(i, 1, d, 0, 1, "layers.%d.attn_res_norm.weight", i);
            E(i, 2, 1, d, 1, "layers.%d.mlp_res_proj.weight", i);
            E(i, 1, d, 0, 1, "layers.%d.mlp_res_norm.weight", i);
        }
    }
    if (attnres) {
        E(-1, 2, 1, d, 1, "output_res_proj.weight");
        E(-1, 1, d, 0, 1, "output_res_norm.weight");
    }
    if (c->final_norm) {
        E(-1, 1, d, 0, 1, "final_norm.weight");
        if (ln_bias) E(-1, 1, d, 0, 1, "final_norm.bias");
    }
    if (!c->tie_embeddings) E(-1, 2, V, d, 0, "lm_head.weight");
#undef E
}

int64_t sf_config_num_params(const sf_config *c) {
    sf_table_builder tb = {0};
    sf_params_table(c, &tb);
    return tb.overflow ? -1 : tb.total;
}

static int ends_with(const char *s, const char *suf) {
    size_t n = strlen(s), m = strlen(suf);
    return n >= m && strcmp(s + n - m, suf) == 0;
}

void sf_params_init(sf_model *m, uint64_t seed) {
    sf_rng rng;
    sf_rng_seed(&rng, seed);
    double resid_std = 0.02 / sqrt(2.0 * (double)m->cfg.n_layers);
    for (int32_t i = 0; i < m->num_tensors; i++) {
        const sf_tensor_info *t = &m->tensors[i];
        float *p = m->params + t->offset;
        const char *nm = t->name;
        if (ends_with(nm, "_res_proj.weight")) {
            memset(p, 0, (size_t)t->numel * sizeof(float)); /* zero pseudo-queries: mandatory */
        } else if (ends_with(nm, "norm.weight")) {
            for (int64_t j = 0; j < t->numel; j++) p[j] = 1.0f;
        } else if (ends_with(nm, ".bias")) {
            memset(p, 0, (size_t)t->numel * sizeof(float));
        } else {
            double std = (ends_with(nm, "o_proj.weight") || ends_with(nm, "down_proj.weight"))
                             ? resid_std : 0.02;
            for (int64_t j = 0; j < t->numel; j++) p[j] = (float)(std * sf_rng_normal(&rng));
        }
    }
}
