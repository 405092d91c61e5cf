/* stackformer C tests: attention (incl. MoDA depth slots) and Attention Residuals aggregation vs double loops. See check.h for the framework; test_main.c runs them. */
#include "check.h"

/* ============================================================================================
 * 3. Attention (with MoDA depth slots) vs a direct double-precision implementation
 * ============================================================================================ */

/* Column col of query row (b, kv head g, position t) under the contract below: its float
 * offset into (k, v) when a sequence column, into (depth_k, depth_v) when a depth column
 * (returns 1 then), and the key position u it belongs to. */
static int naive_column(const sf_attn_args *a, int64_t b, int64_t g, int64_t t, int64_t col,
                        int64_t *off, int64_t *u) {
    const int64_t Tk = a->Tk, nd = a->n_read, C = a->chunk, dh = a->dh, Hkv = a->Hkv;
    if (col < Tk) {
        *u = col;
        *off = b * a->kv_bstride + (col * Hkv + g) * dh;
        return 0;
    }
    int64_t c = col - Tk, i = c % nd;
    *u = (t / C) * C + c / nd;
    *off = b * a->depth_bstride + ((g * a->n_slots + i) * a->depth_len + *u) * dh; /* (B, Hkv, n_slots, len, dh) */
    return 1;
}

/* The contract (sf_internal.h, DEVELOPERS.md "The math", moda_visibility in tests/reference.py):
 * query row (b, h, tq) sits at absolute position t = q_pos0 + tq and has Tk + n_read*chunk
 * columns; query head h reads kv head h / (H/Hkv).
 *   sequence column u < Tk: visible iff !(depth_only && n_read > 0), (!causal || u <= t), and
 *     key u is not padding;
 *   depth column c: slot i = c % n_read of position u = chunk_start(t) + c / n_read, visible iff
 *     u <= t and position u is not padding (a padded position exposes no keys at all).
 * logits q.k/sqrt(dh); one softmax over the visible columns; a row with nothing visible has
 * p = 0, output 0 and lse = -inf. depth_mass = sum of p over the depth columns. */
static void attention_naive(const sf_attn_args *a, const float *q, double *out, double *lse,
                            double *probs, double *depth_mass) {
    const int64_t B = a->B, Tq = a->Tq, Tk = a->Tk, H = a->H, Hkv = a->Hkv, dh = a->dh;
    const int64_t G = H / Hkv, nd = a->n_read, C = a->chunk, W = Tk + nd * C;
    const double scale = 1.0 / sqrt((double)dh);
    double *logit = dalloc(W);
    int *vis = xmalloc((size_t)W * sizeof(int));
    const float **keys = xmalloc((size_t)W * sizeof(float *));
    const float **vals = xmalloc((size_t)W * sizeof(float *));
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t tq = 0; tq < Tq; tq++) {
                const int64_t row = (b * H + h) * Tq + tq, g = h / G;
                const int64_t t = a->q_pos0 + tq;
                const float *qt = q + (b * Tq + tq) * H * dh + h * dh;
                double mx = -INFINITY;
                for (int64_t col = 0; col < W; col++) {
                    int64_t u, off;
                    const int depth = naive_column(a, b, g, t, col, &off, &u);
                    const float *kb = depth ? a->depth_k : a->k, *vb = depth ? a->depth_v : a->v;
                    vis[col] = depth ? u <= t : !(a->depth_only && nd > 0) && (!a->causal || u <= t);
                    if (vis[col] && a->key_padding_mask && !a->key_padding_mask[b * Tk + u]) vis[col] = 0;
                    if (!vis[col]) continue;
                    keys[col] = kb + off;
                    vals[col] = vb + off;
                    double s = 0.0;
                    for (int64_t e = 0; e < dh; e++) s += (double)qt[e] * keys[col][e];
                    logit[col] = s * scale;
                    if (logit[col] > mx) mx = logit[col];
                }
                double sum = 0.0;
                for (int64_t col = 0; col < W; col++) sum += vis[col] ? exp(logit[col] - mx) : 0.0;
                lse[row] = mx == -INFINITY ? -INFINITY : mx + log(sum);
                double *ot = out + (b * Tq + tq) * H * dh + h * dh, dmass = 0.0;
                for (int64_t e = 0; e < dh; e++) ot[e] = 0.0;
                for (int64_t col = 0; col < W; col++) {
                    double p = vis[col] ? exp(logit[col] - mx) / sum : 0.0;
                    probs[row * W + col] = p;
                    if (p == 0.0) continue;
                    if (col >= Tk) dmass += p;
                    for (int64_t e = 0; e < dh; e++) ot[e] += p * vals[col][e];
                }
                depth_mass[row] = dmass;
            }
    free(logit); free(vis); free(keys); free(vals);
}

/* Gradients of that contract in double, from the naive probabilities and output: with
 * D = dO . out and dS_c = p_c (dO . v_c - D) / sqrt(dh), dq += dS_c k_c, dk_c += dS_c q,
 * dv_c += p_c dO. dq, dk, dv (sequence keys) and ddk, ddv (arena-shaped) are overwritten. */
static void attention_naive_backward(const sf_attn_args *a, const float *q, const float *dout,
                                     const double *out, const double *probs, double *dq,
                                     double *dk, double *dv, double *ddk, double *ddv,
                                     int64_t arena) {
    const int64_t B = a->B, Tq = a->Tq, Tk = a->Tk, H = a->H, Hkv = a->Hkv, dh = a->dh;
    const int64_t G = H / Hkv, nd = a->n_read, C = a->chunk, W = Tk + nd * C;
    const double scale = 1.0 / sqrt((double)dh);
    memset(dq, 0, (size_t)(B * Tq * H * dh) * sizeof(double));
    memset(dk, 0, (size_t)(B * a->kv_bstride) * sizeof(double));
    memset(dv, 0, (size_t)(B * a->kv_bstride) * sizeof(double));
    memset(ddk, 0, (size_t)arena * sizeof(double));
    memset(ddv, 0, (size_t)arena * sizeof(double));
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t tq = 0; tq < Tq; tq++) {
                const int64_t row = (b * H + h) * Tq + tq, g = h / G;
                const int64_t t = a->q_pos0 + tq;
                const float *qt = q + (b * Tq + tq) * H * dh + h * dh;
                const float *go = dout + (b * Tq + tq) * H * dh + h * dh;
                const double *ot = out + (b * Tq + tq) * H * dh + h * dh;
                double *dqt = dq + (b * Tq + tq) * H * dh + h * dh, D = 0.0;
                for (int64_t e = 0; e < dh; e++) D += (double)go[e] * ot[e];
                for (int64_t col = 0; col < W; col++) {
                    const double p = probs[row * W + col];
                    if (p == 0.0) continue; /* invisible */
                    int64_t off, u;
                    const int depth = naive_column(a, b, g, t, col, &off, &u);
                    const float *kb = depth ? a->depth_k : a->k, *vb = depth ? a->depth_v : a->v;
                    double *gk = depth ? ddk : dk, *gv = depth ? ddv : dv;
                    double dpv = 0.0;
                    for (int64_t e = 0; e < dh; e++) dpv += (double)go[e] * vb[off + e];
                    const double ds = p * (dpv - D) * scale;
                    for (int64_t e = 0; e < dh; e++) {
                        dqt[e] += ds * kb[off + e];
                        gk[off + e] += ds * qt[e];
                        gv[off + e] += p * go[e];
                    }
                }
            }
}

typedef struct {
    int64_t B, T, H, Hkv, dh, n_slots;
    const uint8_t *mask;
    const char *mask_name;
} attn_shape;

/* Copy rows (B, T, row) into a buffer of capacity (B, cap, row), the layout of a cache. */
static float *to_capacity(const float *x, int64_t B, int64_t T, int64_t cap, int64_t row) {
    float *y = falloc(B * cap * row);
    fill(y, B * cap * row, 1e6f, 1e6f); /* never read: would show up in any output */
    for (int64_t b = 0; b < B; b++) memcpy(y + b * cap * row, x + b * T * row, (size_t)(T * row) * sizeof(float));
    return y;
}

/* One attention configuration over T queries and T keys: compare out / lse / probs /
 * depth_mass with the naive version and check the probability rows; then the same attention
 * evaluated for the last 2 queries only (q_pos0 = T-2) with keys, values and depth slots held
 * in larger cache-like buffers must reproduce those rows bit for bit. */
static void attention_case(const attn_shape *s, int causal, int64_t n_read, int64_t chunk,
                           int depth_only, int nt) {
    const int64_t B = s->B, T = s->T, H = s->H, Hkv = s->Hkv, dh = s->dh, ns = s->n_slots;
    const int64_t W = T + n_read * chunk, rows = B * H * T, qd = H * dh, kvd = Hkv * dh;
    const int64_t arena = B * T * ns * kvd;
    float *q = falloc(B * T * qd), *k = falloc(B * T * kvd), *v = falloc(B * T * kvd);
    float *dk = falloc(arena), *dv = falloc(arena);
    fill(q, B * T * qd, -2.0f, 2.0f); /* |q| ~ 1: peaked but not one-hot softmax rows */
    fill(k, B * T * kvd, -1.0f, 1.0f);
    fill(v, B * T * kvd, -1.0f, 1.0f);
    fill(dk, arena, -1.0f, 1.0f);
    fill(dv, arena, -1.0f, 1.0f);
    sf_attn_args a = {.B = B, .Tq = T, .Tk = T, .q_pos0 = 0, .H = H, .Hkv = Hkv, .dh = dh,
                      .causal = causal, .key_padding_mask = s->mask, .k = k, .v = v,
                      .kv_bstride = T * kvd, .depth_k = dk, .depth_v = dv,
                      .depth_bstride = T * ns * kvd, .depth_len = T, .n_slots = ns, .n_read = n_read,
                      .chunk = chunk, .depth_only = depth_only};

    float *out = falloc(B * T * qd), *out2 = falloc(B * T * qd), *lse = falloc(rows);
    float *probs = falloc(rows * W), *dmass = falloc(rows);
    float *scratch = falloc(sf_attention_scratch_floats(&a, nt));
    double *rout = dalloc(B * T * qd), *rlse = dalloc(rows), *rprobs = dalloc(rows * W);
    double *rdmass = dalloc(rows);
    sf_attention_forward(&a, q, out, lse, probs, dmass, scratch, nt);
    attention_naive(&a, q, rout, rlse, rprobs, rdmass);

    char what[200], sub[260];
    snprintf(what, sizeof what,
             "attention B=%lld T=%lld H=%lld Hkv=%lld dh=%lld causal=%d mask=%s n_read=%lld "
             "chunk=%lld depth_only=%d threads=%d",
             (long long)B, (long long)T, (long long)H, (long long)Hkv, (long long)dh, causal,
             s->mask_name, (long long)n_read, (long long)chunk, depth_only, nt);
    snprintf(sub, sizeof sub, "%s: out", what);
    CHECK_CLOSE(sub, out, rout, B * T * qd, 1e-5, 0.0);
    snprintf(sub, sizeof sub, "%s: probs", what);
    CHECK_CLOSE(sub, probs, rprobs, rows * W, 1e-6, 0.0);
    snprintf(sub, sizeof sub, "%s: depth_mass", what);
    CHECK_CLOSE(sub, dmass, rdmass, rows, 1e-6, 0.0);
    int64_t bad_lse = 0; /* finite rows close, empty rows exactly -inf */
    for (int64_t r = 0; r < rows; r++)
        bad_lse += isinf(rlse[r]) ? !(isinf(lse[r]) && lse[r] < 0) : !(fabs(lse[r] - rlse[r]) <= 1e-5 * (1.0 + fabs(rlse[r])));
    CHECK(bad_lse == 0, "%s: %lld wrong log-sum-exp values", what, (long long)bad_lse);

    /* each row: invisible columns exactly 0; visible ones sum to 1, or the row is all zeros
     * (output exactly 0) when nothing is visible */
    int64_t leaked = 0, bad_sum = 0, empty_not_zero = 0;
    for (int64_t r = 0; r < rows; r++) {
        double sum = 0.0;
        int any = 0;
        for (int64_t c = 0; c < W; c++) {
            if (rprobs[r * W + c] == 0.0 && probs[r * W + c] != 0.0) leaked++;
            sum += probs[r * W + c];
            any |= rprobs[r * W + c] != 0.0;
        }
        if (any && fabs(sum - 1.0) > 1e-5) bad_sum++;
        if (!any) {
            int64_t b = r / (H * T), h = (r / T) % H, t = r % T;
            const float *ot = out + (b * T + t) * qd + h * dh;
            for (int64_t e = 0; e < dh; e++) empty_not_zero += ot[e] != 0.0f;
            empty_not_zero += dmass[r] != 0.0f || sum != 0.0;
        }
    }
    CHECK(leaked == 0, "%s: %lld invisible columns got probability", what, (long long)leaked);
    CHECK(bad_sum == 0, "%s: %lld rows whose probabilities do not sum to 1", what, (long long)bad_sum);
    CHECK(empty_not_zero == 0, "%s: %lld nonzero values in rows with nothing visible", what,
          (long long)empty_not_zero);

    /* recordings are optional and never change the output */
    sf_attention_forward(&a, q, out2, NULL, NULL, NULL, scratch, nt);
    snprintf(sub, sizeof sub, "%s: out without recordings", what);
    CHECK_SAME(sub, out, out2, B * T * qd);
    if (nt != 1) { /* every row is computed by one thread: identical for any thread count */
        float *s1 = falloc(sf_attention_scratch_floats(&a, 1));
        sf_attention_forward(&a, q, out2, NULL, NULL, NULL, s1, 1);
        snprintf(sub, sizeof sub, "%s: threads %d vs 1", what, nt);
        CHECK_SAME(sub, out, out2, B * T * qd);
        free(s1);
    }

    /* the last Tq = 2 queries alone, keys/values/depth slots in buffers of capacity T + 3 */
    if (T >= 2) {
        const int64_t Tq = 2, cap = T + 3;
        float *qd_rows = falloc(B * Tq * qd);
        for (int64_t b = 0; b < B; b++)
            memcpy(qd_rows + b * Tq * qd, q + (b * T + T - Tq) * qd, (size_t)(Tq * qd) * sizeof(float));
        float *kc = to_capacity(k, B, T, cap, kvd), *vc = to_capacity(v, B, T, cap, kvd);
        /* depth arenas are (B, Hkv, n_slots, len, dh): B*Hkv*n_slots runs of T positions */
        float *dkc = to_capacity(dk, B * Hkv * ns, T, cap, dh), *dvc = to_capacity(dv, B * Hkv * ns, T, cap, dh);
        sf_attn_args a2 = a;
        a2.Tq = Tq;
        a2.q_pos0 = T - Tq;
        a2.k = kc; a2.v = vc; a2.kv_bstride = cap * kvd;
        a2.depth_k = dkc; a2.depth_v = dvc; a2.depth_bstride = cap * ns * kvd; a2.depth_len = cap;
        float *o2 = falloc(B * Tq * qd), *p2 = falloc(B * H * Tq * W), *l2 = falloc(B * H * Tq);
        float *sc2 = falloc(sf_attention_scratch_floats(&a2, nt));
        sf_attention_forward(&a2, qd_rows, o2, l2, p2, NULL, sc2, nt);
        int64_t diff = 0;
        for (int64_t b = 0; b < B; b++) {
            diff += first_difference(o2 + b * Tq * qd, out + (b * T + T - Tq) * qd, Tq * qd) >= 0;
            for (int64_t h = 0; h < H; h++) {
                const int64_t r2 = (b * H + h) * Tq, r1 = (b * H + h) * T + T - Tq;
                diff += first_difference(p2 + r2 * W, probs + r1 * W, Tq * W) >= 0;
                diff += first_difference(l2 + r2, lse + r1, Tq) >= 0;
            }
        }
        CHECK(diff == 0, "%s: last 2 queries at q_pos0 = T-2 from cache-sized buffers differ from "
              "the full pass in %lld (batch, head) blocks", what, (long long)diff);
        free(qd_rows); free(kc); free(vc); free(dkc); free(dvc); free(o2); free(p2); free(l2); free(sc2);
    }
    /* backward against the naive gradients, and identical for any thread count */
    {
        float *dout = falloc(B * T * qd), *gq = falloc(B * T * qd), *gk = falloc(B * T * kvd);
        float *gv = falloc(B * T * kvd), *gdk = falloc(arena), *gdv = falloc(arena);
        double *rq = dalloc(B * T * qd), *rk = dalloc(B * T * kvd), *rv = dalloc(B * T * kvd);
        double *rdk = dalloc(arena), *rdv = dalloc(arena);
        fill(dout, B * T * qd, -1.0f, 1.0f);
        fill(gq, B * T * qd, 7.0f, 7.0f); /* overwritten */
        fill(gk, B * T * kvd, 7.0f, 7.0f);
        fill(gv, B * T * kvd, 7.0f, 7.0f);
        memset(gdk, 0, (size_t)arena * sizeof(float)); /* accumulated */
        memset(gdv, 0, (size_t)arena * sizeof(float));
        sf_attention_backward(&a, q, out, dout, lse, gq, gk, gv, gdk, gdv, scratch, nt);
        attention_naive_backward(&a, q, dout, rout, rprobs, rq, rk, rv, rdk, rdv, arena);
        snprintf(sub, sizeof sub, "%s: backward dq", what);
        CHECK_CLOSE(sub, gq, rq, B * T * qd, 3e-5, 1e-4);
        snprintf(sub, sizeof sub, "%s: backward dk", what);
        CHECK_CLOSE(sub, gk, rk, B * T * kvd, 3e-5, 1e-4);
        snprintf(sub, sizeof sub, "%s: backward dv", what);
        CHECK_CLOSE(sub, gv, rv, B * T * kvd, 3e-5, 1e-4);
        snprintf(sub, sizeof sub, "%s: backward d(depth k)", what);
        CHECK_CLOSE(sub, gdk, rdk, arena, 3e-5, 1e-4);
        snprintf(sub, sizeof sub, "%s: backward d(depth v)", what);
        CHECK_CLOSE(sub, gdv, rdv, arena, 3e-5, 1e-4);
        if (nt != 1) {
            float *s1 = falloc(sf_attention_scratch_floats(&a, 1));
            float *q1 = falloc(B * T * qd), *k1 = falloc(B * T * kvd), *v1 = falloc(B * T * kvd);
            float *dk1 = falloc(arena), *dv1 = falloc(arena);
            memset(dk1, 0, (size_t)arena * sizeof(float));
            memset(dv1, 0, (size_t)arena * sizeof(float));
            sf_attention_backward(&a, q, out, dout, lse, q1, k1, v1, dk1, dv1, s1, 1);
            snprintf(sub, sizeof sub, "%s: backward threads %d vs 1", what, nt);
            CHECK_SAME(sub, gq, q1, B * T * qd);
            CHECK_SAME(sub, gk, k1, B * T * kvd);
            CHECK_SAME(sub, gv, v1, B * T * kvd);
            CHECK_SAME(sub, gdk, dk1, arena);
            CHECK_SAME(sub, gdv, dv1, arena);
            free(s1); free(q1); free(k1); free(v1); free(dk1); free(dv1);
        }
        free(dout); free(gq); free(gk); free(gv); free(gdk); free(gdv);
        free(rq); free(rk); free(rv); free(rdk); free(rdv);
    }
    free(q); free(k); free(v); free(dk); free(dv); free(out); free(out2); free(lse); free(probs);
    free(dmass); free(scratch); free(rout); free(rlse); free(rprobs); free(rdmass);
}

void test_attention(void) {
    enum { B = 2, T = 7 };
    /* holes: b0 pads keys 1 and 4, b1 pads key 0 (a causal query 0 sees no sequence key) and 6;
     * empty_row: b0 pads key 3, b1 is padding throughout (every row of b1 sees nothing) */
    static const uint8_t holes[B * T] = {1, 0, 1, 1, 0, 1, 1, /**/ 0, 1, 1, 1, 1, 1, 0};
    static const uint8_t empty_row[B * T] = {1, 1, 1, 0, 1, 1, 1, /**/ 0, 0, 0, 0, 0, 0, 0};
    struct { const uint8_t *mask; const char *name; } masks[] = {
        {NULL, "none"}, {holes, "holes"}, {empty_row, "empty_row"}};
    /* (n_read, chunk, depth_only): plain attention, depth_only without slots (= plain), and
     * depth slots read by chunk 1 / 2 / 3 (T = 7: the last chunk is short) */
    struct { int64_t n_read, chunk; int depth_only; } moda[] = {
        {0, 1, 0}, {0, 1, 1}, {3, 1, 0}, {3, 2, 0}, {3, 3, 0}, {3, 1, 1}, {3, 2, 1}};
    static const int64_t kv_heads[] = {4, 2, 1}; /* MHA, GQA, MQA */
    for (int hi = 0; hi < 3; hi++)
        for (int causal = 0; causal <= 1; causal++)
            for (int mi = 0; mi < 3; mi++)
                for (size_t di = 0; di < sizeof moda / sizeof moda[0]; di++) {
                    /* n_slots = 5 > n_read: slots are strided by n_slots, not n_read */
                    attn_shape s = {B, T, 4, kv_heads[hi], 8, 5, masks[mi].mask, masks[mi].name};
                    attention_case(&s, causal, moda[di].n_read, moda[di].chunk, moda[di].depth_only,
                                   1 + (int)(di % 2));
                }
    /* big enough for the threaded path */
    uint8_t big_mask[2 * 40];
    for (int i = 0; i < 80; i++) big_mask[i] = (i % 7) != 3;
    attn_shape big = {2, 40, 4, 2, 16, 4, big_mask, "every 7th"};
    attention_case(&big, 1, 4, 2, 0, 3);
    attention_case(&big, 0, 4, 3, 0, 3);
    attn_shape big_nomask = {2, 40, 4, 2, 16, 4, NULL, "none"};
    attention_case(&big_nomask, 1, 0, 1, 0, 3);
    /* several 48-row query blocks, key tiles past 16 columns, d_head not a multiple of 16 */
    uint8_t long_mask[2 * 100];
    for (int i = 0; i < 200; i++) long_mask[i] = (i % 11) != 5 && i < 190;
    attn_shape lng = {2, 100, 4, 2, 24, 4, long_mask, "every 11th + tail"};
    attention_case(&lng, 1, 4, 1, 0, 2);
    attention_case(&lng, 0, 4, 2, 0, 2);
    attention_case(&lng, 1, 0, 1, 0, 1);
    attn_shape lng_nomask = {1, 97, 4, 4, 32, 2, NULL, "none"};
    attention_case(&lng_nomask, 1, 2, 3, 0, 2);
    attention_case(&lng_nomask, 1, 2, 1, 1, 3);
    /* a single position */
    attn_shape one = {1, 1, 4, 2, 8, 2, NULL, "none"};
    attention_case(&one, 1, 2, 1, 0, 1);
}

/* ============================================================================================
 * 4. Attention Residuals: aggregation and the two-phase Block schedule
 * ============================================================================================ */

/* h = sum_i alpha_i src_i, alpha = softmax_i((q ⊙ g) . src_i * inv_rms_i), per token. */
static void attnres_naive(double *h, double *alpha, const float *const *src,
                          const float *const *inv_rms, int64_t nsrc, const float *q,
                          const float *g, int64_t N, int64_t d) {
    double *s = dalloc(nsrc);
    for (int64_t n = 0; n < N; n++) {
        double mx = -INFINITY, sum = 0.0;
        for (int64_t i = 0; i < nsrc; i++) {
            double dot = 0.0;
            for (int64_t j = 0; j < d; j++) dot += (double)q[j] * g[j] * src[i][n * d + j];
            s[i] = dot * inv_rms[i][n];
            if (s[i] > mx) mx = s[i];
        }
        for (int64_t i = 0; i < nsrc; i++) sum += exp(s[i] - mx);
        for (int64_t j = 0; j < d; j++) h[n * d + j] = 0.0;
        for (int64_t i = 0; i < nsrc; i++) {
            double al = exp(s[i] - mx) / sum;
            alpha[n * nsrc + i] = al;
            for (int64_t j = 0; j < d; j++) h[n * d + j] += al * src[i][n * d + j];
        }
    }
    free(s);
}

/* nsrc sources (N, d), source i scaled by (i + 1) / 2 so the RMS normalization matters */
static float **make_sources(int64_t nsrc, int64_t N, int64_t d) {
    float **src = xmalloc((size_t)(nsrc + 1) * sizeof(float *));
    for (int64_t i = 0; i < nsrc; i++) {
        src[i] = falloc(N * d);
        float sc = 0.5f * (float)(i + 1);
        fill(src[i], N * d, -sc, sc);
    }
    return src;
}
static void free_sources(float **src, int64_t nsrc) {
    for (int64_t i = 0; i < nsrc; i++) free(src[i]);
    free(src);
}

static void attnres_aggregate_case(int64_t nsrc, int64_t N, int64_t d, int nt) {
    const float eps = 1e-6f;
    float **src = make_sources(nsrc, N, d), **irms = xmalloc((size_t)nsrc * sizeof(float *));
    float *q = falloc(d), *g = falloc(d);
    fill(q, d, -1.0f, 1.0f);
    fill(g, d, 0.5f, 1.5f);
    char what[160], sub[220];
    snprintf(what, sizeof what, "attnres nsrc=%lld N=%lld d=%lld threads=%d", (long long)nsrc,
             (long long)N, (long long)d, nt);
    /* inv_rms = 1/sqrt(mean(x^2) + eps) per token */
    double *rir = dalloc(N);
    for (int64_t i = 0; i < nsrc; i++) {
        irms[i] = falloc(N);
        sf_attnres_inv_rms(irms[i], src[i], N, d, eps, nt);
        for (int64_t n = 0; n < N; n++) {
            double ss = 0.0;
            for (int64_t j = 0; j < d; j++) ss += (double)src[i][n * d + j] * src[i][n * d + j];
            rir[n] = 1.0 / sqrt(ss / (double)d + eps);
        }
        snprintf(sub, sizeof sub, "%s: inv_rms of source %lld", what, (long long)i);
        CHECK_CLOSE(sub, irms[i], rir, N, 0.0, 1e-6);
    }
    float *h = falloc(N * d), *h2 = falloc(N * d), *alpha = falloc(N * nsrc);
    float *scratch = falloc(sf_attnres_scratch_floats(nsrc, d, nt));
    double *rh = dalloc(N * d), *ralpha = dalloc(N * nsrc);
    const float *const *csrc = (const float *const *)src, *const *cirms = (const float *const *)irms;
    sf_attnres_aggregate(h, alpha, csrc, cirms, nsrc, q, g, N, d, scratch, nt);
    attnres_naive(rh, ralpha, csrc, cirms, nsrc, q, g, N, d);
    snprintf(sub, sizeof sub, "%s: h", what);
    CHECK_CLOSE(sub, h, rh, N * d, 1e-5, 1e-5);
    snprintf(sub, sizeof sub, "%s: alpha", what);
    CHECK_CLOSE(sub, alpha, ralpha, N * nsrc, 1e-6, 1e-5);
    int64_t bad_rows = 0;
    for (int64_t n = 0; n < N; n++) {
        double s = 0.0;
        for (int64_t i = 0; i < nsrc; i++) s += alpha[n * nsrc + i];
        bad_rows += fabs(s - 1.0) > 1e-5;
    }
    CHECK(bad_rows == 0, "%s: %lld alpha rows do not sum to 1", what, (long long)bad_rows);
    /* alpha_out is optional, and every token is computed by one thread */
    float *s1 = falloc(sf_attnres_scratch_floats(nsrc, d, 1));
    sf_attnres_aggregate(h2, NULL, csrc, cirms, nsrc, q, g, N, d, s1, 1);
    snprintf(sub, sizeof sub, "%s: no alpha_out, 1 thread", what);
    CHECK_SAME(sub, h, h2, N * d);
    for (int64_t i = 0; i < nsrc; i++) free(irms[i]);
    free(irms); free(s1); free_sources(src, nsrc); free(q); free(g); free(rir); free(h); free(h2);
    free(alpha); free(scratch); free(rh); free(ralpha);
}

/* Phase 1 (online softmax over the completed blocks, all nq queries at once) followed by phase 2
 * (merge in the running partial sum, or nothing) must equal the direct aggregation over
 * [sources..., partial] with that query. */
static void attnres_two_phase_case(int64_t nsrc, int64_t nq, int64_t N, int64_t d, int nt) {
    const float eps = 1e-6f;
    float **src = make_sources(nsrc + 1, N, d); /* src[nsrc] is the partial */
    float **irms = xmalloc((size_t)(nsrc + 1) * sizeof(float *));
    for (int64_t i = 0; i <= nsrc; i++) {
        irms[i] = falloc(N);
        sf_attnres_inv_rms(irms[i], src[i], N, d, eps, 1);
    }
    const float *const *csrc = (const float *const *)src, *const *cirms = (const float *const *)irms;
    float *qg = falloc(nq * d), *ones = falloc(d);
    fill(qg, nq * d, -1.5f, 1.5f);
    for (int64_t j = 0; j < d; j++) ones[j] = 1.0f;

    float *m = falloc(nq * N), *l = falloc(nq * N), *o = falloc(nq * N * d);
    float *logits = falloc(nq * N * nsrc);
    float *m2 = falloc(nq * N), *l2 = falloc(nq * N), *o2 = falloc(nq * N * d);
    sf_attnres_phase1(m, l, o, logits, csrc, cirms, nsrc, qg, nq, N, d, nt);
    sf_attnres_phase1(m2, l2, o2, NULL, csrc, cirms, nsrc, qg, nq, N, d, 1);
    char what[160], sub[240];
    snprintf(what, sizeof what, "attnres two-phase nsrc=%lld nq=%lld N=%lld d=%lld threads=%d",
             (long long)nsrc, (long long)nq, (long long)N, (long long)d, nt);
    snprintf(sub, sizeof sub, "%s: phase-1 state without logits / 1 thread", what);
    CHECK_SAME(sub, m, m2, nq * N);
    CHECK_SAME(sub, l, l2, nq * N);
    CHECK_SAME(sub, o, o2, nq * N * d);

    float *h = falloc(N * d), *hd = falloc(N * d), *h2 = falloc(N * d);
    float *alpha = falloc(N * (nsrc + 1)), *alpha_d = falloc(N * (nsrc + 1));
    float *scratch = falloc(sf_attnres_scratch_floats(nsrc + 1, d, 1));
    double *rh = dalloc(N * d), *ralpha = dalloc(N * (nsrc + 1));
    for (int64_t j = 0; j < nq; j++)
        for (int with_partial = 0; with_partial <= 1; with_partial++) {
            int64_t na = nsrc + with_partial;
            const float *partial = with_partial ? src[nsrc] : NULL;
            const float *pirms = with_partial ? irms[nsrc] : NULL;
            sf_attnres_phase2(h, alpha, m + j * N, l + j * N, o + j * N * d, logits + j * N * nsrc,
                              nsrc, partial, pirms, qg + j * d, N, d, nt);
            /* direct: q = qg_j with unit gains (q ⊙ 1 is exact) over [sources..., partial] */
            sf_attnres_aggregate(hd, alpha_d, csrc, cirms, na, qg + j * d, ones, N, d, scratch, 1);
            attnres_naive(rh, ralpha, csrc, cirms, na, qg + j * d, ones, N, d);
            snprintf(sub, sizeof sub, "%s: query %lld partial=%d: h vs direct aggregate", what,
                     (long long)j, with_partial);
            CHECK_CLOSE_F(sub, h, hd, N * d, 1e-6, 1e-6);
            snprintf(sub, sizeof sub, "%s: query %lld partial=%d: alpha vs direct aggregate", what,
                     (long long)j, with_partial);
            CHECK_CLOSE_F(sub, alpha, alpha_d, N * na, 1e-6, 1e-6);
            snprintf(sub, sizeof sub, "%s: query %lld partial=%d: h vs naive", what, (long long)j,
                     with_partial);
            CHECK_CLOSE(sub, h, rh, N * d, 1e-5, 1e-5);
            snprintf(sub, sizeof sub, "%s: query %lld partial=%d: alpha vs naive", what,
                     (long long)j, with_partial);
            CHECK_CLOSE(sub, alpha, ralpha, N * na, 1e-6, 1e-5);
            /* without the alpha recording (and so without logits) h is unchanged */
            sf_attnres_phase2(h2, NULL, m + j * N, l + j * N, o + j * N * d, NULL, nsrc, partial,
                              pirms, qg + j * d, N, d, 1);
            snprintf(sub, sizeof sub, "%s: query %lld partial=%d: without alpha", what,
                     (long long)j, with_partial);
            CHECK_SAME(sub, h, h2, N * d);
        }
    for (int64_t i = 0; i <= nsrc; i++) free(irms[i]);
    free(irms); free_sources(src, nsrc + 1); free(qg); free(ones); free(m); free(l); free(o);
    free(logits); free(m2); free(l2); free(o2); free(h); free(hd); free(h2); free(alpha);
    free(alpha_d); free(scratch); free(rh); free(ralpha);
}

/* sf_attnres_sources_backward against the formula in double: per token, source x (r its
 * inv_rms) and reader j (weight a, input gradient g, S_j, qg_j):
 *   ds = a (g·x − S);  dx += a g + ds r (qg − (qg·x) r² x / d);  e_j += ds r x.
 * Sizes cover partial token tiles, d with and without a vector-chunk tail, more readers than
 * one group, several sources with accumulate (Block), and threads (dx and the lanes' e
 * partials the same bits for any count). */
static void attnres_backward_case(int64_t nsrc, int64_t nr, int64_t N, int64_t d, int accumulate,
                                  int nt) {
    const int64_t col0 = 1, ld = col0 + nsrc + 1; /* the sources sit at columns col0.. of alpha */
    float **src = make_sources(nsrc, N, d), **irms = xmalloc((size_t)nsrc * sizeof(float *));
    float **dsrc = xmalloc((size_t)nsrc * sizeof(float *)), **dsrc1 = xmalloc((size_t)nsrc * sizeof(float *));
    float *dh = falloc(nr * N * d), *alpha = falloc(nr * N * ld), *S = falloc(nr * N);
    float *qg = falloc(nr * d), *e = falloc(SF_AR_LANES * nr * d), *e1 = falloc(SF_AR_LANES * nr * d);
    fill(dh, nr * N * d, -1.0f, 1.0f);
    fill(alpha, nr * N * ld, 0.05f, 1.0f);
    fill(S, nr * N, -1.0f, 1.0f);
    fill(qg, nr * d, -1.0f, 1.0f);
    float *init = falloc(N * d);
    fill(init, N * d, -0.5f, 0.5f);
    for (int64_t i = 0; i < nsrc; i++) {
        irms[i] = falloc(N);
        sf_attnres_inv_rms(irms[i], src[i], N, d, 1e-6f, 1);
        dsrc[i] = falloc(N * d);
        dsrc1[i] = falloc(N * d);
        memcpy(dsrc[i], init, (size_t)(N * d) * sizeof(float)); /* overwritten unless accumulate */
        memcpy(dsrc1[i], init, (size_t)(N * d) * sizeof(float));
    }
    sf_attnres_reader *rd = xmalloc((size_t)nr * sizeof *rd), *rd1 = xmalloc((size_t)nr * sizeof *rd1);
    for (int64_t j = 0; j < nr; j++) {
        rd[j] = (sf_attnres_reader){.dh = dh + j * N * d, .alpha = alpha + j * N * ld, .ld = ld,
                                    .S = S + j * N, .qg = qg + j * d, .e = e + j * d};
        rd1[j] = rd[j];
        rd1[j].e = e1 + j * d;
    }
    memset(e, 0, (size_t)(SF_AR_LANES * nr * d) * sizeof(float));
    memset(e1, 0, (size_t)(SF_AR_LANES * nr * d) * sizeof(float));
    const float *const *csrc = (const float *const *)src, *const *cirms = (const float *const *)irms;
    sf_attnres_sources_backward(dsrc, csrc, cirms, nsrc, col0, accumulate, rd, nr, nr * d, N, d, 1, nt);
    sf_attnres_sources_backward(dsrc1, csrc, cirms, nsrc, col0, accumulate, rd1, nr, nr * d, N, d, 1, 1);

    double *rdx = dalloc(N * d), *re = dalloc(nr * d);
    for (int64_t k = 0; k < nr * d; k++) re[k] = 0.0;
    char what[200], sub[260];
    snprintf(what, sizeof what, "attnres backward nsrc=%lld readers=%lld N=%lld d=%lld acc=%d threads=%d",
             (long long)nsrc, (long long)nr, (long long)N, (long long)d, accumulate, nt);
    for (int64_t i = 0; i < nsrc; i++) {
        double top = 0.0;
        for (int64_t n = 0; n < N; n++) {
            const float *x = src[i] + n * d;
            double r = irms[i][n];
            double *dx = rdx + n * d;
            for (int64_t k = 0; k < d; k++) dx[k] = accumulate ? init[n * d + k] : 0.0;
            for (int64_t j = 0; j < nr; j++) {
                const float *g = dh + (j * N + n) * d, *q = qg + j * d;
                double a = alpha[(j * N + n) * ld + col0 + i], gx = 0.0, qx = 0.0;
                for (int64_t k = 0; k < d; k++) { gx += (double)g[k] * x[k]; qx += (double)q[k] * x[k]; }
                double ds = a * (gx - S[j * N + n]);
                for (int64_t k = 0; k < d; k++) {
                    dx[k] += a * g[k] + ds * r * (q[k] - qx * r * r * x[k] / (double)d);
                    re[j * d + k] += ds * r * x[k];
                }
            }
            for (int64_t k = 0; k < d; k++) top = fmax(top, fabs(dx[k]));
        }
        snprintf(sub, sizeof sub, "%s: d src %lld", what, (long long)i);
        CHECK_CLOSE(sub, dsrc[i], rdx, N * d, 1e-5 * (1.0 + top), 1e-5);
        snprintf(sub, sizeof sub, "%s: d src %lld vs 1 thread", what, (long long)i);
        CHECK_SAME(sub, dsrc[i], dsrc1[i], N * d);
    }
    snprintf(sub, sizeof sub, "%s: e lanes vs 1 thread", what);
    CHECK_SAME(sub, e, e1, SF_AR_LANES * nr * d);
    for (int t = 1; t < SF_AR_LANES; t++) /* lane partials, summed in lane order */
        for (int64_t k = 0; k < nr * d; k++) e[k] += e[t * nr * d + k];
    double etop = 0.0;
    for (int64_t k = 0; k < nr * d; k++) etop = fmax(etop, fabs(re[k]));
    snprintf(sub, sizeof sub, "%s: e", what);
    CHECK_CLOSE(sub, e, re, nr * d, 1e-5 * (1.0 + etop), 1e-5);
    for (int64_t i = 0; i < nsrc; i++) { free(irms[i]); free(dsrc[i]); free(dsrc1[i]); }
    free(irms); free(dsrc); free(dsrc1); free_sources(src, nsrc); free(dh); free(alpha); free(S);
    free(qg); free(e); free(e1); free(init); free(rd); free(rd1); free(rdx); free(re);
}

/* The general read (heads, per-token queries, static weights, sigmoid gates, with and without
 * the key norm) against a double-precision forward written from its definition, and its
 * backward against central differences of that forward's loss Σ dh ⊙ h. */
typedef struct { int64_t ns, N, d, H; int mixing, per_token, key_norm; } general_case;

static double general_naive(double *h, double *alpha, const double *src, const double *qg,
                            const double *lg, const general_case *c, const double *dh) {
    const int64_t ns = c->ns, N = c->N, d = c->d, H = c->H, hd = d / H;
    double loss = 0.0, *s = dalloc(ns);
    for (int64_t n = 0; n < N; n++) {
        for (int64_t hh = 0; hh < H; hh++) {
            double mx = -INFINITY, sum = 0.0;
            for (int64_t i = 0; i < ns; i++) {
                const double *x = src + (i * N + n) * d;
                double r = 1.0, dot = 0.0;
                if (c->key_norm) {
                    double ss = 0.0;
                    for (int64_t e = 0; e < d; e++) ss += x[e] * x[e];
                    r = 1.0 / sqrt(ss / (double)d + 1e-6);
                }
                const double *q = qg + (c->per_token ? n * d : 0);
                for (int64_t e = hh * hd; e < (hh + 1) * hd; e++) dot += q[e] * x[e];
                s[i] = c->mixing == SF_MIX_STATIC ? lg[hh * ns + i] : dot * r;
                if (s[i] > mx) mx = s[i];
            }
            for (int64_t i = 0; i < ns; i++) sum += exp(s[i] - mx);
            for (int64_t e = hh * hd; e < (hh + 1) * hd; e++) h[n * d + e] = 0.0;
            for (int64_t i = 0; i < ns; i++) {
                double a = c->mixing == SF_MIX_SIGMOID ? 1.0 / (1.0 + exp(-s[i])) : exp(s[i] - mx) / sum;
                if (alpha) alpha[(n * H + hh) * ns + i] = a;
                for (int64_t e = hh * hd; e < (hh + 1) * hd; e++) h[n * d + e] += a * src[(i * N + n) * d + e];
            }
        }
        for (int64_t e = 0; e < d; e++) loss += dh[n * d + e] * h[n * d + e];
    }
    free(s);
    return loss;
}

static double fd_of(double *v, const double *src, const double *qg, const double *lg,
                    const general_case *c, const double *dh, double *hbuf) {
    const double step = 1e-5, old = *v;
    *v = old + step;
    double lp = general_naive(hbuf, NULL, src, qg, lg, c, dh);
    *v = old - step;
    double lm = general_naive(hbuf, NULL, src, qg, lg, c, dh);
    *v = old;
    return (lp - lm) / (2 * step);
}

static void attnres_general_case(const general_case *c, int nt) {
    const int64_t ns = c->ns, N = c->N, d = c->d, H = c->H, w = H * ns;
    const int stat = c->mixing == SF_MIX_STATIC;
    char what[200], sub[260];
    snprintf(what, sizeof what, "attnres general ns=%lld N=%lld d=%lld H=%lld mixing=%d per_token=%d key_norm=%d threads=%d",
             (long long)ns, (long long)N, (long long)d, (long long)H, c->mixing, c->per_token, c->key_norm, nt);
    float **src = make_sources(ns, N, d), **irms = xmalloc((size_t)ns * sizeof(float *));
    float **dsrc = xmalloc((size_t)ns * sizeof(float *)), **dsrc1 = xmalloc((size_t)ns * sizeof(float *));
    int64_t nq = c->per_token ? N * d : d;
    float *qg = falloc(nq), *lg = falloc(w), *dh = falloc(N * d);
    fill(qg, nq, -0.6f, 0.6f);
    fill(lg, w, -1.5f, 1.5f);
    fill(dh, N * d, -1.0f, 1.0f);
    for (int64_t i = 0; i < ns; i++) {
        irms[i] = falloc(N);
        if (c->key_norm) sf_attnres_inv_rms(irms[i], src[i], N, d, 1e-6f, 1);
        else for (int64_t n = 0; n < N; n++) irms[i][n] = 1.0f;
        dsrc[i] = falloc(N * d);
        dsrc1[i] = falloc(N * d);
        memset(dsrc[i], 0, (size_t)(N * d) * sizeof(float));
        memset(dsrc1[i], 0, (size_t)(N * d) * sizeof(float));
    }
    sf_attnres_read rd = {.H = H, .mixing = c->mixing, .qg = stat ? NULL : qg, .qg_ld = c->per_token ? d : 0,
                          .logits = stat ? lg : NULL};
    const float *const *csrc = (const float *const *)src, *const *cirms = (const float *const *)irms;
    float *h = falloc(N * d), *h1 = falloc(N * d), *alpha = falloc(N * w), *alpha1 = falloc(N * w);
    float *scr = falloc(sf_attnres_general_scratch_floats(ns, H, nt)), *scr1 = falloc(sf_attnres_general_scratch_floats(ns, H, 1));
    sf_attnres_general_forward(h, alpha, csrc, cirms, ns, &rd, N, d, scr, nt);
    sf_attnres_general_forward(h1, alpha1, csrc, cirms, ns, &rd, N, d, scr1, 1);
    snprintf(sub, sizeof sub, "%s: h vs 1 thread", what);
    CHECK_SAME(sub, h, h1, N * d);
    snprintf(sub, sizeof sub, "%s: alpha vs 1 thread", what);
    CHECK_SAME(sub, alpha, alpha1, N * w);
    /* double copies of the inputs, the naive forward */
    double *s64 = dalloc(ns * N * d), *q64 = dalloc(nq), *l64 = dalloc(w), *dh64 = dalloc(N * d);
    double *rh = dalloc(N * d), *ra = dalloc(N * w);
    for (int64_t i = 0; i < ns; i++) for (int64_t k = 0; k < N * d; k++) s64[i * N * d + k] = src[i][k];
    for (int64_t k = 0; k < nq; k++) q64[k] = qg[k];
    for (int64_t k = 0; k < w; k++) l64[k] = lg[k];
    for (int64_t k = 0; k < N * d; k++) dh64[k] = dh[k];
    general_naive(rh, ra, s64, q64, l64, c, dh64);
    snprintf(sub, sizeof sub, "%s: h", what);
    CHECK_CLOSE(sub, h, rh, N * d, 1e-5, 1e-5);
    snprintf(sub, sizeof sub, "%s: alpha", what);
    CHECK_CLOSE(sub, alpha, ra, N * w, 1e-6, 1e-5);
    /* backward, 1 thread vs nt, then against finite differences (small cases only) */
    float *dql = falloc(SF_AR_LANES * (w > d ? w : d)), *dql1 = falloc(SF_AR_LANES * (w > d ? w : d));
    float *dqr = falloc(N * d), *dqr1 = falloc(N * d);
    const int64_t ls = w > d ? w : d;
    memset(dql, 0, (size_t)(SF_AR_LANES * ls) * sizeof(float));
    memset(dql1, 0, (size_t)(SF_AR_LANES * ls) * sizeof(float));
    memset(dqr, 0, (size_t)(N * d) * sizeof(float));
    memset(dqr1, 0, (size_t)(N * d) * sizeof(float));
    float *lanes = stat || !c->per_token ? dql : NULL, *lanes1 = stat || !c->per_token ? dql1 : NULL;
    sf_attnres_general_backward(dsrc, csrc, cirms, ns, &rd, alpha, dh, c->key_norm, stat ? NULL : (c->per_token ? NULL : dql),
                                stat || !c->per_token ? NULL : dqr, stat ? dql : NULL, ls, N, d, scr, nt);
    sf_attnres_general_backward(dsrc1, csrc, cirms, ns, &rd, alpha1, dh, c->key_norm, stat ? NULL : (c->per_token ? NULL : dql1),
                                stat || !c->per_token ? NULL : dqr1, stat ? dql1 : NULL, ls, N, d, scr1, 1);
    for (int64_t i = 0; i < ns; i++) {
        snprintf(sub, sizeof sub, "%s: d src %lld vs 1 thread", what, (long long)i);
        CHECK_SAME(sub, dsrc[i], dsrc1[i], N * d);
    }
    snprintf(sub, sizeof sub, "%s: query/logit gradient vs 1 thread", what);
    if (lanes) CHECK_SAME(sub, lanes, lanes1, SF_AR_LANES * ls);
    else CHECK_SAME(sub, dqr, dqr1, N * d);
    if (N * d * ns <= 2000) {
        double *hb = dalloc(N * d), *fd = dalloc(N * d);
        for (int64_t i = 0; i < ns; i++) {
            for (int64_t k = 0; k < N * d; k++) fd[k] = fd_of(s64 + i * N * d + k, s64, q64, l64, c, dh64, hb);
            snprintf(sub, sizeof sub, "%s: d src %lld vs finite differences", what, (long long)i);
            CHECK_CLOSE(sub, dsrc[i], fd, N * d, 1e-4, 1e-4);
        }
        if (stat) {
            for (int t = 1; t < SF_AR_LANES; t++) for (int64_t k = 0; k < w; k++) dql[k] += dql[t * ls + k];
            for (int64_t k = 0; k < w; k++) fd[k] = fd_of(l64 + k, s64, q64, l64, c, dh64, hb);
            snprintf(sub, sizeof sub, "%s: d logits vs finite differences", what);
            CHECK_CLOSE(sub, dql, fd, w, 1e-4, 1e-4);
        } else if (!c->per_token) {
            for (int t = 1; t < SF_AR_LANES; t++) for (int64_t k = 0; k < d; k++) dql[k] += dql[t * ls + k];
            for (int64_t k = 0; k < d; k++) fd[k] = fd_of(q64 + k, s64, q64, l64, c, dh64, hb);
            snprintf(sub, sizeof sub, "%s: d qg (shared) vs finite differences", what);
            CHECK_CLOSE(sub, dql, fd, d, 1e-4, 1e-4);
        } else {
            for (int64_t k = 0; k < N * d; k++) fd[k] = fd_of(q64 + k, s64, q64, l64, c, dh64, hb);
            snprintf(sub, sizeof sub, "%s: d qg (per token) vs finite differences", what);
            CHECK_CLOSE(sub, dqr, fd, N * d, 1e-4, 1e-4);
        }
        free(hb); free(fd);
    }
    for (int64_t i = 0; i < ns; i++) { free(irms[i]); free(dsrc[i]); free(dsrc1[i]); }
    free(irms); free(dsrc); free(dsrc1); free_sources(src, ns); free(qg); free(lg); free(dh); free(h); free(h1);
    free(alpha); free(alpha1); free(scr); free(scr1); free(s64); free(q64); free(l64); free(dh64); free(rh);
    free(ra); free(dql); free(dql1); free(dqr); free(dqr1);
}

void test_attnres(void) {
    static const int64_t nsrcs[] = {1, 2, 5};
    static const int64_t Ns[] = {1, 7};
    static const int64_t ds[] = {1, 16, 33};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 2; b++)
            for (int c = 0; c < 3; c++)
                for (int nt = 1; nt <= 2; nt++) attnres_aggregate_case(nsrcs[a], Ns[b], ds[c], nt);
    attnres_aggregate_case(5, 800, 33, 3); /* threaded */

    for (int a = 0; a < 3; a++)
        for (int c = 0; c < 3; c++) attnres_two_phase_case(nsrcs[a], 3, 9, ds[c], 1 + c % 2);
    attnres_two_phase_case(4, 2, 600, 40, 3); /* threaded */

    static const int64_t bN[] = {1, 7, 37};
    static const int64_t bd[] = {1, 33, 64};
    static const int64_t bnr[] = {1, 5, 40};
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++)
            for (int c = 0; c < 3; c++)
                for (int acc = 0; acc <= 1; acc++)
                    attnres_backward_case(1 + 2 * acc, bnr[c], bN[a], bd[b], acc, 1 + (a + b + c) % 3);

    static const int mixes[] = {SF_MIX_SOFTMAX, SF_MIX_SIGMOID, SF_MIX_STATIC};
    for (int m = 0; m < 3; m++)
        for (int64_t H = 1; H <= 4; H *= 2)
            for (int pt = 0; pt <= (mixes[m] != SF_MIX_STATIC); pt++)
                for (int kn = 0; kn <= (mixes[m] != SF_MIX_STATIC); kn++) {
                    general_case gc = {3, 5, 8, H, mixes[m], pt, kn};
                    attnres_general_case(&gc, 2);
                    general_case one = {1, 2, 4, H, mixes[m], pt, kn}; /* a single source */
                    attnres_general_case(&one, 1);
                    general_case big = {4, 700, 40, H, mixes[m], pt, kn}; /* threaded */
                    attnres_general_case(&big, 2);
                }
}

