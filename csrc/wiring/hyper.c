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
 * written output is Norm_k(F_k(h_0)).
 *
 * mHC (Manifold-Constrained Hyper-Connections, Xie et al., DeepSeek, arXiv 2512.24880, sec.
 * 3-4; residual="mhc") uses the same stream with its three maps per token,
 *
 *     x' = RMSNorm(vec(H)) (no gain),  z = x' Phi^T,
 *     H_pre = sigmoid(a_0 z_pre + b_pre),  H_post = 2 sigmoid(a_1 z_post + b_post),
 *     H_res = SinkhornKnopp(a_2 mat(z_res) + b_res)   (mhc_sinkhorn_iters column-then-row passes)
 *     h_0 = sum_j H_pre[j] H_j,   H'_i = sum_j H_res[i,j] H_j + H_post[i] T(h_0)
 *
 * i.e. alpha[j,0] = H_pre[j], alpha[j,1+i] = H_res[i,j], beta = H_post in the machinery below;
 * the backward goes through every Sinkhorn iteration exactly. Init (docs/WIRINGS.md): Phi = 0,
 * a = 0.01, b_pre = -log(n-1) (H_pre = 1/n), b_post = 0, b_res = 0 (H_res uniform), so the copies
 * stay equal and the model starts as the pre-norm residual stack. Tensor names and the
 * reading of both papers: docs/WIRINGS.md. See sf_wiring.h for the hooks' contract. */
#include "../sf_wiring.h"
#include "../sf_cpu.h"

#include <math.h>
#include <stdlib.h>

/* Row runs for the token reductions (static-weight, scale and projection gradients): a
 * constant, so the sums do not depend on the thread count. */
#define HC_LANES 16
#define MHC_MAX_N 16 /* per-token scratch on the stack: n x n matrices */
/* mHC's Sinkhorn runs on MHC_TB tokens side by side (element t of token u at [t * MHC_TB + u]):
 * the n x n matrices are too small to vectorize one at a time, and the innermost loop over
 * the tokens is a full vector */
#define MHC_TB 16

typedef struct {
    int mhc, dyn;
    int64_t n, C;   /* copies, columns of alpha (n + 1) */
    int64_t Z;      /* mHC: projections per token, 2n + n^2 */
    int64_t Zp;     /* ... rounded up to whole GEMM panels: z's row stride */
    int64_t iters;  /* mHC: Sinkhorn passes */
    float *H;       /* training: (L+1, N, n, d) every sublayer's stream; inference: 2 of them */
    int64_t nH;     /* streams kept */
    float *v;       /* post-norm: a sublayer's output Norm(y) before it joins the stream */
    /* the current sublayer's coefficients (recomputed for the backward): alpha (N, n, C), beta
     * (N, n); HC dynamic: tanh values ta (N, n, C), tb (N, n), the normed copies Hn (N, n, d);
     * mHC: z (N, Zp) and each token's 1/RMS of vec(H) in zinv (N), kept for every sublayer
     * when training (L of each: the backward then needs no product), the Sinkhorn iterates sk
     * (N, 2 iters + 1, n, n) */
    float *alpha, *beta, *ta, *tb, *Hn, *nstats, *z, *sk;
    float *zinv;
    float *dz, *pack;    /* mHC: dL/dz scaled by 1/RMS (N, Z); the GEMM engine's scratch */
    float *Ppad;         /* mHC: Phi with zero rows up to Zp (Zp, n d) */
    /* backward */
    float *dcur, *dnext; /* dL/dH_k, dL/dH_{k+1} (N, n, d) */
    float *dh0;          /* dL/dh_0 of the sublayer being walked (N, d) */
    float *ga, *gb;      /* dL/dalpha (N, n, C), dL/dbeta (N, n) */
    float *dHn;          /* dL/dH̄ (N, n, d); mHC: a block of rows per thread (threads, 8, n d) */
    float *lane;         /* (HC_LANES, lane_floats) */
    int64_t lane_floats;
} hc_state;

/* ---- parameters: per sublayer (s = 0 attention, 1 MLP of block i) ---- */

static void table_layer(const sf_config *c, int i, sf_table_builder *tb) {
    const int64_t n = c->hc_expansion, d = c->d_model;
    const int ln_bias = c->bias && c->norm == SF_NORM_LAYERNORM;
    const int mhc = c->residual == SF_RES_MHC;
    char nm[SF_NAME_MAX];
    for (int s = 0; s < 2; s++) {
        const char *p = s == 0 ? "attn" : "mlp";
#define EMIT(suffix, nd, a, b, init, field) \
        (snprintf(nm, sizeof nm, "layers.%d.%s_%s." suffix, i, p, mhc ? "mhc" : "hc"), \
         sf_params_emit(tb, nm, i, nd, a, b, 1, init, s == 0 ? SF_LAYER_VIEW(field[0]) : SF_LAYER_VIEW(field[1])))
        if (mhc) {
            EMIT("proj.weight", 2, n * n + 2 * n, n * d, SF_INIT_ZEROS, hc_proj);
            EMIT("base.weight", 1, n * n + 2 * n, 0, SF_INIT_MHC_BASE, hc_base);
            EMIT("scale.weight", 1, 3, 0, SF_INIT_HC_SCALE, hc_scale);
            continue;
        }
        EMIT("alpha.weight", 2, n, n + 1, s == 0 ? SF_INIT_HC_ALPHA_ATTN : SF_INIT_HC_ALPHA_MLP, hc_alpha);
        EMIT("beta.weight", 1, n, 0, SF_INIT_ONES, hc_beta);
        if (!c->hc_dynamic) continue;
        EMIT("norm.weight", 1, d, 0, SF_INIT_ONES, hc_nw);
        if (ln_bias) EMIT("norm.bias", 1, d, 0, SF_INIT_ZEROS, hc_nb);
        EMIT("proj.weight", 2, n + 2, d, SF_INIT_ZEROS, hc_proj);
        EMIT("scale.weight", 1, 2, 0, SF_INIT_HC_SCALE, hc_scale);
#undef EMIT
    }
}
static void table_model(const sf_config *c, sf_table_builder *tb) {}

/* traces: the weights of the input read (alpha_{j,0}, H_pre) over the n copies */
static int64_t num_sources(const sf_config *c, int64_t k) { return k < 2 * c->n_layers ? c->hc_expansion : 0; }

/* ---- per call ---- */

static sf_status init(run *R) {
    hc_state *s = calloc(1, sizeof *s);
    if (!s) return SF_ERR_NOMEM;
    R->ws = s;
    s->mhc = R->c->residual == SF_RES_MHC;
    s->dyn = s->mhc || R->c->hc_dynamic;
    s->n = R->c->hc_expansion;
    s->C = s->n + 1;
    s->Z = s->n * s->n + 2 * s->n;
    /* a partial 16-column panel would take the GEMM engine's generic tile, ~6x slower per
     * FLOP than a full one: the forward product runs on Phi padded with zero rows instead */
    s->Zp = (s->Z + SF_GEMM_NR - 1) / SF_GEMM_NR * SF_GEMM_NR;
    s->iters = R->c->mhc_sinkhorn_iters;
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
    const int64_t N = R->N, d = R->d, n = s->n, C = s->C, Z = s->Z;
    const int64_t Hsz = cmul(&bad, cmul(&bad, N, n), d);
    s->H = take(bp, cmul(&bad, s->nH, Hsz));
    s->v = R->c->pre_norm ? NULL : take(bp, N * d);
    s->alpha = take(bp, cmul(&bad, N, n * C));
    s->beta = take(bp, cmul(&bad, N, n));
    if (s->dyn) {
        s->Hn = s->mhc ? NULL : take(bp, Hsz); /* mHC never writes its normed stream */
        s->nstats = take(bp, cmul(&bad, 2 * N, n));
    }
    if (s->dyn && !s->mhc) {
        s->ta = take(bp, cmul(&bad, N, n * C));
        s->tb = take(bp, cmul(&bad, N, n));
    }
    if (s->mhc) {
        const int64_t kept = R->training ? R->L : 1;
        s->z = take(bp, cmul(&bad, kept, cmul(&bad, N, s->Zp)));
        s->zinv = take(bp, cmul(&bad, kept, N));
        s->Ppad = take(bp, cmul(&bad, s->Zp, n * d));
        /* the backward's Sinkhorn iterates, whole blocks of MHC_TB tokens */
        s->sk = R->training ? take(bp, cmul(&bad, (N + MHC_TB - 1) / MHC_TB * MHC_TB, cmul(&bad, 2 * s->iters + 1, n * n)))
                            : NULL;
        s->dz = R->training ? take(bp, cmul(&bad, N, Z)) : NULL;
        /* z = vec(H) Phi^T (B = Phi^T, K = n d); backward dH̄ = dz Phi (B = Phi, K = Z) and
         * dPhi += dz^T vec(H) (A = dz^T strided, B = vec(H)) */
        int64_t pk = sf_matmul_pack_floats(n * d, s->Zp);
        if (R->training) {
            const int64_t p2 = sf_matmul_pack_floats(Z, n * d), p3 = sf_gemm_pack_floats(Z, N, n * d, 1);
            pk = pk > p2 ? pk : p2;
            pk = pk > p3 ? pk : p3;
        }
        s->pack = take(bp, pk);
    }
    if (R->training) {
        s->dcur = take(bp, Hsz);
        s->dnext = take(bp, Hsz);
        s->dh0 = take(bp, N * d);
        s->ga = take(bp, cmul(&bad, N, n * C));
        s->gb = take(bp, cmul(&bad, N, n));
        /* mHC: one block of dL/dH̄ rows per thread (mhc_read_backward; sf_gemm_tile_rows() <= 8) */
        s->dHn = s->mhc ? take(bp, cmul(&bad, R->nt, 8 * n * d)) : s->dyn ? take(bp, Hsz) : NULL;
        /* per lane: HC static alpha/beta, scales (2), projection ((n+2) x d); mHC base (Z),
         * scales (3) (its projection's gradient is one GEMM over all tokens) */
        s->lane_floats = s->mhc ? Z + 3 : n * C + n + 2 + (n + 2) * d;
        s->lane = take(bp, cmul(&bad, HC_LANES, s->lane_floats));
    }
    if (bad) bp->bad = 1;
}

static float *stream(const run *R, int64_t k) {
    const hc_state *s = R->ws;
    return s->H + (s->nH == 2 ? k % 2 : k) * R->N * s->n * R->d;
}

static const sf_layer_views *views(const run *R, int64_t k) { return &R->m->layers[k / 2]; }

/* ---- coefficients ---- */

static float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

/* MHC_TB floats as one value (GCC/Clang vector extension): the compilers do not vectorize
 * these short reductions on their own (GCC scalarizes the 16 sums), so they are written on
 * whole vectors; each lane does exactly the scalar operations, in the same order. */
typedef float sk_vec __attribute__((vector_size(MHC_TB * sizeof(float))));
/* loads and stores through memcpy (no alignment or aliasing assumption; a vector move) */
#define SK_LD(v, p) memcpy(&(v), (p), sizeof(sk_vec))
#define SK_ST(p, v) memcpy((p), &(v), sizeof(sk_vec))

/* One Sinkhorn pass y = T(x) over MHC_TB tokens: T_c (every column to sum 1) or T_r (every
 * row). Element (i, j) is at [(i n + j) MHC_TB + u]; `one` steps along the normalised line,
 * `other` across lines. */
static inline __attribute__((always_inline)) void sk_pass(float *y, const float *x, int64_t n, int64_t one, int64_t other) {
    for (int64_t l = 0; l < n; l++) {
        sk_vec sum = {0}, v;
        for (int64_t m = 0; m < n; m++) {
            SK_LD(v, x + (l * other + m * one) * MHC_TB);
            sum += v;
        }
        const sk_vec inv = 1.0f / sum; /* one division per line */
        for (int64_t m = 0; m < n; m++) {
            const int64_t o = (l * other + m * one) * MHC_TB;
            SK_LD(v, x + o);
            v *= inv;
            SK_ST(y + o, v);
        }
    }
}
/* its backward: for y = x / s along a line, dx = (dy - sum(dy y)) / s, dM in place */
static inline __attribute__((always_inline)) void sk_pass_backward(float *dM, const float *x, const float *y, int64_t n, int64_t one, int64_t other) {
    for (int64_t l = 0; l < n; l++) {
        sk_vec sum = {0}, dot = {0}, xv, dv, yv;
        for (int64_t m = 0; m < n; m++) {
            const int64_t o = (l * other + m * one) * MHC_TB;
            SK_LD(xv, x + o);
            SK_LD(dv, dM + o);
            SK_LD(yv, y + o);
            sum += xv;
            dot += dv * yv;
        }
        const sk_vec inv = 1.0f / sum;
        for (int64_t m = 0; m < n; m++) {
            const int64_t o = (l * other + m * one) * MHC_TB;
            SK_LD(dv, dM + o);
            dv = (dv - dot) * inv;
            SK_ST(dM + o, dv);
        }
    }
}

/* mHC's Sinkhorn-Knopp on MHC_TB tokens' n x n logits (it[0] holds them on entry): M0 =
 * exp(logits - max) (a per-token shift, which every normalization cancels), then `iters`
 * passes of T_c (columns to sum 1) followed by T_r (rows to sum 1). With keep, all 2 iters + 1
 * iterates stay in it (it[p] at it + p n^2 MHC_TB, for the exact backward); otherwise it
 * holds two and the result is returned. */
static inline __attribute__((always_inline)) const float *sinkhorn_body(float *it, int64_t n, int64_t iters, int keep) {
    const int64_t nn = n * n, S = nn * MHC_TB;
    float mx[MHC_TB];
    for (int64_t u = 0; u < MHC_TB; u++) mx[u] = it[u];
    for (int64_t t = 1; t < nn; t++)
        for (int64_t u = 0; u < MHC_TB; u++) mx[u] = it[t * MHC_TB + u] > mx[u] ? it[t * MHC_TB + u] : mx[u];
    for (int64_t t = 0; t < nn; t++)
        for (int64_t u = 0; u < MHC_TB; u++) it[t * MHC_TB + u] = sf_expf(it[t * MHC_TB + u] - mx[u]);
    for (int64_t p = 0; p < 2 * iters; p++) {
        const float *x = it + (keep ? p : p % 2) * S;
        float *y = it + (keep ? p + 1 : (p + 1) % 2) * S;
        if (p % 2 == 0) sk_pass(y, x, n, n, 1); /* T_c: line j = column, steps of n */
        else sk_pass(y, x, n, 1, n);            /* T_r */
    }
    return it + (keep ? 2 * iters : 0) * S;
}

/* dlogits from dM (the result's gradient; overwritten), back through every kept pass, then
 * the exp: all in the token-interleaved layout */
static inline __attribute__((always_inline)) void sinkhorn_backward_body(float *dlogits, float *dM, const float *it,
                                                                         int64_t n, int64_t iters) {
    const int64_t S = n * n * MHC_TB;
    for (int64_t p = 2 * iters - 1; p >= 0; p--) {
        if (p % 2 == 0) sk_pass_backward(dM, it + p * S, it + (p + 1) * S, n, n, 1);
        else sk_pass_backward(dM, it + p * S, it + (p + 1) * S, n, 1, n);
    }
    for (int64_t t = 0; t < S; t++) dlogits[t] = dM[t] * it[t];
}

/* the Sinkhorn loops compiled again for 512-bit vectors (one per MHC_TB tokens instead of two):
 * the same operations per element, the same bits */
#ifdef SF_X86
SF_TARGET_AVX512_WIDE static const float *sinkhorn_wide(float *it, int64_t n, int64_t iters, int keep) {
    return sinkhorn_body(it, n, iters, keep);
}
SF_TARGET_AVX512_WIDE static void sinkhorn_backward_wide(float *dl, float *dM, const float *it, int64_t n, int64_t iters) {
    sinkhorn_backward_body(dl, dM, it, n, iters);
}
#endif
static const float *sinkhorn(float *it, int64_t n, int64_t iters, int keep) {
    const float *M;
    SF_WIDE_OR(M = sinkhorn_wide(it, n, iters, keep), M = sinkhorn_body(it, n, iters, keep));
    return M;
}
static void sinkhorn_backward(float *dl, float *dM, const float *it, int64_t n, int64_t iters) {
    SF_WIDE_OR(sinkhorn_backward_wide(dl, dM, it, n, iters), sinkhorn_backward_body(dl, dM, it, n, iters));
}

/* mHC's z and 1/RMS of sublayer k (kept per sublayer when training) */
static float *mhc_z(const run *R, int64_t k) {
    const hc_state *s = R->ws;
    return s->z + (R->training ? k : 0) * R->N * s->Zp;
}
static float *mhc_zinv(const run *R, int64_t k) {
    const hc_state *s = R->ws;
    return s->zinv + (R->training ? k : 0) * R->N;
}

/* mHC's three maps from z: H_pre, H_post into alpha[., 0] and beta, H_res (Sinkhorn) into
 * alpha[., 1..n]; with keep (the backward's recomputation) every iterate into s->sk, in
 * blocks of MHC_TB tokens (a last partial block is padded with zero logits, never read) */
static void mhc_maps(run *R, int64_t k, int keep) {
    hc_state *s = R->ws;
    const sf_layer_views *Lv = views(R, k);
    const int sub = (int)(k % 2);
    const int64_t N = R->N, n = s->n, nn = n * n, C = s->C, Zp = s->Zp, S = nn * MHC_TB;
    const int64_t nblk = (N + MHC_TB - 1) / MHC_TB;
    const float *b = Lv->hc_base[sub], *a = Lv->hc_scale[sub], *zk = mhc_z(R, k);
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * nn * s->iters > 16384)
    for (int64_t blk = 0; blk < nblk; blk++) {
        const int64_t r0 = blk * MHC_TB, nb = N - r0 < MHC_TB ? N - r0 : MHC_TB;
        float two[2 * MHC_MAX_N * MHC_MAX_N * MHC_TB];
        float *it = keep ? s->sk + blk * (2 * s->iters + 1) * S : two;
        for (int64_t t = 0; t < nn; t++)
            for (int64_t u = 0; u < MHC_TB; u++)
                it[t * MHC_TB + u] = u < nb ? a[2] * zk[(r0 + u) * Zp + 2 * n + t] + b[2 * n + t] : 0.0f;
        const float *M = sinkhorn(it, n, s->iters, keep);
        for (int64_t u = 0; u < nb; u++) {
            const int64_t r = r0 + u;
            const float *z = zk + r * Zp;
            float *al = s->alpha + r * n * C, *be = s->beta + r * n;
            for (int64_t j = 0; j < n; j++) al[j * C] = sigm(a[0] * z[j] + b[j]);
            for (int64_t i = 0; i < n; i++) be[i] = 2.0f * sigm(a[1] * z[n + i] + b[n + i]);
            for (int64_t i = 0; i < n; i++)
                for (int64_t j = 0; j < n; j++) al[j * C + 1 + i] = M[(i * n + j) * MHC_TB + u];
        }
    }
}

/* mHC: dL/dH_res (in ga[., 1..n]) back through every Sinkhorn pass of s->sk into the logits'
 * gradient dl, stored in dz[., 2n..] (coef_backward_rows scales it and sums it) */
static void mhc_sinkhorn_backward(run *R) {
    hc_state *s = R->ws;
    const int64_t N = R->N, n = s->n, nn = n * n, C = s->C, Z = s->Z, S = nn * MHC_TB;
    const int64_t nblk = (N + MHC_TB - 1) / MHC_TB;
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * nn * s->iters > 16384)
    for (int64_t blk = 0; blk < nblk; blk++) {
        const int64_t r0 = blk * MHC_TB, nb = N - r0 < MHC_TB ? N - r0 : MHC_TB;
        float dM[MHC_MAX_N * MHC_MAX_N * MHC_TB], dl[MHC_MAX_N * MHC_MAX_N * MHC_TB];
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < n; j++)
                for (int64_t u = 0; u < MHC_TB; u++)
                    dM[(i * n + j) * MHC_TB + u] = u < nb ? s->ga[((r0 + u) * n + j) * C + 1 + i] : 0.0f;
        sinkhorn_backward(dl, dM, s->sk + blk * (2 * s->iters + 1) * S, n, s->iters);
        for (int64_t u = 0; u < nb; u++)
            for (int64_t t = 0; t < nn; t++) s->dz[(r0 + u) * Z + 2 * n + t] = dl[t * MHC_TB + u];
    }
}

/* alpha (N, n, C), beta (N, n) of sublayer k from its stream H_k */
static void coef_forward(run *R, int64_t k, const float *Hk) {
    hc_state *s = R->ws;
    const sf_layer_views *Lv = views(R, k);
    const int sub = (int)(k % 2);
    const int64_t N = R->N, d = R->d, n = s->n, C = s->C, Z = s->Z;
    if (s->mhc) {
        const int64_t nd = n * d, Zp = s->Zp;
        float *zk = mhc_z(R, k), *zinv = mhc_zinv(R, k);
        /* z = RMSNorm(vec(H)) Phi^T computed as (vec(H) Phi^T) / RMS, the reordering of the
         * mHC paper (sec. 4.3.1): the GEMM engine takes the products, the 1/RMS scales Z
         * numbers per token instead of n d, and the normed stream is never written */
        memcpy(s->Ppad, Lv->hc_proj[sub], (size_t)(Z * nd) * sizeof(float));
        memset(s->Ppad + Z * nd, 0, (size_t)((Zp - Z) * nd) * sizeof(float));
        sf_matmul(zk, Hk, s->Ppad, NULL, N, nd, Zp, 0, s->pack, R->nt);
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * nd > 65536)
        for (int64_t r = 0; r < N; r++) {
            const float *x = Hk + r * nd;
            const float inv = 1.0f / sqrtf(sf_dot(x, x, nd) / (float)nd + R->c->norm_eps); /* as sf_rmsnorm */
            float *z = zk + r * Zp;
            zinv[r] = inv;
            for (int64_t c = 0; c < Z; c++) z[c] *= inv;
        }
        mhc_maps(R, k, 0);
        return;
    }
    const float *sa = Lv->hc_alpha[sub], *sb = Lv->hc_beta[sub], *P = Lv->hc_proj[sub], *sc = Lv->hc_scale[sub];
    if (s->dyn) {
        if (R->c->norm == SF_NORM_LAYERNORM) sf_layernorm(s->Hn, Hk, Lv->hc_nw[sub], Lv->hc_nb[sub], N * n, d, R->c->norm_eps, R->nt);
        else sf_rmsnorm(s->Hn, Hk, Lv->hc_nw[sub], N * n, d, R->c->norm_eps, R->nt);
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
                ta[c] = tanhf(sf_dot(hn, P + c * d, d));
                al[c] = sa[j * C + c] + sc[0] * ta[c];
            }
            float tb = tanhf(sf_dot(hn, P + C * d, d));
            s->tb[r * n + j] = tb;
            s->beta[r * n + j] = sb[j] + sc[1] * tb;
        }
}

/* The coefficient gradients of one token run (a lane's rows): ga/gb (complete) into the
 * lane's parameter partials, and dL/dH̄ (s->dHn) for HC; mHC's dL/dz into s->dz (its products
 * with Phi follow in mhc_read_backward). */
static void coef_backward_rows(const run *R, int64_t k, int64_t r0, int64_t r1, float *ln) {
    const hc_state *s = R->ws;
    const sf_layer_views *Lv = views(R, k);
    const int sub = (int)(k % 2);
    const int64_t d = R->d, n = s->n, C = s->C, Z = s->Z;
    if (s->mhc) {
        const float *a = Lv->hc_scale[sub];
        float *lb = ln, *lsc = ln + Z;
        for (int64_t r = r0; r < r1; r++) {
            const float *z = mhc_z(R, k) + r * s->Zp, *g = s->ga + r * n * C, *gbr = s->gb + r * n;
            float *dz = s->dz + r * Z; /* dz[2n..]: the Sinkhorn logits' gradient on entry */
            for (int64_t j = 0; j < n; j++) { /* H_pre = sigmoid(a0 z + b) */
                const float p = s->alpha[(r * n + j) * C], dpre = g[j * C] * p * (1.0f - p);
                lb[j] += dpre; lsc[0] += dpre * z[j]; dz[j] = a[0] * dpre;
            }
            for (int64_t i = 0; i < n; i++) { /* H_post = 2 sigmoid(a1 z + b) */
                const float q = 0.5f * s->beta[r * n + i], dpost = gbr[i] * 2.0f * q * (1.0f - q);
                lb[n + i] += dpost; lsc[1] += dpost * z[n + i]; dz[n + i] = a[1] * dpost;
            }
            for (int64_t t = 0; t < n * n; t++) {
                const float dl = dz[2 * n + t];
                lb[2 * n + t] += dl; lsc[2] += dl * z[2 * n + t]; dz[2 * n + t] = a[2] * dl;
            }
        }
        return;
    }
    const float *P = Lv->hc_proj[sub], *sc = Lv->hc_scale[sub];
    float *lsa = ln, *lsb = ln + n * C, *lsc = lsb + n, *lP = lsc + 2;
    for (int64_t r = r0; r < r1; r++) {
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
            const float pb = sc[1] * gbj * (1.0f - tb * tb); /* d/d(pre-tanh) of beta */
            lsc[1] += gbj * tb;
            for (int64_t e = 0; e < d; e++) { dhn[e] = pb * P[C * d + e]; lP[C * d + e] += pb * hn[e]; }
            for (int64_t c = 0; c < C; c++) {
                const float pa = sc[0] * g[c] * (1.0f - ta[c] * ta[c]);
                lsc[0] += g[c] * ta[c];
                for (int64_t e = 0; e < d; e++) { dhn[e] += pa * P[c * d + e]; lP[c * d + e] += pa * hn[e]; }
            }
        }
    }
}

/* the lanes' partials into the parameters' gradients, in lane order */
static void coef_backward_sum(run *R, int64_t k) {
    hc_state *s = R->ws;
    const sf_layer_views *Lv = views(R, k);
    const int sub = (int)(k % 2);
    const int64_t d = R->d, n = s->n, C = s->C, Z = s->Z, LF = s->lane_floats;
    for (int64_t l = 0; l < HC_LANES; l++) {
        const float *ln = s->lane + l * LF;
        if (s->mhc) {
            float *db = GRAD(R, Lv->hc_base[sub]), *dsc = GRAD(R, Lv->hc_scale[sub]);
            for (int64_t t = 0; t < Z; t++) db[t] += ln[t];
            for (int64_t t = 0; t < 3; t++) dsc[t] += ln[Z + t];
            continue;
        }
        float *dsa = GRAD(R, Lv->hc_alpha[sub]), *dsb = GRAD(R, Lv->hc_beta[sub]);
        for (int64_t t = 0; t < n * C; t++) dsa[t] += ln[t];
        for (int64_t t = 0; t < n; t++) dsb[t] += ln[n * C + t];
        if (!s->dyn) continue;
        float *dsc = GRAD(R, Lv->hc_scale[sub]), *dP = GRAD(R, Lv->hc_proj[sub]);
        dsc[0] += ln[n * C + n];
        dsc[1] += ln[n * C + n + 1];
        for (int64_t t = 0; t < (n + 2) * d; t++) dP[t] += ln[n * C + n + 2 + t];
    }
}

/* mHC, one token: dL/dH_k (dc) gets its read part a0_j dL/dh_0 (dh) and dL/dH̄ (g) through the
 * gain-free RMSNorm of vec(H) (x): sf_rmsnorm_backward's formula with the forward's 1/RMS, and
 * mean(g x) in eight partial sums instead of one chain of n d dependent adds */
static void mhc_norm_backward_token(float *dc, const float *g, const float *x, const float *dh, const float *al,
                                    float inv, int64_t n, int64_t d, int64_t C) {
    const int64_t nd = n * d;
    double acc[8] = {0}; /* mean(g x): eight partial sums (element e into e % 8), in order */
    int64_t e = 0;
    for (; e + 8 <= nd; e += 8)
        for (int q = 0; q < 8; q++) acc[q] += (double)g[e + q] * x[e + q];
    for (int q = 0; e < nd; e++, q++) acc[q] += (double)g[e] * x[e];
    const double sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    const float m = (float)(sum / (double)nd) * inv * inv;
    for (int64_t j = 0; j < n; j++) {
        const float a0 = al[j * C];
        float *dcj = dc + j * d;
        const float *xj = x + j * d, *gj = g + j * d;
        for (int64_t e = 0; e < d; e++) dcj[e] = (dcj[e] + a0 * dh[e]) + inv * (gj[e] - xj[e] * m);
    }
}

/* mHC's read backward after the Sinkhorn passes (dz[., 2n..] holds the logits' gradient), in
 * one pass over the tokens by lanes (HC_LANES fixed runs, so the parameter partials do not
 * depend on the thread count) and, inside a lane, by blocks of a register tile's rows: the
 * H_pre gradients <dL/dh_0, H_j>, the block's coefficient rows (dz, the base/scale partials),
 * dL/dH̄ = dz Phi made tile by tile into this thread's s->dHn (rows x n d: 48 KB at M), the
 * norm's backward on it while it is in L1/L2, and dz scaled by each token's 1/RMS. After all
 * lanes, dPhi += dz^T vec(H) (since H̄ = vec(H) / RMS) is one GEMM over all tokens. Written
 * out whole, dL/dH̄ was 12.6 MB per sublayer at M, stored by one product and read back by the
 * next pass, and H_k was read by one more pass. Each element of dL/dH̄ is sf_gemm's (zero,
 * then one fma per k ascending), so the bits are the same. */
static void mhc_read_backward(run *R, int64_t k, const float *Hk) {
    hc_state *s = R->ws;
    const sf_layer_views *Lv = views(R, k);
    const int sub = (int)(k % 2);
    const int64_t N = R->N, d = R->d, n = s->n, C = s->C, nd = n * d, Z = s->Z, LF = s->lane_floats;
    const int64_t mr = sf_gemm_tile_rows(), pw = 2 * SF_GEMM_NR;
    const float *P = Lv->hc_proj[sub], *zinv = mhc_zinv(R, k);
    sf_pack_panels(s->pack, P, nd, 0, Z, nd); /* Phi (Z x n d) as the product's B */
#pragma omp parallel num_threads(R->nt) if (N * nd > 32768)
    {
        float *g = s->dHn + (int64_t)sf_team_tid() * mr * nd;
#pragma omp for schedule(static)
        for (int64_t l = 0; l < HC_LANES; l++) {
            const int64_t l1 = N * (l + 1) / HC_LANES;
            for (int64_t r0 = N * l / HC_LANES; r0 < l1; r0 += mr) {
                const int64_t nb = l1 - r0 < mr ? l1 - r0 : mr;
                for (int64_t r = r0; r < r0 + nb; r++)
                    for (int64_t j = 0; j < n; j++)
                        s->ga[(r * n + j) * C] = sf_dot(s->dh0 + r * d, Hk + r * nd + j * d, d);
                coef_backward_rows(R, k, r0, r0 + nb, s->lane + l * LF);
                float *dz = s->dz + r0 * Z;
                for (int64_t c = 0; c < nd; c += pw)
                    sf_gemm_tile2(g + c, nd, dz, Z, 1, Z, s->pack + c * Z, Z * SF_GEMM_NR, NULL, nb,
                                  nd - c < pw ? nd - c : pw, 0);
                for (int64_t t = 0; t < nb; t++) {
                    const int64_t r = r0 + t;
                    mhc_norm_backward_token(s->dcur + r * nd, g + t * nd, Hk + r * nd, s->dh0 + r * d,
                                            s->alpha + r * n * C, zinv[r], n, d, C);
                    for (int64_t c = 0; c < Z; c++) dz[t * Z + c] *= zinv[r];
                }
            }
        }
    }
    coef_backward_sum(R, k);
    sf_gemm(GRAD(R, P), nd, s->dz, 1, Z, Hk, 0, NULL, Z, N, nd, 1, s->pack, R->nt);
}

/* dL/dH̄ (s->dHn) back through the copies' norm into dL/dH_k (s->dcur, accumulated) */
static void coef_backward_norm(run *R, int64_t k, const float *Hk) {
    hc_state *s = R->ws;
    const sf_layer_views *Lv = views(R, k);
    const int sub = (int)(k % 2);
    const int64_t N = R->N, d = R->d, n = s->n;
    if (R->c->norm == SF_NORM_LAYERNORM)
        sf_layernorm_backward(s->dcur, GRAD(R, Lv->hc_nw[sub]), GRAD(R, Lv->hc_nb[sub]), s->dHn, Hk, Lv->hc_nw[sub],
                              N * n, d, R->c->norm_eps, s->nstats, 1, R->nt);
    else
        sf_rmsnorm_backward(s->dcur, GRAD(R, Lv->hc_nw[sub]), s->dHn, Hk, Lv->hc_nw[sub], N * n, d, R->c->norm_eps,
                            s->nstats, 1, R->nt);
}

/* ---- the stream's per-token mixing ----
 * Every output element is the scalar loop's expression in the scalar loop's order (products
 * added from a zero or from the first term, no fused multiply-adds), and every dot product is
 * sf_dot's (eight lanes e % 8, sf_hsum8, then the tail), so these keep the bits of the plain
 * loops. Compiled twice (AVX2, and a clone for AVX-512 targets), and specialised for n = 4
 * (the papers' default) by inlining with a constant. */
#define V8_LD(v, p) memcpy(&(v), (p), sizeof(sf_v8))
#define V8_ST(p, v) memcpy((p), &(v), sizeof(sf_v8))
#define HC_AI static inline __attribute__((always_inline))

HC_AI float v8_hsum(sf_v8 a) {
    float l[8];
    memcpy(l, &a, sizeof l);
    return sf_hsum8(l);
}

/* Each pass below walks one row of the token (one copy, 1.5 KB at M) in memory order and keeps
 * what it accumulates in L1 (the token's rows are 6 KB at n = 4). Reading the n rows side by
 * side, 8 floats of each at a time, ran at about half the speed once the stream came from L3:
 * the hardware prefetchers follow one stream far better than n interleaved ones (Zen 4, the
 * mixing of M's 2048 tokens on one core: read 1.1 -> 0.45 ms). */

/* h = sum_j al[j C] x_j (the read): one pass per copy, adding into h */
HC_AI void mix_read_token(float *h, const float *x, const float *al, int64_t n, int64_t d, int64_t C) {
    for (int64_t j = 0; j < n; j++) {
        const float a = al[j * C], *xj = x + j * d;
        int64_t e = 0;
        for (; e + 8 <= d; e += 8) {
            sf_v8 acc = {0}, xv;
            if (j > 0) V8_LD(acc, h + e);
            V8_LD(xv, xj + e);
            acc += a * xv;
            V8_ST(h + e, acc);
        }
        for (; e < d; e++) h[e] = (j > 0 ? h[e] : 0.0f) + a * xj[e];
    }
}

/* o_i = be_i v + sum_j al[j C + 1 + i] x_j (the write): o_i = be_i v, then one pass per copy j
 * adding its share into every o_i */
HC_AI void mix_write_token(float *o, const float *v, const float *x, const float *al, const float *be, int64_t n,
                           int64_t d, int64_t C) {
    for (int64_t i = 0; i < n; i++) {
        float *oi = o + i * d;
        const float b = be[i];
        int64_t e = 0;
        for (; e + 8 <= d; e += 8) {
            sf_v8 vv;
            V8_LD(vv, v + e);
            vv = b * vv;
            V8_ST(oi + e, vv);
        }
        for (; e < d; e++) oi[e] = b * v[e];
    }
    for (int64_t j = 0; j < n; j++) {
        const float *xj = x + j * d;
        float a[MHC_MAX_N];
        for (int64_t i = 0; i < n; i++) a[i] = al[j * C + 1 + i];
        int64_t e = 0;
        for (; e + 8 <= d; e += 8) {
            sf_v8 xv, acc;
            V8_LD(xv, xj + e);
            for (int64_t i = 0; i < n; i++) {
                V8_LD(acc, o + i * d + e);
                acc += a[i] * xv;
                V8_ST(o + i * d + e, acc);
            }
        }
        for (; e < d; e++)
            for (int64_t i = 0; i < n; i++) o[i * d + e] += a[i] * xj[e];
    }
}

/* The write's backward for one token, from dn = dL/dH' (n x d): dv = sum_i be_i dn_i,
 * gb_i = <dn_i, v> (one pass per dn_i), then per copy j: dc_j = sum_i al[j C + 1 + i] dn_i and
 * ga[j C + 1 + i] = <dn_i, x_j> (one pass over x_j; dn is in L1 by then). The dots are
 * sf_dot's: eight lanes e % 8 in e order, sf_hsum8, then the tail. */
HC_AI void mix_write_backward_token(float *dv, float *dc, float *ga, float *gb, const float *dn, const float *x,
                                    const float *v, const float *al, const float *be, int64_t n, int64_t d,
                                    int64_t C) {
    const int64_t d8 = d / 8 * 8;
    for (int64_t i = 0; i < n; i++) {
        const float *dni = dn + i * d;
        const float b = be[i];
        sf_v8 agb = {0}, o, dnv, vv;
        for (int64_t e = 0; e < d8; e += 8) {
            o = (sf_v8){0};
            if (i > 0) V8_LD(o, dv + e);
            V8_LD(dnv, dni + e);
            V8_LD(vv, v + e);
            o += b * dnv;
            V8_ST(dv + e, o);
            agb += dnv * vv;
        }
        float sb = v8_hsum(agb);
        for (int64_t e = d8; e < d; e++) {
            sb += dni[e] * v[e];
            dv[e] = (i > 0 ? dv[e] : 0.0f) + b * dni[e];
        }
        gb[i] = sb;
    }
    for (int64_t j = 0; j < n; j++) {
        const float *xj = x + j * d;
        float *dcj = dc + j * d;
        float a[MHC_MAX_N];
        sf_v8 aga[MHC_MAX_N], xv, dnv;
        for (int64_t i = 0; i < n; i++) {
            a[i] = al[j * C + 1 + i];
            aga[i] = (sf_v8){0};
        }
        for (int64_t e = 0; e < d8; e += 8) {
            V8_LD(xv, xj + e);
            sf_v8 c = {0};
            for (int64_t i = 0; i < n; i++) {
                V8_LD(dnv, dn + i * d + e);
                c += a[i] * dnv;
                aga[i] += dnv * xv;
            }
            V8_ST(dcj + e, c);
        }
        for (int64_t i = 0; i < n; i++) {
            float sa = v8_hsum(aga[i]);
            for (int64_t e = d8; e < d; e++) sa += dn[i * d + e] * xj[e];
            ga[j * C + 1 + i] = sa;
        }
        for (int64_t e = d8; e < d; e++) {
            float c = 0.0f;
            for (int64_t i = 0; i < n; i++) c += a[i] * dn[i * d + e];
            dcj[e] = c;
        }
    }
}

/* tokens [r0, r1) of each pass; n = 4 inlined with the constant */
typedef struct {
    float *out, *out2, *ga, *gb;
    const float *x, *v, *dn, *alpha, *beta;
    int64_t n, d, C;
} mix_args;
enum { MIX_READ, MIX_WRITE, MIX_WRITE_BACKWARD };

HC_AI void mix_tokens_n(const mix_args *m, int op, int64_t r0, int64_t r1, int64_t n) {
    const int64_t d = m->d, C = m->C;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = m->x + r * n * d, *al = m->alpha + r * n * C;
        if (op == MIX_READ) mix_read_token(m->out + r * d, x, al, n, d, C);
        else if (op == MIX_WRITE) mix_write_token(m->out + r * n * d, m->v + r * d, x, al, m->beta + r * n, n, d, C);
        else
            mix_write_backward_token(m->out + r * d, m->out2 + r * n * d, m->ga + r * n * C, m->gb + r * n,
                                     m->dn + r * n * d, x, m->v + r * d, al, m->beta + r * n, n, d, C);
    }
}
HC_AI void mix_tokens_body(const mix_args *m, int op, int64_t r0, int64_t r1) {
    if (m->n == 4) mix_tokens_n(m, op, r0, r1, 4);
    else mix_tokens_n(m, op, r0, r1, m->n);
}
static void mix_tokens_plain(const mix_args *m, int op, int64_t r0, int64_t r1) { mix_tokens_body(m, op, r0, r1); }
#ifdef SF_X86
SF_TARGET_AVX512_WIDE static void mix_tokens_wide(const mix_args *m, int op, int64_t r0, int64_t r1) {
    mix_tokens_body(m, op, r0, r1);
}
#endif
#define MIX_TB 16 /* tokens per call */
static void mix_tokens(const run *R, const mix_args *m, int op) {
    const int64_t N = R->N, nblk = (N + MIX_TB - 1) / MIX_TB;
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * m->n * m->n * m->d > 65536)
    for (int64_t b = 0; b < nblk; b++) {
        const int64_t r0 = b * MIX_TB, r1 = N - r0 < MIX_TB ? N : r0 + MIX_TB;
        SF_WIDE_OR(mix_tokens_wide(m, op, r0, r1), mix_tokens_plain(m, op, r0, r1));
    }
}

/* ---- forward hooks ---- */

static float *embed_dst(run *R) { return R->acts[0].in_a; /* a staging row: begin copies it */ }

/* trace: row `row` of the per-copy RMS table, over all N*d elements of each copy of H */
static void record_copy_rms(const run *R, const float *H, int64_t row) {
    const hc_state *s = R->ws;
    const int64_t N = R->N, d = R->d, n = s->n;
    if (!R->copy_rms) return;
    for (int64_t j = 0; j < n; j++) {
        double ss = 0.0;
        for (int64_t r = 0; r < N; r++) {
            const float *x = H + (r * n + j) * d;
            for (int64_t e = 0; e < d; e++) ss += (double)x[e] * x[e];
        }
        R->copy_rms[row * n + j] = (float)sqrt(ss / (double)(N * d));
    }
}

static void begin(run *R, float *x0) {
    hc_state *s = R->ws;
    const int64_t N = R->N, d = R->d, n = s->n;
    float *H0 = stream(R, 0);
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * n * d > 65536)
    for (int64_t r = 0; r < N; r++)
        for (int64_t j = 0; j < n; j++) memcpy(H0 + (r * n + j) * d, x0 + r * d, (size_t)d * sizeof(float));
    record_copy_rms(R, H0, 0);
}

static void read(run *R, int64_t k, float *h, float *alpha_trace) {
    hc_state *s = R->ws;
    const int64_t N = R->N, d = R->d, n = s->n, C = s->C;
    const float *Hk = stream(R, k);
    coef_forward(R, k, Hk);
    const mix_args m = {.out = h, .x = Hk, .alpha = s->alpha, .n = n, .d = d, .C = C};
    mix_tokens(R, &m, MIX_READ);
    if (alpha_trace)
        for (int64_t r = 0; r < N; r++)
            for (int64_t j = 0; j < n; j++) alpha_trace[r * n + j] = s->alpha[(r * n + j) * C];
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
    sub_out_hook(R, k, v, trace_out);
    if (rms) rms[SF_RMS_OUTPUT] = rms_of(v, Nd);
    const float *Hk = stream(R, k);
    float *Hn = stream(R, k + 1);
    const mix_args m = {.out = Hn, .x = Hk, .v = v, .alpha = s->alpha, .beta = s->beta, .n = n, .d = d, .C = C};
    mix_tokens(R, &m, MIX_WRITE);
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
    record_copy_rms(R, Hn, k + 1);
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
    const int64_t d = R->d, n = s->n, C = s->C;
    const float *Hk = stream(R, k);
    if (s->mhc) mhc_maps(R, k, 1); /* the forward's maps from its z, every Sinkhorn iterate kept */
    else coef_forward(R, k, Hk); /* the forward's coefficients (and H̄), recomputed */
    const float *v = k % 2 == 0 ? R->acts[k / 2].y_a : R->acts[k / 2].y_m;
    if (!R->c->pre_norm) { /* v = dropout(Norm(y)), recomputed */
        const float *nw, *nb;
        sub_norm(R, k, &nw, &nb);
        norm_fwd(R, s->v, v, nw, nb);
        resid_dropout(R, s->v, k);
        v = s->v;
    }
    float *dv = R->dy;
    const mix_args m = {.out = dv, .out2 = s->dcur, .ga = s->ga, .gb = s->gb, .x = Hk, .v = v, .dn = s->dnext,
                        .alpha = s->alpha, .beta = s->beta, .n = n, .d = d, .C = C};
    mix_tokens(R, &m, MIX_WRITE_BACKWARD);
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

/* HC's read backward: per lane, the input-alpha gradients <dL/dh_0, H_j> and dL/dH_k's read part
 * alpha_{j,0} dL/dh_0, then the coefficient rows; the lanes' sums; HC dynamic through tanh, the
 * projection and the copies' norm */
static void hc_read_backward(run *R, int64_t k, const float *Hk) {
    hc_state *s = R->ws;
    const int64_t N = R->N, d = R->d, n = s->n, C = s->C, LF = s->lane_floats;
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * n * C * d > 65536)
    for (int64_t l = 0; l < HC_LANES; l++) {
        const int64_t r0 = N * l / HC_LANES, r1 = N * (l + 1) / HC_LANES;
        for (int64_t r = r0; r < r1; r++) {
            const float *dh = s->dh0 + r * d, *x = Hk + r * n * d;
            float *dc = s->dcur + r * n * d;
            for (int64_t j = 0; j < n; j++) {
                s->ga[(r * n + j) * C] = sf_dot(dh, x + j * d, d);
                const float a0 = s->alpha[(r * n + j) * C];
                for (int64_t e = 0; e < d; e++) dc[j * d + e] += a0 * dh[e];
            }
        }
        coef_backward_rows(R, k, r0, r1, s->lane + l * LF);
    }
    coef_backward_sum(R, k);
    if (s->dyn) coef_backward_norm(R, k, Hk);
}

/* dL/dh_0 is in s->dh0: the input-alpha gradients, dL/dH_k's read part, then the coefficient
 * gradients into the parameters (HC static; HC dynamic through tanh, the projection and the
 * copies' norm; mHC through the sigmoids, every Sinkhorn pass, the projection and the norm). */
static void read_backward(run *R, int64_t k) {
    hc_state *s = R->ws;
    const float *Hk = stream(R, k);
    memset(s->lane, 0, (size_t)(HC_LANES * s->lane_floats) * sizeof(float));
    if (s->mhc) {
        mhc_sinkhorn_backward(R);
        mhc_read_backward(R, k, Hk);
    } else {
        hc_read_backward(R, k, Hk);
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

#define SF_HYPER_HOOKS                      \
    .save_block_input = 0, /* every sublayer's stream is kept */ \
    .table_layer = table_layer, \
    .table_model = table_model, \
    .num_sources = num_sources, \
    .init = init, \
    .free = free_state, \
    .layout_block = layout_block, \
    .layout = layout, \
    .embed_dst = embed_dst, \
    .begin = begin, \
    .read = read, \
    .out_buf = out_buf, \
    .write = write, \
    .final = final, \
    .backward_begin = backward_begin, \
    .write_backward = write_backward, \
    .read_grad_dst = read_grad_dst, \
    .read_backward = read_backward, \
    .embed_grad = embed_grad, \
    .backward_end = backward_end

const sf_wiring sf_wiring_hyper_connections = {.name = "hyper_connections", SF_HYPER_HOOKS};
const sf_wiring sf_wiring_mhc = {.name = "mhc", SF_HYPER_HOOKS};
