/* The configuration: the field table (sf_config_fields.h) at run time, defaults, validation. */
#include "sf_internal.h"
#include "sf_kernels.h"

#include <math.h>
#include <string.h>

#include <stddef.h>

/* ---- the table at run time ------------------------------------------------------------------ */

static const sf_config_field fields[] = {
#define SF_FIELD(c_name, py_name, kind, def, lo, hi, choices, doc) \
    {#py_name, #c_name, SF_FIELD_##kind, (double)(def), (double)(lo), (double)(hi), choices, doc, offsetof(sf_config, c_name)},
#include "sf_config_fields.h"
#undef SF_FIELD
};
#define N_FIELDS ((int32_t)(sizeof fields / sizeof fields[0]))

int32_t sf_config_num_fields(void) { return N_FIELDS; }
const sf_config_field *sf_config_field_at(int32_t i) { return i >= 0 && i < N_FIELDS ? &fields[i] : NULL; }

void sf_config_default(sf_config *c, int64_t vocab_size, int64_t d_model, int64_t n_heads,
                       int64_t n_layers, int64_t max_seq_len) {
    memset(c, 0, sizeof *c);
#define SF_FIELD(c_name, py_name, kind, def, lo, hi, choices, doc) c->c_name = (SF_CTYPE_##kind)(def);
#include "sf_config_fields.h"
#undef SF_FIELD
    c->vocab_size = vocab_size;
    c->d_model = d_model;
    c->n_heads = n_heads;
    c->n_layers = n_layers;
    c->max_seq_len = max_seq_len;
    c->n_kv_heads = n_heads; /* the SF_DERIVED defaults */
    c->d_ff = 4 * d_model;
}

/* One field against its row of the table: the message names the field by its Python name. */
static sf_status check_field(const sf_config *c, const sf_config_field *f, char *err, size_t errlen) {
    const char *p = (const char *)c + f->offset;
    switch (f->kind) {
    case SF_FIELD_INT: {
        int64_t v;
        memcpy(&v, p, sizeof v);
        if ((double)v < f->lo || (double)v > f->hi)
            return sf_fail(err, errlen, SF_ERR_INVALID_CONFIG, "%s must be in [%.0f, %.0f], got %lld", f->name, f->lo, f->hi, (long long)v);
        return SF_OK;
    }
    case SF_FIELD_BOOL: {
        int32_t v;
        memcpy(&v, p, sizeof v);
        if (v != 0 && v != 1) return sf_fail(err, errlen, SF_ERR_INVALID_CONFIG, "%s must be 0 or 1, got %d", f->name, (int)v);
        return SF_OK;
    }
    case SF_FIELD_ENUM: {
        int32_t v;
        memcpy(&v, p, sizeof v);
        if (v < f->lo || v > f->hi)
            return sf_fail(err, errlen, SF_ERR_INVALID_CONFIG, "%s must be one of %s (got %d)", f->name, f->choices, (int)v);
        return SF_OK;
    }
    case SF_FIELD_REAL:
    case SF_FIELD_PROB: {
        float v;
        memcpy(&v, p, sizeof v);
        /* written so that NaN fails both */
        int ok = f->kind == SF_FIELD_REAL ? (v > f->lo && v < f->hi) : (v >= f->lo && v < f->hi);
        if (!ok)
            return sf_fail(err, errlen, SF_ERR_INVALID_CONFIG, "%s must be a float32 in %s%g, %g), got %g", f->name,
                           f->kind == SF_FIELD_REAL ? "(" : "[", f->lo, f->hi, (double)v);
        return SF_OK;
    }
    }
    return sf_fail(err, errlen, SF_ERR_INVALID_CONFIG, "%s has an unknown kind", f->name);
}

sf_status sf_config_validate(const sf_config *c, char *err, size_t errlen) {
#define REQ(cond, ...) \
    do { if (!(cond)) return sf_fail(err, errlen, SF_ERR_INVALID_CONFIG, __VA_ARGS__); } while (0)
    if (!c) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "config is NULL");
    for (int32_t i = 0; i < N_FIELDS; i++) {
        sf_status st = check_field(c, &fields[i], err, errlen);
        if (st != SF_OK) return st;
    }
    /* the rules between fields */
    REQ(c->n_heads <= c->d_model, "n_heads must be in [1, d_model=%lld], got %lld", (long long)c->d_model, (long long)c->n_heads);
    REQ(c->d_model % c->n_heads == 0, "d_model (%lld) must be divisible by n_heads (%lld)", (long long)c->d_model, (long long)c->n_heads);
    REQ(c->n_kv_heads <= c->n_heads, "n_kv_heads must be in [1, n_heads=%lld], got %lld", (long long)c->n_heads, (long long)c->n_kv_heads);
    REQ(c->n_heads % c->n_kv_heads == 0, "n_heads (%lld) must be divisible by n_kv_heads (%lld)", (long long)c->n_heads, (long long)c->n_kv_heads);
    if (c->pos == SF_POS_ROPE) {
        int64_t dh = c->d_model / c->n_heads;
        REQ(dh % 2 == 0, "pos='rope' needs an even head dimension, got d_model/n_heads = %lld", (long long)dh);
    }
    if (c->pos == SF_POS_SINUSOIDAL) REQ(c->d_model % 2 == 0, "pos='sinusoidal' needs an even d_model, got %lld", (long long)c->d_model);
    REQ(!c->moda_depth_only || c->moda, "moda_depth_only needs moda=True");
    REQ(c->residual != SF_RES_MHC || c->hc_expansion >= 2, "hc_expansion must be >= 2 for residual='mhc' (its H_pre init is 1/n with b = -log(n-1)), got %lld", (long long)c->hc_expansion);
    {
        const int ar = c->residual == SF_RES_ATTNRES_FULL || c->residual == SF_RES_ATTNRES_BLOCK;
        static const char *mix[] = {"softmax", "sigmoid", "static"};
        REQ(c->attnres_mixing == SF_MIX_SOFTMAX || ar, "attnres_mixing='%s' needs residual='attnres_full' or 'attnres_block'",
            mix[c->attnres_mixing]);
        REQ(c->attnres_key_norm || ar, "attnres_key_norm=False needs residual='attnres_full' or 'attnres_block'");
        REQ(c->attnres_query == SF_ARQ_STATIC || ar, "attnres_query='input' needs residual='attnres_full' or 'attnres_block'");
        REQ(c->attnres_window == 0 || ar, "attnres_window needs residual='attnres_full' or 'attnres_block'");
        REQ(c->attnres_heads == 1 || ar, "attnres_heads needs residual='attnres_full' or 'attnres_block'");
        /* static weights read no keys and no query: the key norm and the query have nothing to act on */
        REQ(c->attnres_mixing != SF_MIX_STATIC || !c->attnres_key_norm,
            "attnres_mixing='static' has no keys to normalise: set attnres_key_norm=False");
        REQ(c->attnres_mixing != SF_MIX_STATIC || c->attnres_query == SF_ARQ_STATIC,
            "attnres_mixing='static' reads no query: attnres_query='input' cannot be combined with it");
        REQ(c->attnres_heads <= c->d_model && c->d_model % c->attnres_heads == 0,
            "attnres_heads (%lld) must divide d_model (%lld)", (long long)c->attnres_heads, (long long)c->d_model);
    }
    REQ(c->moda_depth_kv == SF_DKV_ATTN_FFN || c->moda, "moda_depth_kv='%s' needs moda=True",
        c->moda_depth_kv == SF_DKV_ATTN ? "attn" : "attn+ffn+extra");
    REQ(c->moda_depth_rope == SF_DROPE_NONE || (c->moda && c->pos == SF_POS_ROPE),
        "moda_depth_rope='%s' needs moda=True and pos='rope' (otherwise nothing is rotated; leave it 'none')",
        c->moda_depth_rope == SF_DROPE_LEGACY ? "legacy" : "own");
    REQ(c->moda_chunk <= c->max_seq_len, "moda_chunk must be in [1, max_seq_len=%lld], got %lld", (long long)c->max_seq_len, (long long)c->moda_chunk);
    if (sf_config_num_params(c) < 0) return sf_fail(err, errlen, SF_ERR_OVERFLOW, "parameter count overflows 64 bits");
#undef REQ
    return SF_OK;
}
