/* stackformer C tests: model level: config validation, parameter table, forward-pass properties, threads, cache, errors. See check.h for the framework; test_main.c runs them. */
#include "check.h"

/* ============================================================================================
 * 5. Model level: config validation, parameter table, forward-pass properties
 * ============================================================================================ */

/* ---- config validation -------------------------------------------------------------------- */

static void expect_config_status(const sf_config *c, sf_status want, const char *what, int line) {
    char err[256];
    err[0] = '\0';
    sf_status st = sf_config_validate(c, err, sizeof err);
    CHECK(st == want, "line %d, %s: validate returned %s (%s), want %s", line, what,
          sf_status_name(st), err, sf_status_name(want));
    if (want != SF_OK) {
        CHECK(err[0] != '\0', "line %d, %s: empty error message", line, what);
        /* err may be NULL, and a short buffer is truncated but terminated */
        sf_status st_null = sf_config_validate(c, NULL, 0);
        CHECK(st_null == st, "line %d, %s: status with err=NULL %d vs %d", line, what, st_null, st);
        char small[8];
        memset(small, 'x', sizeof small);
        sf_config_validate(c, small, sizeof small);
        CHECK(memchr(small, '\0', sizeof small) != NULL, "line %d, %s: short message buffer not terminated", line, what);
        /* model creation reports the same failure and creates nothing */
        static char not_a_model;
        sf_model *m = (sf_model *)(void *)&not_a_model; /* must come back NULL */
        char err2[256] = "";
        sf_status st_create = sf_model_create(c, 0, &m, err2, sizeof err2);
        CHECK(st_create == st && m == NULL && err2[0] != '\0',
              "line %d, %s: sf_model_create returned %s, model %p, message '%s'", line, what,
              sf_status_name(st_create), (void *)m, err2);
        if (st_create == SF_OK) sf_model_free(m);
    }
}

/* BAD(status, statement on c): the base config with one change must fail with that status */
#define BAD(want, stmt)                                                                 \
    do {                                                                                \
        sf_config c = base;                                                             \
        stmt;                                                                           \
        expect_config_status(&c, (want), #stmt, __LINE__);                              \
    } while (0)
#define GOOD(stmt)                                                                      \
    do {                                                                                \
        sf_config c = base;                                                             \
        stmt;                                                                           \
        expect_config_status(&c, SF_OK, #stmt, __LINE__);                               \
    } while (0)

void test_config_validation(void) {
    sf_config base;
    sf_config_default(&base, 50, 64, 4, 2, 16);
    const sf_status INVALID = SF_ERR_INVALID_CONFIG;
    const int64_t HUGE64 = INT64_MAX;

    GOOD((void)c);
    GOOD(c.pos = SF_POS_ROPE);
    GOOD(c.pos = SF_POS_SINUSOIDAL);
    GOOD((c.moda = 1, c.moda_depth_only = 1, c.moda_chunk = 16));
    GOOD((c.residual = SF_RES_ATTNRES_BLOCK, c.attnres_block_size = 1));
    GOOD((c.n_kv_heads = 1, c.act = SF_ACT_SWIGLU, c.norm = SF_NORM_RMSNORM));

    /* divisibility */
    BAD(INVALID, c.d_model = 30);                       /* 30 % 4 heads */
    BAD(INVALID, c.n_heads = 5);                        /* 64 % 5 */
    BAD(INVALID, c.n_kv_heads = 3);                     /* 4 % 3 */
    BAD(INVALID, c.n_kv_heads = 8);                     /* more kv heads than heads */
    BAD(INVALID, c.n_heads = 128);                      /* more heads than d_model */
    /* zero and negative sizes (checked before any division by them) */
    BAD(INVALID, c.vocab_size = 0);
    BAD(INVALID, c.vocab_size = -3);
    BAD(INVALID, c.d_model = 0);
    BAD(INVALID, c.n_heads = 0);
    BAD(INVALID, c.n_heads = -4);
    BAD(INVALID, c.n_kv_heads = 0);
    BAD(INVALID, c.n_layers = 0);
    BAD(INVALID, c.d_ff = 0);
    BAD(INVALID, c.max_seq_len = 0);
    BAD(INVALID, c.attnres_block_size = 0);
    BAD(INVALID, c.moda_chunk = 0);
    /* huge sizes: an error, never an overflow or a giant allocation */
    BAD(INVALID, c.vocab_size = HUGE64);
    BAD(INVALID, c.d_model = HUGE64);
    BAD(INVALID, (c.d_model = HUGE64 - 1, c.n_heads = 1, c.n_kv_heads = 1));
    BAD(INVALID, c.n_layers = HUGE64);
    BAD(INVALID, c.d_ff = HUGE64);
    BAD(INVALID, c.max_seq_len = HUGE64);
    BAD(INVALID, c.attnres_block_size = HUGE64);
    BAD(INVALID, c.moda_chunk = 17); /* > max_seq_len */
    /* every dimension within its bound, but the parameter count overflows 64 bits */
    BAD(SF_ERR_OVERFLOW, (c.vocab_size = c.d_model = c.d_ff = (int64_t)1 << 24, c.n_heads = 1,
                          c.n_kv_heads = 1, c.n_layers = 4096, c.act = SF_ACT_SWIGLU, c.moda = 1));
    /* enumerations and flags */
    BAD(INVALID, c.causal = 2);
    BAD(INVALID, c.pos = 4);
    BAD(INVALID, c.pos = -1);
    BAD(INVALID, c.act = 4);
    BAD(INVALID, c.norm = 2);
    BAD(INVALID, c.pre_norm = -1);
    BAD(INVALID, c.bias = 2);
    BAD(INVALID, c.final_norm = 2);
    BAD(INVALID, c.tie_embeddings = 2);
    BAD(INVALID, c.residual = SF_NUM_WIRINGS);
    BAD(INVALID, c.denseformer_dilation = 0);
    BAD(INVALID, c.denseformer_period = 4097);
    BAD(INVALID, c.moda = 2);
    BAD(INVALID, c.moda_depth_only = 2);
    /* floats */
    BAD(INVALID, c.norm_eps = 0.0f);
    BAD(INVALID, c.norm_eps = NAN);
    BAD(INVALID, c.norm_eps = INFINITY);
    BAD(INVALID, c.attnres_eps = -1.0f);
    BAD(INVALID, c.rope_theta = 1.0f);
    BAD(INVALID, c.rope_theta = NAN);
    /* cross-field rules */
    BAD(INVALID, c.moda_depth_only = 1);                                  /* without moda */
    BAD(INVALID, (c.pos = SF_POS_ROPE, c.d_model = 12));                  /* head dim 3 */
    BAD(INVALID, (c.pos = SF_POS_SINUSOIDAL, c.d_model = 15, c.n_heads = 3, c.n_kv_heads = 3));

    char err[256] = "";
    CHECK(sf_config_validate(NULL, err, sizeof err) == SF_ERR_INVALID_ARG && err[0],
          "NULL config: '%s'", err);
    CHECK(sf_model_create(&base, 0, NULL, err, sizeof err) == SF_ERR_INVALID_ARG,
          "sf_model_create with out = NULL");

    /* overflow is also visible through sf_config_num_params */
    sf_config c = base;
    c.vocab_size = c.d_model = c.d_ff = (int64_t)1 << 24;
    c.n_heads = c.n_kv_heads = 1;
    c.n_layers = 4096;
    c.act = SF_ACT_SWIGLU;
    c.moda = 1;
    CHECK(sf_config_num_params(&c) == -1, "num_params of an overflowing config: %lld",
          (long long)sf_config_num_params(&c));
    /* valid but absurdly large (~2^50 floats): SF_ERR_NOMEM with a message, no allocation */
    c.n_layers = 1;
    c.act = SF_ACT_GELU;
    c.moda = 0;
    CHECK(sf_config_validate(&c, err, sizeof err) == SF_OK, "huge config should validate: %s", err);
    CHECK(sf_config_num_params(&c) > ((int64_t)1 << 40), "huge config num_params %lld",
          (long long)sf_config_num_params(&c));
    sf_model *m = NULL;
    err[0] = '\0';
    sf_status st = sf_model_create(&c, 0, &m, err, sizeof err);
    CHECK(st == SF_ERR_NOMEM && m == NULL && err[0], "huge model: %s, model %p, '%s'",
          sf_status_name(st), (void *)m, err);
    if (m) sf_model_free(m);

    for (int s = SF_OK; s <= SF_ERR_BUSY; s++)
        CHECK(strcmp(sf_status_name((sf_status)s), sf_status_name((sf_status)99)) != 0,
              "status %d has no name ('%s')", s, sf_status_name((sf_status)s));
}

/* ---- the parameter table -------------------------------------------------------------------- */

/* The state_dict names in flat-buffer order, from the table in DEVELOPERS.md. */
static int expected_names(const sf_config *c, char (*out)[SF_NAME_MAX], int cap) {
    int n = 0;
    const int ln_bias = c->bias && c->norm == SF_NORM_LAYERNORM, attnres = c->residual != SF_RES_PLAIN;
#define ADD(...) do { if (n < cap) snprintf(out[n], SF_NAME_MAX, __VA_ARGS__); n++; } while (0)
    ADD("tok_emb.weight");
    if (c->pos == SF_POS_LEARNED) ADD("pos_emb.weight");
    for (int i = 0; i < (int)c->n_layers; i++) {
        ADD("layers.%d.attn_norm.weight", i);
        if (ln_bias) ADD("layers.%d.attn_norm.bias", i);
        static const char *proj[] = {"q", "k", "v", "o"};
        for (int p = 0; p < 4; p++) {
            ADD("layers.%d.attn.%s_proj.weight", i, proj[p]);
            if (c->bias) ADD("layers.%d.attn.%s_proj.bias", i, proj[p]);
        }
        ADD("layers.%d.mlp_norm.weight", i);
        if (ln_bias) ADD("layers.%d.mlp_norm.bias", i);
        static const char *mlp[] = {"gate", "up", "down"};
        for (int p = c->act == SF_ACT_SWIGLU ? 0 : 1; p < 3; p++) {
            ADD("layers.%d.mlp.%s_proj.weight", i, mlp[p]);
            if (c->bias) ADD("layers.%d.mlp.%s_proj.bias", i, mlp[p]);
        }
        if (c->moda && i < c->n_layers - 1) {
            ADD("layers.%d.mlp.depth_k_proj.weight", i);
            ADD("layers.%d.mlp.depth_v_proj.weight", i);
        }
        if (attnres) {
            ADD("layers.%d.attn_res_proj.weight", i);
            ADD("layers.%d.attn_res_norm.weight", i);
            ADD("layers.%d.mlp_res_proj.weight", i);
            ADD("layers.%d.mlp_res_norm.weight", i);
        }
    }
    if (attnres) { ADD("output_res_proj.weight"); ADD("output_res_norm.weight"); }
    if (c->final_norm) {
        ADD("final_norm.weight");
        if (ln_bias) ADD("final_norm.bias");
    }
    if (!c->tie_embeddings) ADD("lm_head.weight");
#undef ADD
    return n;
}

int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* The documented (out, in) shape of a tensor, from its name. */
static void expected_shape(const sf_config *c, const char *name, int64_t shape[2], int *ndim) {
    const int64_t d = c->d_model, dh = d / c->n_heads, qd = c->n_heads * dh, kvd = c->n_kv_heads * dh;
    *ndim = 2;
    shape[0] = -1; /* unknown name: never matches */
    shape[1] = d;
    if (ends_with(name, ".bias") || ends_with(name, "norm.weight")) {
        *ndim = 1;
        shape[1] = 0;
        shape[0] = d;
        if (strstr(name, "q_proj")) shape[0] = qd;
        if (strstr(name, "k_proj") || strstr(name, "v_proj")) shape[0] = kvd;
        if (strstr(name, "gate_proj") || strstr(name, "up_proj")) shape[0] = c->d_ff;
    } else if (!strcmp(name, "tok_emb.weight") || !strcmp(name, "lm_head.weight")) {
        shape[0] = c->vocab_size;
    } else if (!strcmp(name, "pos_emb.weight")) {
        shape[0] = c->max_seq_len;
    } else if (strstr(name, "_res_proj")) {
        shape[0] = 1;
    } else if (strstr(name, "q_proj")) {
        shape[0] = qd;
    } else if (strstr(name, "k_proj") || strstr(name, "v_proj")) { /* incl. depth_k/v_proj */
        shape[0] = kvd;
    } else if (strstr(name, "o_proj")) {
        shape[0] = d; shape[1] = qd;
    } else if (strstr(name, "gate_proj") || strstr(name, "up_proj")) {
        shape[0] = c->d_ff;
    } else if (strstr(name, "down_proj")) {
        shape[0] = d; shape[1] = c->d_ff;
    }
}

static void check_tensor_table(const sf_config *cfg, const char *label) {
    char err[256] = "";
    sf_model *m = NULL;
    sf_status st = sf_model_create(cfg, 7, &m, err, sizeof err);
    CHECK(st == SF_OK && m, "%s: sf_model_create: %s", label, err);
    if (!m) return;
    const int32_t nt = sf_model_num_tensors(m);
    enum { CAP = 512 };
    char (*want)[SF_NAME_MAX] = xmalloc(CAP * sizeof *want);
    int nwant = expected_names(cfg, want, CAP);
    CHECK(nt == nwant, "%s: %d tensors, the documented table has %d", label, nt, nwant);

    int64_t offset = 0;
    int64_t bad_name = 0, bad_dup = 0, bad_offset = 0, bad_shape = 0, bad_meta = 0, bad_init = 0;
    const float *params = sf_model_params(m);
    for (int32_t i = 0; i < nt; i++) {
        const sf_tensor_info *t = sf_model_tensor(m, i);
        if (i < nwant && strcmp(t->name, want[i]) != 0) {
            if (!bad_name) printf("  %s: tensor %d is '%s', documented '%s'\n", label, i, t->name, want[i]);
            bad_name++;
        }
        bad_dup += sf_model_find_tensor(m, t->name) != i; /* unique: the lookup finds this one */
        bad_offset += t->offset != offset;                /* contiguous, in table order */
        offset += t->numel;
        int64_t shape[2];
        int ndim;
        expected_shape(cfg, t->name, shape, &ndim);
        bad_shape += t->ndim != ndim || t->shape[0] != shape[0] || t->shape[1] != shape[1] ||
                     t->numel != (ndim == 2 ? shape[0] * shape[1] : shape[0]);
        int layer = -1;
        if (!strncmp(t->name, "layers.", 7)) layer = atoi(t->name + 7);
        int no_decay = ends_with(t->name, ".bias") || ends_with(t->name, "norm.weight") ||
                       strstr(t->name, "_res_proj") != NULL;
        bad_meta += t->layer != layer || t->no_decay != no_decay;
        /* init: pseudo-queries 0, norm gains 1, biases 0, everything else random and small */
        const float *p = params + t->offset;
        for (int64_t j = 0; j < t->numel; j++) {
            float want_v = strstr(t->name, "_res_proj") || ends_with(t->name, ".bias") ? 0.0f
                           : ends_with(t->name, "norm.weight")                          ? 1.0f
                                                                                        : NAN;
            if (isnan(want_v) ? !(fabsf(p[j]) < 0.2f) : p[j] != want_v) { bad_init++; break; }
        }
    }
    CHECK(bad_name == 0, "%s: %lld tensors out of documented order", label, (long long)bad_name);
    CHECK(bad_dup == 0, "%s: %lld duplicate names", label, (long long)bad_dup);
    CHECK(bad_offset == 0, "%s: %lld non-contiguous offsets", label, (long long)bad_offset);
    CHECK(bad_shape == 0, "%s: %lld tensors with undocumented shapes", label, (long long)bad_shape);
    CHECK(bad_meta == 0, "%s: %lld tensors with wrong layer / no_decay", label, (long long)bad_meta);
    CHECK(bad_init == 0, "%s: %lld tensors not initialized as documented", label, (long long)bad_init);
    CHECK(offset == sf_model_num_params(m) && offset == sf_config_num_params(cfg),
          "%s: sum of numel %lld, num_params %lld, config num_params %lld", label, (long long)offset,
          (long long)sf_model_num_params(m), (long long)sf_config_num_params(cfg));
    CHECK(sf_model_find_tensor(m, "no.such.tensor") == -1 && sf_model_tensor(m, -1) == NULL &&
              sf_model_tensor(m, nt) == NULL,
          "%s: lookups out of range", label);
    CHECK(memcmp(sf_model_config(m), cfg, sizeof *cfg) == 0, "%s: sf_model_config differs", label);

    /* init is a function of (config, seed) */
    sf_model *m2 = NULL, *m3 = NULL;
    sf_model_create(cfg, 7, &m2, err, sizeof err);
    sf_model_create(cfg, 8, &m3, err, sizeof err);
    if (m2 && m3) {
        CHECK(memcmp(params, sf_model_params(m2), (size_t)offset * sizeof(float)) == 0,
              "%s: same seed, different weights", label);
        CHECK(memcmp(params, sf_model_params(m3), (size_t)offset * sizeof(float)) != 0,
              "%s: different seeds, same weights", label);
    }
    sf_model_free(m2);
    sf_model_free(m3);
    free(want);
    sf_model_free(m);
}

void test_tensor_table(void) {
    sf_config c;
    sf_config_default(&c, 37, 32, 4, 3, 12);
    check_tensor_table(&c, "table default");
    c.n_kv_heads = 2;
    c.act = SF_ACT_SWIGLU;
    c.tie_embeddings = 0;
    c.residual = SF_RES_ATTNRES_BLOCK;
    c.moda = 1;
    c.d_ff = 40;
    check_tensor_table(&c, "table gqa swiglu untied attnres moda");
    c.norm = SF_NORM_RMSNORM;
    c.pos = SF_POS_ROPE;
    c.final_norm = 0;
    c.residual = SF_RES_ATTNRES_FULL;
    c.n_layers = 1; /* moda with a single block: no depth projections */
    check_tensor_table(&c, "table rmsnorm rope no-final-norm 1 layer");
    c.norm = SF_NORM_LAYERNORM;
    c.bias = 0;
    c.pos = SF_POS_NONE;
    c.moda = 0;
    c.n_layers = 2;
    check_tensor_table(&c, "table no bias, no pos");
}

/* ---- forward-pass properties ---------------------------------------------------------------- */

typedef struct { const char *name; void (*tweak)(sf_config *); } variant;

static void v_plain(sf_config *c) { (void)c; }
static void v_post_rope_gqa_swiglu(sf_config *c) {
    c->pre_norm = 0; c->pos = SF_POS_ROPE; c->n_kv_heads = 2; c->act = SF_ACT_SWIGLU;
    c->norm = SF_NORM_RMSNORM;
}
static void v_bidir_sinusoidal(sf_config *c) {
    c->causal = 0; c->pos = SF_POS_SINUSOIDAL; c->act = SF_ACT_GELU_TANH;
}
static void v_bare_relu(sf_config *c) {
    c->pos = SF_POS_NONE; c->act = SF_ACT_RELU; c->bias = 0; c->tie_embeddings = 0; c->final_norm = 0;
}
static void v_full(sf_config *c) { c->residual = SF_RES_ATTNRES_FULL; }
static void v_full_post(sf_config *c) {
    c->residual = SF_RES_ATTNRES_FULL; c->pre_norm = 0; c->norm = SF_NORM_RMSNORM;
}
static void v_block1(sf_config *c) { c->residual = SF_RES_ATTNRES_BLOCK; c->attnres_block_size = 1; }
static void v_block2(sf_config *c) { c->residual = SF_RES_ATTNRES_BLOCK; c->attnres_block_size = 2; }
static void v_block3(sf_config *c) { c->residual = SF_RES_ATTNRES_BLOCK; c->attnres_block_size = 3; }
static void v_block4(sf_config *c) { /* L = 6 sublayers: the last block is short */
    c->residual = SF_RES_ATTNRES_BLOCK; c->attnres_block_size = 4;
}
static void v_block2_post(sf_config *c) { v_block2(c); c->pre_norm = 0; c->pos = SF_POS_ROPE; }
static void v_moda_c1(sf_config *c) { c->moda = 1; }
static void v_moda_c2_rope_mqa(sf_config *c) {
    c->moda = 1; c->moda_chunk = 2; c->pos = SF_POS_ROPE; c->n_kv_heads = 1;
}
static void v_moda_depth_only_c3(sf_config *c) { c->moda = 1; c->moda_chunk = 3; c->moda_depth_only = 1; }
static void v_moda_block3(sf_config *c) {
    c->moda = 1; c->moda_chunk = 2; c->n_kv_heads = 2;
    c->residual = SF_RES_ATTNRES_BLOCK; c->attnres_block_size = 3;
}
static void v_moda_bidir_c2(sf_config *c) { c->moda = 1; c->moda_chunk = 2; c->causal = 0; }
static void v_moda_full_post(sf_config *c) { c->moda = 1; c->residual = SF_RES_ATTNRES_FULL; c->pre_norm = 0; }
/* issue 20's ablation knobs */
static void v_moda_rope_own_c2(sf_config *c) { v_moda_c2_rope_mqa(c); c->moda_depth_rope = SF_DROPE_OWN; }
static void v_moda_rope_legacy(sf_config *c) { c->moda = 1; c->pos = SF_POS_ROPE; c->moda_depth_rope = SF_DROPE_LEGACY; }
static void v_moda_kv_attn_rope(sf_config *c) { c->moda = 1; c->pos = SF_POS_ROPE; c->moda_depth_kv = SF_DKV_ATTN; }
static void v_moda_kv_extra_block3(sf_config *c) { v_moda_block3(c); c->moda_depth_kv = SF_DKV_EXTRA; c->pos = SF_POS_ROPE; }
static void v_full_no_key_norm(sf_config *c) { v_full(c); c->attnres_key_norm = 0; }
static void v_block2_no_key_norm_post(sf_config *c) { v_block2_post(c); c->attnres_key_norm = 0; }
static void v_full_sigmoid(sf_config *c) { v_full(c); c->attnres_mixing = SF_MIX_SIGMOID; }
static void v_block3_sigmoid_moda(sf_config *c) { v_moda_block3(c); c->attnres_mixing = SF_MIX_SIGMOID; }

/* MoDA depth slots each block writes (moda_depth_kv='attn': its attention's only) */
static int64_t slots_per_block(const sf_config *c) { return c->moda_depth_kv == SF_DKV_ATTN ? 1 : 2; }

static const variant VARIANTS[] = {
    {"plain", v_plain},
    {"plain post rope gqa swiglu rmsnorm", v_post_rope_gqa_swiglu},
    {"plain bidirectional sinusoidal gelu_tanh", v_bidir_sinusoidal},
    {"plain no-pos relu no-bias untied no-final-norm", v_bare_relu},
    {"attnres_full", v_full},
    {"attnres_full post rmsnorm", v_full_post},
    {"attnres_block S=1", v_block1},
    {"attnres_block S=2", v_block2},
    {"attnres_block S=3", v_block3},
    {"attnres_block S=4", v_block4},
    {"attnres_block S=2 post rope", v_block2_post},
    {"moda chunk 1", v_moda_c1},
    {"moda chunk 2 rope mqa", v_moda_c2_rope_mqa},
    {"moda depth_only chunk 3", v_moda_depth_only_c3},
    {"moda chunk 2 + attnres_block S=3", v_moda_block3},
    {"moda bidirectional chunk 2", v_moda_bidir_c2},
    {"moda + attnres_full post", v_moda_full_post},
    {"moda chunk 2 rope mqa, moda_depth_rope own", v_moda_rope_own_c2},
    {"moda rope, moda_depth_rope legacy", v_moda_rope_legacy},
    {"moda rope, moda_depth_kv attn", v_moda_kv_attn_rope},
    {"moda rope attnres_block S=3, moda_depth_kv attn+ffn+extra", v_moda_kv_extra_block3},
    {"attnres_full, no key norm", v_full_no_key_norm},
    {"attnres_block S=2 post rope, no key norm", v_block2_no_key_norm_post},
    {"attnres_full, sigmoid gates", v_full_sigmoid},
    {"moda + attnres_block S=3, sigmoid gates", v_block3_sigmoid_moda},
};
enum { N_VARIANTS = (int)(sizeof VARIANTS / sizeof VARIANTS[0]) };

/* V=37, d=32, 4 heads (dh = 8), 3 blocks (L = 6 sublayers), max_seq_len 12, d_ff 48 */
static sf_config small_config(const variant *v) {
    sf_config c;
    sf_config_default(&c, 37, 32, 4, 3, 12);
    c.d_ff = 48;
    v->tweak(&c);
    return c;
}

/* Fresh weights make every AttnRes pseudo-query 0 (uniform mixtures) and keep every bias 0,
 * and start DenseFormer / Hyper-Connections / mHC at their identity-like init: randomize or
 * perturb them so the schedules, mixtures and bias paths are actually exercised. */
sf_model *make_model(const sf_config *c, uint64_t seed, const char *label) {
    char err[256] = "";
    sf_model *m = NULL;
    sf_status st = sf_model_create(c, seed, &m, err, sizeof err);
    CHECK(st == SF_OK && m, "%s: sf_model_create: %s (%s)", label, sf_status_name(st), err);
    if (!m) return NULL;
    float *p = sf_model_params(m);
    for (int32_t i = 0; i < sf_model_num_tensors(m); i++) {
        const sf_tensor_info *t = sf_model_tensor(m, i);
        if (strstr(t->name, "_res_proj")) fill(p + t->offset, t->numel, -0.3f, 0.3f);
        else if (ends_with(t->name, ".bias")) fill(p + t->offset, t->numel, -0.05f, 0.05f);
        else if (ends_with(t->name, "norm.weight")) fill(p + t->offset, t->numel, 0.8f, 1.2f);
        else if (strstr(t->name, "_hc.") || strstr(t->name, "_mhc.") || strstr(t->name, ".dwa."))
            for (int64_t e = 0; e < t->numel; e++) p[t->offset + e] += frand(-0.2f, 0.2f);
    }
    return m;
}

static sf_status forward(const sf_model *m, const int32_t *tok, const float *embeds,
                         const uint8_t *pad, int64_t B, int64_t T, int two_phase, int nt,
                         float *logits, float *hidden, sf_trace *trace, char *err, size_t errlen) {
    sf_forward_args a = {.tokens = tok, .embeds = embeds, .key_padding_mask = pad, .B = B, .T = T,
                         .attnres_two_phase = two_phase, .n_threads = nt};
    return sf_forward(m, &a, logits, hidden, trace, err, errlen);
}

/* Run and require success; returns 1 when it ran. */
static int forward_ok(const sf_model *m, const int32_t *tok, const uint8_t *pad, int64_t B,
                      int64_t T, int two_phase, int nt, float *logits, float *hidden,
                      const char *label) {
    char err[256] = "";
    sf_status st = forward(m, tok, NULL, pad, B, T, two_phase, nt, logits, hidden, NULL, err, sizeof err);
    CHECK(st == SF_OK, "%s: sf_forward: %s (%s)", label, sf_status_name(st), err);
    return st == SF_OK;
}

void random_tokens(int32_t *tok, int64_t n, int64_t V) {
    for (int64_t i = 0; i < n; i++) tok[i] = (int32_t)(urand() * (double)V);
}

/* Every property a single configuration must have (also used by test_wirings.c). */
void check_forward_config(const sf_config *cfg, const char *name) {
    enum { B = 2, T = 9 };
    const sf_config c = *cfg;
    const variant vv = {name, NULL}, *v = &vv;
    sf_model *m = make_model(&c, 1, v->name);
    if (!m) return;
    const int64_t V = c.vocab_size, d = c.d_model, NV = B * T * V;
    const int block = c.residual == SF_RES_ATTNRES_BLOCK;
    int32_t tok[B * T], tok2[B * T];
    random_tokens(tok, B * T, V);
    float *logits = falloc(NV), *logits2 = falloc(NV), *hidden = falloc(B * T * d);
    char what[200];

    /* finite outputs */
    if (!forward_ok(m, tok, NULL, B, T, 1, 1, logits, hidden, v->name)) goto done;
    CHECK(all_finite(logits, NV), "%s: non-finite logits", v->name);
    CHECK(all_finite(hidden, B * T * d), "%s: non-finite hidden", v->name);

    /* logits = hidden (after the final norm) . head^T */
    {
        int32_t hi = sf_model_find_tensor(m, c.tie_embeddings ? "tok_emb.weight" : "lm_head.weight");
        const float *head = sf_model_params(m) + sf_model_tensor(m, hi)->offset;
        double *want = dalloc(NV);
        for (int64_t r = 0; r < B * T; r++)
            for (int64_t j = 0; j < V; j++) {
                double s = 0.0;
                for (int64_t e = 0; e < d; e++) s += (double)hidden[r * d + e] * head[j * d + e];
                want[r * V + j] = s;
            }
        snprintf(what, sizeof what, "%s: logits vs hidden . head^T", v->name);
        CHECK_CLOSE(what, logits, want, NV, 1e-5, 1e-5);
        free(want);
    }

    /* thread counts give the same bits */
    for (int nt = 2; nt <= 3; nt++) {
        forward_ok(m, tok, NULL, B, T, 1, nt, logits2, NULL, v->name);
        snprintf(what, sizeof what, "%s: threads 1 vs %d", v->name, nt);
        CHECK_SAME(what, logits, logits2, NV);
    }

    /* embeddings given directly (the token rows of tok_emb) are the token path */
    {
        float *emb = falloc(B * T * d);
        const float *tok_emb = sf_model_params(m) + sf_model_tensor(m, sf_model_find_tensor(m, "tok_emb.weight"))->offset;
        for (int64_t r = 0; r < B * T; r++) memcpy(emb + r * d, tok_emb + tok[r] * d, (size_t)d * sizeof(float));
        char err[256] = "";
        sf_status st = forward(m, NULL, emb, NULL, B, T, 1, 1, logits2, NULL, NULL, err, sizeof err);
        CHECK(st == SF_OK, "%s: forward with embeds: %s", v->name, err);
        snprintf(what, sizeof what, "%s: embeds vs tokens", v->name);
        CHECK_SAME(what, logits, logits2, NV);
        free(emb);
    }

    /* Block AttnRes: the two-phase schedule is a reordering of the same sums; elsewhere the
     * flag is ignored */
    forward_ok(m, tok, NULL, B, T, 0, 1, logits2, NULL, v->name);
    snprintf(what, sizeof what, "%s: two_phase 1 vs 0", v->name);
    if (block) CHECK_CLOSE_F(what, logits, logits2, NV, 1e-5, 1e-5);
    else CHECK_SAME(what, logits, logits2, NV);

    /* causality: a new last token changes nothing before it (bitwise: rows are independent);
     * bidirectional: it changes position 0 */
    memcpy(tok2, tok, sizeof tok);
    for (int b = 0; b < B; b++) tok2[b * T + T - 1] = (tok[b * T + T - 1] + 1) % (int32_t)V;
    forward_ok(m, tok2, NULL, B, T, 1, 1, logits2, NULL, v->name);
    for (int b = 0; b < B; b++) {
        const float *a0 = logits + (int64_t)b * T * V, *a1 = logits2 + (int64_t)b * T * V;
        if (c.causal) {
            snprintf(what, sizeof what, "%s: causality, batch row %d, positions < T-1", v->name, b);
            CHECK_SAME(what, a0, a1, (T - 1) * V);
        } else {
            CHECK(first_difference(a0, a1, V) >= 0,
                  "%s: bidirectional, batch row %d: position 0 ignores the last token", v->name, b);
        }
        CHECK(first_difference(a0 + (T - 1) * V, a1 + (T - 1) * V, V) >= 0,
              "%s: batch row %d: the last position ignores its own token", v->name, b);
    }

    /* padding: the tokens at padded positions never reach a real position (b0: holes at 2, 5;
     * b1: right padding from 6) */
    {
        static const uint8_t pad[B * T] = {1, 1, 0, 1, 1, 0, 1, 1, 1, /**/ 1, 1, 1, 1, 1, 1, 0, 0, 0};
        memcpy(tok2, tok, sizeof tok);
        for (int64_t r = 0; r < B * T; r++)
            if (!pad[r]) tok2[r] = (tok[r] + 1 + (int32_t)r) % (int32_t)V;
        forward_ok(m, tok, pad, B, T, 1, 1, logits, NULL, v->name);
        forward_ok(m, tok2, pad, B, T, 1, 1, logits2, NULL, v->name);
        CHECK(all_finite(logits, NV), "%s: non-finite logits with padding", v->name);
        for (int64_t r = 0; r < B * T; r++) {
            if (!pad[r]) continue;
            snprintf(what, sizeof what, "%s: padding, real position [%lld, %lld] depends on padded tokens",
                     v->name, (long long)(r / T), (long long)(r % T));
            CHECK_SAME(what, logits + r * V, logits2 + r * V, V);
        }
    }
done:
    free(logits); free(logits2); free(hidden);
    sf_model_free(m);
}

void test_forward_variants(void) {
    for (int i = 0; i < N_VARIANTS; i++) {
        const sf_config c = small_config(&VARIANTS[i]);
        check_forward_config(&c, VARIANTS[i].name);
    }
}

/* Block AttnRes with S = 1 is Full AttnRes: same table, same weights, same logits. */
void test_block_s1_is_full(void) {
    sf_config full = small_config(&(variant){"full", v_full});
    sf_config blk = small_config(&(variant){"block1", v_block1});
    sf_model *mf = make_model(&full, 3, "full"), *mb = make_model(&blk, 3, "block S=1");
    if (!mf || !mb) { sf_model_free(mf); sf_model_free(mb); return; }
    int same_table = sf_model_num_tensors(mf) == sf_model_num_tensors(mb) &&
                     sf_model_num_params(mf) == sf_model_num_params(mb);
    for (int32_t i = 0; same_table && i < sf_model_num_tensors(mf); i++) {
        const sf_tensor_info *a = sf_model_tensor(mf, i), *b = sf_model_tensor(mb, i);
        same_table = !strcmp(a->name, b->name) && a->offset == b->offset && a->numel == b->numel;
    }
    CHECK(same_table, "attnres_full and attnres_block S=1 have different parameter tables");
    if (same_table) {
        memcpy(sf_model_params(mb), sf_model_params(mf), (size_t)sf_model_num_params(mf) * sizeof(float));
        enum { B = 2, T = 11 };
        const int64_t NV = B * T * full.vocab_size;
        int32_t tok[B * T];
        random_tokens(tok, B * T, full.vocab_size);
        float *lf = falloc(NV), *lb = falloc(NV);
        forward_ok(mf, tok, NULL, B, T, 0, 1, lf, NULL, "full");
        for (int two_phase = 0; two_phase <= 1; two_phase++) {
            forward_ok(mb, tok, NULL, B, T, two_phase, 1, lb, NULL, "block S=1");
            char what[96];
            snprintf(what, sizeof what, "block S=1 (two_phase=%d) vs full", two_phase);
            CHECK_CLOSE_F(what, lb, lf, NV, 1e-6, 1e-6);
        }
        free(lf); free(lb);
    }
    sf_model_free(mf);
    sf_model_free(mb);
}

/* Every trace buffer at exactly its documented shape (the sanitizer build checks the bounds);
 * the recordings agree with each other and with the documented layout. */
static void check_traces(const variant *v) {
    enum { B = 2, T = 7 };
    const sf_config c = small_config(v);
    sf_model *m = make_model(&c, 5, v->name);
    if (!m) return;
    const int64_t n = c.n_layers, L = 2 * n, H = c.n_heads, d = c.d_model, V = c.vocab_size;
    const int attnres = c.residual != SF_RES_PLAIN;
    int32_t tok[B * T];
    random_tokens(tok, B * T, V);

    float *attention[8], *hidden[9], *attn_out[8], *mlp_out[8], *alpha[17], *depth_mass[8];
    float *rms = falloc((L + 1) * SF_RMS_COLS);
    for (int64_t i = 0; i < n; i++) {
        attention[i] = falloc(B * H * T * (T + sf_depth_cols(&c, i)));
        attn_out[i] = falloc(B * T * d);
        mlp_out[i] = falloc(B * T * d);
        depth_mass[i] = falloc(B * H * T);
    }
    for (int64_t i = 0; i <= n; i++) hidden[i] = falloc(B * T * d);
    for (int64_t k = 0; k <= L; k++) alpha[k] = attnres ? falloc(B * T * sf_attnres_num_sources(&c, k)) : NULL;
    sf_trace tr = {attention, hidden, attn_out, mlp_out, attnres ? alpha : NULL,
                   c.moda ? depth_mass : NULL, rms, NULL};

    /* the documented source counts: Full k+1 (L+1 at the output); Block 1 + k/S + [k%S != 0] */
    for (int64_t k = 0; k <= L && attnres; k++) {
        int64_t S = c.attnres_block_size, want;
        if (c.residual == SF_RES_ATTNRES_FULL) want = k + 1;
        else want = k < L ? 1 + k / S + (k % S != 0) : 1 + (L + S - 1) / S;
        CHECK(sf_attnres_num_sources(&c, k) == want, "%s: sources of sublayer %lld: %lld, want %lld",
              v->name, (long long)k, (long long)sf_attnres_num_sources(&c, k), (long long)want);
    }
    for (int64_t i = 0; i < n; i++)
        CHECK(sf_depth_cols(&c, i) == (c.moda ? slots_per_block(&c) * i * c.moda_chunk : 0), "%s: depth cols of layer %lld",
              v->name, (long long)i);

    float *logits = falloc(B * T * V), *logits2 = falloc(B * T * V);
    float *alpha0[17] = {0};
    char err[256] = "", what[200];
    for (int two_phase = 0; two_phase <= 1; two_phase++) {
        sf_status st = forward(m, tok, NULL, NULL, B, T, two_phase, 2, logits, NULL, &tr, err, sizeof err);
        CHECK(st == SF_OK, "%s: forward with traces: %s", v->name, err);
        if (st != SF_OK) continue;
        /* recording changes nothing */
        forward_ok(m, tok, NULL, B, T, two_phase, 2, logits2, NULL, v->name);
        snprintf(what, sizeof what, "%s two_phase=%d: logits with vs without traces", v->name, two_phase);
        CHECK_SAME(what, logits, logits2, B * T * V);

        for (int64_t i = 0; i < n; i++) {
            const int64_t W = T + sf_depth_cols(&c, i), Dc = W - T;
            int64_t bad_rows = 0, bad_mass = 0;
            for (int64_t r = 0; r < B * H * T; r++) {
                const float *p = attention[i] + r * W;
                double sum = 0.0, dsum = 0.0;
                for (int64_t col = 0; col < W; col++) sum += p[col];
                for (int64_t col = T; col < W; col++) dsum += p[col];
                bad_rows += fabs(sum - 1.0) > 1e-5; /* causal, unpadded: every row sees a key */
                if (c.moda) bad_mass += fabs(dsum - depth_mass[i][r]) > 1e-5;
                /* causal: no probability on later keys or later depth positions */
                const int64_t t = r % T;
                for (int64_t u = t + 1; u < T && c.causal; u++) bad_rows += p[u] != 0.0f;
                for (int64_t col = 0; col < Dc; col++) {
                    int64_t u = (t / c.moda_chunk) * c.moda_chunk + col / (slots_per_block(&c) * i);
                    bad_rows += u > t && p[T + col] != 0.0f;
                }
            }
            CHECK(bad_rows == 0, "%s two_phase=%d: layer %lld: %lld bad attention rows", v->name,
                  two_phase, (long long)i, (long long)bad_rows);
            CHECK(bad_mass == 0, "%s two_phase=%d: layer %lld: %lld depth_mass values != depth columns' sum",
                  v->name, two_phase, (long long)i, (long long)bad_mass);
            CHECK(all_finite(attn_out[i], B * T * d) && all_finite(mlp_out[i], B * T * d),
                  "%s: non-finite sublayer outputs in layer %lld", v->name, (long long)i);
        }
        for (int64_t i = 0; i <= n; i++)
            CHECK(all_finite(hidden[i], B * T * d), "%s: non-finite hidden[%lld]", v->name, (long long)i);
        for (int64_t k = 0; k < L; k++)
            CHECK(all_finite(rms + k * SF_RMS_COLS, SF_RMS_COLS), "%s: rms row %lld not finite", v->name, (long long)k);
        CHECK(isfinite(rms[L * SF_RMS_COLS + SF_RMS_INPUT]) && isnan(rms[L * SF_RMS_COLS + SF_RMS_OUTPUT]) &&
                  isnan(rms[L * SF_RMS_COLS + SF_RMS_STREAM]),
              "%s: rms output row %g %g %g (want finite, NaN, NaN)", v->name,
              (double)rms[L * SF_RMS_COLS], (double)rms[L * SF_RMS_COLS + 1], (double)rms[L * SF_RMS_COLS + 2]);
        if (!attnres) {
            /* plain residual: the stream entering block 0 is the embedding, and block i+1's
             * input is block i's input plus its two updates (pre-norm) */
            if (c.pre_norm) {
                float *x = fdup(hidden[0], B * T * d);
                for (int64_t i = 0; i < n; i++) {
                    sf_add(x, attn_out[i], B * T * d, 1);
                    sf_add(x, mlp_out[i], B * T * d, 1);
                    snprintf(what, sizeof what, "%s: hidden[%lld] = hidden[%lld] + attn_out + mlp_out",
                             v->name, (long long)i + 1, (long long)i);
                    CHECK_SAME(what, x, hidden[i + 1], B * T * d);
                    memcpy(x, hidden[i + 1], (size_t)(B * T * d) * sizeof(float));
                }
                free(x);
            }
            continue;
        }
        for (int64_t k = 0; k <= L; k++) {
            const int64_t ns = sf_attnres_num_sources(&c, k);
            int64_t bad = 0;
            for (int64_t r = 0; r < B * T; r++) {
                double s = 0.0;
                for (int64_t i = 0; i < ns; i++) s += alpha[k][r * ns + i];
                bad += fabs(s - 1.0) > 1e-5;
            }
            CHECK(bad == 0, "%s two_phase=%d: alpha[%lld]: %lld rows do not sum to 1", v->name,
                  two_phase, (long long)k, (long long)bad);
            if (two_phase == 0) {
                alpha0[k] = fdup(alpha[k], B * T * ns);
            } else if (alpha0[k]) {
                snprintf(what, sizeof what, "%s: alpha[%lld] two-phase vs direct", v->name, (long long)k);
                CHECK_CLOSE_F(what, alpha[k], alpha0[k], B * T * ns, 1e-6, 1e-5);
            }
        }
    }
    for (int64_t k = 0; k <= L; k++) { free(alpha0[k]); free(alpha[k]); }
    for (int64_t i = 0; i < n; i++) { free(attention[i]); free(attn_out[i]); free(mlp_out[i]); free(depth_mass[i]); }
    for (int64_t i = 0; i <= n; i++) free(hidden[i]);
    free(rms); free(logits); free(logits2);
    sf_model_free(m);
}

void test_traces(void) {
    check_traces(&(variant){"traces plain", v_plain});
    check_traces(&(variant){"traces moda chunk 2 rope mqa", v_moda_c2_rope_mqa});
    check_traces(&(variant){"traces moda + attnres_block S=3", v_moda_block3});
    check_traces(&(variant){"traces attnres_block S=4", v_block4});
    check_traces(&(variant){"traces moda + attnres_full post", v_moda_full_post});
}

/* Issue 23's activation recordings (embed, MLP inputs, q/k/v, z, MLP activation): taking them
 * changes no logit and no other recording (bitwise), and they are what they say they are: the
 * plain stream's identities hold bitwise, z = P V per head (to float rounding). That q/k/v are
 * the projections before RoPE is checked against the float64 reference (tests/test_hooks.py). */
static void check_trace_activations(const variant *v) {
    enum { B = 2, T = 7 };
    const sf_config c = small_config(v);
    sf_model *m = make_model(&c, 6, v->name);
    if (!m) return;
    const int64_t n = c.n_layers, H = c.n_heads, Hkv = c.n_kv_heads, d = c.d_model, V = c.vocab_size;
    const int64_t dh = d / H, G = H / Hkv, F = c.d_ff, Nd = B * T * d;
    int32_t tok[B * T];
    random_tokens(tok, B * T, V);
    float *att1[8], *att2[8], *hid1[9], *hid2[9], *ao1[8], *ao2[8], *mo1[8], *mo2[8];
    float *mid[8], *q[8], *k[8], *vv[8], *z[8], *post[8];
    float *embed = falloc(Nd);
    for (int64_t i = 0; i < n; i++) {
        const int64_t W = T + sf_depth_cols(&c, i);
        att1[i] = falloc(B * H * T * W); att2[i] = falloc(B * H * T * W);
        ao1[i] = falloc(Nd); ao2[i] = falloc(Nd); mo1[i] = falloc(Nd); mo2[i] = falloc(Nd);
        mid[i] = falloc(Nd); q[i] = falloc(B * T * H * dh); z[i] = falloc(B * T * H * dh);
        k[i] = falloc(B * T * Hkv * dh); vv[i] = falloc(B * T * Hkv * dh); post[i] = falloc(B * T * F);
    }
    for (int64_t i = 0; i <= n; i++) { hid1[i] = falloc(Nd); hid2[i] = falloc(Nd); }
    sf_trace plain_tr = {att1, hid1, ao1, mo1, NULL, NULL, NULL, NULL};
    sf_trace act_tr = {att2, hid2, ao2, mo2, NULL, NULL, NULL, NULL, embed, mid, q, k, vv, z, post};
    float *l0 = falloc(B * T * V), *l1 = falloc(B * T * V), *l2 = falloc(B * T * V);
    char err[256] = "", what[200];
    forward_ok(m, tok, NULL, B, T, 1, 2, l0, NULL, v->name);
    sf_status st1 = forward(m, tok, NULL, NULL, B, T, 1, 2, l1, NULL, &plain_tr, err, sizeof err);
    sf_status st2 = forward(m, tok, NULL, NULL, B, T, 1, 2, l2, NULL, &act_tr, err, sizeof err);
    CHECK(st1 == SF_OK && st2 == SF_OK, "%s: traced forwards: %s", v->name, err);
    if (st1 == SF_OK && st2 == SF_OK) {
        snprintf(what, sizeof what, "%s: logits with activation traces vs none", v->name);
        CHECK_SAME(what, l0, l2, B * T * V);
        for (int64_t i = 0; i < n; i++) {
            snprintf(what, sizeof what, "%s: layer %lld recordings with vs without activations", v->name, (long long)i);
            CHECK_SAME(what, att1[i], att2[i], B * H * T * (T + sf_depth_cols(&c, i)));
            CHECK_SAME(what, ao1[i], ao2[i], Nd);
            CHECK_SAME(what, mo1[i], mo2[i], Nd);
            CHECK_SAME(what, hid1[i], hid2[i], Nd);
            CHECK(all_finite(q[i], B * T * H * dh) && all_finite(k[i], B * T * Hkv * dh) &&
                      all_finite(vv[i], B * T * Hkv * dh) && all_finite(post[i], B * T * F),
                  "%s: non-finite activations in layer %lld", v->name, (long long)i);
            /* z[t, h] = sum over the sequence columns s of P[h, t, s] v[s, h / G] (+ depth columns,
             * not checked here: MoDA variants compare the sequence part only when depth_mass is 0) */
            const int64_t W = T + sf_depth_cols(&c, i);
            double worst = 0.0;
            for (int64_t b = 0; b < B && sf_depth_cols(&c, i) == 0; b++)
                for (int64_t h = 0; h < H; h++)
                    for (int64_t t = 0; t < T; t++)
                        for (int64_t e = 0; e < dh; e++) {
                            double acc = 0.0;
                            for (int64_t s2 = 0; s2 < T; s2++)
                                acc += (double)att2[i][((b * H + h) * T + t) * W + s2] *
                                       vv[i][((b * T + s2) * Hkv + h / G) * dh + e];
                            double got = z[i][((b * T + t) * H + h) * dh + e];
                            if (fabs(got - acc) > worst) worst = fabs(got - acc);
                        }
            CHECK(worst < 1e-5, "%s: layer %lld: z differs from P v by %g", v->name, (long long)i, worst);
            if (c.residual == SF_RES_PLAIN && c.pre_norm) { /* resid_mid = resid_pre + attn_out, bitwise */
                float *x = fdup(hid2[i], Nd);
                sf_add(x, ao2[i], Nd, 1);
                snprintf(what, sizeof what, "%s: hidden_mid[%lld] = hidden[%lld] + attn_out", v->name, (long long)i, (long long)i);
                CHECK_SAME(what, x, mid[i], Nd);
                free(x);
            }
        }
        if (c.residual == SF_RES_PLAIN) {
            snprintf(what, sizeof what, "%s: embed = hidden[0] (plain)", v->name);
            CHECK_SAME(what, embed, hid2[0], Nd);
        }
    }
    for (int64_t i = 0; i < n; i++) {
        free(att1[i]); free(att2[i]); free(ao1[i]); free(ao2[i]); free(mo1[i]); free(mo2[i]);
        free(mid[i]); free(q[i]); free(k[i]); free(vv[i]); free(z[i]); free(post[i]);
    }
    for (int64_t i = 0; i <= n; i++) { free(hid1[i]); free(hid2[i]); }
    free(embed); free(l0); free(l1); free(l2);
    sf_model_free(m);
}

void test_trace_activations(void) {
    check_trace_activations(&(variant){"activations plain", v_plain});
    check_trace_activations(&(variant){"activations post rope gqa swiglu", v_post_rope_gqa_swiglu});
    check_trace_activations(&(variant){"activations attnres_full post", v_full_post});
    check_trace_activations(&(variant){"activations moda chunk 2 rope mqa", v_moda_c2_rope_mqa});
    check_trace_activations(&(variant){"activations moda + attnres_block S=3", v_moda_block3});
}

/* Larger model and sequence so the matmul, attention and AttnRes kernels really run threaded:
 * the forward pass is bitwise identical for 1 and 2 threads. */
void test_forward_threads(void) {
    static const variant vs[] = {{"wide plain", v_plain},
                                 {"wide moda chunk 2 + attnres_block S=3", v_moda_block3},
                                 {"wide attnres_full post", v_full_post}};
    enum { B = 2, T = 32 };
    for (size_t vi = 0; vi < sizeof vs / sizeof vs[0]; vi++) {
        sf_config c;
        sf_config_default(&c, 300, 64, 4, 2, 32);
        c.d_ff = 256;
        vs[vi].tweak(&c);
        sf_model *m = make_model(&c, 11, vs[vi].name);
        if (!m) continue;
        int32_t tok[B * T];
        random_tokens(tok, B * T, c.vocab_size);
        const int64_t NV = B * T * c.vocab_size;
        float *l1 = falloc(NV), *l2 = falloc(NV);
        for (int two_phase = 0; two_phase <= 1; two_phase++) {
            forward_ok(m, tok, NULL, B, T, two_phase, 1, l1, NULL, vs[vi].name);
            forward_ok(m, tok, NULL, B, T, two_phase, 2, l2, NULL, vs[vi].name);
            char what[128];
            snprintf(what, sizeof what, "%s two_phase=%d: threads 1 vs 2", vs[vi].name, two_phase);
            CHECK_SAME(what, l1, l2, NV);
            CHECK(all_finite(l1, NV), "%s: non-finite logits", vs[vi].name);
        }
        free(l1); free(l2);
        sf_model_free(m);
    }
}

/* Incremental decoding: feeding a sequence through a cache in pieces (prefill 4, then 1, 1, 3
 * positions) reproduces the logits of one full pass, for every causal variant. */
/* Cached decoding in pieces (4, 1, 1, 3 positions) equals one full pass, twice (the second
 * after sf_cache_reset), and a full cache refuses one more position (also used by
 * test_wirings.c). */
void check_cache_config(const sf_config *cfg, const char *name) {
    enum { B = 2, T = 9 };
    static const int64_t pieces[] = {4, 1, 1, 3};
    char err[256], what[200];
    const sf_config c = *cfg;
    const variant vv = {name, NULL}, *v = &vv;
    if (!c.causal) return;
    sf_model *m = make_model(&c, 4, v->name);
    if (!m) return;

    const int64_t V = c.vocab_size;
    int32_t tok[B * T], piece_tok[B * T];
    random_tokens(tok, B * T, V);
    float *full = falloc(B * T * V), *step = falloc(B * T * V);
    forward_ok(m, tok, NULL, B, T, 1, 1, full, NULL, v->name);
    sf_cache *cache = NULL;
    sf_status st = sf_cache_create(m, B, T, &cache, err, sizeof err);
    CHECK(st == SF_OK && cache, "%s: sf_cache_create: %s", v->name, err);
    if (!cache) { free(full); free(step); sf_model_free(m); return; }
    CHECK(sf_cache_batch(cache) == B && sf_cache_len(cache) == 0, "%s: new cache: batch %lld, len %lld",
          v->name, (long long)sf_cache_batch(cache), (long long)sf_cache_len(cache));
    for (int pass = 0; pass < 2; pass++) { /* the second pass after sf_cache_reset */
        int64_t pos = 0;
        for (size_t pi = 0; pi < sizeof pieces / sizeof pieces[0]; pi++) {
            const int64_t n = pieces[pi];
            for (int64_t b = 0; b < B; b++) memcpy(piece_tok + b * n, tok + b * T + pos, (size_t)n * sizeof(int32_t));
            sf_forward_args a = {.tokens = piece_tok, .B = B, .T = n, .attnres_two_phase = 1,
                                 .n_threads = 2, .cache = cache};
            err[0] = '\0';
            st = sf_forward(m, &a, step, NULL, NULL, err, sizeof err);
            CHECK(st == SF_OK, "%s: cached step at %lld: %s", v->name, (long long)pos, err);
            for (int64_t b = 0; st == SF_OK && b < B; b++) {
                snprintf(what, sizeof what, "%s: pass %d, positions %lld..%lld of batch row %lld, cached vs full",
                         v->name, pass, (long long)pos, (long long)(pos + n - 1), (long long)b);
                CHECK_CLOSE_F(what, step + b * n * V, full + (b * T + pos) * V, n * V, 1e-5, 1e-5);
            }
            pos += n;
            CHECK(sf_cache_len(cache) == pos, "%s: cache length %lld, want %lld", v->name,
                  (long long)sf_cache_len(cache), (long long)pos);
        }
        /* full: one more position does not fit, and the cache is left as it was */
        sf_forward_args a = {.tokens = tok, .B = B, .T = 1, .cache = cache};
        err[0] = '\0';
        st = sf_forward(m, &a, step, NULL, NULL, err, sizeof err);
        CHECK(st == SF_ERR_INVALID_ARG && err[0] && sf_cache_len(cache) == T,
              "%s: full cache: %s '%s', len %lld", v->name, sf_status_name(st), err,
              (long long)sf_cache_len(cache));
        sf_cache_reset(cache);
        CHECK(sf_cache_len(cache) == 0, "%s: reset cache length %lld", v->name, (long long)sf_cache_len(cache));
    }
    sf_cache_free(cache);
    free(full); free(step);
    sf_model_free(m);
}

void test_cache(void) {
    enum { B = 2, T = 9 };
    char err[256];
    for (int vi = 0; vi < N_VARIANTS; vi++) {
        const sf_config cv = small_config(&VARIANTS[vi]);
        check_cache_config(&cv, VARIANTS[vi].name);
    }

    /* what a cache refuses: a mask, a trace, another batch size, another model, a
     * bidirectional model, and sizes it cannot hold */
    const sf_config c = small_config(&VARIANTS[0]);
    sf_config bc = c;
    bc.causal = 0;
    sf_model *m = make_model(&c, 4, "cache errors"), *other = make_model(&c, 5, "cache errors"),
             *bidir = make_model(&bc, 4, "cache errors");
    sf_cache *cache = NULL, *bad = NULL;
    if (m && other && bidir && sf_cache_create(m, 2, 8, &cache, err, sizeof err) == SF_OK) {
        int32_t tok[2 * 8] = {0};
        uint8_t pad[2 * 8];
        memset(pad, 1, sizeof pad);
        float *logits = falloc(2 * 8 * c.vocab_size), *hidden[4]; /* n_layers + 1 */
        for (int i = 0; i < 4; i++) hidden[i] = falloc(2 * 8 * c.d_model);
        sf_trace tr = {.hidden = hidden};
        struct { const char *what; const sf_model *m; sf_forward_args a; sf_trace *tr; } cases[] = {
            {"with a key_padding_mask", m, {.tokens = tok, .key_padding_mask = pad, .B = 2, .T = 2, .cache = cache}, NULL},
            {"with a trace", m, {.tokens = tok, .B = 2, .T = 2, .cache = cache}, &tr},
            {"with another batch size", m, {.tokens = tok, .B = 1, .T = 2, .cache = cache}, NULL},
            {"with another model", other, {.tokens = tok, .B = 2, .T = 2, .cache = cache}, NULL},
            {"longer than the cache", m, {.tokens = tok, .B = 2, .T = 9, .cache = cache}, NULL},
        };
        for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
            err[0] = '\0';
            sf_status st = sf_forward(cases[i].m, &cases[i].a, logits, NULL, cases[i].tr, err, sizeof err);
            CHECK(st == SF_ERR_INVALID_ARG && err[0] && sf_cache_len(cache) == 0,
                  "cached forward %s: %s '%s', cache len %lld", cases[i].what, sf_status_name(st), err,
                  (long long)sf_cache_len(cache));
        }
        sf_status st = sf_cache_create(bidir, 2, 8, &bad, err, sizeof err);
        if (st == SF_OK) { /* creation may succeed; decoding a bidirectional model may not */
            sf_forward_args a = {.tokens = tok, .B = 2, .T = 1, .cache = bad};
            err[0] = '\0';
            st = sf_forward(bidir, &a, logits, NULL, NULL, err, sizeof err);
            CHECK(st == SF_ERR_INVALID_ARG && err[0], "cached forward of a bidirectional model: %s '%s'",
                  sf_status_name(st), err);
            sf_cache_free(bad);
            bad = NULL;
        }
        err[0] = '\0';
        st = sf_cache_create(m, 2, c.max_seq_len + 1, &bad, err, sizeof err);
        CHECK(st == SF_ERR_INVALID_ARG && !bad && err[0], "cache longer than max_seq_len: %s '%s'", sf_status_name(st), err);
        err[0] = '\0';
        st = sf_cache_create(m, 0, 4, &bad, err, sizeof err);
        CHECK(st == SF_ERR_INVALID_ARG && !bad && err[0], "cache with B = 0: %s '%s'", sf_status_name(st), err);
        for (int i = 0; i < 4; i++) free(hidden[i]);
        free(logits);
    } else {
        CHECK(0, "cache errors: setup failed: %s", err);
    }
    sf_cache_free(cache);
    sf_model_free(m); sf_model_free(other); sf_model_free(bidir);
}

/* Bad arguments return the right status with a message, never crash. */
void test_forward_errors(void) {
    sf_config c = small_config(&(variant){"plain", v_plain});
    sf_model *m = make_model(&c, 2, "errors");
    if (!m) return;
    enum { B = 2, T = 5 };
    const int64_t V = c.vocab_size, Tmax = c.max_seq_len;
    int32_t tok[2 * 16];
    random_tokens(tok, 2 * 16, V);
    float *logits = falloc(2 * 16 * V), *emb = falloc(B * T * c.d_model);
    fill(emb, B * T * c.d_model, -1.0f, 1.0f);
    char err[256];
    sf_status st;
#define EXPECT(want, call)                                                                        \
    do {                                                                                          \
        err[0] = '\0';                                                                            \
        st = (call);                                                                              \
        CHECK(st == (want) && err[0] != '\0', "%s: returned %s with message '%s', want %s",       \
              #call, sf_status_name(st), err, sf_status_name(want));                              \
    } while (0)

    int32_t saved = tok[7];
    tok[7] = (int32_t)V; /* one past the vocabulary */
    EXPECT(SF_ERR_TOKEN_RANGE, forward(m, tok, NULL, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    tok[7] = -1;
    EXPECT(SF_ERR_TOKEN_RANGE, forward(m, tok, NULL, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    tok[7] = saved;
    EXPECT(SF_ERR_INVALID_ARG, forward(m, tok, NULL, NULL, 1, Tmax + 1, 1, 1, logits, NULL, NULL, err, sizeof err));
    EXPECT(SF_ERR_INVALID_ARG, forward(m, tok, NULL, NULL, 0, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    EXPECT(SF_ERR_INVALID_ARG, forward(m, tok, NULL, NULL, B, 0, 1, 1, logits, NULL, NULL, err, sizeof err));
    EXPECT(SF_ERR_INVALID_ARG, forward(m, NULL, NULL, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    EXPECT(SF_ERR_INVALID_ARG, forward(m, tok, emb, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    EXPECT(SF_ERR_INVALID_ARG, forward(NULL, tok, NULL, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    emb[3] = NAN;
    EXPECT(SF_ERR_NONFINITE, forward(m, NULL, emb, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
    emb[3] = INFINITY;
    EXPECT(SF_ERR_NONFINITE, forward(m, NULL, emb, NULL, B, T, 1, 1, logits, NULL, NULL, err, sizeof err));
#undef EXPECT
    /* err may be NULL */
    tok[0] = -5;
    CHECK(forward(m, tok, NULL, NULL, B, T, 1, 1, logits, NULL, NULL, NULL, 0) == SF_ERR_TOKEN_RANGE,
          "bad token with err = NULL");
    tok[0] = 0;
    /* T = max_seq_len is fine, and nothing needs to be requested as output */
    CHECK(forward(m, tok, NULL, NULL, 2, Tmax, 1, 1, logits, NULL, NULL, err, sizeof err) == SF_OK,
          "T = max_seq_len: %s", err);
    CHECK(forward(m, tok, NULL, NULL, 2, Tmax, 1, 1, NULL, NULL, NULL, err, sizeof err) == SF_OK,
          "no outputs requested: %s", err);
    /* the default thread count (n_threads = 0) follows sf_set_num_threads */
    sf_set_num_threads(3);
    CHECK(sf_get_num_threads() == 3 && sf_threads_resolve(0) == 3 && sf_threads_resolve(2) == 2,
          "thread settings: %d %d", sf_get_num_threads(), sf_threads_resolve(0));
    sf_set_num_threads(0);
    CHECK(sf_get_num_threads() >= 1, "default threads %d", sf_get_num_threads());
    free(logits); free(emb);
    sf_model_free(m);
}

