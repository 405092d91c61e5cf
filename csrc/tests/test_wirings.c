/* stackformer C tests: the depth wirings of csrc/wiring/ through the model API -- DenseFormer,
 * Hyper-Connections (static and dynamic) and mHC, alone and with MoDA, post-norm, RMSNorm,
 * RoPE, GQA, SwiGLU and bidirectional attention.
 *
 * What every wiring must have, checked here without Python:
 *   - the forward-pass properties of every config (test_model.c's check_forward_config:
 *     finite, logits = hidden . head^T, threads 1/2/3 bitwise, embeds = tokens, causality,
 *     padding) and cached decoding = one full pass (check_cache_config);
 *   - training: the same loss and gradient bits for 1 and 2 threads and with gradient
 *     checkpointing (the recomputed forward must be the stored one), finite gradients, and a
 *     nonzero gradient on every one of the wiring's own tensors once they are perturbed;
 *   - the init the papers prescribe: DenseFormer and Hyper-Connections start as the plain
 *     residual stack (the same logits as a plain model holding the same shared weights), and
 *     the wiring adds only its own tensors to the table.
 * The values against the papers' equations are the float64 reference's job
 * (tests/test_wirings_c.py); this file proves the C contract on its own. */
#include "check.h"

typedef struct { const char *name; void (*tweak)(sf_config *); } wiring_case;

static void w_dense(sf_config *c) { c->residual = SF_RES_DENSEFORMER; }
static void w_dense_dilated(sf_config *c) {
    c->residual = SF_RES_DENSEFORMER; c->denseformer_dilation = 2; c->denseformer_period = 2;
}
static void w_dense_post_rms_rope(sf_config *c) {
    c->residual = SF_RES_DENSEFORMER; c->pre_norm = 0; c->norm = SF_NORM_RMSNORM; c->pos = SF_POS_ROPE;
}
static void w_hc(sf_config *c) { c->residual = SF_RES_HYPER_CONNECTIONS; }
static void w_hc_dynamic_n2_gqa_swiglu(sf_config *c) {
    c->residual = SF_RES_HYPER_CONNECTIONS; c->hc_dynamic = 1; c->hc_expansion = 2;
    c->n_kv_heads = 2; c->act = SF_ACT_SWIGLU;
}
static void w_hc_dynamic_post_moda(sf_config *c) {
    c->residual = SF_RES_HYPER_CONNECTIONS; c->hc_dynamic = 1; c->pre_norm = 0; c->moda = 1;
}
static void w_mhc(sf_config *c) { c->residual = SF_RES_MHC; }
static void w_mhc_n2_it5_moda_rope(sf_config *c) {
    c->residual = SF_RES_MHC; c->hc_expansion = 2; c->mhc_sinkhorn_iters = 5;
    c->moda = 1; c->moda_chunk = 2; c->pos = SF_POS_ROPE;
}
static void w_mhc_bidir_untied(sf_config *c) {
    c->residual = SF_RES_MHC; c->causal = 0; c->tie_embeddings = 0; c->bias = 0;
}
static void w_dense_moda_bidir(sf_config *c) { c->residual = SF_RES_DENSEFORMER; c->moda = 1; c->causal = 0; }

static const wiring_case CASES[] = {
    {"denseformer", w_dense},
    {"denseformer dilation 2 period 2", w_dense_dilated},
    {"denseformer post rmsnorm rope", w_dense_post_rms_rope},
    {"denseformer + moda bidirectional", w_dense_moda_bidir},
    {"hyper_connections n=4 static", w_hc},
    {"hyper_connections n=2 dynamic gqa swiglu", w_hc_dynamic_n2_gqa_swiglu},
    {"hyper_connections dynamic post + moda", w_hc_dynamic_post_moda},
    {"mhc n=4", w_mhc},
    {"mhc n=2 5 iterations + moda chunk 2 rope", w_mhc_n2_it5_moda_rope},
    {"mhc bidirectional untied no-bias", w_mhc_bidir_untied},
};
enum { N_CASES = (int)(sizeof CASES / sizeof CASES[0]) };

/* V=37, d=32, 4 heads, 3 blocks (L = 6 sublayers), max_seq_len 12, d_ff 48 */
static sf_config case_config(const wiring_case *w) {
    sf_config c;
    sf_config_default(&c, 37, 32, 4, 3, 12);
    c.d_ff = 48;
    w->tweak(&c);
    return c;
}

static int is_wiring_tensor(const char *name) {
    return strstr(name, "_hc.") || strstr(name, "_mhc.") || strstr(name, ".dwa.");
}

/* forward_backward into `grads` (num_params floats); returns the status */
static sf_status train_pass(sf_model *m, const int32_t *tok, const int32_t *tgt, int64_t B, int64_t T,
                            int checkpoint, int nt, double *loss, float *grads, const char *label) {
    sf_train_args a = {.tokens = tok, .targets = tgt, .B = B, .T = T, .ignore_index = -100,
                       .checkpoint = checkpoint, .n_threads = nt};
    char err[256] = "";
    int64_t count = 0;
    sf_status st = sf_forward_backward(m, &a, loss, &count, err, sizeof err);
    CHECK(st == SF_OK, "%s: sf_forward_backward (checkpoint=%d, threads=%d): %s (%s)", label, checkpoint, nt,
          sf_status_name(st), err);
    CHECK(st != SF_OK || count == B * T, "%s: %lld counted targets, want %lld", label, (long long)count,
          (long long)(B * T));
    if (st == SF_OK) memcpy(grads, sf_model_grads(m), (size_t)sf_model_num_params(m) * sizeof(float));
    return st;
}

/* Loss and gradients: bitwise the same for 1 and 2 threads and with checkpointing; finite;
 * every wiring tensor gets a gradient. */
static void check_training(const sf_config *c, const char *name) {
    enum { B = 2, T = 9 };
    sf_model *m = make_model(c, 21, name);
    if (!m) return;
    const int64_t P = sf_model_num_params(m);
    int32_t tok[B * T], tgt[B * T];
    random_tokens(tok, B * T, c->vocab_size);
    random_tokens(tgt, B * T, c->vocab_size);
    float *g0 = falloc(P), *g1 = falloc(P);
    double l0 = 0.0, l1 = 0.0;
    char what[200];
    if (train_pass(m, tok, tgt, B, T, 0, 1, &l0, g0, name) == SF_OK) {
        CHECK(isfinite(l0) && all_finite(g0, P), "%s: non-finite loss %g or gradients", name, l0);
        static const struct { int checkpoint, nt; } runs[] = {{0, 2}, {1, 1}, {1, 2}};
        for (size_t r = 0; r < sizeof runs / sizeof runs[0]; r++) {
            if (train_pass(m, tok, tgt, B, T, runs[r].checkpoint, runs[r].nt, &l1, g1, name) != SF_OK) continue;
            CHECK(memcmp(&l0, &l1, sizeof l0) == 0, "%s: loss %.17g vs %.17g (checkpoint=%d, threads=%d)", name,
                  l0, l1, runs[r].checkpoint, runs[r].nt);
            snprintf(what, sizeof what, "%s: gradients, stored 1 thread vs checkpoint=%d threads=%d", name,
                     runs[r].checkpoint, runs[r].nt);
            CHECK_SAME(what, g0, g1, P);
        }
        int n_wiring = 0;
        for (int32_t i = 0; i < sf_model_num_tensors(m); i++) {
            const sf_tensor_info *t = sf_model_tensor(m, i);
            if (!is_wiring_tensor(t->name)) continue;
            n_wiring++;
            double s = 0.0;
            for (int64_t e = 0; e < t->numel; e++) s += fabs((double)g0[t->offset + e]);
            CHECK(s > 0.0, "%s: tensor %s gets no gradient", name, t->name);
        }
        CHECK(n_wiring > 0, "%s: no wiring tensors in the table", name);
    }
    free(g0); free(g1);
    sf_model_free(m);
}

/* At init, DenseFormer (identity depth weights) and Hyper-Connections (the papers' init, static
 * or with zero dynamic projections) compute the plain residual stack: given the plain model's
 * weights for every shared tensor, the logits agree to rounding (the wiring sums the same terms
 * through its own arithmetic). The table adds only tensors of the wiring's own.
 * One qualification (docs/WIRINGS.md, HC init): HC's output is the sum of its E equal copies,
 * and the final norm of E x is the norm of x with eps / E^2. At init the stream's variance is
 * ~4e-4, where eps = 1e-5 vs 1e-5/16 moves the logits by ~1%, so both models here run with
 * norm_eps = 1e-12, which removes eps from the comparison without hiding anything else. */
static void check_init_is_plain(const sf_config *cw, const char *name) {
    enum { B = 2, T = 9 };
    sf_config cc = *cw;
    cc.norm_eps = 1e-12f;
    const sf_config *c = &cc;
    sf_config pc = cc;
    pc.residual = SF_RES_PLAIN;
    char err[256] = "";
    sf_model *w = NULL, *p = NULL;
    sf_status s1 = sf_model_create(c, 3, &w, err, sizeof err);
    sf_status s2 = sf_model_create(&pc, 5, &p, err, sizeof err);
    CHECK(s1 == SF_OK && s2 == SF_OK, "%s: create: %s", name, err);
    if (s1 == SF_OK && s2 == SF_OK) {
        int shared = 0;
        for (int32_t i = 0; i < sf_model_num_tensors(w); i++) {
            const sf_tensor_info *t = sf_model_tensor(w, i);
            int32_t j = sf_model_find_tensor(p, t->name);
            if (j < 0) {
                CHECK(is_wiring_tensor(t->name), "%s: tensor %s is neither plain's nor the wiring's", name, t->name);
                continue;
            }
            const sf_tensor_info *u = sf_model_tensor(p, j);
            CHECK(u->numel == t->numel, "%s: tensor %s: %lld vs plain's %lld elements", name, t->name,
                  (long long)t->numel, (long long)u->numel);
            if (u->numel != t->numel) continue;
            memcpy(sf_model_params(w) + t->offset, sf_model_params(p) + u->offset, (size_t)t->numel * sizeof(float));
            shared++;
        }
        CHECK(shared == sf_model_num_tensors(p), "%s: %d of plain's %d tensors found", name, shared,
              (int)sf_model_num_tensors(p));
        int32_t tok[B * T];
        random_tokens(tok, B * T, c->vocab_size);
        const int64_t NV = B * T * c->vocab_size;
        float *lw = falloc(NV), *lp = falloc(NV);
        sf_forward_args a = {.tokens = tok, .B = B, .T = T, .attnres_two_phase = 1, .n_threads = 1};
        s1 = sf_forward(w, &a, lw, NULL, NULL, err, sizeof err);
        s2 = sf_forward(p, &a, lp, NULL, NULL, err, sizeof err);
        CHECK(s1 == SF_OK && s2 == SF_OK, "%s: forward: %s", name, err);
        char what[200];
        snprintf(what, sizeof what, "%s at init vs the plain stack with the same weights", name);
        if (s1 == SF_OK && s2 == SF_OK) CHECK_CLOSE_F(what, lw, lp, NV, 2e-5, 2e-5);
        free(lw); free(lp);
    }
    sf_model_free(w);
    sf_model_free(p);
}

/* Each wiring knob out of range is refused by validation, naming its field. */
static void check_refusals(void) {
    static const char *fields[] = {"hc_expansion", "mhc_sinkhorn_iters", "denseformer_dilation",
                                   "denseformer_period"};
    for (int i = 0; i < 4; i++) {
        sf_config c = case_config(&CASES[0]);
        if (i == 0) { c.residual = SF_RES_MHC; c.hc_expansion = 0; }
        if (i == 1) { c.residual = SF_RES_MHC; c.mhc_sinkhorn_iters = 0; }
        if (i == 2) c.denseformer_dilation = 0;
        if (i == 3) c.denseformer_period = 0;
        char err[256] = "";
        sf_status st = sf_config_validate(&c, err, sizeof err);
        CHECK(st != SF_OK && strstr(err, fields[i]), "bad %s: %s '%s'", fields[i], sf_status_name(st), err);
    }
}

void test_wirings(void) {
    for (int i = 0; i < N_CASES; i++) {
        const sf_config c = case_config(&CASES[i]);
        check_forward_config(&c, CASES[i].name);
        check_cache_config(&c, CASES[i].name);
        check_training(&c, CASES[i].name);
        if (c.residual != SF_RES_MHC && !c.moda && c.pre_norm) check_init_is_plain(&c, CASES[i].name);
    }
    check_refusals();
}
