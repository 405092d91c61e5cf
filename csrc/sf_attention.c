/* Multi-head self-attention, with optional Mixture-of-Depths depth slots; forward and backward.
 *
 * One query row at a time: its visible sequence logits and depth logits go into one scratch
 * row, one softmax covers both (MoDA's joint softmax), and the output is the weighted sum of
 * sequence values and depth values. Memory is O(T) per thread, never a T x T buffer unless
 * the caller asks for the probabilities as a trace; the backward pass recomputes each row's
 * probabilities from the saved log-sum-exp (flash-attention style). Depth slots are read in
 * place from the arena (B, T, n_slots, Hkv, dh): nothing is gathered per query.
 */
#include "sf_internal.h"
#include "sf_kernels.h"

#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static int64_t depth_cols(const sf_attn_args *a) { return a->n_read * a->chunk; }

int64_t sf_attention_scratch_floats(const sf_attn_args *a, int n_threads) {
    return (int64_t)sf_threads_resolve(n_threads) * (a->Tk + depth_cols(a));
}

#define dot sf_dot
#define axpy sf_axpy

static inline const float *key_row(const sf_attn_args *a, const float *base, int64_t b, int64_t u,
                                   int64_t g) {
    return base + b * a->kv_bstride + u * a->Hkv * a->dh + g * a->dh;
}

static inline const float *depth_row(const sf_attn_args *a, const float *base, int64_t b,
                                     int64_t u, int64_t i, int64_t g) {
    return base + b * a->depth_bstride + ((u * a->n_slots + i) * a->Hkv + g) * a->dh;
}

/* Logits of query row (b, h, t) into s[0 .. Tk + dcols); -inf marks invisible columns.
 * Returns the row max (-inf when nothing is visible). t is the query's absolute position. */
static float row_logits(const sf_attn_args *a, const float *qt, int64_t b, int64_t g, int64_t t,
                        float scale, float *s) {
    const int64_t Tk = a->Tk, nd = a->n_read, dcols = depth_cols(a), C = a->chunk;
    const uint8_t *pad = a->key_padding_mask ? a->key_padding_mask + b * Tk : NULL;
    const int seq_visible = !(a->depth_only && nd > 0); /* depth-only ablation */
    const int64_t u_end = a->causal ? t + 1 : Tk;
    const int64_t cs = (t / C) * C; /* first position of t's chunk */
    float mx = -INFINITY;
    for (int64_t u = 0; u < Tk; u++) {
        float sc = -INFINITY;
        if (seq_visible && u < u_end && (!pad || pad[u]))
            sc = dot(qt, key_row(a, a->k, b, u, g), a->dh) * scale;
        s[u] = sc;
        mx = sc > mx ? sc : mx;
    }
    for (int64_t c = 0; c < dcols; c++) {
        int64_t u = cs + c / nd, i = c % nd;
        float sc = -INFINITY;
        if (u <= t && u < Tk && (!pad || pad[u])) /* padding exposes no depth slots either */
            sc = dot(qt, depth_row(a, a->depth_k, b, u, i, g), a->dh) * scale;
        s[Tk + c] = sc;
        mx = sc > mx ? sc : mx;
    }
    return mx;
}

void sf_attention_forward(const sf_attn_args *a, const float *q, float *out, float *lse,
                          float *probs, float *depth_mass, float *scratch, int n_threads) {
    const int64_t B = a->B, Tq = a->Tq, Tk = a->Tk, H = a->H, dh = a->dh;
    const int64_t G = H / a->Hkv, qd = H * dh, C = a->chunk, nd = a->n_read;
    const int64_t dcols = depth_cols(a), width = Tk + dcols, rows = B * H * Tq;
    const float scale = 1.0f / sqrtf((float)dh);
    const int nt = sf_threads_resolve(n_threads);

#pragma omp parallel num_threads(nt) if (rows * width * dh > (1 << 20))
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *s = scratch + (int64_t)tid * width;
#pragma omp for schedule(dynamic, 8)
        for (int64_t row = 0; row < rows; row++) {
            int64_t b = row / (H * Tq), h = (row / Tq) % H, tq = row % Tq, g = h / G;
            int64_t t = a->q_pos0 + tq;
            const float *qt = q + (b * Tq + tq) * qd + h * dh;
            float *ot = out + (b * Tq + tq) * qd + h * dh;
            float mx = row_logits(a, qt, b, g, t, scale, s);
            memset(ot, 0, (size_t)dh * sizeof(float));
            if (mx == -INFINITY) { /* nothing visible: p = 0, output 0 */
                if (lse) lse[row] = -INFINITY;
                if (probs) memset(probs + row * width, 0, (size_t)width * sizeof(float));
                if (depth_mass) depth_mass[row] = 0.0f;
                continue;
            }
            for (int64_t c = 0; c < width; c++) s[c] = sf_expf(s[c] - mx); /* exp(-inf) = 0 */
            float sum = sf_sum(s, width);
            float inv = 1.0f / sum, dmass = 0.0f;
            if (lse) lse[row] = mx + logf(sum);
            if (a->dropout > 0.0f) /* the trace keeps the undropped probabilities */
                for (int64_t c = 0; c < width; c++)
                    s[c] *= sf_dropout_scale(a->dropout_seed, a->dropout_stream, (uint64_t)(row * width + c), a->dropout);
            for (int64_t u = 0; u < Tk; u++) {
                if (s[u] == 0.0f) continue;
                s[u] *= inv;
                axpy(ot, s[u], key_row(a, a->v, b, u, g), dh);
            }
            int64_t cs = (t / C) * C;
            for (int64_t c = 0; c < dcols; c++) {
                if (s[Tk + c] == 0.0f) continue;
                s[Tk + c] *= inv;
                dmass += s[Tk + c];
                axpy(ot, s[Tk + c], depth_row(a, a->depth_v, b, cs + c / nd, c % nd, g), dh);
            }
            if (probs) memcpy(probs + row * width, s, (size_t)width * sizeof(float));
            if (depth_mass) depth_mass[row] = dmass;
        }
    }
}

/* Backward. Work is split by (batch, kv head): a unit owns dK/dV rows of its kv head, the
 * depth-slot gradients of its kv head and dQ of the query heads that share it, so no two
 * threads ever write the same float and the result does not depend on the thread count. */
void sf_attention_backward(const sf_attn_args *a, const float *q, const float *out,
                           const float *dout, const float *lse, float *dq, float *dk, float *dv,
                           float *ddepth_k, float *ddepth_v, float *scratch, int n_threads) {
    const int64_t B = a->B, Tq = a->Tq, Tk = a->Tk, H = a->H, Hkv = a->Hkv, dh = a->dh;
    const int64_t G = H / Hkv, qd = H * dh, kvd = Hkv * dh, C = a->chunk, nd = a->n_read;
    const int64_t dcols = depth_cols(a), width = Tk + dcols;
    const float scale = 1.0f / sqrtf((float)dh);
    const int nt = sf_threads_resolve(n_threads);
    const int64_t units = B * Hkv;

#pragma omp parallel num_threads(nt) if (B * H * Tq * width * dh > (1 << 20))
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *s = scratch + (int64_t)tid * width;
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < units; unit++) {
            int64_t b = unit / Hkv, g = unit % Hkv;
            for (int64_t u = 0; u < Tk; u++) { /* this unit's dK, dV rows start at zero */
                memset(dk + b * a->kv_bstride + u * kvd + g * dh, 0, (size_t)dh * sizeof(float));
                memset(dv + b * a->kv_bstride + u * kvd + g * dh, 0, (size_t)dh * sizeof(float));
            }
            for (int64_t h = g * G; h < (g + 1) * G; h++) {
                for (int64_t tq = 0; tq < Tq; tq++) {
                    int64_t row = (b * H + h) * Tq + tq, t = a->q_pos0 + tq;
                    const float *qt = q + (b * Tq + tq) * qd + h * dh;
                    const float *ot = out + (b * Tq + tq) * qd + h * dh;
                    const float *dot_ = dout + (b * Tq + tq) * qd + h * dh;
                    float *dqt = dq + (b * Tq + tq) * qd + h * dh;
                    memset(dqt, 0, (size_t)dh * sizeof(float));
                    if (lse[row] == -INFINITY) continue;
                    row_logits(a, qt, b, g, t, scale, s);
                    /* with dropout keep m_c: out = sum_c p_c m_c v_c, so dv_c = p_c m_c dO,
                     * dp_c = m_c (dO . v_c), and D = sum_c p_c dp_c = dO . out still holds */
                    float D = dot(dot_, ot, dh);
                    const int drop = a->dropout > 0.0f;
                    for (int64_t u = 0; u < Tk; u++) {
                        if (s[u] == -INFINITY) continue;
                        float p = sf_expf(s[u] - lse[row]);
                        float keep = drop ? sf_dropout_scale(a->dropout_seed, a->dropout_stream, (uint64_t)(row * width + u), a->dropout) : 1.0f;
                        const float *vu = key_row(a, a->v, b, u, g);
                        float ds = p * (keep * dot(dot_, vu, dh) - D) * scale;
                        axpy(dqt, ds, key_row(a, a->k, b, u, g), dh);
                        axpy(dk + b * a->kv_bstride + u * kvd + g * dh, ds, qt, dh);
                        axpy(dv + b * a->kv_bstride + u * kvd + g * dh, p * keep, dot_, dh);
                    }
                    int64_t cs = (t / C) * C;
                    for (int64_t c = 0; c < dcols; c++) {
                        if (s[Tk + c] == -INFINITY) continue;
                        int64_t u = cs + c / nd, i = c % nd;
                        float p = sf_expf(s[Tk + c] - lse[row]);
                        float keep = drop ? sf_dropout_scale(a->dropout_seed, a->dropout_stream, (uint64_t)(row * width + Tk + c), a->dropout) : 1.0f;
                        const float *vd = depth_row(a, a->depth_v, b, u, i, g);
                        float ds = p * (keep * dot(dot_, vd, dh) - D) * scale;
                        axpy(dqt, ds, depth_row(a, a->depth_k, b, u, i, g), dh);
                        axpy((float *)depth_row(a, ddepth_k, b, u, i, g), ds, qt, dh);
                        axpy((float *)depth_row(a, ddepth_v, b, u, i, g), p * keep, dot_, dh);
                    }
                }
            }
        }
    }
}
