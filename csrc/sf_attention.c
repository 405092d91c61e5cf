/* Multi-head self-attention, with optional Mixture-of-Depths depth slots.
 *
 * One query row at a time: its visible sequence logits and depth logits go into one scratch
 * row, one softmax covers both (MoDA's joint softmax), and the output is the weighted sum of
 * sequence values and depth values. Memory is O(T) per thread, never a T x T buffer unless
 * the caller asks for the probabilities as a trace. Depth slots are read in place from the
 * arena (B, T, n_slots, Hkv, dh): nothing is gathered per query.
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
    return (int64_t)sf_threads_resolve(n_threads) * (a->T + depth_cols(a));
}

static float dot(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void axpy(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

void sf_attention_forward(const sf_attn_args *a, const float *q, const float *k, const float *v,
                          float *out, float *probs, float *depth_mass, float *scratch,
                          int n_threads) {
    const int64_t B = a->B, T = a->T, H = a->H, Hkv = a->Hkv, dh = a->dh;
    const int64_t G = H / Hkv, qd = H * dh, kvd = Hkv * dh;
    const int64_t C = a->chunk, nd = a->n_read, dcols = depth_cols(a), width = T + dcols;
    const float scale = 1.0f / sqrtf((float)dh);
    const int nt = sf_threads_resolve(n_threads);
    const int64_t rows = B * H * T;
    /* depth-only ablation masks the sequence wherever depth slots exist */
    const int seq_visible = !(a->depth_only && nd > 0);

#pragma omp parallel num_threads(nt) if (rows * (T + dcols) * dh > 32768)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *s = scratch + (int64_t)tid * width;
#pragma omp for schedule(dynamic, 8)
        for (int64_t row = 0; row < rows; row++) {
            int64_t b = row / (H * T), h = (row / T) % H, t = row % T, g = h / G;
            const float *qt = q + (b * T + t) * qd + h * dh;
            float *ot = out + (b * T + t) * qd + h * dh;
            const uint8_t *pad = a->key_padding_mask ? a->key_padding_mask + b * T : NULL;
            int64_t u_end = a->causal ? t + 1 : T;
            int64_t cs = (t / C) * C; /* first position of t's chunk */
            float mx = -INFINITY;
            /* logits; -inf marks invisible columns */
            for (int64_t u = 0; u < T; u++) {
                float sc = -INFINITY;
                if (seq_visible && u < u_end && (!pad || pad[u]))
                    sc = dot(qt, k + (b * T + u) * kvd + g * dh, dh) * scale;
                s[u] = sc;
                if (sc > mx) mx = sc;
            }
            for (int64_t c = 0; c < dcols; c++) {
                int64_t u = cs + c / nd, i = c % nd;
                float sc = -INFINITY;
                if (u <= t && u < T)
                    sc = dot(qt, a->depth_k + (((b * T + u) * a->n_slots + i) * Hkv + g) * dh, dh) * scale;
                s[T + c] = sc;
                if (sc > mx) mx = sc;
            }
            memset(ot, 0, (size_t)dh * sizeof(float));
            if (mx == -INFINITY) { /* nothing visible: p = 0, output 0 */
                if (probs) memset(probs + row * width, 0, (size_t)width * sizeof(float));
                if (depth_mass) depth_mass[row] = 0.0f;
                continue;
            }
            float sum = 0.0f;
            for (int64_t c = 0; c < width; c++) {
                float e = s[c] == -INFINITY ? 0.0f : expf(s[c] - mx);
                s[c] = e;
                sum += e;
            }
            float inv = 1.0f / sum, dmass = 0.0f;
            for (int64_t u = 0; u < T; u++) {
                if (s[u] == 0.0f) continue;
                s[u] *= inv;
                axpy(ot, s[u], v + (b * T + u) * kvd + g * dh, dh);
            }
            for (int64_t c = 0; c < dcols; c++) {
                if (s[T + c] == 0.0f) continue;
                int64_t u = cs + c / nd, i = c % nd;
                s[T + c] *= inv;
                dmass += s[T + c];
                axpy(ot, s[T + c], a->depth_v + (((b * T + u) * a->n_slots + i) * Hkv + g) * dh, dh);
            }
            if (probs) memcpy(probs + row * width, s, (size_t)width * sizeof(float));
            if (depth_mass) depth_mass[row] = dmass;
        }
    }
}
