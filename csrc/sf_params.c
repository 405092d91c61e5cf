#define _POSIX_C_SOURCE 200809L
/* Config validation, the parameter table (names, shapes, offsets), and seeded init. */
#include "sf_internal.h"
#include "sf_kernels.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- errors and checked arithmetic -------------------------------------------------------- */

const char *sf_status_name(sf_status s) {
    switch (s) {
    case SF_OK: return "ok";
    case SF_ERR_INVALID_CONFIG: return "invalid config";
    case SF_ERR_INVALID_ARG: return "invalid argument";
    case SF_ERR_NOMEM: return "out of memory";
    case SF_ERR_OVERFLOW: return "size overflow";
    case SF_ERR_TOKEN_RANGE: return "token id out of range";
    case SF_ERR_NONFINITE: return "non-finite value";
    case SF_ERR_BUSY: return "model busy";
    }
    return "unknown status";
}

sf_status sf_fail(char *err, size_t errlen, sf_status st, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return st;
}

/* Allocations larger than the machine's physical memory are refused up front with
 * SF_ERR_NOMEM: with overcommit a huge malloc "succeeds" and the process dies later. */
int64_t sf_memory_limit_bytes(void) {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    if (pages > 0 && size > 0) return (int64_t)pages * (int64_t)size;
#endif
    return (int64_t)1 << 40;
}

int sf_mul_ok(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0) return 1;
    if (a != 0 && b > INT64_MAX / a) return 1;
    *out = a * b;
    return 0;
}

int sf_add_ok(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0 || a > INT64_MAX - b) return 1;
    *out = a + b;
    return 0;
}

/* ---- config ------------------------------------------------------------------------------- */

void sf_config_default(sf_config *c, int64_t vocab_size, int64_t d_model, int64_t n_heads,
                       int64_t n_layers, int64_t max_seq_len) {
    memset(c, 0, sizeof *c);
    c->vocab_size = vocab_size;
    c->d_model = d_model;
    c->n_heads = n_heads;
    c->n_kv_heads = n_heads;
    c->n_layers = n_layers;
    c->d_ff = 4 * d_model;
    c->max_seq_len = max_seq_len;
    c->causal = 1;
    c->pos = SF_POS_LEARNED;
    c->act = SF_ACT_GELU;
    c->norm = SF_NORM_LAYERNORM;
    c->pre_norm = 1;
    c->bias = 1;
    c->final_norm = 1;
    c->tie_embeddings = 1;
    c->norm_eps = 1e-5f;
    c->rope_theta = 10000.0f;
    c->residual = SF_RES_PLAIN;
    c->attnres_block_size = 4;
    c->attnres_eps = 1e-6f;
    c->moda = 0;
    c->moda_depth_only = 0;
    c->moda_chunk = 1;
    c->attn_dropout = 0.0f;
    c->resid_dropout = 0.0f;
}

/* Upper bound on any single dimension: keeps every derived size far from int64 overflow
 * and turns absurd configs into a clear error instead of a giant allocation attempt. */
#define SF_DIM_MAX ((int64_t)1 << 24)

sf_status sf_config_validate(const sf_config *c, char *err, size_t errlen) {
#define REQ(cond, ...) \
    do { if (!(cond)) return sf_fail(err, errlen, SF_ERR_INVALID_CONFIG, __VA_ARGS__); } while (0)
    if (!c) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "config is NULL");
    REQ(c->vocab_size >= 1 && c->vocab_size <= SF_DIM_MAX, "vocab_size must be in [1, %lld], got %lld", (long long)SF_DIM_MAX, (long long)c->vocab_size);
    REQ(c->d_model >= 1 && c->d_model <= SF_DIM_MAX, "d_model must be in [1, %lld], got %lld", (long long)SF_DIM_MAX, (long long)c->d_model);
    REQ(c->n_heads >= 1 && c->n_heads <= c->d_model, "n_heads must be in [1, d_model=%lld], got %lld", (long long)c->d_model, (long long)c->n_heads);
    REQ(c->d_model % c->n_heads == 0, "d_model (%lld) must be divisible by n_heads (%lld)", (long long)c->d_model, (long long)c->n_heads);
    REQ(c->n_kv_heads >= 1 && c->n_kv_heads <= c->n_heads, "n_kv_heads must be in [1, n_heads=%lld], got %lld", (long long)c->n_heads, (long long)c->n_kv_heads);
    REQ(c->n_heads % c->n_kv_heads == 0, "n_heads (%lld) must be divisible by n_kv_heads (%lld)", (long long)c->n_heads, (long long)c->n_kv_heads);
    REQ(c->n_layers >= 1 && c->n_layers <= 4096, "n_layers must be in [1, 4096], got %lld", (long long)c->n_layers);
    REQ(c->d_ff >= 1 && c->d_ff <= SF_DIM_MAX, "d_ff must be in [1, %lld], got %lld", (long long)SF_DIM_MAX, (long long)c->d_ff);
    REQ(c->max_seq_len >= 1 && c->max_seq_len <= SF_DIM_MAX, "max_seq_len must be in [1, %lld], got %lld", (long long)SF_DIM_MAX, (long long)c->max_seq_len);
    REQ(c->causal == 0 || c->causal == 1, "causal must be 0 or 1");
    REQ(c->pos >= SF_POS_NONE && c->pos <= SF_POS_ROPE, "pos must be one of none/learned/sinusoidal/rope (got %d)", c->pos);
    REQ(c->act >= SF_ACT_GELU && c->act <= SF_ACT_SWIGLU, "activation must be one of gelu/gelu_tanh/relu/swiglu (got %d)", c->act);
    REQ(c->norm == SF_NORM_LAYERNORM || c->norm == SF_NORM_RMSNORM, "norm must be layernorm or rmsnorm (got %d)", c->norm);
    REQ(c->pre_norm == 0 || c->pre_norm == 1, "pre_norm must be 0 or 1");
    REQ(c->bias == 0 || c->bias == 1, "bias must be 0 or 1");
    REQ(c->final_norm == 0 || c->final_norm == 1, "final_norm must be 0 or 1");
    REQ(c->tie_embeddings == 0 || c->tie_embeddings == 1, "tie_embeddings must be 0 or 1");
    REQ(isfinite(c->norm_eps) && c->norm_eps > 0.0f, "norm_eps must be a positive finite number");
    REQ(isfinite(c->attnres_eps) && c->attnres_eps > 0.0f, "attnres_eps must be a positive finite number");
    REQ(isfinite(c->rope_theta) && c->rope_theta > 1.0f, "rope_theta must be a finite number > 1");
    if (c->pos == SF_POS_ROPE) {
        int64_t dh = c->d_model / c->n_heads;
        REQ(dh % 2 == 0, "pos='rope' needs an even head dimension, got d_model/n_heads = %lld", (long long)dh);
    }
    if (c->pos == SF_POS_SINUSOIDAL) REQ(c->d_model % 2 == 0, "pos='sinusoidal' needs an even d_model, got %lld", (long long)c->d_model);
    REQ(c->residual >= SF_RES_PLAIN && c->residual <= SF_RES_ATTNRES_BLOCK, "residual must be plain/attnres_full/attnres_block (got %d)", c->residual);
    REQ(c->attnres_block_size >= 1 && c->attnres_block_size <= 65536, "attnres_block_size must be in [1, 65536], got %lld", (long long)c->attnres_block_size);
    REQ(c->moda == 0 || c->moda == 1, "moda must be 0 or 1");
    REQ(c->moda_depth_only == 0 || c->moda_depth_only == 1, "moda_depth_only must be 0 or 1");
    REQ(!c->moda_depth_only || c->moda, "moda_depth_only needs moda=True");
    REQ(c->attn_dropout >= 0.0f && c->attn_dropout < 1.0f, "attn_dropout must be in [0, 1)");
    REQ(c->resid_dropout >= 0.0f && c->resid_dropout < 1.0f, "resid_dropout must be in [0, 1)");
    REQ(c->moda_chunk >= 1 && c->moda_chunk <= c->max_seq_len, "moda_chunk must be in [1, max_seq_len=%lld], got %lld", (long long)c->max_seq_len, (long long)c->moda_chunk);
    if (sf_config_num_params(c) < 0) return sf_fail(err, errlen, SF_ERR_OVERFLOW, "parameter count overflows 64 bits");
#undef REQ
    return SF_OK;
}

/* ---- the parameter table ------------------------------------------------------------------ */

/* Walk the table in its one canonical order. `emit` is called per tensor; when `out` is NULL
 * only the count/size is computed. Returns total floats, or -1 on overflow. */
typedef struct {
    sf_tensor_info *out;
    int32_t n;
    int64_t total;
    int overflow;
} table_builder;

static void emit(table_builder *tb, const char *name, int layer, int ndim, int64_t d0, int64_t d1,
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

static void build_table(const sf_config *c, table_builder *tb) {
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
    table_builder tb = {0};
    build_table(c, &tb);
    return tb.overflow ? -1 : tb.total;
}

/* ---- RNG: xoshiro256** seeded by splitmix64; normals by Box-Muller ---------------------- */

typedef struct { uint64_t s[4]; int has_spare; double spare; } sf_rng;

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
static uint64_t rng_next(sf_rng *r) {
    uint64_t *s = r->s, res = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 45);
    return res;
}
static void rng_seed(sf_rng *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&seed);
    r->has_spare = 0;
}
static double rng_uniform(sf_rng *r) { /* (0, 1] */
    return ((double)(rng_next(r) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
}
static double rng_normal(sf_rng *r) {
    if (r->has_spare) { r->has_spare = 0; return r->spare; }
    double u1 = rng_uniform(r), u2 = rng_uniform(r);
    double rad = sqrt(-2.0 * log(u1)), th = 6.283185307179586 * u2;
    r->spare = rad * sin(th);
    r->has_spare = 1;
    return rad * cos(th);
}

static int ends_with(const char *s, const char *suf) {
    size_t n = strlen(s), m = strlen(suf);
    return n >= m && strcmp(s + n - m, suf) == 0;
}

static void init_params(sf_model *m, uint64_t seed) {
    sf_rng rng;
    rng_seed(&rng, seed);
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
            for (int64_t j = 0; j < t->numel; j++) p[j] = (float)(std * rng_normal(&rng));
        }
    }
}

/* ---- model lifecycle ---------------------------------------------------------------------- */

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
    table_builder tb = {0};
    build_table(cfg, &tb);
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
    table_builder fill = {m->tensors, 0, 0, 0};
    build_table(cfg, &fill);

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
    init_params(m, seed);
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
