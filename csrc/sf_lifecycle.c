#define _POSIX_C_SOURCE 200809L
/* A model's life: create (validate, lay out, init), views, accessors, free, and the
 * reader/writer guard. */
#include "sf_internal.h"
#include "sf_kernels.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

static float *view(sf_model *m, const char *name) {
    int32_t i = sf_model_find_tensor(m, name);
    return i < 0 ? NULL : m->params + m->tensors[i].offset;
}

sf_status sf_model_create(const sf_config *cfg, uint64_t seed, sf_model **out, char *err,
                          size_t errlen) {
    if (!out) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "out is NULL");
    *out = NULL;
    sf_status st = sf_config_validate(cfg, err, errlen);
    if (st != SF_OK) return st;
    sf_table_builder tb = {0};
    sf_params_table(cfg, &tb);
    int64_t bytes;
    if (tb.overflow || sf_mul_ok(tb.total, (int64_t)sizeof(float), &bytes) || bytes > sf_memory_limit_bytes())
        return sf_fail(err, errlen, SF_ERR_NOMEM, "model would need %lld parameters: too large",
                       (long long)tb.total);
    sf_model *m = calloc(1, sizeof *m);
    if (!m) return sf_fail(err, errlen, SF_ERR_NOMEM, "cannot allocate model");
    m->cfg = *cfg;
    m->num_tensors = tb.n;
    m->num_params = tb.total;
    m->tensors = calloc((size_t)tb.n, sizeof *m->tensors);
    /* parameters, gradients and the two AdamW moments in one allocation: views of any of
     * them stay valid for the model's whole life */
    int64_t all;
    if (sf_mul_ok(tb.total, 4, &all) || all > sf_memory_limit_bytes() / (int64_t)sizeof(float)) {
        sf_model_free(m);
        return sf_fail(err, errlen, SF_ERR_NOMEM, "model would need %lld parameters: too large",
                       (long long)tb.total);
    }
    m->params = calloc((size_t)(all > 0 ? all : 1), sizeof(float));
    if (m->params) {
        m->grads = m->params + tb.total;
        m->adam_m = m->grads + tb.total;
        m->adam_v = m->adam_m + tb.total;
    }
    atomic_init(&m->state, 0);
    atomic_init(&m->fwd_busy, 0);
    m->layers = calloc((size_t)cfg->n_layers, sizeof *m->layers);
    if (!m->tensors || !m->params || !m->layers) {
        sf_model_free(m);
        return sf_fail(err, errlen, SF_ERR_NOMEM, "cannot allocate %lld parameters (%.1f MiB)",
                       (long long)tb.total, (double)bytes / 1048576.0);
    }
    sf_table_builder fill = {m->tensors, 0, 0, 0};
    sf_params_table(cfg, &fill);

    m->tok_emb = view(m, "tok_emb.weight");
    m->pos_emb = view(m, "pos_emb.weight");
    m->final_norm_w = view(m, "final_norm.weight");
    m->final_norm_b = view(m, "final_norm.bias");
    m->out_res_q = view(m, "output_res_proj.weight");
    m->out_res_g = view(m, "output_res_norm.weight");
    m->lm_head = cfg->tie_embeddings ? m->tok_emb : view(m, "lm_head.weight");
    char nm[SF_NAME_MAX];
#define V(field, suffix) (snprintf(nm, sizeof nm, "layers.%d." suffix, i), L->field = view(m, nm))
    for (int i = 0; i < (int)cfg->n_layers; i++) {
        sf_layer_views *L = &m->layers[i];
        V(attn_norm_w, "attn_norm.weight"); V(attn_norm_b, "attn_norm.bias");
        V(q_w, "attn.q_proj.weight"); V(q_b, "attn.q_proj.bias");
        V(k_w, "attn.k_proj.weight"); V(k_b, "attn.k_proj.bias");
        V(v_w, "attn.v_proj.weight"); V(v_b, "attn.v_proj.bias");
        V(o_w, "attn.o_proj.weight"); V(o_b, "attn.o_proj.bias");
        V(mlp_norm_w, "mlp_norm.weight"); V(mlp_norm_b, "mlp_norm.bias");
        V(gate_w, "mlp.gate_proj.weight"); V(gate_b, "mlp.gate_proj.bias");
        V(up_w, "mlp.up_proj.weight"); V(up_b, "mlp.up_proj.bias");
        V(down_w, "mlp.down_proj.weight"); V(down_b, "mlp.down_proj.bias");
        V(depth_k_w, "mlp.depth_k_proj.weight"); V(depth_v_w, "mlp.depth_v_proj.weight");
        V(attn_res_q, "attn_res_proj.weight"); V(attn_res_g, "attn_res_norm.weight");
        V(mlp_res_q, "mlp_res_proj.weight"); V(mlp_res_g, "mlp_res_norm.weight");
    }
#undef V
    sf_params_init(m, seed);
    *out = m;
    return SF_OK;
}

void sf_model_free(sf_model *m) {
    if (!m) return;
    free(m->train_mem);
    free(m->fwd_mem);
    free(m->params);
    free(m->tensors);
    free(m->layers);
    free(m);
}

const sf_config *sf_model_config(const sf_model *m) { return &m->cfg; }
float *sf_model_params(sf_model *m) { return m->params; }
int64_t sf_model_num_params(const sf_model *m) { return m->num_params; }
int32_t sf_model_num_tensors(const sf_model *m) { return m->num_tensors; }
const sf_tensor_info *sf_model_tensor(const sf_model *m, int32_t i) {
    return (i >= 0 && i < m->num_tensors) ? &m->tensors[i] : NULL;
}
float *sf_model_grads(sf_model *m) { return m->grads; }
float *sf_model_adam_m(sf_model *m) { return m->adam_m; }
float *sf_model_adam_v(sf_model *m) { return m->adam_v; }
int64_t sf_model_step_count(const sf_model *m) { return m->step; }
void sf_model_set_step_count(sf_model *m, int64_t step) { m->step = step < 0 ? 0 : step; }

/* The guard word: >= 0 counts running forward calls; WRITE_PENDING is set by a train step that
 * waits for them to drain (new forward calls are refused meanwhile, so it cannot starve);
 * -1 while the step runs. Forward calls never wait: they fail fast with SF_ERR_BUSY. */
#define WRITE_PENDING (1 << 30)

int sf_model_acquire_read(sf_model *m) {
    int s = atomic_load(&m->state);
    do {
        if (s < 0 || (s & WRITE_PENDING)) return 0;
    } while (!atomic_compare_exchange_weak(&m->state, &s, s + 1));
    return 1;
}
void sf_model_release_read(sf_model *m) { atomic_fetch_sub(&m->state, 1); }
int sf_model_acquire_write(sf_model *m) {
    int s = atomic_load(&m->state);
    do {
        if (s < 0 || (s & WRITE_PENDING)) return 0; /* another train step holds or wants it */
    } while (!atomic_compare_exchange_weak(&m->state, &s, s | WRITE_PENDING));
    while (atomic_load(&m->state) != WRITE_PENDING) { /* in-flight forward calls finish */
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
    atomic_store(&m->state, -1);
    return 1;
}
void sf_model_release_write(sf_model *m) { atomic_store(&m->state, 0); }

int32_t sf_model_find_tensor(const sf_model *m, const char *name) {
    /* linear scan: called at model build and by name lookups from Python, never in hot loops */
    for (int32_t i = 0; i < m->num_tensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0) return i;
    return -1;
}
