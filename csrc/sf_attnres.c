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
        const float *x = src + n * d;
        double ss = 0.0;
        for (int64_t j = 0; j < d; j++) ss += (double)x[j] * x[j];
        inv_rms[n] = (float)(1.0 / sqrt(ss / (double)d + (double)eps));
    }
}

#define dotf sf_dot

int64_t sf_attnres_scratch_floats(int64_t nsrc, int64_t d, int n_threads) {
    return (int64_t)sf_threads_resolve(n_threads) * (d + nsrc);
}

void sf_attnres_aggregate(float *h, float *alpha_out, const float *const *src,
                          const float *const *inv_rms, int64_t nsrc, const float *q,
                          const float *g, int64_t N, int64_t d, float *scratch, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel num_threads(nt) if (N * d * nsrc > 65536)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        /* per-thread q ⊙ g (d floats) and logits (nsrc floats) */
        float *qg = scratch + (int64_t)tid * (d + nsrc);
        {
            float *s = qg + d;
            for (int64_t j = 0; j < d; j++) qg[j] = q[j] * g[j];
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) {
                float mx = -INFINITY;
                for (int64_t i = 0; i < nsrc; i++) {
                    s[i] = dotf(qg, src[i] + n * d, d) * inv_rms[i][n];
                    if (s[i] > mx) mx = s[i];
                }
                float sum = 0.0f;
                for (int64_t i = 0; i < nsrc; i++) { s[i] = sf_expf(s[i] - mx); sum += s[i]; }
                float inv = 1.0f / sum;
                float *hn = h + n * d;
                for (int64_t i = 0; i < nsrc; i++) {
                    float w = s[i] * inv;
                    const float *x = src[i] + n * d;
                    if (i == 0) for (int64_t j = 0; j < d; j++) hn[j] = w * x[j];
                    else for (int64_t j = 0; j < d; j++) hn[j] += w * x[j];
                    if (alpha_out) alpha_out[n * nsrc + i] = w;
                }
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
 * token's dh rows of all nr readers stay in L1 while its sources are read once and their
 * gradients written once: for Full, one source at a time gathered from all of its readers;
 * for Block, the readers of one block at a time over all completed blocks. These passes are
 * memory-bound, so the traffic is the cost. */
void sf_attnres_sources_backward(float *const *dsrc, const float *const *src,
                                 const float *const *inv_rms, int64_t nsrc, int64_t col0,
                                 int accumulate, const sf_attnres_reader *rd, int64_t nr,
                                 int64_t e_tstride, int64_t N, int64_t d, int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel num_threads(nt) if (N * d * nr * nsrc > 65536)
    {
        int64_t eoff = 0;
#ifdef _OPENMP
        eoff = (int64_t)omp_get_thread_num() * e_tstride;
#endif
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++)
            for (int64_t i = 0; i < nsrc; i++) {
                const float *x = src[i] + n * d;
                float *dx = dsrc[i] + n * d;
                float r = inv_rms[i][n], c2 = 0.0f;
                if (!accumulate) memset(dx, 0, (size_t)d * sizeof(float));
                for (int64_t j = 0; j < nr; j++) {
                    const float *g = rd[j].dh + n * d, *qg = rd[j].qg;
                    float *e = rd[j].e + eoff;
                    float a = rd[j].alpha[n * rd[j].ld + col0 + i];
                    float ds = a * (dotf(g, x, d) - rd[j].S[n]);
                    float c1 = ds * r;
                    c2 += c1 * dotf(qg, x, d) * r * r;
                    for (int64_t k = 0; k < d; k++) {
                        dx[k] += a * g[k] + c1 * qg[k];
                        e[k] += c1 * x[k];
                    }
                }
                c2 /= (float)d;
                for (int64_t k = 0; k < d; k++) dx[k] -= c2 * x[k];
            }
    }
}

void sf_attnres_row_dots(float *S, const float *a, const float *b, int64_t N, int64_t d,
                         int n_threads) {
    int nt = sf_threads_resolve(n_threads);
#pragma omp parallel for schedule(static) num_threads(nt) if (N * d > 65536)
    for (int64_t n = 0; n < N; n++) S[n] = dotf(a + n * d, b + n * d, d);
}
