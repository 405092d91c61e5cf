/* The configuration: defaults and validation. */
#include "sf_internal.h"
#include "sf_kernels.h"

#include <math.h>
#include <string.h>

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
