/* Multi-head self-attention, with optional Mixture-of-Depths depth slots; forward and backward.
 *
 * Work goes in blocks of SF_ATT_BQ query rows of one (batch, head). A block's sequence logits
 * S = Q K^T, the output P V and, in the backward pass, dP = dO V^T, dQ = dS K, dK += dS^T Q and
 * dV += P^T dO are register-tiled products over K and V packed once per block (sf_gemm_tile2):
 * with d_head 32-128 the per-key dot products of a row-at-a-time kernel waste most of the FMA
 * units, the tiles keep them busy. Causality trims every row tile to the keys it can see.
 * Between the products, one pass per row applies masks, MoDA's depth columns (logits by dot
 * products: a row's depth slots are its own, so they do not tile) and one softmax over
 * [sequence | depth] (MoDA's joint softmax).
 *
 * Memory is O(SF_ATT_BQ * T) per thread, never a T x T buffer unless the caller asks for the
 * probabilities as a trace; the backward pass recomputes the probabilities from the saved
 * log-sum-exp (flash-attention style). Depth slots are read in place from the arena
 * (B, Hkv, n_slots, T, dh), slot by slot over many query rows: one slot of consecutive
 * positions is one contiguous stream, where a position-major arena made every row a short read
 * on a page of its own. The depth work runs in passes of its own, by (batch, kv head) groups,
 * so one read of a slot serves every query head that shares it: the forward makes all rows'
 * depth logits before the head units and adds the depth values after them; the backward does a
 * unit's depth part before its sequence part. Every dot product and accumulation keeps the order
 * of the row-at-a-time loops this replaced (per float: slots ascending; per slot: heads, then
 * rows ascending), so the bits did not move.
 * Decoding (a few query rows over a
 * long cache) takes the row-at-a-time path instead, where packing K and V would cost as much as
 * the products themselves.
 */
#include "sf_internal.h"
#include "sf_kernels.h"
#include "sf_bf16.h"

#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static int64_t depth_cols(const sf_attn_args *a) { return a->n_read * a->chunk; }

#define SF_ATT_BQ 48     /* query rows per block: 6 register tiles of 8 (8 of 6 without AVX-512) */
#define SF_ATT_ROWS_MAX 3 /* Tq at or below this: row-at-a-time path (decoding) */

static int64_t round16(int64_t n) { return (n + SF_GEMM_NR - 1) / SF_GEMM_NR * SF_GEMM_NR; }

/* Per thread: three packed copies of a head's K / V (K^T and V^T panels, K panels), packed Q
 * and dO of one block, and two BQ x width blocks (logits / probabilities and dP / dS). */
static int64_t per_thread_floats(const sf_attn_args *a) {
    int64_t width = a->Tk + depth_cols(a);
    if (a->bf16) { /* the fp32 blocks, then bf16 words (bf_layout) */
        const int64_t Tk = a->Tk, dh = a->dh, dhh = (dh + 1) / 2, BQh = (SF_ATT_BQ + 1) / 2;
        const int64_t pa = SF_ATT_BQ * ((Tk + 1) / 2) > Tk * BQh ? SF_ATT_BQ * ((Tk + 1) / 2) : Tk * BQh;
        return 2 * SF_ATT_BQ * width + 2 * sf_bf16_pack_words(dh, Tk) + sf_bf16_pack_words(Tk, dh) +
               2 * SF_ATT_BQ * dhh + pa + 2 * sf_bf16_pack_words(SF_ATT_BQ, dh);
    }
    return 3 * round16(a->Tk) * round16(a->dh) + 2 * SF_ATT_BQ * round16(a->dh) + 2 * SF_ATT_BQ * width;
}

/* A thread's bf16 scratch: the fp32 logits / probabilities and dP / dS blocks, K^T and V^T
 * panels (K = dh), K or V panels (K = keys), the block's Q and dO rows, a P / dS block (rows,
 * or transposed: rows = keys), and the block's Q and dO as panels (K = query rows). */
typedef struct {
    float *sblk, *pblk;
    uint32_t *kt, *vt, *kvn, *qa, *da, *pa, *qb, *db;
} bf_ws;

static bf_ws bf_layout(const sf_attn_args *a, float *ws) {
    const int64_t Tk = a->Tk, dh = a->dh, dhh = (dh + 1) / 2, BQh = (SF_ATT_BQ + 1) / 2;
    const int64_t width = Tk + depth_cols(a);
    const int64_t pa = SF_ATT_BQ * ((Tk + 1) / 2) > Tk * BQh ? SF_ATT_BQ * ((Tk + 1) / 2) : Tk * BQh;
    bf_ws w;
    w.sblk = ws;
    w.pblk = ws + SF_ATT_BQ * width;
    w.kt = (uint32_t *)(ws + 2 * SF_ATT_BQ * width);
    w.vt = w.kt + sf_bf16_pack_words(dh, Tk);
    w.kvn = w.vt + sf_bf16_pack_words(dh, Tk);
    w.qa = w.kvn + sf_bf16_pack_words(Tk, dh);
    w.da = w.qa + SF_ATT_BQ * dhh;
    w.pa = w.da + SF_ATT_BQ * dhh;
    w.qb = w.pa + pa;
    w.db = w.qb + sf_bf16_pack_words(SF_ATT_BQ, dh);
    return w;
}

/* -0 -> +0 (x + 0 changes nothing else): the chains' FTZ can leave a -0 that a zero term (a
 * masked key, a pad half) would turn into +0, and where those zero terms fall depends on the
 * tiling, so every bf16 result is made canonical before anyone reads it */
static void plus_zero(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += 0.0f;
}

/* Shared by all threads, at the start of the scratch: MoDA's depth logits / probabilities of
 * every query row, (B, H, Tq, dcols); the backward keeps each row's D = dO . O there. */
static int64_t depth_scratch_floats(const sf_attn_args *a) {
    return depth_cols(a) > 0 ? a->B * a->H * a->Tq * depth_cols(a) : 0;
}

int64_t sf_attention_scratch_floats(const sf_attn_args *a, int n_threads) {
    return depth_scratch_floats(a) + (int64_t)sf_threads_resolve(n_threads) * per_thread_floats(a);
}

#define dot sf_dot
#define axpy sf_axpy

static inline const float *key_row(const sf_attn_args *a, const float *base, int64_t b, int64_t u,
                                   int64_t g) {
    return base + b * a->kv_bstride + u * a->Hkv * a->dh + g * a->dh;
}

static inline const float *depth_row(const sf_attn_args *a, const float *base, int64_t b,
                                     int64_t u, int64_t i, int64_t g) {
    return base + b * a->depth_bstride + ((g * a->n_slots + i) * a->depth_len + u) * a->dh;
}

/* The query row the depth logits of row (b, tq, head h) use: q's own, or the pre-RoPE one
 * (moda_depth_rope='none'). */
static inline const float *depth_query(const sf_attn_args *a, const float *q, int64_t b, int64_t tq,
                                       int64_t h) {
    const int64_t qd = a->H * a->dh;
    return (a->q_depth ? a->q_depth : q) + (b * a->Tq + tq) * qd + h * a->dh;
}

static int seq_visible(const sf_attn_args *a) { return !(a->depth_only && a->n_read > 0); }

/* Keys query position t may see: [0, key_limit) (before padding). */
static int64_t key_limit(const sf_attn_args *a, int64_t t) {
    if (!seq_visible(a)) return 0;
    return a->causal ? (t + 1 < a->Tk ? t + 1 : a->Tk) : a->Tk;
}

/* Position u's depth slots are visible to query position t: u in t's chunk, at or before t,
 * a real key (padding exposes no depth slots either). */
static int depth_visible(const sf_attn_args *a, int64_t b, int64_t u, int64_t t) {
    return u <= t && u < a->Tk && (!a->key_padding_mask || a->key_padding_mask[b * a->Tk + u]);
}

/* Software prefetch of depth slot rows: the streams are long and regular, but each is a few
 * pages and the hardware prefetchers stop at page boundaries. The forward asks for the row
 * SF_DEPTH_PF positions ahead in the same slot's stream (prefetch_row); the backward, which
 * walks a block of SF_DEPTH_BR rows through every slot, for the same row of the next slot
 * (prefetch_span). A hint only: an address past the arena is never dereferenced. */
#define SF_DEPTH_PF 16
#ifndef SF_DEPTH_BR
#define SF_DEPTH_BR 16 /* query rows per block of the depth backward (rounded up to the chunk) */
#endif
static inline void prefetch_span(const float *p, int64_t n) {
    for (int64_t e = 0; e < n; e += 16) __builtin_prefetch(p + e);
}
static inline void prefetch_row(const float *p, int64_t dh) { prefetch_span(p + SF_DEPTH_PF * dh, dh); }

static float row_max(const float *x, int64_t n) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* Depth logits of query rows [tq0, tq0 + nq) of query heads [h0, h0 + nh), all of one kv head
 * (batch b), into their depth columns (row (h0 + j, tq0 + r)'s at sd + j * ldh + r * ldr;
 * column c = uc * n_read + i: slot i of position cs + uc, cs the first position of the row's
 * chunk), scaled, -inf where invisible. Slot by slot: one slot of the rows' positions is one
 * contiguous stream, read once for all the query heads that share it. */
static void depth_logits(const sf_attn_args *a, const float *q, int64_t b, int64_t h0, int64_t nh,
                         int64_t tq0, int64_t nq, float scale, float *sd, int64_t ldh, int64_t ldr) {
    const int64_t nd = a->n_read, C = a->chunk, g = h0 / (a->H / a->Hkv);
    for (int64_t uc = 0; uc < C; uc++)
        for (int64_t i = 0; i < nd; i++) {
            const int dropped = a->depth_drop && a->depth_drop[i];
            for (int64_t j = 0; j < nh; j++)
                for (int64_t r = 0; r < nq; r++) {
                    const int64_t t = a->q_pos0 + tq0 + r, u = (t / C) * C + uc;
                    float *su = sd + j * ldh + r * ldr + uc * nd + i;
                    if (dropped || !depth_visible(a, b, u, t)) { *su = -INFINITY; continue; }
                    const float *kd = depth_row(a, a->depth_k, b, u, i, g);
                    if (j == 0) prefetch_row(kd, a->dh);
                    *su = dot(depth_query(a, q, b, tq0 + r, h0 + j), kd, a->dh) * scale;
                }
        }
}

/* out's rows (b, tq0 + r, head h0 + j) += their depth values weighted by the normalized depth
 * probabilities (laid out as depth_logits leaves the logits; exact zeros are skipped). */
static void depth_values(const sf_attn_args *a, int64_t b, int64_t h0, int64_t nh, int64_t tq0,
                         int64_t nq, const float *sd, int64_t ldh, int64_t ldr, float *out) {
    const int64_t nd = a->n_read, C = a->chunk, dh = a->dh, qd = a->H * dh, g = h0 / (a->H / a->Hkv);
    for (int64_t uc = 0; uc < C; uc++)
        for (int64_t i = 0; i < nd; i++)
            for (int64_t j = 0; j < nh; j++)
                for (int64_t r = 0; r < nq; r++) {
                    const int64_t t = a->q_pos0 + tq0 + r, u = (t / C) * C + uc;
                    const float p = sd[j * ldh + r * ldr + uc * nd + i];
                    if (u >= a->Tk) continue;
                    const float *vd = depth_row(a, a->depth_v, b, u, i, g);
                    if (j == 0) prefetch_row(vd, dh);
                    if (p != 0.0f) axpy(out + (b * a->Tq + tq0 + r) * qd + (h0 + j) * dh, p, vd, dh);
                }
}

/* Logits of query row (b, h, t) into s[0 .. Tk + dcols) by dot products (the decode path):
 * sequence columns unscaled (as the tiles leave them), depth columns scaled; -inf marks
 * invisible columns. Returns the max of the scaled row (-inf when nothing is visible). */
static float row_logits(const sf_attn_args *a, const float *q, int64_t b, int64_t h, int64_t tq,
                        float scale, float *s) {
    const int64_t Tk = a->Tk, g = h / (a->H / a->Hkv), t = a->q_pos0 + tq;
    const float *qt = q + (b * a->Tq + tq) * a->H * a->dh + h * a->dh;
    const uint8_t *pad = a->key_padding_mask ? a->key_padding_mask + b * Tk : NULL;
    const int64_t u_end = key_limit(a, t);
    float mx = -INFINITY;
    /* each logit summed by fma in ascending k from 0, like the tiles, so a query decoded from
     * the cache gets the same bits as in the full pass; 8 keys at once for parallel chains */
    for (int64_t u0 = 0; u0 < u_end; u0 += 8) {
        int64_t nb = u_end - u0 < 8 ? u_end - u0 : 8;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t k = 0; k < a->dh; k++)
            for (int64_t j = 0; j < nb; j++) acc[j] = fmaf(qt[k], key_row(a, a->k, b, u0 + j, g)[k], acc[j]);
        for (int64_t j = 0; j < nb; j++) {
            float sc = (pad && !pad[u0 + j]) ? -INFINITY : acc[j];
            s[u0 + j] = sc;
            mx = sc > mx ? sc : mx;
        }
    }
    for (int64_t u = u_end; u < Tk; u++) s[u] = -INFINITY;
    depth_logits(a, q, b, h, 1, tq, 1, scale, s + Tk, 0, 0);
    float md = row_max(s + Tk, depth_cols(a));
    mx *= scale; /* scale > 0: the max of the scaled logits, bit for bit */
    return md > mx ? md : mx;
}

/* Softmax of one row, in place, over its unscaled sequence logits s[0, n) and scaled depth
 * logits sd[0, dcols) (-inf where invisible), mx the max of the scaled row. The sequence part
 * is left unnormalized, e_u = exp(scale s_u - mx) (times the dropout keep-scale when training):
 * P V is computed from it and scaled by *inv once per output row, which saves a pass over the
 * row. The depth part is normalized (*dmass gets its share). Returns the log-sum-exp (-inf,
 * all zeros and *inv = 0 when nothing is visible). */
static float row_softmax(const sf_attn_args *a, int64_t row, float *s, int64_t n, float *sd,
                         float mx, float scale, float *dmass, float *inv_out) {
    const int64_t Tk = a->Tk, dcols = depth_cols(a), width = Tk + dcols;
    *dmass = 0.0f;
    *inv_out = 0.0f;
    if (mx == -INFINITY) {
        memset(s, 0, (size_t)n * sizeof(float));
        memset(sd, 0, (size_t)dcols * sizeof(float));
        return -INFINITY;
    }
    sf_exp_row(s, n, scale, mx); /* exp(-inf) = 0 */
    float sum = sf_sum(s, n);
    for (int64_t c = 0; c < dcols; c++) sd[c] = sf_expf(sd[c] - mx);
    sum += sf_sum(sd, dcols);
    float inv = 1.0f / sum, dm = 0.0f;
    if (a->dropout > 0.0f) {
        for (int64_t v = 0; v < n; v++)
            s[v] *= sf_dropout_scale(a->dropout_seed, a->dropout_stream, (uint64_t)(row * width + v), a->dropout);
        for (int64_t c = 0; c < dcols; c++)
            sd[c] *= sf_dropout_scale(a->dropout_seed, a->dropout_stream, (uint64_t)(row * width + Tk + c), a->dropout);
    }
    for (int64_t c = 0; c < dcols; c++) { sd[c] *= inv; dm += sd[c]; }
    *dmass = dm;
    *inv_out = inv;
    return mx + logf(sum);
}

/* After the sequence part of query rows [tq0, tq0 + nq) of head h is in place (row r of the
 * output at o + r * ldo, its sequence probabilities at sblk + r * ld, its depth ones at
 * sd + r * ldd): normalize it by irow[r] (bf16: P was normalized before its product, irow
 * unused) and record. The depth values are added after this (depth_values). */
static void block_finish(const sf_attn_args *a, int64_t b, int64_t h, int64_t tq0, int64_t nq,
                         const float *sblk, int64_t ld, const float *sd, int64_t ldd, const float *lrow,
                         const float *drow, const float *irow, float *o, int64_t ldo, float *lse,
                         float *probs, float *depth_mass) {
    const int64_t Tk = a->Tk, dcols = depth_cols(a), width = Tk + dcols;
    for (int64_t r = 0; r < nq; r++) {
        const int64_t row = (b * a->H + h) * a->Tq + tq0 + r, n = key_limit(a, a->q_pos0 + tq0 + r);
        const float *s = sblk + r * ld, inv = a->bf16 ? 1.0f : irow[r];
        float *ot = o + r * ldo;
        if (a->bf16) plus_zero(ot, a->dh);
        else
            for (int64_t e = 0; e < a->dh; e++) ot[e] *= inv; /* the sequence part was unnormalized */
        if (lse) lse[row] = lrow[r];
        if (depth_mass) depth_mass[row] = drow[r];
        if (probs) {
            float *pr = probs + row * width;
            for (int64_t u = 0; u < n; u++) pr[u] = s[u] * inv;
            memset(pr + n, 0, (size_t)(Tk - n) * sizeof(float));
            memcpy(pr + Tk, sd + r * ldd, (size_t)dcols * sizeof(float));
        }
    }
}

/* Decode path: one query row by dot products. s: scratch of Tk + dcols floats. */
static void forward_row(const sf_attn_args *a, const float *q, float *out, float *lse,
                        float *probs, float *depth_mass, float *s, int64_t row) {
    const int64_t Tq = a->Tq, Tk = a->Tk, H = a->H, dh = a->dh, G = H / a->Hkv, qd = H * dh;
    int64_t b = row / (H * Tq), h = (row / Tq) % H, tq = row % Tq, g = h / G;
    int64_t t = a->q_pos0 + tq, n = key_limit(a, t);
    const float *qt = q + (b * Tq + tq) * qd + h * dh;
    float *ot = out + (b * Tq + tq) * qd + h * dh;
    const float scale = 1.0f / sqrtf((float)dh);
    if (a->bf16) {
        const int path = sf_bf16_path();
        const uint8_t *pad = a->key_padding_mask ? a->key_padding_mask + b * Tk : NULL;
        sf_bf16_dots(path, s, qt, key_row(a, a->k, b, 0, g), a->Hkv * dh, n, dh);
        if (pad)
            for (int64_t u = 0; u < n; u++) s[u] = pad[u] ? s[u] : -INFINITY;
        for (int64_t u = n; u < Tk; u++) s[u] = -INFINITY;
        float mx = -INFINITY;
        for (int64_t u = 0; u < n; u++) mx = s[u] > mx ? s[u] : mx;
        float dm, inv;
        depth_logits(a, q, b, h, 1, tq, 1, scale, s + Tk, 0, 0);
        float md = row_max(s + Tk, depth_cols(a));
        mx *= scale;
        float l = row_softmax(a, row, s, n, s + Tk, md > mx ? md : mx, scale, &dm, &inv);
        for (int64_t u = 0; u < n; u++) s[u] *= inv;
        sf_bf16_combine(path, ot, s, key_row(a, a->v, b, 0, g), a->Hkv * dh, n, dh);
        block_finish(a, b, h, tq, 1, s, 0, s + Tk, 0, &l, &dm, NULL, ot, 0, lse, probs, depth_mass);
        depth_values(a, b, h, 1, tq, 1, s + Tk, 0, 0, out);
        return;
    }
    float mx = row_logits(a, q, b, h, tq, scale, s), dm, inv;
    float l = row_softmax(a, row, s, n, s + Tk, mx, scale, &dm, &inv);
    memset(ot, 0, (size_t)dh * sizeof(float));
    for (int64_t u = 0; u < n; u++) { /* ascending fma, as in the P V tiles */
        const float *vu = key_row(a, a->v, b, u, g);
        float pu = s[u];
        for (int64_t e = 0; e < dh; e++) ot[e] = fmaf(pu, vu[e], ot[e]);
    }
    block_finish(a, b, h, tq, 1, s, 0, s + Tk, 0, &l, &dm, &inv, ot, 0, lse, probs, depth_mass);
    depth_values(a, b, h, 1, tq, 1, s + Tk, 0, 0, out);
}

/* S = Q K^T for query rows [tq0, tq0 + nq) of head h into sblk (row stride width), each row
 * tile only as far as its last row can see. kt: K^T panels (K = dh). Columns past a row's own
 * key limit hold junk until the row pass masks them. */
static void block_logits(const sf_attn_args *a, const float *q, int64_t b, int64_t h,
                         int64_t tq0, int64_t nq, int64_t kend, const float *kt, float *sblk) {
    const int64_t dh = a->dh, qd = a->H * dh, width = a->Tk + depth_cols(a), MRT = sf_gemm_tile_rows();
    for (int64_t i0 = 0; i0 < nq; i0 += MRT) {
        int64_t mr = nq - i0 < MRT ? nq - i0 : MRT;
        int64_t lim = key_limit(a, a->q_pos0 + tq0 + i0 + mr - 1);
        const float *qa = q + (b * a->Tq + tq0 + i0) * qd + h * dh;
        for (int64_t c0 = 0; c0 < lim; c0 += 2 * SF_GEMM_NR)
            sf_gemm_tile2(sblk + i0 * width + c0, width, qa, qd, 1, dh, kt + c0 * dh, SF_GEMM_NR * dh, NULL, mr,
                          kend - c0 < 2 * SF_GEMM_NR ? kend - c0 : 2 * SF_GEMM_NR, 0);
    }
}

/* y rows [tq0, tq0 + nq) of head h (row stride ld) (=|+=) P_blk V where P_blk is the block in
 * pblk (row stride width), each row tile reducing only over the keys its last row can see.
 * vn: V panels (K = kn rows). */
static void block_times_values(const sf_attn_args *a, float *y, int64_t ld, int64_t tq0, int64_t nq,
                               const float *pblk, const float *vn, int64_t kn, int accumulate) {
    const int64_t dh = a->dh, width = a->Tk + depth_cols(a), MRT = sf_gemm_tile_rows();
    for (int64_t i0 = 0; i0 < nq; i0 += MRT) {
        int64_t mr = nq - i0 < MRT ? nq - i0 : MRT;
        int64_t lim = key_limit(a, a->q_pos0 + tq0 + i0 + mr - 1);
        for (int64_t c0 = 0; c0 < dh; c0 += 2 * SF_GEMM_NR)
            sf_gemm_tile2(y + i0 * ld + c0, ld, pblk + i0 * width, width, 1, lim, vn + c0 * kn, SF_GEMM_NR * kn,
                          NULL, mr, dh - c0 < 2 * SF_GEMM_NR ? dh - c0 : 2 * SF_GEMM_NR, accumulate);
    }
}

/* Sequence logits of one block row: scale, mask padding, zero [n, kend); returns the max. */
/* Sequence logits of one block row, unscaled: -inf at padded keys, zeros over [n, kend)
 * (so the row tile's P V reduction sees nothing there); returns the max of the scaled row's
 * sequence part. */
static float row_mask(const sf_attn_args *a, int64_t b, float *s, int64_t n, int64_t kend, float scale) {
    const uint8_t *pad = a->key_padding_mask ? a->key_padding_mask + b * a->Tk : NULL;
    if (pad)
        for (int64_t u = 0; u < n; u++) s[u] = pad[u] ? s[u] : -INFINITY;
    float m8[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t u = 0;
    for (; u + 8 <= n; u += 8) /* eight running maxima: vectorizes without fast-math */
        for (int j = 0; j < 8; j++) m8[j] = s[u + j] > m8[j] ? s[u + j] : m8[j];
    float mx = -INFINITY;
    for (int j = 0; j < 8; j++) mx = m8[j] > mx ? m8[j] : mx;
    for (; u < n; u++) mx = s[u] > mx ? s[u] : mx;
    if (kend > n) memset(s + n, 0, (size_t)(kend - n) * sizeof(float));
    return mx * scale; /* scale > 0: the max of the scaled logits, bit for bit */
}

/* bf16 forward of one work unit: head h of batch b, query blocks [blk0, blk1). As the fp32
 * unit, with S = bf16(Q) bf16(K)^T and O = bf16(P) bf16(V), P normalized first. */
static void forward_unit_bf16(const sf_attn_args *a, int path, const float *q, float *out, float *lse,
                              float *probs, float *depth_mass, float *dl, float *ws, int64_t b, int64_t h,
                              int64_t blk0, int64_t blk1) {
    const int64_t Tq = a->Tq, Tk = a->Tk, H = a->H, dh = a->dh, G = H / a->Hkv, g = h / G;
    const int64_t qd = H * dh, kvd = a->Hkv * dh, dcols = depth_cols(a), width = Tk + dcols, dhh = (dh + 1) / 2;
    const float scale = 1.0f / sqrtf((float)dh);
    const int64_t mrt = sf_bf16_path_mr(path);
    bf_ws w = bf_layout(a, ws);
    int64_t t_last = (blk1 * SF_ATT_BQ < Tq ? blk1 * SF_ATT_BQ : Tq) - 1;
    int64_t kpack = key_limit(a, a->q_pos0 + t_last), khv = (kpack + 1) / 2;
    if (kpack > 0) {
        sf_bf16_pack_b(w.kt, key_row(a, a->k, b, 0, g), 1, kvd, dh, kpack, 1);  /* K^T */
        sf_bf16_pack_b(w.kvn, key_row(a, a->v, b, 0, g), kvd, 1, kpack, dh, 1); /* V */
    }
    for (int64_t blk = blk0; blk < blk1; blk++) {
        int64_t tq0 = blk * SF_ATT_BQ;
        int64_t nq = Tq - tq0 < SF_ATT_BQ ? Tq - tq0 : SF_ATT_BQ;
        int64_t kend = key_limit(a, a->q_pos0 + tq0 + nq - 1), ldp = (kend + 1) / 2;
        if (kend > 0) {
            sf_bf16_pack_a(w.qa, dhh, q + (b * Tq + tq0) * qd + h * dh, qd, 1, nq, dh, 1);
            for (int64_t i0 = 0; i0 < nq; i0 += mrt) {
                int64_t mr = nq - i0 < mrt ? nq - i0 : mrt;
                int64_t lim = key_limit(a, a->q_pos0 + tq0 + i0 + mr - 1);
                sf_bf16_rows(path, w.sblk + i0 * width, width, w.qa + i0 * dhh, dhh, w.kt, dhh * SF_BF16_NR,
                             mr, dhh, lim, 0);
            }
        }
        float lrow[SF_ATT_BQ], drow[SF_ATT_BQ];
        float *sdb = dl + ((b * H + h) * Tq + tq0) * dcols; /* the depth logits, made beforehand */
        for (int64_t i = 0; i < nq; i++) {
            int64_t t = a->q_pos0 + tq0 + i, row = (b * H + h) * Tq + tq0 + i;
            int64_t n = key_limit(a, t);
            float *s = w.sblk + i * width, *sd = sdb + i * dcols, inv;
            float mx = row_mask(a, b, s, n, kend, scale), md = row_max(sd, dcols);
            lrow[i] = row_softmax(a, row, s, n, sd, md > mx ? md : mx, scale, &drow[i], &inv);
            for (int64_t u = 0; u < n; u++) s[u] *= inv;
        }
        float *ob = out + (b * Tq + tq0) * qd + h * dh;
        if (kend > 0) sf_bf16_pack_a(w.pa, ldp, w.sblk, width, 1, nq, kend, 1);
        for (int64_t i0 = 0; i0 < nq; i0 += mrt) {
            int64_t mr = nq - i0 < mrt ? nq - i0 : mrt;
            int64_t lim = key_limit(a, a->q_pos0 + tq0 + i0 + mr - 1);
            sf_bf16_rows(path, ob + i0 * qd, qd, w.pa + i0 * ldp, ldp, w.kvn, khv * SF_BF16_NR, mr,
                         (lim + 1) / 2, dh, 0);
        }
        block_finish(a, b, h, tq0, nq, w.sblk, width, sdb, dcols, lrow, drow, NULL, ob, qd, lse, probs, depth_mass);
    }
}

/* The forward's depth passes work in units of (batch b, kv head, query block): unit -> b, its
 * first query head h0, its rows [tq0, tq0 + nq); returns where their depth columns are in dl. */
static float *depth_unit(const sf_attn_args *a, float *dl, int64_t unit, int64_t *b, int64_t *h0,
                         int64_t *tq0, int64_t *nq) {
    const int64_t nblk = (a->Tq + SF_ATT_BQ - 1) / SF_ATT_BQ;
    *b = unit / (a->Hkv * nblk);
    *h0 = (unit / nblk) % a->Hkv * (a->H / a->Hkv);
    *tq0 = unit % nblk * SF_ATT_BQ;
    *nq = a->Tq - *tq0 < SF_ATT_BQ ? a->Tq - *tq0 : SF_ATT_BQ;
    return dl + ((*b * a->H + *h0) * a->Tq + *tq0) * depth_cols(a);
}

void sf_attention_forward(const sf_attn_args *a, const float *q, float *out, float *lse,
                          float *probs, float *depth_mass, float *scratch, int n_threads) {
    const int64_t B = a->B, Tq = a->Tq, Tk = a->Tk, H = a->H, dh = a->dh;
    const int64_t G = H / a->Hkv, qd = H * dh, kvd = a->Hkv * dh;
    const int64_t dcols = depth_cols(a), width = Tk + dcols, rows = B * H * Tq;
    const int64_t nblk = (Tq + SF_ATT_BQ - 1) / SF_ATT_BQ, P = round16(Tk) * round16(dh);
    const float scale = 1.0f / sqrtf((float)dh);
    const int nt = sf_threads_resolve(n_threads);
    const int rowwise = Tq <= SF_ATT_ROWS_MAX;
    /* Work units: whole heads when there are enough of them to share out (K and V are then
     * packed once per head), otherwise each head's query blocks split in nt parts. */
    const int64_t per_head = B * H >= 2 * nt ? 1 : (nblk < nt ? nblk : nt);
    const int path = a->bf16 ? sf_bf16_path() : 0;
    /* MoDA: the depth logits of every row are made first and the depth values added last, by
     * units of (batch, kv head, query block), so that a slot read once serves every query
     * head that shares it; the head units in between take them from dl (B, H, Tq, dcols). */
    float *dl = scratch;
    const int depth_passes = !rowwise && dcols > 0;
    const int64_t dunits = B * a->Hkv * nblk;

#pragma omp parallel num_threads(nt) if (rows * width * dh > (1 << 20))
    {
        const int tid = sf_team_tid();
        float *ws = scratch + depth_scratch_floats(a) + (int64_t)tid * per_thread_floats(a);
        if (depth_passes) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t unit = 0; unit < dunits; unit++) {
                int64_t b, h0, tq0, nq;
                float *sd = depth_unit(a, dl, unit, &b, &h0, &tq0, &nq);
                depth_logits(a, q, b, h0, G, tq0, nq, scale, sd, Tq * dcols, dcols);
            }
        }
        if (rowwise) {
#pragma omp for schedule(dynamic, 8)
            for (int64_t row = 0; row < rows; row++) forward_row(a, q, out, lse, probs, depth_mass, ws, row);
        } else {
            float *kt = ws, *vn = ws + P, *sblk = ws + 3 * P + 2 * SF_ATT_BQ * round16(dh);
#pragma omp for schedule(dynamic, 1)
            for (int64_t unit = 0; unit < B * H * per_head; unit++) {
                int64_t b = unit / (H * per_head), h = (unit / per_head) % H, g = h / G;
                /* this unit's query blocks [blk0, blk1); K and V packed once for all of them */
                int64_t blk0 = (unit % per_head) * nblk / per_head, blk1 = (unit % per_head + 1) * nblk / per_head;
                if (a->bf16) {
                    forward_unit_bf16(a, path, q, out, lse, probs, depth_mass, dl, ws, b, h, blk0, blk1);
                    continue;
                }
                int64_t t_last = (blk1 * SF_ATT_BQ < Tq ? blk1 * SF_ATT_BQ : Tq) - 1;
                int64_t kpack = key_limit(a, a->q_pos0 + t_last);
                if (kpack > 0) {
                    sf_pack_panels(kt, key_row(a, a->k, b, 0, g), kvd, 1, dh, kpack);
                    sf_pack_panels(vn, key_row(a, a->v, b, 0, g), kvd, 0, kpack, dh);
                }
                for (int64_t blk = blk0; blk < blk1; blk++) {
                    int64_t tq0 = blk * SF_ATT_BQ;
                    int64_t nq = Tq - tq0 < SF_ATT_BQ ? Tq - tq0 : SF_ATT_BQ;
                    int64_t kend = key_limit(a, a->q_pos0 + tq0 + nq - 1);
                    if (kend > 0) block_logits(a, q, b, h, tq0, nq, kend, kt, sblk);
                    float lrow[SF_ATT_BQ], drow[SF_ATT_BQ], irow[SF_ATT_BQ];
                    float *sdb = dl + ((b * H + h) * Tq + tq0) * dcols;
                    for (int64_t i = 0; i < nq; i++) {
                        int64_t t = a->q_pos0 + tq0 + i, row = (b * H + h) * Tq + tq0 + i;
                        int64_t n = key_limit(a, t);
                        float *s = sblk + i * width, *sd = sdb + i * dcols;
                        float mx = row_mask(a, b, s, n, kend, scale), md = row_max(sd, dcols);
                        lrow[i] = row_softmax(a, row, s, n, sd, md > mx ? md : mx, scale, &drow[i], &irow[i]);
                    }
                    float *ob = out + (b * Tq + tq0) * qd + h * dh;
                    block_times_values(a, ob, qd, tq0, nq, sblk, vn, kpack, 0);
                    block_finish(a, b, h, tq0, nq, sblk, width, sdb, dcols, lrow, drow, irow, ob, qd, lse, probs, depth_mass);
                }
            }
        }
        if (depth_passes) { /* after every head's sequence part is in place and normalized */
#pragma omp for schedule(dynamic, 1)
            for (int64_t unit = 0; unit < dunits; unit++) {
                int64_t b, h0, tq0, nq;
                const float *sd = depth_unit(a, dl, unit, &b, &h0, &tq0, &nq);
                depth_values(a, b, h0, G, tq0, nq, sd, Tq * dcols, dcols, out);
            }
        }
    }
}

/* The depth columns' gradients of query rows [tq0, tq0 + nq) of query heads [h0, h0 + nh), all
 * of one kv head (they do not tile: each row has its own slots), slot by slot as in
 * depth_logits; D[row] = dO . O of the row. Adds to the rows' dQ (dq_depth under
 * moda_depth_rope='none') and to the slots' dK, dV, for each slot heads ascending, then rows
 * ascending: the order of the row-at-a-time pass. With the row's log-sum-exp known, a
 * column's probability needs no row max, so each logit is made where it is used and the
 * slot's K is still in L1 for the dQ term. */
static void depth_backward(const sf_attn_args *a, const float *q, const float *dout, const float *lse,
                           float *dq, float *ddepth_k, float *ddepth_v, const float *D, int64_t b,
                           int64_t h0, int64_t nh, int64_t tq0, int64_t nq) {
    const int64_t Tq = a->Tq, Tk = a->Tk, nd = a->n_read, C = a->chunk, dh = a->dh, qd = a->H * dh;
    const int64_t width = Tk + depth_cols(a), g = h0 / (a->H / a->Hkv);
    const float scale = 1.0f / sqrtf((float)dh);
    const int drop = a->dropout > 0.0f;
    float *dqd = a->q_depth ? a->dq_depth : dq;
    /* Rows in blocks of BR (a multiple of the chunk, aligned in absolute positions, so the rows
     * that read one slot row are all in one block): the block's Q, dO and dQ rows then stay in
     * L1 while every slot passes over them; walking all Tq rows per slot re-read them from L2
     * (590 KB per slot at M-GQA). Per dQ row the (uc, i) order and per slot row the (head,
     * row) order are unchanged, so are the bits. */
    const int64_t BR = (SF_DEPTH_BR + C - 1) / C * C, t_first = a->q_pos0 + tq0;
    for (int64_t rb = 0; rb < nq;) {
        const int64_t t_b = t_first + rb, t_e = (t_b / BR + 1) * BR;
        const int64_t r_end = t_e - t_first < nq ? t_e - t_first : nq;
        for (int64_t uc = 0; uc < C; uc++)
        for (int64_t i = 0; i < nd; i++) {
            if (a->depth_drop && a->depth_drop[i]) continue;
            const int64_t c = uc * nd + i;
            for (int64_t h = h0; h < h0 + nh; h++)
                for (int64_t r = rb; r < r_end; r++) {
                    const int64_t tq = tq0 + r, row = (b * a->H + h) * Tq + tq, t = a->q_pos0 + tq;
                    const int64_t u = (t / C) * C + uc;
                    const float l = lse[row];
                    if (l == -INFINITY || !depth_visible(a, b, u, t)) continue;
                    const float *qdt = depth_query(a, q, b, tq, h), *dot_ = dout + (b * Tq + tq) * qd + h * dh;
                    const float *kd = depth_row(a, a->depth_k, b, u, i, g), *vd = depth_row(a, a->depth_v, b, u, i, g);
                    float *dkd = (float *)depth_row(a, ddepth_k, b, u, i, g), *dvd = (float *)depth_row(a, ddepth_v, b, u, i, g);
                    if (h == h0 && i + 1 < nd) { /* the same row of the next slot, read one block pass later */
                        const int64_t nx = a->depth_len * dh;
                        prefetch_span(kd + nx, dh); prefetch_span(vd + nx, dh);
                        prefetch_span(dkd + nx, dh); prefetch_span(dvd + nx, dh);
                    }
                    const float sc = dot(qdt, kd, dh) * scale;
                    if (sc == -INFINITY) continue;
                    float p = sf_expf(sc - l);
                    float keep = drop ? sf_dropout_scale(a->dropout_seed, a->dropout_stream, (uint64_t)(row * width + Tk + c), a->dropout) : 1.0f;
                    float ds = p * (keep * dot(dot_, vd, dh) - D[row]) * scale;
                    axpy(dqd + (b * Tq + tq) * qd + h * dh, ds, kd, dh);
                    axpy(dkd, ds, qdt, dh);
                    axpy(dvd, p * keep, dot_, dh);
                }
        }
        rb = r_end;
    }
}

/* A backward unit's (batch b, kv head g) depth part, before its sequence part: its dQ (and
 * dq_depth) rows start at zero and take the depth columns' terms first, as the row-at-a-time
 * pass had them; one pass over the unit's rows for all the query heads that share g. Dr: the
 * rows' D, (B, H, Tq). */
static void backward_depth_unit(const sf_attn_args *a, const float *q, const float *out, const float *dout,
                                const float *lse, float *dq, float *ddepth_k, float *ddepth_v, float *Dr,
                                int64_t b, int64_t g) {
    const int64_t Tq = a->Tq, H = a->H, dh = a->dh, qd = H * dh, G = H / a->Hkv;
    for (int64_t h = g * G; h < (g + 1) * G; h++)
        for (int64_t tq = 0; tq < Tq; tq++) {
            const int64_t row = (b * H + h) * Tq + tq, off = (b * Tq + tq) * qd + h * dh;
            memset(dq + off, 0, (size_t)dh * sizeof(float));
            if (a->q_depth) memset(a->dq_depth + off, 0, (size_t)dh * sizeof(float));
            Dr[row] = lse[row] == -INFINITY ? 0.0f : dot(dout + off, out + off, dh);
        }
    depth_backward(a, q, dout, lse, dq, ddepth_k, ddepth_v, Dr, b, g * G, G, 0, Tq);
}

/* The backward's row pass over query rows [tq0, tq0 + nq) of head h (batch b, kv head g), the
 * same for fp32 and bf16 units: with S = Q K^T in sblk and dP = dO V^T in pblk (rows `width`
 * floats apart, valid to kend), each row becomes dS (in pblk) and the dropped P (in sblk), and
 * its dQ row starts at zero (under MoDA it already holds the depth columns' terms). */
static void backward_row_pass(const sf_attn_args *a, const float *q, const float *out, const float *dout,
                              const float *lse, float *dq, const float *Dr, float *sblk,
                              float *pblk, int64_t b, int64_t g, int64_t h, int64_t tq0, int64_t nq,
                              int64_t kend) {
    const int64_t Tq = a->Tq, Tk = a->Tk, H = a->H, dh = a->dh, qd = H * dh;
    const int64_t dcols = depth_cols(a), width = Tk + dcols;
    const float scale = 1.0f / sqrtf((float)dh);
    const int drop = a->dropout > 0.0f;
    const uint8_t *pad = a->key_padding_mask ? a->key_padding_mask + b * Tk : NULL;
    for (int64_t i = 0; i < nq; i++) {
        int64_t tq = tq0 + i, row = (b * H + h) * Tq + tq, t = a->q_pos0 + tq;
        int64_t n = key_limit(a, t);
        const float *ot = out + (b * Tq + tq) * qd + h * dh;
        const float *dot_ = dout + (b * Tq + tq) * qd + h * dh;
        float *dqt = dq + (b * Tq + tq) * qd + h * dh;
        float *s = sblk + i * width, *dp = pblk + i * width;
        const float l = lse[row];
        if (dcols == 0) { /* else backward_depth_unit started it */
            memset(dqt, 0, (size_t)dh * sizeof(float));
            if (a->q_depth) memset(a->dq_depth + (b * Tq + tq) * qd + h * dh, 0, (size_t)dh * sizeof(float));
        }
        if (l == -INFINITY) n = 0; /* nothing visible: no gradient */
        if (kend > n) {
            memset(s + n, 0, (size_t)(kend - n) * sizeof(float));
            memset(dp + n, 0, (size_t)(kend - n) * sizeof(float));
        }
        if (l == -INFINITY) continue;
        /* with dropout keep m_c: out = sum_c p_c m_c v_c, so dv_c = p_c m_c dO,
         * dp_c = m_c (dO . v_c), and D = sum_c p_c dp_c = dO . out still holds */
        float D = Dr ? Dr[row] : dot(dot_, ot, dh); /* Dr: backward_depth_unit made them */
        if (drop) {
            for (int64_t u = 0; u < n; u++) {
                float p = sf_expf(s[u] * scale - l);
                float keep = sf_dropout_scale(a->dropout_seed, a->dropout_stream, (uint64_t)(row * width + u), a->dropout);
                dp[u] = p * (keep * dp[u] - D) * scale; /* dS */
                s[u] = p * keep;                        /* dropped P, for dV */
            }
        } else { /* the common case: dS and P in one vectorized pass */
            sf_softmax_grad_row(s, dp, n, scale, l, D);
        }
        if (pad) /* padded keys: no probability, no gradient */
            for (int64_t u = 0; u < n; u++)
                if (!pad[u]) { s[u] = 0.0f; dp[u] = 0.0f; }
    }
}

/* bf16 backward of one unit (batch b, kv head g): the fp32 unit's steps with every sequence
 * product on bf16 operands: S = Q K^T and dP = dO V^T recomputed, dQ += dS K, dK += dS^T Q,
 * dV += (P keep)^T dO. The reductions over query rows run in pairs of the block's rows from an
 * even row, whatever the tile height, so every path gives the same chains. */
static void backward_unit_bf16(const sf_attn_args *a, int path, const float *q, const float *out,
                               const float *dout, const float *lse, float *dq, float *dk, float *dv,
                               const float *Dr, float *ws, int64_t b, int64_t g) {
    const int64_t Tq = a->Tq, Tk = a->Tk, H = a->H, Hkv = a->Hkv, dh = a->dh, G = H / Hkv;
    const int64_t qd = H * dh, kvd = Hkv * dh, dcols = depth_cols(a), width = Tk + dcols;
    const int64_t dhh = (dh + 1) / 2, mrt = sf_bf16_path_mr(path);
    const int64_t kall = Tq > 0 ? key_limit(a, a->q_pos0 + Tq - 1) : 0, kallh = (kall + 1) / 2;
    bf_ws w = bf_layout(a, ws);
    float *sblk = w.sblk, *pblk = w.pblk;
    for (int64_t u = 0; u < Tk; u++) { /* this unit's dK, dV rows start at zero */
        memset(dk + b * a->kv_bstride + u * kvd + g * dh, 0, (size_t)dh * sizeof(float));
        memset(dv + b * a->kv_bstride + u * kvd + g * dh, 0, (size_t)dh * sizeof(float));
    }
    if (kall > 0) {
        sf_bf16_pack_b(w.kt, key_row(a, a->k, b, 0, g), 1, kvd, dh, kall, 1);  /* K^T */
        sf_bf16_pack_b(w.vt, key_row(a, a->v, b, 0, g), 1, kvd, dh, kall, 1);  /* V^T */
        sf_bf16_pack_b(w.kvn, key_row(a, a->k, b, 0, g), kvd, 1, kall, dh, 1); /* K */
    }
    for (int64_t h = g * G; h < (g + 1) * G; h++) {
        for (int64_t tq0 = 0; tq0 < Tq; tq0 += SF_ATT_BQ) {
            int64_t nq = Tq - tq0 < SF_ATT_BQ ? Tq - tq0 : SF_ATT_BQ;
            int64_t kend = key_limit(a, a->q_pos0 + tq0 + nq - 1);
            const float *qb_rows = q + (b * Tq + tq0) * qd + h * dh;
            const float *dob = dout + (b * Tq + tq0) * qd + h * dh;
            if (kend > 0) {
                sf_bf16_pack_a(w.qa, dhh, qb_rows, qd, 1, nq, dh, 1);
                sf_bf16_pack_a(w.da, dhh, dob, qd, 1, nq, dh, 1);
                for (int64_t i0 = 0; i0 < nq; i0 += mrt) {
                    int64_t mr = nq - i0 < mrt ? nq - i0 : mrt;
                    int64_t lim = key_limit(a, a->q_pos0 + tq0 + i0 + mr - 1);
                    sf_bf16_rows(path, sblk + i0 * width, width, w.qa + i0 * dhh, dhh, w.kt,
                                 dhh * SF_BF16_NR, mr, dhh, lim, 0);
                    sf_bf16_rows(path, pblk + i0 * width, width, w.da + i0 * dhh, dhh, w.vt,
                                 dhh * SF_BF16_NR, mr, dhh, lim, 0); /* dP = dO V^T */
                }
            }
            backward_row_pass(a, q, out, dout, lse, dq, Dr, sblk, pblk, b, g, h, tq0, nq, kend);
            if (kend == 0) continue;
            /* dQ += dS K, row tiles reducing over the keys their last row sees */
            const int64_t ldp = (kend + 1) / 2;
            float *dqb = dq + (b * Tq + tq0) * qd + h * dh;
            sf_bf16_pack_a(w.pa, ldp, pblk, width, 1, nq, kend, 1);
            for (int64_t i0 = 0; i0 < nq; i0 += mrt) {
                int64_t mr = nq - i0 < mrt ? nq - i0 : mrt;
                int64_t lim = key_limit(a, a->q_pos0 + tq0 + i0 + mr - 1);
                sf_bf16_rows(path, dqb + i0 * qd, qd, w.pa + i0 * ldp, ldp, w.kvn, kallh * SF_BF16_NR, mr,
                             (lim + 1) / 2, dh, 1);
            }
            for (int64_t i = 0; i < nq; i++) plus_zero(dqb + i * qd, dh);
            /* dK += dS^T Q_blk and dV += P^T dO_blk: key tiles reducing over the block's query
             * rows from the even row at or before the first that can see the tile */
            const int64_t ldt = (nq + 1) / 2;
            sf_bf16_pack_b(w.qb, qb_rows, qd, 1, nq, dh, 1);
            sf_bf16_pack_b(w.db, dob, qd, 1, nq, dh, 1);
            for (int pass = 0; pass < 2; pass++) {
                sf_bf16_pack_a(w.pa, ldt, pass == 0 ? pblk : sblk, 1, width, kend, nq, 1);
                float *dst = pass == 0 ? dk : dv;
                const uint32_t *bp = pass == 0 ? w.qb : w.db;
                for (int64_t u0 = 0; u0 < kend; u0 += mrt) {
                    int64_t mr = kend - u0 < mrt ? kend - u0 : mrt;
                    int64_t j0 = a->causal ? u0 - (a->q_pos0 + tq0) : 0;
                    if (j0 < 0) j0 = 0;
                    if (j0 >= nq) continue;
                    int64_t i0 = j0 / 2;
                    sf_bf16_rows(path, dst + b * a->kv_bstride + u0 * kvd + g * dh, kvd, w.pa + u0 * ldt + i0,
                                 ldt, bp + i0 * SF_BF16_NR, ldt * SF_BF16_NR, mr, ldt - i0, dh, 1);
                }
            }
        }
    }
    for (int64_t u = 0; u < Tk; u++) {
        plus_zero(dk + b * a->kv_bstride + u * kvd + g * dh, dh);
        plus_zero(dv + b * a->kv_bstride + u * kvd + g * dh, dh);
    }
}

/* Backward. Work is split by (batch, kv head): a unit owns dK/dV rows of its kv head, the
 * depth-slot gradients of its kv head and dQ of the query heads that share it, so no two
 * threads ever write the same float and the result does not depend on the thread count.
 * Per block: recompute S, P = exp(S - lse); dP = dO V^T; dS = P (keep dP - D) with
 * D = dO . O; then dQ = dS K, dK += dS^T Q, dV += (P keep)^T dO. */
void sf_attention_backward(const sf_attn_args *a, const float *q, const float *out,
                           const float *dout, const float *lse, float *dq, float *dk, float *dv,
                           float *ddepth_k, float *ddepth_v, float *scratch, int n_threads) {
    const int64_t B = a->B, Tq = a->Tq, Tk = a->Tk, H = a->H, Hkv = a->Hkv, dh = a->dh;
    const int64_t G = H / Hkv, qd = H * dh, kvd = Hkv * dh;
    const int64_t dcols = depth_cols(a), width = Tk + dcols;
    const int64_t P = round16(Tk) * round16(dh);
    const int64_t QP = SF_ATT_BQ * round16(dh);
    const int nt = sf_threads_resolve(n_threads);
    const int64_t units = B * Hkv;
    const int64_t kall = Tq > 0 ? key_limit(a, a->q_pos0 + Tq - 1) : 0;
    const int path = a->bf16 ? sf_bf16_path() : 0;
    const int64_t MRT = sf_gemm_tile_rows(); /* key rows per dK / dV tile */

#pragma omp parallel num_threads(nt) if (B * H * Tq * width * dh > (1 << 20))
    {
        const int tid = sf_team_tid();
        float *ws = scratch + depth_scratch_floats(a) + (int64_t)tid * per_thread_floats(a);
        float *kt = ws, *vt = ws + P, *kn = ws + 2 * P, *qn = ws + 3 * P, *dn = qn + QP;
        float *sblk = dn + QP, *pblk = sblk + SF_ATT_BQ * width;
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < units; unit++) {
            int64_t b = unit / Hkv, g = unit % Hkv;
            float *Dr = dcols > 0 ? scratch : NULL; /* the rows' D, (B, H, Tq) */
            if (Dr) backward_depth_unit(a, q, out, dout, lse, dq, ddepth_k, ddepth_v, Dr, b, g);
            if (a->bf16) {
                backward_unit_bf16(a, path, q, out, dout, lse, dq, dk, dv, Dr, ws, b, g);
                continue;
            }
            for (int64_t u = 0; u < Tk; u++) { /* this unit's dK, dV rows start at zero */
                memset(dk + b * a->kv_bstride + u * kvd + g * dh, 0, (size_t)dh * sizeof(float));
                memset(dv + b * a->kv_bstride + u * kvd + g * dh, 0, (size_t)dh * sizeof(float));
            }
            if (kall > 0) {
                sf_pack_panels(kt, key_row(a, a->k, b, 0, g), kvd, 1, dh, kall);
                sf_pack_panels(vt, key_row(a, a->v, b, 0, g), kvd, 1, dh, kall);
                sf_pack_panels(kn, key_row(a, a->k, b, 0, g), kvd, 0, kall, dh);
            }
            for (int64_t h = g * G; h < (g + 1) * G; h++) {
                for (int64_t tq0 = 0; tq0 < Tq; tq0 += SF_ATT_BQ) {
                    int64_t nq = Tq - tq0 < SF_ATT_BQ ? Tq - tq0 : SF_ATT_BQ;
                    int64_t kend = key_limit(a, a->q_pos0 + tq0 + nq - 1);
                    const float *dob = dout + (b * Tq + tq0) * qd + h * dh;
                    if (kend > 0) {
                        block_logits(a, q, b, h, tq0, nq, kend, kt, sblk);
                        block_logits(a, dout, b, h, tq0, nq, kend, vt, pblk); /* dP = dO V^T */
                    }
                    backward_row_pass(a, q, out, dout, lse, dq, Dr, sblk, pblk, b, g, h, tq0, nq, kend);
                    if (kend == 0) continue;
                    /* dQ += dS K */
                    block_times_values(a, dq + (b * Tq + tq0) * qd + h * dh, qd, tq0, nq, pblk, kn, kall, 1);
                    /* dK += dS^T Q_blk, dV += P^T dO_blk: key tiles of 6 rows, reducing over the
                     * block's query rows from the first one that can see the tile */
                    sf_pack_panels(qn, q + (b * Tq + tq0) * qd + h * dh, qd, 0, nq, dh);
                    sf_pack_panels(dn, dob, qd, 0, nq, dh);
                    for (int64_t u0 = 0; u0 < kend; u0 += MRT) {
                        int64_t mr = kend - u0 < MRT ? kend - u0 : MRT;
                        int64_t j0 = a->causal ? u0 - (a->q_pos0 + tq0) : 0;
                        if (j0 < 0) j0 = 0;
                        if (j0 >= nq) continue;
                        float *dkr = dk + b * a->kv_bstride + u0 * kvd + g * dh;
                        float *dvr = dv + b * a->kv_bstride + u0 * kvd + g * dh;
                        for (int64_t c0 = 0; c0 < dh; c0 += 2 * SF_GEMM_NR) {
                            int64_t mw = dh - c0 < 2 * SF_GEMM_NR ? dh - c0 : 2 * SF_GEMM_NR;
                            sf_gemm_tile2(dkr + c0, kvd, pblk + j0 * width + u0, 1, width, nq - j0,
                                          qn + c0 * nq + j0 * SF_GEMM_NR, SF_GEMM_NR * nq, NULL, mr, mw, 1);
                            sf_gemm_tile2(dvr + c0, kvd, sblk + j0 * width + u0, 1, width, nq - j0,
                                          dn + c0 * nq + j0 * SF_GEMM_NR, SF_GEMM_NR * nq, NULL, mr, mw, 1);
                        }
                    }
                }
            }
        }
    }
}
