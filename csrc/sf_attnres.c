/* Attention Residuals: each sublayer's input is a learned softmax mixture of earlier outputs.
 *
 * Per token: K_i = src_i / rms(src_i) ⊙ g, s_i = q · K_i = (q ⊙ g) · src_i * inv_rms_i,
 * alpha = softmax(s), h = Σ alpha_i src_i. Folding q ⊙ g into one vector and caching each
 * source's per-token inverse RMS means a source is normalized once, however many later
 * sublayers read it.
 */
#include "sf_internal.h"
#include "sf_kernels.h"

#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

void sf_attnres_inv_rms(float *inv_rms, const float *src, int64_t N, int64_t d, float eps,
                        int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (N * d > 65536)
    for (int64_t n = 0; n < N; n++) {
        /* partial sums: one running sum was ~0.4% of a Block AttnRes train step at M */
        double ss = sf_sumsq_d(src + n * d, d);
        inv_rms[n] = (float)(1.0 / sqrt(ss / (double)d + (double)eps));
    }
}

#define dotf sf_dot

/* Tokens per tile in the aggregation and its backward. A source's rows of one tile are one
 * contiguous stretch (TILE * d floats), walked before the next source's: per token, the nsrc
 * rows sit in nsrc different buffers, and interleaving that many streams row by row outruns
 * the hardware prefetchers, leaving every row's first load a cache miss (70% of the pass's
 * time, measured at Full AttnRes M). A tile's rows stay in L1/L2 between the passes over them,
 * and every token still sees its sources in the same order (the aggregation kept its bits). */
#define AR_TILE 16

/* Ask for the next stretch (rows n0.. of the next buffer) while this one is being used. */
static inline void prefetch_rows(const float *p, int64_t nfloats) {
    for (int64_t k = 0; k < nfloats; k += 16) __builtin_prefetch(p + k, 0, 2);
}

/* 8 floats as one value (GCC/Clang vector extension; one AVX register, or two SSE ones), for
 * the backward's register-held chunks: there a plain float array was kept on the stack (the
 * backward gather ran ~7% slower). Element-wise, the same arithmetic as the scalar code. */
typedef float v8 __attribute__((vector_size(32)));
/* loads and stores as memcpy (no alignment assumed); macros, since a function taking or
 * returning a v8 has a different ABI without AVX (GCC warns in the portable build) */
#define LD8(v, p) memcpy(&(v), (p), sizeof(v8))
#define ST8(p, v) memcpy((p), &(v), sizeof(v8))

int64_t sf_attnres_scratch_floats(int64_t nsrc, int64_t d, int n_threads) {
    return (int64_t)sf_threads_resolve(n_threads) * (d + AR_TILE * nsrc);
}

void sf_attnres_aggregate(float *h, float *alpha_out, const float *const *src,
                          const float *const *inv_rms, int64_t nsrc, const float *q,
                          const float *g, int64_t N, int64_t d, float *scratch, int n_threads) {
    sf_attnres_aggregate_mix(h, alpha_out, src, inv_rms, nsrc, q, g, N, d, 0, scratch, n_threads);
}

void sf_attnres_aggregate_mix(float *h, float *alpha_out, const float *const *src,
                              const float *const *inv_rms, int64_t nsrc, const float *q,
                              const float *g, int64_t N, int64_t d, int sigmoid, float *scratch,
                              int n_threads) {
    int nt = sf_threads_resolve(n_threads);
    int64_t ntiles = (N + AR_TILE - 1) / AR_TILE;
#pragma omp parallel num_threads(nt) if (N * d * nsrc > 65536)
    {
        const int tid = sf_team_tid();
        /* per-thread q ⊙ g (d floats) and a tile's logits, then weights (AR_TILE × nsrc) */
        float *qg = scratch + (int64_t)tid * (d + AR_TILE * nsrc);
        float *s = qg + d;
        for (int64_t j = 0; j < d; j++) qg[j] = q[j] * g[j];
#pragma omp for schedule(static)
        for (int64_t tb = 0; tb < ntiles; tb++) {
            int64_t n0 = tb * AR_TILE, nn = N - n0 < AR_TILE ? N - n0 : AR_TILE;
            for (int64_t i = 0; i < nsrc; i++)
                for (int64_t t = 0; t < nn; t++)
                    s[t * nsrc + i] = dotf(qg, src[i] + (n0 + t) * d, d) * inv_rms[i][n0 + t];
            for (int64_t t = 0; t < nn && sigmoid; t++) { /* independent gates, in place */
                float *st = s + t * nsrc;
                for (int64_t i = 0; i < nsrc; i++) st[i] = 1.0f / (1.0f + sf_expf(-st[i]));
                if (alpha_out) memcpy(alpha_out + (n0 + t) * nsrc, st, (size_t)nsrc * sizeof(float));
            }
            for (int64_t t = 0; t < nn && !sigmoid; t++) { /* softmax over the sources, in place */
                float *st = s + t * nsrc, mx = -INFINITY, sum = 0.0f;
                for (int64_t i = 0; i < nsrc; i++) if (st[i] > mx) mx = st[i];
                for (int64_t i = 0; i < nsrc; i++) { st[i] = sf_expf(st[i] - mx); sum += st[i]; }
                float inv = 1.0f / sum;
                for (int64_t i = 0; i < nsrc; i++) st[i] *= inv;
                if (alpha_out) memcpy(alpha_out + (n0 + t) * nsrc, st, (size_t)nsrc * sizeof(float));
            }
            for (int64_t i = 0; i < nsrc; i++)
                for (int64_t t = 0; t < nn; t++) {
                    float w = s[t * nsrc + i];
                    const float *x = src[i] + (n0 + t) * d;
                    float *hn = h + (n0 + t) * d;
                    if (i == 0) for (int64_t j = 0; j < d; j++) hn[j] = w * x[j];
                    else for (int64_t j = 0; j < d; j++) hn[j] += w * x[j];
                }
        }
    }
}

void sf_attnres_phase1(float *m, float *l, float *o, float *logits, const float *const *src,
                       const float *const *inv_rms, int64_t nsrc, const float *qg, int64_t nq,
                       int64_t N, int64_t d, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
    /* One pass over the completed blocks serves all nq queries of the block: each source row
     * is loaded once per token and dotted with every query (the batched phase). */
#pragma omp parallel for schedule(static) num_threads(nt) if (N * d * nsrc * nq > 65536)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t j = 0; j < nq; j++) {
            float *on = o + (j * N + n) * d;
            memset(on, 0, (size_t)d * sizeof(float));
            m[j * N + n] = -INFINITY;
            l[j * N + n] = 0.0f;
        }
        for (int64_t i = 0; i < nsrc; i++) {
            const float *x = src[i] + n * d;
            for (int64_t j = 0; j < nq; j++) {
                float sc = dotf(qg + j * d, x, d) * inv_rms[i][n];
                if (logits) logits[(j * N + n) * nsrc + i] = sc;
                /* online softmax: rescale the running state when the max grows */
                float *mj = &m[j * N + n], *lj = &l[j * N + n], *on = o + (j * N + n) * d;
                if (sc > *mj) {
                    float r = sf_expf(*mj - sc); /* exp(-inf) = 0 on the first source */
                    *lj *= r;
                    for (int64_t k = 0; k < d; k++) on[k] *= r;
                    *mj = sc;
                }
                float e = sf_expf(sc - *mj);
                *lj += e;
                for (int64_t k = 0; k < d; k++) on[k] += e * x[k];
            }
        }
    }
}

void sf_attnres_phase2(float *h, float *alpha_out, const float *m, const float *l,
                       const float *o, const float *logits, int64_t nsrc, const float *partial,
                       const float *partial_inv_rms, const float *qg, int64_t N, int64_t d,
                       int n_threads) {
    int nt = sf_threads_resolve(n_threads);
    int64_t na = nsrc + (partial ? 1 : 0);
#pragma omp parallel for schedule(static) num_threads(nt) if (N * d > 65536)
    for (int64_t n = 0; n < N; n++) {
        const float *on = o + n * d;
        float *hn = h + n * d;
        float mx = m[n], sum = l[n], sp = -INFINITY, rs = 1.0f, ep = 0.0f;
        if (partial) { /* merge the one extra source into the online state */
            const float *p = partial + n * d;
            sp = dotf(qg, p, d) * partial_inv_rms[n];
            float mnew = sp > mx ? sp : mx;
            rs = sf_expf(mx - mnew);
            ep = sf_expf(sp - mnew);
            sum = sum * rs + ep;
            mx = mnew;
            float inv = 1.0f / sum;
            for (int64_t k = 0; k < d; k++) hn[k] = (on[k] * rs + ep * p[k]) * inv;
        } else {
            float inv = 1.0f / sum;
            for (int64_t k = 0; k < d; k++) hn[k] = on[k] * inv;
        }
        if (alpha_out && logits) {
            float inv = 1.0f / sum;
            for (int64_t i = 0; i < nsrc; i++) alpha_out[n * na + i] = sf_expf(logits[n * nsrc + i] - mx) * inv;
            if (partial) alpha_out[n * na + nsrc] = ep * inv;
        }
    }
}

/* Per token, for source x_i (r = inv_rms_i) and each reader j (a = its alpha for x_i, S_j =
 * dh_j·h_j = Σ_i' alpha_i' dh_j·x_i'; the softmax's backward needs exactly this sum):
 *   ds = a (dh_j·x − S_j);  dx += a dh_j + ds r (qg_j − (qg_j·x) r² x / d);  e_j += ds r x
 * Why readers are batched: each reader's terms touch every source it read, and scattering them
 * one reader at a time reads and writes every earlier source's gradient at every reader
 * (L²/2 read-modify-writes of N×d for Full AttnRes, on top of the reads of the sources). Here a
 * tile's sources are read once and their gradients written once while all nr readers' dh rows
 * stream past: for Full, one source at a time gathered from all of its readers; for Block, the
 * readers of one block at a time over all completed blocks. The RMS path's Σ_j ds r (qg_j·x)
 * comes from dx·x at the end (see xd below) rather than from a second dot per reader. */

#define AR_RG 32 /* readers per group in the two passes (their weights wait in fixed arrays) */
#define AR_CH 32 /* floats of dx and x held in registers across a group's readers */

/* dx += Σ_j a_j dh_j + c_j qg_j and e_j += c_j x for one token (row offset off) and readers
 * rd[0..jn): per element the same sums in the same order as a reader-at-a-time loop. */
static void backward_updates(float *dx, const float *x, const sf_attnres_reader *rd, int64_t jn,
                             const float *av, const float *cv, int64_t off, int64_t eoff,
                             int64_t d) {
    int64_t k0 = 0;
    for (; k0 + AR_CH <= d; k0 += AR_CH) {
        v8 acc[AR_CH / 8], xv[AR_CH / 8];
        for (int c = 0; c < AR_CH / 8; c++) { /* via locals: acc and xv never have their address taken */
            v8 t, u;
            LD8(t, dx + k0 + 8 * c);
            LD8(u, x + k0 + 8 * c);
            acc[c] = t;
            xv[c] = u;
        }
        for (int64_t j = 0; j < jn; j++) {
            const float *g = rd[j].dh + off + k0, *qg = rd[j].qg + k0;
            float *e = rd[j].e + eoff + k0, a = av[j], c1 = cv[j];
            for (int c = 0; c < AR_CH / 8; c++) {
                v8 gv, qv, ev;
                LD8(gv, g + 8 * c);
                LD8(qv, qg + 8 * c);
                LD8(ev, e + 8 * c);
                acc[c] += a * gv + c1 * qv;
                ev += c1 * xv[c];
                ST8(e + 8 * c, ev);
            }
        }
        for (int c = 0; c < AR_CH / 8; c++) {
            v8 t = acc[c];
            ST8(dx + k0 + 8 * c, t);
        }
    }
    if (k0 < d)
        for (int64_t j = 0; j < jn; j++) {
            const float *g = rd[j].dh + off, *qg = rd[j].qg;
            float *e = rd[j].e + eoff, a = av[j], c = cv[j];
            for (int64_t k = k0; k < d; k++) {
                dx[k] += a * g[k] + c * qg[k];
                e[k] += c * x[k];
            }
        }
}

#define AR_FUSE 4 /* sources whose pass-1 dots share one load of each dh row */

/* out[i] = dotf(g, x[i] + off, d) for i < NI, bit for bit (the same eight lanes, the same
 * final combination), loading g once for all of them. NI is a constant at each call site. */
static inline __attribute__((always_inline)) void dots_n(float *out, const float *g,
                                                           const float *const *x, int64_t off,
                                                           const int NI, int64_t d) {
    v8 acc[AR_FUSE];
    for (int i = 0; i < NI; i++) acc[i] = (v8){0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= d; k += 8) {
        v8 gv;
        LD8(gv, g + k);
        for (int i = 0; i < NI; i++) {
            v8 xv;
            LD8(xv, x[i] + off + k);
            acc[i] += gv * xv;
        }
    }
    for (int i = 0; i < NI; i++) {
        float lanes[8];
        v8 t = acc[i];
        memcpy(lanes, &t, sizeof lanes);
        float s = sf_hsum8(lanes);
        for (int64_t kk = k; kk < d; kk++) s += g[kk] * x[i][off + kk];
        out[i] = s;
    }
}

static void dots_fused(float *out, const float *g, const float *const *x, int64_t off, int ni,
                       int64_t d) {
    switch (ni) {
    case 1: dots_n(out, g, x, off, 1, d); break;
    case 2: dots_n(out, g, x, off, 2, d); break;
    case 3: dots_n(out, g, x, off, 3, d); break;
    default: dots_n(out, g, x, off, 4, d); break;
    }
}

void sf_attnres_sources_backward(float *const *dsrc, const float *const *src,
                                 const float *const *inv_rms, int64_t nsrc, int64_t col0,
                                 int accumulate, const sf_attnres_reader *rd, int64_t nr,
                                 int64_t e_tstride, int64_t N, int64_t d, int key_norm,
                                 int n_threads) {
    int nt = sf_threads_resolve(n_threads);
    int64_t ntiles = (N + AR_TILE - 1) / AR_TILE;
#pragma omp parallel num_threads(nt) if (N * d * nr * nsrc > 65536)
    {
        float xd[AR_FUSE][AR_TILE], av[AR_FUSE][AR_TILE][AR_RG], cv[AR_FUSE][AR_TILE][AR_RG];
        /* The rows are split into SF_AR_LANES fixed runs of tiles, each with its own e
         * accumulators and walked in order by one thread, so every e sum has the same terms in
         * the same order for any thread count (per-thread accumulators did not: dq/dg differed
         * between 1 and 2 threads). A tile at a time (see AR_TILE), reader-major inside it: one
         * reader's dh rows for the tile are one contiguous stretch, and the tile's x and dx
         * rows stay in L1/L2. Up to AR_FUSE sources share pass 1: each dh row is loaded once
         * for all of their dots. */
#pragma omp for schedule(static)
        for (int64_t lane = 0; lane < SF_AR_LANES; lane++)
        for (int64_t tb = ntiles * lane / SF_AR_LANES; tb < ntiles * (lane + 1) / SF_AR_LANES; tb++) {
            const int64_t eoff = lane * e_tstride;
            int64_t n0 = tb * AR_TILE, nn = N - n0 < AR_TILE ? N - n0 : AR_TILE;
            for (int64_t i0 = 0; i0 < nsrc; i0 += AR_FUSE) {
                const int ni = (int)(nsrc - i0 < AR_FUSE ? nsrc - i0 : AR_FUSE);
                /* xd = (dx before this call) · x + Σ_j a (dh_j · x): subtracted from dx · x at
                 * the end, it leaves Σ_j c1 (qg_j · x), so the RMS path costs one dot per token
                 * instead of one per reader */
                for (int i = 0; i < ni; i++)
                    for (int64_t t = 0; t < nn; t++) {
                        const float *x = src[i0 + i] + (n0 + t) * d;
                        float *dx = dsrc[i0 + i] + (n0 + t) * d;
                        if (accumulate) xd[i][t] = dotf(dx, x, d);
                        else { xd[i][t] = 0.0f; memset(dx, 0, (size_t)d * sizeof(float)); }
                    }
                for (int64_t j0 = 0; j0 < nr; j0 += AR_RG) {
                    int64_t jn = nr - j0 < AR_RG ? nr - j0 : AR_RG;
                    /* pass 1, reader-major: the dots, streaming each reader's dh rows (and
                     * asking for the next reader's while this one's are read) */
                    for (int64_t j = 0; j < jn; j++) {
                        const sf_attnres_reader *R = &rd[j0 + j];
                        if (j0 + j + 1 < nr) prefetch_rows(rd[j0 + j + 1].dh + n0 * d, nn * d);
                        for (int64_t t = 0; t < nn; t++) {
                            int64_t n = n0 + t;
                            float gx[AR_FUSE];
                            dots_fused(gx, R->dh + n * d, src + i0, n * d, ni, d);
                            for (int i = 0; i < ni; i++) {
                                float a = R->alpha[n * R->ld + col0 + i0 + i];
                                av[i][t][j] = a;
                                /* softmax: ds = a (dh·x - S); sigmoid gate: ds = a (1 - a) dh·x */
                                cv[i][t][j] = (R->sigmoid ? a * (1.0f - a) * gx[i] : a * (gx[i] - R->S[n])) * inv_rms[i0 + i][n];
                                xd[i][t] += a * gx[i];
                            }
                        }
                    }
                    /* pass 2, token-major over the rows pass 1 left in L2: a chunk of dx and x
                     * stays in registers across all readers */
                    for (int i = 0; i < ni; i++)
                        for (int64_t t = 0; t < nn; t++)
                            backward_updates(dsrc[i0 + i] + (n0 + t) * d, src[i0 + i] + (n0 + t) * d,
                                             rd + j0, jn, av[i][t], cv[i][t], (n0 + t) * d, eoff, d);
                }
                for (int i = 0; key_norm && i < ni; i++) /* the RMS path (none without key norm) */
                    for (int64_t t = 0; t < nn; t++) {
                        int64_t n = n0 + t;
                        const float *x = src[i0 + i] + n * d;
                        float *dx = dsrc[i0 + i] + n * d, r = inv_rms[i0 + i][n];
                        float c2 = (dotf(dx, x, d) - xd[i][t]) * r * r / (float)d;
                        for (int64_t k = 0; k < d; k++) dx[k] -= c2 * x[k];
                    }
            }
        }
    }
}

void sf_attnres_row_dots(float *S, const float *a, const float *b, int64_t N, int64_t d,
                         int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (N * d > 65536)
    for (int64_t n = 0; n < N; n++) S[n] = dotf(a + n * d, b + n * d, d);
}

/* ---- the general read (see sf_internal.h): heads, per-token queries, static weights, windows.
 * Written for clarity over speed (these are ablations): per token, per head, per source, with
 * every sum in ascending order, so a token's results do not depend on which thread runs it. */

int64_t sf_attnres_general_scratch_floats(int64_t nsrc, int64_t H, int n_threads) {
    return (int64_t)sf_threads_resolve(n_threads) * 3 * H * nsrc;
}

/* alpha_t (H, nsrc) of token n: the logits, then softmax or sigmoid per head */
static void general_weights(float *a, const float *const *src, const float *const *inv_rms,
                            int64_t nsrc, const sf_attnres_read *rd, int64_t n, int64_t d) {
    const int64_t H = rd->H, dh = d / H;
    const float *qg = rd->qg ? rd->qg + n * rd->qg_ld : NULL;
    for (int64_t h = 0; h < H; h++) {
        float *ah = a + h * nsrc;
        for (int64_t i = 0; i < nsrc; i++)
            ah[i] = rd->drop && rd->drop[i] ? -INFINITY
                    : rd->mixing == SF_MIX_STATIC ? rd->logits[h * nsrc + i]
                                                  : dotf(qg + h * dh, src[i] + n * d + h * dh, dh) * inv_rms[i][n];
        if (rd->mixing == SF_MIX_SIGMOID) { /* a dropped gate is 0 */
            for (int64_t i = 0; i < nsrc; i++) ah[i] = rd->drop && rd->drop[i] ? 0.0f : 1.0f / (1.0f + sf_expf(-ah[i]));
            continue;
        }
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t i = 0; i < nsrc; i++) if (ah[i] > mx) mx = ah[i];
        for (int64_t i = 0; i < nsrc; i++) { ah[i] = sf_expf(ah[i] - mx); sum += ah[i]; }
        float inv = 1.0f / sum;
        for (int64_t i = 0; i < nsrc; i++) ah[i] *= inv;
    }
}

void sf_attnres_general_forward(float *h, float *alpha_out, const float *const *src,
                                const float *const *inv_rms, int64_t nsrc, const sf_attnres_read *rd,
                                int64_t N, int64_t d, float *scratch, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
    const int64_t H = rd->H, dh = d / H, w = H * nsrc;
#pragma omp parallel num_threads(nt) if (N * d * nsrc > 65536)
    {
        float *a = scratch + (int64_t)sf_team_tid() * 3 * w;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (rd->alpha_in) memcpy(a, rd->alpha_in + n * w, (size_t)w * sizeof(float));
            else general_weights(a, src, inv_rms, nsrc, rd, n, d);
            if (alpha_out) memcpy(alpha_out + n * w, a, (size_t)w * sizeof(float));
            float *hn = h + n * d;
            for (int64_t hh = 0; hh < H; hh++)
                for (int64_t i = 0; i < nsrc; i++) {
                    const float wi = a[hh * nsrc + i], *x = src[i] + n * d + hh * dh;
                    float *y = hn + hh * dh;
                    if (i == 0) for (int64_t e = 0; e < dh; e++) y[e] = wi * x[e];
                    else for (int64_t e = 0; e < dh; e++) y[e] += wi * x[e];
                }
        }
    }
}

/* d s / d src for s = r (qg·x)_h with r = 1/sqrt(mean(x²)+eps) over the whole row:
 * ds/dx_e = r qg_e [e in h] - (qg·x)_h r³ x_e / d, so the RMS term of source i collects
 * Σ_h ds_h (qg·x)_h once per token. */
void sf_attnres_general_backward(float *const *dsrc, const float *const *src,
                                 const float *const *inv_rms, int64_t nsrc, const sf_attnres_read *rd,
                                 const float *alpha, const float *dh, int key_norm, float *dqg_lanes,
                                 float *dqg_rows, float *dlogit_lanes, int64_t lane_stride, int64_t N,
                                 int64_t d, float *scratch, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
    const int64_t H = rd->H, hd = d / H, w = H * nsrc;
    const int stat = rd->mixing == SF_MIX_STATIC;
#pragma omp parallel num_threads(nt) if (N * d * nsrc > 65536)
    {
        float *ga = scratch + (int64_t)sf_team_tid() * 3 * w, *ds = ga + w, *P = ds + w;
#pragma omp for schedule(static)
        for (int64_t lane = 0; lane < SF_AR_LANES; lane++)
        for (int64_t n = N * lane / SF_AR_LANES; n < N * (lane + 1) / SF_AR_LANES; n++) {
            const float *a = alpha + n * w, *g = dh + n * d;
            const float *qg = stat ? NULL : rd->qg + n * rd->qg_ld;
            float *dq = dqg_rows ? dqg_rows + n * d : dqg_lanes ? dqg_lanes + lane * lane_stride : NULL;
            for (int64_t h = 0; h < H; h++) {
                float c = 0.0f;
                for (int64_t i = 0; i < nsrc; i++) {
                    ga[h * nsrc + i] = dotf(g + h * hd, src[i] + n * d + h * hd, hd); /* dL/d alpha */
                    c += a[h * nsrc + i] * ga[h * nsrc + i];
                }
                for (int64_t i = 0; i < nsrc; i++) { /* dL/ds: softmax (static too) or sigmoid gates */
                    float ai = a[h * nsrc + i], gi = ga[h * nsrc + i];
                    ds[h * nsrc + i] = rd->mixing == SF_MIX_SIGMOID ? ai * (1.0f - ai) * gi : ai * (gi - c);
                }
            }
            for (int64_t i = 0; i < nsrc; i++) {
                const float *x = src[i] + n * d, r = inv_rms[i][n];
                float *dx = dsrc[i] + n * d, corr = 0.0f;
                if (!stat && key_norm) {
                    for (int64_t h = 0; h < H; h++) {
                        P[h] = dotf(qg + h * hd, x + h * hd, hd);
                        corr += ds[h * nsrc + i] * P[h];
                    }
                    corr *= r * r * r / (float)d;
                }
                for (int64_t h = 0; h < H; h++) {
                    const float ai = a[h * nsrc + i], ci = ds[h * nsrc + i] * r;
                    const int64_t e0 = h * hd, e1 = e0 + hd;
                    if (stat) {
                        for (int64_t e = e0; e < e1; e++) dx[e] += ai * g[e];
                        continue;
                    }
                    for (int64_t e = e0; e < e1; e++) {
                        dx[e] += ai * g[e] + ci * qg[e] - corr * x[e];
                        dq[e] += ci * x[e];
                    }
                }
            }
            if (stat) {
                float *db = dlogit_lanes + lane * lane_stride;
                for (int64_t j = 0; j < w; j++) db[j] += ds[j];
            }
        }
    }
}
