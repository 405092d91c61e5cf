/* Hyper-Connections (Zhu et al., ByteDance, arXiv 2409.19606): the residual stream widened to n
 * copies H = (h_1 .. h_n) per token (n = hc_expansion; H^0 = the embedding n times). Sublayer k
 * (each attention and each MLP is one "layer" T of the paper) reads and writes through its
 * hyper-connection matrix HC = [[0, B], [A_m, A_r]] (eq. 1-4):
 *
 *     h_0 = sum_j alpha_{j,0} H_j                            (width connection: the input)
 *     H'_i = beta_i T(h_0) + sum_j alpha_{j,1+i} H_j          (depth connection + A_r^T H)
 *
 * with alpha = [A_m A_r] (n x (n+1)) and beta = B (n). Static (SHC): learned alpha, beta. Dynamic
 * (DHC, eq. 6-8, hc_dynamic=True): per token from H̄ = Norm(H) (per copy),
 *
 *     alpha = static_alpha + s_alpha tanh(H̄ W_alpha),   beta = static_beta + s_beta tanh(H̄ W_beta)
 *
 * (W_alpha (d, n+1), W_beta (d), zero at init; s_alpha = s_beta = 0.01 at init). The static part
 * starts at alpha = [e_{k mod n}, I_n], beta = 1 (eq. 14), so every copy carries the pre-norm
 * residual stream; the head reads the sum of the copies (through the final norm). As in the
 * paper's pseudo-code (appendix, the HyperConnection module) and its naming. T(h_0) is the
 * sublayer on its pre-norm input, F_k(Norm_k(h_0)); under post-norm, as for AttnRes, the
 * written output is Norm_k(F_k(h_0)). See sf_wiring.h for the hooks' contract. */
#include "../sf_wiring.h"

#include <math.h>
#include <stdlib.h>

/* Row runs for the token reductions (static-weight, scale and projection gradients): a
 * constant, so the sums do not depend on the thread count. */
#define HC_LANES 16

typedef struct {
    int64_t n, C;   /* copies, columns of alpha (n + 1) */
    int dyn;
    float *H;       /* training: (L+1, N, n, d) every sublayer's stream; inference: 2 of them */
    int64_t nH;     /* streams kept */
    float *v;       /* post-norm: a sublayer's output Norm(y) before it joins the stream */
    /* per-sublayer coefficients, recomputed for the backward: (N, n, C), (N, n); dynamic also
     * the tanh values and H̄ (N, n, d) */
    float *alpha, *beta, *ta, *tb, *Hn, *nstats;
    /* backward */
    float *dcur, *dnext; /* dL/dH_k, dL/dH_{k+1} (N, n, d) */
    float *dh0;          /* dL/dh_0 of the sublayer being walked (N, d) */
    float *ga, *gb;      /* dL/dalpha (N, n, C), dL/dbeta (N, n) */
    float *dHn;          /* dL/dH̄ (N, n, d) */
    float *lane;         /* (HC_LANES, lane_floats) */
    int64_t lane_floats;
} hc_state;

/* ---- parameters: per sublayer (s = 0 attention, 1 MLP of block i) ---- */

static const char *sub_name(int s) { return s == 0 ? "attn" : "mlp"; }

static void table_layer(const sf_config *c, int i, sf_table_builder *tb) {
    const int64_t n = c->hc_expansion, d = c->d_model;
    const int ln_bias = c->bias && c->norm == SF_NORM_LAYERNORM;
    char nm[SF_NAME_MAX];
    for (int s = 0; s < 2; s++) {
        const char *p = sub_name(s);
        snprintf(nm, sizeof nm, "layers.%d.%s_hc.static_alpha", i, p);
        sf_params_emit(tb, nm, i, 2, n, n + 1, 1, s == 0 ? SF_INIT_HC_ALPHA_ATTN : SF_INIT_HC_ALPHA_MLP,
                       s == 0 ? SF_LAYER_VIEW(hc_sa[0]) : SF_LAYER_VIEW(hc_sa[1]));
        snprintf(nm, sizeof nm, "layers.%d.%s_hc.static_beta", i, p);
        sf_params_emit(tb, nm, i, 1, n, 0, 1, SF_INIT_ONES, s == 0 ? SF_LAYER_VIEW(hc_sb[0]) : SF_LAYER_VIEW(hc_sb[1]));
        if (!c->hc_dynamic) continue;
        snprintf(nm, sizeof nm, "layers.%d.%s_hc.dynamic_alpha_fn", i, p);
        sf_params_emit(tb, nm, i, 2, d, n + 1, 1, SF_INIT_ZEROS, s == 0 ? SF_LAYER_VIEW(hc_fa[0]) : SF_LAYER_VIEW(hc_fa[1]));
        snprintf(nm, sizeof nm, "layers.%d.%s_hc.dynamic_alpha_scale", i, p);
        sf_params_emit(tb, nm, i, 1, 1, 0, 1, SF_INIT_HC_SCALE, s == 0 ? SF_LAYER_VIEW(hc_as[0]) : SF_LAYER_VIEW(hc_as[1]));
        snprintf(nm, sizeof nm, "layers.%d.%s_hc.dynamic_beta_fn", i, p);
        sf_params_emit(tb, nm, i, 1, d, 0, 1, SF_INIT_ZEROS, s == 0 ? SF_LAYER_VIEW(hc_fb[0]) : SF_LAYER_VIEW(hc_fb[1]));
        snprintf(nm, sizeof nm, "layers.%d.%s_hc.dynamic_beta_scale", i, p);
        sf_params_emit(tb, nm, i, 1, 1, 0, 1, SF_INIT_HC_SCALE, s == 0 ? SF_LAYER_VIEW(hc_bs[0]) : SF_LAYER_VIEW(hc_bs[1]));
        snprintf(nm, sizeof nm, "layers.%d.%s_hc.norm.weight", i, p);
        sf_params_emit(tb, nm, i, 1, d, 0, 1, SF_INIT_ONES, s == 0 ? SF_LAYER_VIEW(hc_nw[0]) : SF_LAYER_VIEW(hc_nw[1]));
        if (ln_bias) {
            snprintf(nm, sizeof nm, "layers.%d.%s_hc.norm.bias", i, p);
            sf_params_emit(tb, nm, i, 1, d, 0, 1, SF_INIT_ZEROS, s == 0 ? SF_LAYER_VIEW(hc_nb[0]) : SF_LAYER_VIEW(hc_nb[1]));
        }
    }
}
static void table_model(const sf_config *c, sf_table_builder *tb) {}

/* traces: the weights of the input read (alpha_{j,0}) over the n copies */
static int64_t num_sources(const sf_config *c, int64_t k) { return k < 2 * c->n_layers ? c->hc_expansion : 0; }

/* ---- per call ---- */

static sf_status init(run *R) {
    hc_state *s = calloc(1, sizeof *s);
    if (!s) return SF_ERR_NOMEM;
    R->ws = s;
    s->n = R->c->hc_expansion;
    s->C = s->n + 1;
    s->dyn = R->c->hc_dynamic;
    s->nH = R->training ? R->L + 1 : 2;
    return SF_OK;
}
static void free_state(run *R) {
    free(R->ws);
    R->ws = NULL;
}

static void layout_block(run *R, bump *bp, block_acts *A) {
    const int64_t Nd = R->N * R->d;
    A->y_a = take(bp, Nd);
    A->y_m = take(bp, Nd);
}

static void layout(run *R, bump *bp, want w) {
    hc_state *s = R->ws;
    int bad = 0;
    const int64_t N = R->N, d = R->d, n = s->n, C = s->C;
    const int64_t Hsz = cmul(&bad, cmul(&bad, N, n), d);
    s->H = take(bp, cmul(&bad, s->nH, Hsz));
    s->v = R->c->pre_norm ? NULL : take(bp, N * d);
    s->alpha = take(bp, cmul(&bad, N, n * C));
    s->beta = take(bp, cmul(&bad, N, n));
    if (s->dyn) {
        s->ta = take(bp, cmul(&bad, N, n * C));
        s->tb = take(bp, cmul(&bad, N, n));
        s->Hn = take(bp, Hsz);
        s->nstats = take(bp, cmul(&bad, 2 * N, n));
    }
    if (R->training) {
        s->dcur = take(bp, Hsz);
        s->dnext = take(bp, Hsz);
        s->dh0 = take(bp, N * d);
        s->ga = take(bp, cmul(&bad, N, n * C));
        s->gb = take(bp, cmul(&bad, N, n));
        s->dHn = s->dyn ? take(bp, Hsz) : NULL;
        /* per lane: static alpha/beta, the two scales, W_alpha (d x C) and W_beta (d) */
        s->lane_floats = n * C + n + 2 + d * C + d;
        s->lane = take(bp, cmul(&bad, HC_LANES, s->lane_floats));
    }
    if (bad) bp->bad = 1;
}

static float *stream(const run *R, int64_t k) {
    const hc_state *s = R->ws;
    return s->H + (s->nH == 2 ? k % 2 : k) * R->N * s->n * R->d;
}

/* ---- coefficients ---- */

static void params_of(const run *R, int64_t k, const float **sa, const float **sb, const float **fa,
                      const float **as, const float **fb, const float **bs, const float **nw,
                      const float **nb) {
    const sf_layer_views *Lv = &R->m->layers[k / 2];
    const int s = (int)(k % 2);
    *sa = Lv->hc_sa[s]; *sb = Lv->hc_sb[s]; *fa = Lv->hc_fa[s]; *as = Lv->hc_as[s];
    *fb = Lv->hc_fb[s]; *bs = Lv->hc_bs[s]; *nw = Lv->hc_nw[s]; *nb = Lv->hc_nb[s];
}

/* alpha (N, n, C), beta (N, n) of sublayer k from its stream H_k */
static void coef_forward(run *R, int64_t k, const float *Hk) {
    hc_state *s = R->ws;
    const int64_t N = R->N, d = R->d, n = s->n, C = s->C;
    const float *sa, *sb, *fa, *as, *fb, *bs, *nw, *nb;
    params_of(R, k, &sa, &sb, &fa, &as, &fb, &bs, &nw, &nb);
    if (s->dyn) {
        if (R->c->norm == SF_NORM_LAYERNORM) sf_layernorm(s->Hn, Hk, nw, nb, N * n, d, R->c->norm_eps, R->nt);
        else sf_rmsnorm(s->Hn, Hk, nw, N * n, d, R->c->norm_eps, R->nt);
    }
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * n * C * d > 65536)
    for (int64_t r = 0; r < N; r++)
        for (int64_t j = 0; j < n; j++) {
            float *al = s->alpha + (r * n + j) * C;
            if (!s->dyn) {
                for (int64_t c = 0; c < C; c++) al[c] = sa[j * C + c];
                s->beta[r * n + j] = sb[j];
                continue;
            }
            const float *hn = s->Hn + (r * n + j) * d;
            float *ta = s->ta + (r * n + j) * C;
            for (int64_t c = 0; c < C; c++) {
                float acc = 0.0f;
                for (int64_t e = 0; e < d; e++) acc += hn[e] * fa[e * C + c];
                ta[c] = tanhf(acc);
                al[c] = sa[j * C + c] + as[0] * ta[c];
            }
            float tb = tanhf(sf_dot(hn, fb, d));
            s->tb[r * n + j] = tb;
            s->beta[r * n + j] = sb[j] + bs[0] * tb;
        }
}

/* ---- forward hooks ---- */

static float *embed_dst(run *R) { return R->acts[0].in_a; /* a staging row: begin copies it */ }

static void begin(run *R, float *x0) {
    hc_state *s = R->ws;
    const int64_t N = R->N, d = R->d, n = s->n;
    float *H0 = stream(R, 0);
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * n * d > 65536)
    for (int64_t r = 0; r < N; r++)
        for (int64_t j = 0; j < n; j++) memcpy(H0 + (r * n + j) * d, x0 + r * d, (size_t)d * sizeof(float));
}

static void read(run *R, int64_t k, float *h, float *alpha_trace) {
    hc_state *s = R->ws;
    const int64_t N = R->N, d = R->d, n = s->n, C = s->C;
    const float *Hk = stream(R, k);
    coef_forward(R, k, Hk);
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * n * d > 65536)
    for (int64_t r = 0; r < N; r++) {
        float *hr = h + r * d;
        for (int64_t e = 0; e < d; e++) hr[e] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            const float a = s->alpha[(r * n + j) * C], *x = Hk + (r * n + j) * d;
            for (int64_t e = 0; e < d; e++) hr[e] += a * x[e];
            if (alpha_trace) alpha_trace[r * n + j] = a;
        }
    }
}

static float *out_buf(run *R, int64_t k, float *own) { return own; }

static void write(run *R, int64_t k, float *y, float *next, float *trace_out, float *rms) {
    hc_state *s = R->ws;
    const int64_t N = R->N, d = R->d, n = s->n, C = s->C, Nd = N * d;
    float *v = y;
    if (!R->c->pre_norm) {
        const float *nw, *nb;
        sub_norm(R, k, &nw, &nb);
        norm_fwd(R, s->v, y, nw, nb);
        v = s->v;
    }
    resid_dropout(R, v, k);
    copy(trace_out, v, Nd);
    if (rms) rms[SF_RMS_OUTPUT] = rms_of(v, Nd);
    const float *Hk = stream(R, k);
    float *Hn = stream(R, k + 1);
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * n * n * d > 65536)
    for (int64_t r = 0; r < N; r++)
        for (int64_t i = 0; i < n; i++) {
            float *o = Hn + (r * n + i) * d;
            const float b = s->beta[r * n + i], *vr = v + r * d;
            for (int64_t e = 0; e < d; e++) o[e] = b * vr[e];
            for (int64_t j = 0; j < n; j++) {
                const float a = s->alpha[(r * n + j) * C + 1 + i], *x = Hk + (r * n + j) * d;
                for (int64_t e = 0; e < d; e++) o[e] += a * x[e];
            }
        }
    /* the stack's next buffer is not read (the next read mixes the copies); the rms summary's
     * stream column is the copies' sum, what the head would read */
    if (rms) {
        double ss = 0.0;
        for (int64_t r = 0; r < N; r++)
            for (int64_t e = 0; e < d; e++) {
                float t = 0.0f;
                for (int64_t i = 0; i < n; i++) t += Hn[(r * n + i) * d + e];
                ss += (double)t * t;
            }
        rms[SF_RMS_STREAM] = (float)sqrt(ss / (double)Nd);
    }
    (void)next;
}

/* the head reads the sum of the copies */
static void final(run *R, float *alpha_trace) {
    hc_state *s = R->ws;
    const int64_t N = R->N, d = R->d, n = s->n;
    const float *HL = stream(R, R->L);
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * n * d > 65536)
    for (int64_t r = 0; r < N; r++) {
        float *o = R->fin_h + r * d;
        for (int64_t e = 0; e < d; e++) o[e] = 0.0f;
        for (int64_t i = 0; i < n; i++)
            for (int64_t e = 0; e < d; e++) o[e] += HL[(r * n + i) * d + e];
    }
}

/* ---- backward ---- */

static void backward_begin(run *R, const float *dfin_h) {
    hc_state *s = R->ws;
    const int64_t N = R->N, d = R->d, n = s->n;
    for (int64_t r = 0; r < N; r++)
        for (int64_t i = 0; i < n; i++) memcpy(s->dnext + (r * n + i) * d, dfin_h + r * d, (size_t)d * sizeof(float));
}

/* dL/dy of sublayer k from dL/dH_{k+1} (s->dnext): dv = sum_i beta_i dH'_i; the beta and
 * residual-alpha gradients per token; dL/dH_k's skip part into s->dcur. */
static const float *write_backward(run *R, int64_t k) {
    hc_state *s = R->ws;
    const int64_t N = R->N, d = R->d, n = s->n, C = s->C;
    const float *Hk = stream(R, k);
    coef_forward(R, k, Hk); /* the forward's coefficients (and H̄), recomputed */
    const float *v = k % 2 == 0 ? R->acts[k / 2].y_a : R->acts[k / 2].y_m;
    if (!R->c->pre_norm) { /* v = dropout(Norm(y)), recomputed */
        const float *nw, *nb;
        sub_norm(R, k, &nw, &nb);
        norm_fwd(R, s->v, v, nw, nb);
        resid_dropout(R, s->v, k);
        v = s->v;
    }
    float *dv = R->dy;
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * n * n * d > 65536)
    for (int64_t r = 0; r < N; r++) {
        const float *dn = s->dnext + r * n * d, *x = Hk + r * n * d, *vr = v + r * d;
        float *dvr = dv + r * d, *dc = s->dcur + r * n * d;
        for (int64_t e = 0; e < d; e++) dvr[e] = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            const float b = s->beta[r * n + i];
            for (int64_t e = 0; e < d; e++) dvr[e] += b * dn[i * d + e];
            s->gb[r * n + i] = sf_dot(dn + i * d, vr, d);
        }
        for (int64_t j = 0; j < n; j++) {
            float *dcj = dc + j * d;
            for (int64_t e = 0; e < d; e++) dcj[e] = 0.0f;
            for (int64_t i = 0; i < n; i++) {
                const float a = s->alpha[(r * n + j) * C + 1 + i];
                for (int64_t e = 0; e < d; e++) dcj[e] += a * dn[i * d + e];
                s->ga[(r * n + j) * C + 1 + i] = sf_dot(dn + i * d, x + j * d, d);
            }
        }
    }
    resid_dropout(R, dv, k);
    if (R->c->pre_norm) return dv;
    const float *y = k % 2 == 0 ? R->acts[k / 2].y_a : R->acts[k / 2].y_m, *nw, *nb;
    sub_norm(R, k, &nw, &nb);
    norm_bwd(R, R->dx, dv, y, nw, nb, 0);
    return R->dx;
}

static float *read_grad_dst(run *R, int64_t k, int *accumulate) {
    *accumulate = 0;
    return ((hc_state *)R->ws)->dh0;
}

/* dL/dh_0 is in s->dh0: the input-alpha gradients, dL/dH_k's read part, then the coefficient
 * gradients into the parameters (static, and dynamic through tanh, W and the copy norm). */
static void read_backward(run *R, int64_t k) {
    hc_state *s = R->ws;
    const int64_t N = R->N, d = R->d, n = s->n, C = s->C, LF = s->lane_floats;
    const float *Hk = stream(R, k);
    const float *sa, *sb, *fa, *as, *fb, *bs, *nw, *nb;
    params_of(R, k, &sa, &sb, &fa, &as, &fb, &bs, &nw, &nb);
    memset(s->lane, 0, (size_t)(HC_LANES * LF) * sizeof(float));
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * n * C * d > 65536)
    for (int64_t l = 0; l < HC_LANES; l++) {
        float *ln = s->lane + l * LF, *lsa = ln, *lsb = ln + n * C, *lsc = lsb + n, *lfa = lsc + 2, *lfb = lfa + d * C;
        for (int64_t r = N * l / HC_LANES; r < N * (l + 1) / HC_LANES; r++) {
            const float *dh = s->dh0 + r * d, *x = Hk + r * n * d;
            float *dc = s->dcur + r * n * d;
            for (int64_t j = 0; j < n; j++) {
                const float a0 = s->alpha[(r * n + j) * C];
                s->ga[(r * n + j) * C] = sf_dot(dh, x + j * d, d);
                for (int64_t e = 0; e < d; e++) dc[j * d + e] += a0 * dh[e];
            }
            for (int64_t j = 0; j < n; j++) {
                const float *g = s->ga + (r * n + j) * C;
                for (int64_t c = 0; c < C; c++) lsa[j * C + c] += g[c];
                lsb[j] += s->gb[r * n + j];
            }
            if (!s->dyn) continue;
            for (int64_t j = 0; j < n; j++) {
                const float *g = s->ga + (r * n + j) * C, *ta = s->ta + (r * n + j) * C;
                const float *hn = s->Hn + (r * n + j) * d;
                float *dhn = s->dHn + (r * n + j) * d;
                const float tb = s->tb[r * n + j], gbj = s->gb[r * n + j];
                const float pb = bs[0] * gbj * (1.0f - tb * tb); /* d/d(pre-tanh) of beta */
                lsc[1] += gbj * tb;
                for (int64_t e = 0; e < d; e++) { dhn[e] = pb * fb[e]; lfb[e] += pb * hn[e]; }
                for (int64_t c = 0; c < C; c++) {
                    const float pa = as[0] * g[c] * (1.0f - ta[c] * ta[c]);
                    lsc[0] += g[c] * ta[c];
                    for (int64_t e = 0; e < d; e++) { dhn[e] += pa * fa[e * C + c]; lfa[e * C + c] += pa * hn[e]; }
                }
            }
        }
    }
    /* the lanes' sums, in lane order */
    float *dsa = GRAD(R, sa), *dsb = GRAD(R, sb);
    for (int64_t l = 0; l < HC_LANES; l++) {
        const float *ln = s->lane + l * LF;
        for (int64_t t = 0; t < n * C; t++) dsa[t] += ln[t];
        for (int64_t t = 0; t < n; t++) dsb[t] += ln[n * C + t];
        if (!s->dyn) continue;
        const float *lsc = ln + n * C + n, *lfa = lsc + 2, *lfb = lfa + d * C;
        GRAD(R, as)[0] += lsc[0];
        GRAD(R, bs)[0] += lsc[1];
        float *dfa = GRAD(R, fa), *dfb = GRAD(R, fb);
        for (int64_t t = 0; t < d * C; t++) dfa[t] += lfa[t];
        for (int64_t t = 0; t < d; t++) dfb[t] += lfb[t];
    }
    if (s->dyn) { /* through the copies' norm into dL/dH_k */
        if (R->c->norm == SF_NORM_LAYERNORM)
            sf_layernorm_backward(s->dcur, GRAD(R, nw), GRAD(R, nb), s->dHn, Hk, nw, N * n, d, R->c->norm_eps, s->nstats, 1, R->nt);
        else
            sf_rmsnorm_backward(s->dcur, GRAD(R, nw), s->dHn, Hk, nw, N * n, d, R->c->norm_eps, s->nstats, 1, R->nt);
    }
    float *t = s->dnext; /* dL/dH_k is the next step's dL/dH_{k+1} */
    s->dnext = s->dcur;
    s->dcur = t;
}

/* H^0 is the embedding n times: its gradient is the copies' sum */
static const float *embed_grad(run *R) {
    hc_state *s = R->ws;
    const int64_t N = R->N, d = R->d, n = s->n;
    for (int64_t r = 0; r < N; r++) {
        float *o = R->dx + r * d;
        for (int64_t e = 0; e < d; e++) o[e] = 0.0f;
        for (int64_t i = 0; i < n; i++)
            for (int64_t e = 0; e < d; e++) o[e] += s->dnext[(r * n + i) * d + e];
    }
    return R->dx;
}
static void backward_end(run *R) {}

const sf_wiring sf_wiring_hyper_connections = {
    .name = "hyper_connections",
    .save_block_input = 0, /* every sublayer's stream is kept */
    .table_layer = table_layer,
    .table_model = table_model,
    .num_sources = num_sources,
    .init = init,
    .free = free_state,
    .layout_block = layout_block,
    .layout = layout,
    .embed_dst = embed_dst,
    .begin = begin,
    .read = read,
    .out_buf = out_buf,
    .write = write,
    .final = final,
    .backward_begin = backward_begin,
    .write_backward = write_backward,
    .read_grad_dst = read_grad_dst,
    .read_backward = read_backward,
    .embed_grad = embed_grad,
    .backward_end = backward_end,
};
