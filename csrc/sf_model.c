/* The stack: embedding, n blocks of (attention, MLP) sublayers connected through depth by a
 * wiring (csrc/wiring/, interface in sf_wiring.h), optional Mixture-of-Depths attention, final
 * norm, head — the sublayers' forward and backward, the sublayer loop, gradient
 * checkpointing, the embedding, the head, and the decoding cache. See DEVELOPERS.md for the
 * math.
 *
 * Memory: every call lays all of its buffers out in one allocation (see `layout`), made
 * before the layer loop and freed after it, so concurrent forward calls never share mutable
 * state and nothing is allocated inside the loop. Per transformer block the activations the
 * backward pass needs live in a `block_acts`; inference (and gradient checkpointing) give all
 * blocks one shared set, training without checkpointing gives each block its own.
 */
#include "sf_wiring.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* MoDA: depth slots each block writes (its attention's; and its FFN's unless moda_depth_kv='attn'):
 * block l reads the depth_slots_per_layer * l slots of blocks 0..l-1, in order. */
static int64_t depth_slots_per_layer(const sf_config *c) { return c->moda_depth_kv == SF_DKV_ATTN ? 1 : 2; }

int64_t sf_depth_cols(const sf_config *c, int64_t layer) {
    return c->moda ? depth_slots_per_layer(c) * layer * c->moda_chunk : 0;
}

/* ---- the decoding cache --------------------------------------------------------------------- */

struct sf_cache {
    const sf_model *m;
    int64_t B, max_len, len;
    float *k, *v;             /* (n_layers, B, max_len, kvd) */
    float *depth_k, *depth_v; /* (B, Hkv, n_slots, max_len, dh) */
    _Atomic int busy;         /* a call is appending to it (or resetting it) */
};

/* MoDA under RoPE: which depth-rope rule applies (SF_DROPE_*), or -1 when there is nothing to
 * rotate (no MoDA or no RoPE: every rule is the same model). */
static int depth_rope(const sf_config *c) { return c->moda && c->pos == SF_POS_ROPE ? c->moda_depth_rope : -1; }

static int64_t n_depth_slots(const sf_config *c) { return c->moda ? depth_slots_per_layer(c) * (c->n_layers - 1) : 0; }

sf_status sf_cache_create(const sf_model *m, int64_t B, int64_t max_len, sf_cache **out,
                          char *err, size_t errlen) {
    if (!m || !out) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "model or out is NULL");
    *out = NULL;
    const sf_config *c = &m->cfg;
    if (B < 1 || max_len < 1 || max_len > c->max_seq_len)
        return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "cache needs B >= 1 and 1 <= max_len <= max_seq_len=%lld (got B=%lld, max_len=%lld)",
                       (long long)c->max_seq_len, (long long)B, (long long)max_len);
    int64_t kvd = c->n_kv_heads * (c->d_model / c->n_heads), rows, kv, dep, total, bytes;
    if (sf_mul_ok(B, max_len, &rows) || sf_mul_ok(rows, kvd, &kv) ||
        sf_mul_ok(kv, c->n_layers, &kv) || sf_mul_ok(rows * kvd, n_depth_slots(c), &dep) ||
        sf_add_ok(kv, dep, &total) || sf_mul_ok(total, 2 * (int64_t)sizeof(float), &bytes) ||
        bytes > sf_memory_limit_bytes())
        return sf_fail(err, errlen, SF_ERR_NOMEM, "cache for B=%lld, max_len=%lld is too large", (long long)B, (long long)max_len);
    sf_cache *ca = calloc(1, sizeof *ca);
    float *blk = ca ? malloc((size_t)(bytes > 0 ? bytes : 4)) : NULL;
    if (!blk) { free(ca); return sf_fail(err, errlen, SF_ERR_NOMEM, "cannot allocate %.1f MiB for the cache", (double)bytes / 1048576.0); }
    ca->m = m; ca->B = B; ca->max_len = max_len; ca->len = 0;
    ca->k = blk; ca->v = blk + kv; ca->depth_k = blk + 2 * kv; ca->depth_v = ca->depth_k + dep;
    *out = ca;
    return SF_OK;
}

void sf_cache_free(sf_cache *c) {
    if (!c) return;
    free(c->k);
    free(c);
}
int64_t sf_cache_len(const sf_cache *c) { return c->len; }
int64_t sf_cache_batch(const sf_cache *c) { return c->B; }
sf_status sf_cache_reset(sf_cache *c) {
    int idle = 0;
    if (!atomic_compare_exchange_strong(&c->busy, &idle, 1)) return SF_ERR_BUSY;
    c->len = 0;
    atomic_store(&c->busy, 0);
    return SF_OK;
}

/* ---- one call's buffers ------------------------------------------------------------------- */

/* Lay out every buffer of a call. Run once to measure (bp->base NULL), once to assign. */
static void layout(run *R, bump *bp, want w) {
    const sf_config *c = R->c;
    const sf_wiring *W = R->W;
    int bad = 0;
    const int64_t N = R->N, d = R->d, Nd = cmul(&bad, N, d), n = c->n_layers;
    const int64_t nacts = R->per_block ? n : 1;
    const int pre = c->pre_norm;
    block_acts shared = {0};
    for (int64_t i = 0; i < n; i++) {
        block_acts *A = &R->acts[i];
        if (i < nacts) {
            *A = (block_acts){0};
            A->in_a = take(bp, Nd);
            A->u_a = pre ? take(bp, Nd) : NULL;
            A->q = take(bp, cmul(&bad, N, R->qd));
            A->k = take(bp, cmul(&bad, N, R->kvd));
            A->v = take(bp, cmul(&bad, N, R->kvd));
            A->att = take(bp, cmul(&bad, N, R->qd));
            A->lse = R->training ? take(bp, cmul(&bad, N, c->n_heads)) : NULL;
            A->in_m = take(bp, Nd);
            A->u_m = pre ? take(bp, Nd) : NULL;
            A->f1 = take(bp, cmul(&bad, N, R->F));
            A->f2 = c->act == SF_ACT_SWIGLU ? take(bp, cmul(&bad, N, R->F)) : NULL;
            A->g = take(bp, cmul(&bad, N, R->F));
            A->q_pre = depth_rope(c) == SF_DROPE_NONE ? take(bp, cmul(&bad, N, R->qd)) : NULL;
            W->layout_block(R, bp, A);
            if (i == 0) shared = *A;
        } else {
            *A = shared;
        }
        if (!pre) { A->u_a = A->in_a; A->u_m = A->in_m; }
    }
    R->x_in = (R->training && !R->per_block && W->save_block_input) ? take(bp, cmul(&bad, n, Nd)) : NULL;
    R->fin_h = take(bp, Nd);
    R->fin_u = c->final_norm ? take(bp, Nd) : R->fin_h;
    W->layout(R, bp, w);
    R->kvtmp = c->moda ? take(bp, cmul(&bad, N, R->kvd)) : NULL;
    R->logits = R->training ? take(bp, cmul(&bad, N, R->V)) : NULL;
    if (c->moda && !R->cache) {
        int64_t arena = cmul(&bad, cmul(&bad, N, R->n_slots), R->kvd);
        R->depth_k = take(bp, arena);
        R->depth_v = take(bp, arena);
    }
    /* pack: forward B = W^T (K x M); backward also B = W (M x K) and B = x (N x K) */
    int64_t K1 = max64(max64(d, R->qd), R->F), pk = 0;
    int64_t dims[] = {d, R->qd, R->kvd, R->F, R->V};
    for (int a = 0; a < 5; a++)
        for (int b = 0; b < 5; b++) pk = max64(pk, sf_matmul_pack_floats(dims[a], dims[b]));
    if (R->training) { /* dW = dy^T x: B = x (N x K), A = dy^T strided (sf_gemm packs a chunk) */
        int64_t widest = 0;
        for (int a = 0; a < 5; a++) widest = max64(widest, dims[a]);
        pk = max64(pk, sf_gemm_pack_floats(widest, N, max64(K1, widest), 1));
    }
    R->pack = take(bp, pk);
    if (R->bf16) sf_bf16_layout(R, bp);
    sf_attn_args aa = {0};
    aa.B = R->B; aa.Tq = R->T; aa.H = c->n_heads;
    aa.Tk = R->cache ? R->cache->max_len : R->T;
    aa.n_read = R->n_slots;
    aa.chunk = c->moda_chunk;
    aa.dh = R->dh;
    aa.bf16 = R->bf16;
    R->attn_scratch = take(bp, sf_attention_scratch_floats(&aa, R->nt));
    R->stats = take(bp, 2 * N);
    R->rope = c->pos == SF_POS_ROPE ? take(bp, cmul(&bad, R->T, R->dh)) : NULL;
    if (R->training) {
        R->dx = take(bp, Nd);
        R->du = take(bp, Nd);
        R->dy = take(bp, Nd);
        R->dfin = take(bp, Nd);
        R->dq = take(bp, cmul(&bad, N, R->qd));
        R->dk = take(bp, cmul(&bad, N, R->kvd));
        R->dv = take(bp, cmul(&bad, N, R->kvd));
        R->dtmp_kv = take(bp, cmul(&bad, N, R->kvd));
        R->datt = take(bp, cmul(&bad, N, R->qd));
        R->df1 = take(bp, cmul(&bad, N, R->F));
        R->df2 = c->act == SF_ACT_SWIGLU ? take(bp, cmul(&bad, N, R->F)) : NULL;
        R->dg = take(bp, cmul(&bad, N, R->F));
        R->dmask = c->resid_dropout > 0.0f ? take(bp, Nd) : NULL;
        R->dq_depth = depth_rope(c) == SF_DROPE_NONE ? take(bp, cmul(&bad, N, R->qd)) : NULL;
        if (c->moda) {
            int64_t arena = cmul(&bad, cmul(&bad, N, R->n_slots), R->kvd);
            R->ddepth_k = take(bp, arena);
            R->ddepth_v = take(bp, arena);
        }
    }
    if (bad) bp->bad = 1;
}

static void run_free(run *R) {
    /* training memory and the cached forward workspace stay with the model */
    if (R->fwd_cached) atomic_store(&((sf_model *)R->m)->fwd_busy, 0);
    else if (!R->training) free(R->mem);
    if (R->W) R->W->free(R);
    free(R->acts);
}

/* A workspace the model keeps between calls, grown to `bytes` when smaller (NULL if that
 * fails; the caller holds the guard that makes it its own). */
static void *kept_workspace(void **mem, int64_t *have, int64_t bytes) {
    if (*have < bytes) {
        free(*mem);
        *mem = malloc((size_t)bytes);
        *have = *mem ? bytes : 0;
    }
    return *mem;
}

/* Sizes, the wiring and its state, the block table; no workspace yet. */
static sf_status run_setup(run *R, const sf_model *m, int64_t B, int64_t T, int training,
                           int per_block, int two_phase, sf_cache *cache, int n_threads) {
    const sf_config *c = &m->cfg;
    memset(R, 0, sizeof *R);
    int64_t N; /* every size of the call derives from N: a wrapped B*T (2**62 x 2**62) used to
                * lay out a small workspace */
    if (B < 1 || T < 1 || sf_mul_ok(B, T, &N)) return SF_ERR_OVERFLOW;
    R->m = m; R->c = c; R->W = sf_wiring_of(c); R->B = B; R->T = T; R->N = N; R->d = c->d_model;
    R->dh = c->d_model / c->n_heads; R->qd = c->n_heads * R->dh; R->kvd = c->n_kv_heads * R->dh;
    R->F = c->d_ff; R->V = c->vocab_size; R->L = 2 * c->n_layers;
    R->n_slots = n_depth_slots(c);
    R->nt = sf_threads_resolve(n_threads);
    R->training = training; R->per_block = per_block; R->two_phase = two_phase;
    R->cache = cache; R->pos0 = cache ? cache->len : 0;
    R->bf16 = c->compute_dtype == SF_DTYPE_BFLOAT16;
    R->acts = calloc((size_t)c->n_layers, sizeof *R->acts);
    if (!R->acts) return SF_ERR_NOMEM;
    return R->W->init(R);
}

/* Set up sizes and allocate everything; on failure nothing is left allocated. */
static sf_status run_init(run *R, const sf_model *m, int64_t B, int64_t T, int training,
                          int per_block, int two_phase, sf_cache *cache, want w, int n_threads,
                          char *err, size_t errlen) {
    if (run_setup(R, m, B, T, training, per_block, two_phase, cache, n_threads) != SF_OK) goto nomem;
    bump bp = {NULL, 0, 0};
    layout(R, &bp, w);
    int64_t bytes;
    if (bp.bad || sf_mul_ok(bp.used + 16, (int64_t)sizeof(float), &bytes)) {
        run_free(R);
        return sf_fail(err, errlen, SF_ERR_OVERFLOW, "workspace size for B=%lld, T=%lld overflows", (long long)B, (long long)T);
    }
    if (bytes > sf_memory_limit_bytes()) {
        run_free(R);
        return sf_fail(err, errlen, SF_ERR_NOMEM, "this call would need %.1f GiB of workspace", (double)bytes / 1073741824.0);
    }
    sf_model *mm = (sf_model *)m;
    if (training) {
        R->mem = kept_workspace(&mm->train_mem, &mm->train_mem_bytes, bytes);
    } else {
        int idle = 0;
        if (atomic_compare_exchange_strong(&mm->fwd_busy, &idle, 1)) {
            R->mem = kept_workspace(&mm->fwd_mem, &mm->fwd_mem_bytes, bytes);
            if (R->mem) R->fwd_cached = 1;
            else atomic_store(&mm->fwd_busy, 0);
        }
        if (!R->mem) R->mem = malloc((size_t)bytes);
    }
    if (!R->mem) {
        run_free(R);
        return sf_fail(err, errlen, SF_ERR_NOMEM, "cannot allocate %.1f MiB of workspace", (double)bytes / 1048576.0);
    }
    bump real = {(float *)(((uintptr_t)R->mem + 63) & ~(uintptr_t)63), 0, 0};
    layout(R, &real, w);
    if (cache) {
        R->depth_k = cache->depth_k;
        R->depth_v = cache->depth_v;
        R->depth_bstride = cache->max_len * R->n_slots * R->kvd;
        R->depth_len = cache->max_len;
        R->kv_bstride = cache->max_len * R->kvd;
    } else {
        R->depth_bstride = T * R->n_slots * R->kvd;
        R->depth_len = T;
        R->kv_bstride = T * R->kvd;
    }
    if (R->rope) sf_rope_table(R->rope, T, R->pos0, R->dh, m->cfg.rope_theta, R->nt);
    if (R->bf16) sf_bf16_convert_weights(R);
    return SF_OK;
nomem:
    run_free(R);
    return sf_fail(err, errlen, SF_ERR_NOMEM, "cannot allocate workspace tables");
}

/* ---- MoDA depth slots and attention arguments ------------------------------------------- */

/* depth slot `slot` of row r (batch r / T, position pos0 + r % T), kv head g, in an arena
 * laid out (B, Hkv, n_slots, depth_len, dh) (see sf_attn_args) */
static float *depth_at(const run *R, float *arena, int64_t r, int64_t g, int64_t slot) {
    int64_t b = r / R->T, t = R->pos0 + r % R->T;
    return arena + b * R->depth_bstride + ((g * R->n_slots + slot) * R->depth_len + t) * R->dh;
}

/* rows (N, Hkv*dh) -> the arena's slot `slot`, one head's d_head floats at a time */
static void write_depth(const run *R, float *arena, int64_t slot, const float *rows) {
    const int64_t Hkv = R->c->n_kv_heads;
    const int key = arena == R->depth_k;
    const float *const *p = R->patch ? (key ? R->patch->depth_k : R->patch->depth_v) : NULL;
    if (p && p[slot]) rows = p[slot]; /* the caller's value for this slot */
    float *const *rec = R->tr ? (key ? R->tr->depth_k : R->tr->depth_v) : NULL;
    if (rec && rec[slot]) copy(rec[slot], rows, R->N * R->kvd);
    for (int64_t r = 0; r < R->N; r++)
        for (int64_t g = 0; g < Hkv; g++)
            memcpy(depth_at(R, arena, r, g, slot), rows + r * R->kvd + g * R->dh, (size_t)R->dh * sizeof(float));
}

/* rows (+)= the gradient arena's slot `slot` */
static void read_depth(const run *R, float *rows, const float *arena, int64_t slot, int accumulate) {
    const int64_t Hkv = R->c->n_kv_heads;
    for (int64_t r = 0; r < R->N; r++)
        for (int64_t g = 0; g < Hkv; g++) {
            const float *src = depth_at(R, (float *)arena, r, g, slot);
            float *dst = rows + r * R->kvd + g * R->dh;
            if (accumulate) for (int64_t j = 0; j < R->dh; j++) dst[j] += src[j];
            else memcpy(dst, src, (size_t)R->dh * sizeof(float));
        }
}

static sf_attn_args attn_args(const run *R, int64_t i, const block_acts *A) {
    const sf_config *c = R->c;
    sf_attn_args a = {0};
    a.B = R->B; a.Tq = R->T; a.Tk = R->T; a.q_pos0 = R->pos0;
    a.H = c->n_heads; a.Hkv = c->n_kv_heads; a.dh = R->dh; a.causal = c->causal;
    a.key_padding_mask = R->pad;
    a.k = A->k; a.v = A->v; a.kv_bstride = R->kv_bstride;
    if (R->cache) {
        int64_t layer = i * R->B * R->cache->max_len * R->kvd;
        a.k = R->cache->k + layer;
        a.v = R->cache->v + layer;
        a.Tk = R->pos0 + R->T;
    }
    a.depth_k = R->depth_k; a.depth_v = R->depth_v; a.depth_bstride = R->depth_bstride;
    a.depth_len = R->depth_len;
    a.n_slots = R->n_slots; a.n_read = c->moda ? depth_slots_per_layer(c) * i : 0; a.chunk = c->moda_chunk;
    a.depth_only = c->moda_depth_only;
    a.q_depth = A->q_pre; /* NULL unless moda_depth_rope='none' */
    a.depth_drop = R->patch && R->patch->depth_ablate ? R->patch->depth_ablate[i] : NULL;
    a.dq_depth = R->dq_depth;
    a.dropout = R->attn_p;
    a.dropout_seed = R->drop_seed;
    a.dropout_stream = 4 * (uint64_t)i;
    a.bf16 = R->bf16;
    return a;
}

/* ---- sublayers: forward ------------------------------------------------------------------- */

/* y = Attn_i(u): projections, RoPE, cache and depth writes, attention, output projection. */
static void attn_forward(const run *R, int64_t i, block_acts *A, const float *u, float *y,
                         const sf_trace *tr) {
    const sf_layer_views *Lv = &R->m->layers[i];
    const sf_config *c = R->c;
    float *probs = tr && tr->attention ? tr->attention[i] : NULL;
    float *depth_mass = tr && tr->depth_mass ? tr->depth_mass[i] : NULL;
    if (R->bf16) { /* u packed once for the three products */
        float *ys[3] = {A->q, A->k, A->v};
        const float *ws[3] = {Lv->q_w, Lv->k_w, Lv->v_w}, *bs[3] = {Lv->q_b, Lv->k_b, Lv->v_b};
        const int64_t Ms[3] = {R->qd, R->kvd, R->kvd};
        sf_bf16_linear_same_x(R, 3, ys, u, ws, bs, R->d, Ms);
    } else {
        linear(R, A->q, u, Lv->q_w, Lv->q_b, R->d, R->qd);
        linear(R, A->k, u, Lv->k_w, Lv->k_b, R->d, R->kvd);
        linear(R, A->v, u, Lv->v_w, Lv->v_b, R->d, R->kvd);
    }
    if (tr && tr->q) copy(tr->q[i], A->q, R->N * R->qd); /* before RoPE rotates them in place */
    if (tr && tr->k) copy(tr->k[i], A->k, R->N * R->kvd);
    if (tr && tr->v) copy(tr->v[i], A->v, R->N * R->kvd);
    const int drope = depth_rope(c), writes = c->moda && i < c->n_layers - 1;
    const int extra = c->moda_depth_kv == SF_DKV_EXTRA; /* the slot from its own projections */
    const int64_t slot = depth_slots_per_layer(c) * i;  /* attn_i's depth slot */
    if (drope == SF_DROPE_NONE) { /* depth logits and this layer's depth slot stay unrotated */
        copy(A->q_pre, A->q, R->N * R->qd);
        if (writes && !extra) write_depth(R, R->depth_k, slot, A->k);
    }
    if (c->pos == SF_POS_ROPE) {
        sf_rope(A->q, R->N, R->T, c->n_heads, R->dh, R->qd, R->rope, R->nt);
        sf_rope(A->k, R->N, R->T, c->n_kv_heads, R->dh, R->kvd, R->rope, R->nt);
    }
    sf_attn_args a = attn_args(R, i, A);
    if (R->cache) { /* append this call's keys/values after the cached positions */
        for (int64_t r = 0; r < R->N; r++) {
            int64_t off = (r / R->T) * R->kv_bstride + (R->pos0 + r % R->T) * R->kvd;
            memcpy((float *)a.k + off, A->k + r * R->kvd, (size_t)R->kvd * sizeof(float));
            memcpy((float *)a.v + off, A->v + r * R->kvd, (size_t)R->kvd * sizeof(float));
        }
    }
    if (writes && extra) { /* (u Wadk^T, u Wadv^T), the key rotated at its own position unless 'none' */
        linear(R, R->kvtmp, u, Lv->attn_depth_k_w, NULL, R->d, R->kvd);
        if (drope == SF_DROPE_OWN || drope == SF_DROPE_LEGACY)
            sf_rope(R->kvtmp, R->N, R->T, c->n_kv_heads, R->dh, R->kvd, R->rope, R->nt);
        write_depth(R, R->depth_k, slot, R->kvtmp);
        linear(R, R->kvtmp, u, Lv->attn_depth_v_w, NULL, R->d, R->kvd);
        write_depth(R, R->depth_v, slot, R->kvtmp);
    } else if (writes) { /* this layer's K (rotated at its own position unless 'none') and V */
        if (drope != SF_DROPE_NONE) write_depth(R, R->depth_k, slot, A->k);
        write_depth(R, R->depth_v, slot, A->v);
    }
    sf_attention_forward(&a, A->q, A->att, A->lse, probs, depth_mass, R->attn_scratch, R->nt);
    if (tr && tr->z) copy(tr->z[i], A->att, R->N * R->qd);
    linear(R, y, A->att, Lv->o_w, Lv->o_b, R->qd, R->d);
}

/* y = MLP_i(u); under MoDA also writes depth slot 2i+1 = (u Wdk^T, u Wdv^T). */
static void mlp_forward(const run *R, int64_t i, block_acts *A, const float *u, float *y,
                        const sf_trace *tr) {
    const sf_layer_views *Lv = &R->m->layers[i];
    const sf_config *c = R->c;
    int64_t nF = R->N * R->F;
    if (c->act == SF_ACT_SWIGLU) {
        linear(R, A->f1, u, Lv->gate_w, Lv->gate_b, R->d, R->F);
        linear(R, A->f2, u, Lv->up_w, Lv->up_b, R->d, R->F);
        sf_swiglu(A->g, A->f1, A->f2, nF, R->nt);
    } else {
        /* the activation runs in the matmul's epilogue; the pre-activation is kept for training */
        if (R->bf16) { /* the activation on each product tile while it is in cache */
            /* forward call: act(.) packed for the down product, no fp32 copy (the same bits);
             * not when the activation is recorded (it is never written then) */
            if (!(tr && tr->mlp_post) &&
                sf_bf16_mlp_forward(R, y, c->act, u, Lv->up_w, Lv->up_b, Lv->down_w, Lv->down_b, R->d, R->F))
                goto depth;
            sf_bf16_linear_act(R, R->training ? A->f1 : NULL, A->g, c->act, u, Lv->up_w, Lv->up_b, R->d, R->F);
        } else {
            sf_matmul_act(R->training ? A->f1 : NULL, A->g, c->act, u, Lv->up_w, Lv->up_b, R->N, R->d,
                          R->F, R->pack, R->nt);
        }
    }
    if (tr && tr->mlp_post) copy(tr->mlp_post[i], A->g, nF);
    linear(R, y, A->g, Lv->down_w, Lv->down_b, R->F, R->d);
depth:
    if (c->moda && c->moda_depth_kv != SF_DKV_ATTN && i < c->n_layers - 1) {
        linear(R, R->kvtmp, u, Lv->depth_k_w, NULL, R->d, R->kvd);
        if (depth_rope(c) == SF_DROPE_OWN) /* rotated at its own position, like attention's */
            sf_rope(R->kvtmp, R->N, R->T, c->n_kv_heads, R->dh, R->kvd, R->rope, R->nt);
        write_depth(R, R->depth_k, 2 * i + 1, R->kvtmp);
        linear(R, R->kvtmp, u, Lv->depth_v_w, NULL, R->d, R->kvd);
        write_depth(R, R->depth_v, 2 * i + 1, R->kvtmp);
    }
}

/* ---- sublayers: backward ------------------------------------------------------------------ */

/* Given dy = dL/dy of y = Attn_i(u), accumulate parameter gradients and write du. */
static void attn_backward(const run *R, int64_t i, block_acts *A, const float *u,
                          const float *dy, float *du) {
    const sf_layer_views *Lv = &R->m->layers[i];
    const sf_config *c = R->c;
    linear_bwd(R, R->datt, 0, dy, A->att, Lv->o_w, Lv->o_b, R->qd, R->d);
    sf_attn_args a = attn_args(R, i, A);
    sf_attention_backward(&a, A->q, A->att, R->datt, A->lse, R->dq, R->dk, R->dv, R->ddepth_k,
                          R->ddepth_v, R->attn_scratch, R->nt);
    const int drope = depth_rope(c), writes = c->moda && i < c->n_layers - 1;
    const int extra = c->moda_depth_kv == SF_DKV_EXTRA;
    const int64_t slot = depth_slots_per_layer(c) * i;
    if (writes && !extra) { /* later layers read this K, V as depth slot attn_i */
        if (drope != SF_DROPE_NONE) read_depth(R, R->dk, R->ddepth_k, slot, 1);
        read_depth(R, R->dv, R->ddepth_v, slot, 1);
    }
    if (c->pos == SF_POS_ROPE) {
        sf_rope_backward(R->dq, R->N, R->T, c->n_heads, R->dh, R->qd, R->rope, R->nt);
        sf_rope_backward(R->dk, R->N, R->T, c->n_kv_heads, R->dh, R->kvd, R->rope, R->nt);
    }
    if (drope == SF_DROPE_NONE) { /* the unrotated depth path joins after the inverse rotation */
        for (int64_t j = 0; j < R->N * R->qd; j++) R->dq[j] += R->dq_depth[j];
        if (writes && !extra) read_depth(R, R->dk, R->ddepth_k, slot, 1);
    }
    linear_bwd(R, du, 0, R->dq, u, Lv->q_w, Lv->q_b, R->d, R->qd);
    linear_bwd(R, du, 1, R->dk, u, Lv->k_w, Lv->k_b, R->d, R->kvd);
    linear_bwd(R, du, 1, R->dv, u, Lv->v_w, Lv->v_b, R->d, R->kvd);
    if (writes && extra) { /* the slot's own projections */
        read_depth(R, R->dtmp_kv, R->ddepth_k, slot, 0);
        if (drope == SF_DROPE_OWN || drope == SF_DROPE_LEGACY)
            sf_rope_backward(R->dtmp_kv, R->N, R->T, c->n_kv_heads, R->dh, R->kvd, R->rope, R->nt);
        linear_bwd(R, du, 1, R->dtmp_kv, u, Lv->attn_depth_k_w, NULL, R->d, R->kvd);
        read_depth(R, R->dtmp_kv, R->ddepth_v, slot, 0);
        linear_bwd(R, du, 1, R->dtmp_kv, u, Lv->attn_depth_v_w, NULL, R->d, R->kvd);
    }
}

static void mlp_backward(const run *R, int64_t i, block_acts *A, const float *u,
                         const float *dy, float *du) {
    const sf_layer_views *Lv = &R->m->layers[i];
    const sf_config *c = R->c;
    int64_t nF = R->N * R->F;
    linear_bwd(R, R->dg, 0, dy, A->g, Lv->down_w, Lv->down_b, R->F, R->d);
    if (c->act == SF_ACT_SWIGLU) {
        sf_swiglu_backward(R->df1, R->df2, R->dg, A->f1, A->f2, nF, R->nt);
        linear_bwd(R, du, 0, R->df1, u, Lv->gate_w, Lv->gate_b, R->d, R->F);
        linear_bwd(R, du, 1, R->df2, u, Lv->up_w, Lv->up_b, R->d, R->F);
    } else {
        sf_act_backward(c->act, R->df1, R->dg, A->f1, nF, R->nt);
        linear_bwd(R, du, 0, R->df1, u, Lv->up_w, Lv->up_b, R->d, R->F);
    }
    if (c->moda && c->moda_depth_kv != SF_DKV_ATTN && i < c->n_layers - 1) {
        read_depth(R, R->dtmp_kv, R->ddepth_k, 2 * i + 1, 0);
        if (depth_rope(c) == SF_DROPE_OWN)
            sf_rope_backward(R->dtmp_kv, R->N, R->T, c->n_kv_heads, R->dh, R->kvd, R->rope, R->nt);
        linear_bwd(R, du, 1, R->dtmp_kv, u, Lv->depth_k_w, NULL, R->d, R->kvd);
        read_depth(R, R->dtmp_kv, R->ddepth_v, 2 * i + 1, 0);
        linear_bwd(R, du, 1, R->dtmp_kv, u, Lv->depth_v_w, NULL, R->d, R->kvd);
    }
}

/* ---- the stack ---------------------------------------------------------------------------- */

static void embed(const run *R, const int32_t *tokens, const float *embeds, float *x0) {
    const sf_config *c = R->c;
    const int64_t d = R->d;
    for (int64_t r = 0; r < R->N; r++) {
        int64_t t = R->pos0 + r % R->T;
        float *xr = x0 + r * d;
        if (tokens) memcpy(xr, R->m->tok_emb + (int64_t)tokens[r] * d, (size_t)d * sizeof(float));
        else memcpy(xr, embeds + r * d, (size_t)d * sizeof(float));
        if (c->pos == SF_POS_LEARNED) {
            const float *pe = R->m->pos_emb + t * d;
            for (int64_t j = 0; j < d; j++) xr[j] += pe[j];
        } else if (c->pos == SF_POS_SINUSOIDAL) {
            for (int64_t j = 0; j < d; j += 2) {
                double ang = (double)t / pow(10000.0, (double)j / (double)d);
                xr[j] += (float)sin(ang);
                xr[j + 1] += (float)cos(ang);
            }
        }
    }
}

static void embed_backward(const run *R, const int32_t *tokens, const float *dx0) {
    const sf_config *c = R->c;
    const int64_t d = R->d, N = R->N;
    float *gt = tokens ? GRAD(R, R->m->tok_emb) : NULL;
    float *gp = c->pos == SF_POS_LEARNED ? GRAD(R, R->m->pos_emb) : NULL;
    /* column-parallel scatter-add: each thread owns columns, rows in order */
#pragma omp parallel for schedule(static) num_threads(R->nt) if (N * d > 65536)
    for (int64_t j = 0; j < d; j++)
        for (int64_t r = 0; r < N; r++) {
            float g = dx0[r * d + j];
            if (gt) gt[(int64_t)tokens[r] * d + j] += g;
            if (gp) gp[(R->pos0 + r % R->T) * d + j] += g;
        }
}

/* Sublayer k's forward: y = F_k(u) (attention for k even, MLP for k odd, of block k/2). */
static void sub_forward(run *R, int64_t k, const float *u, float *y, sf_trace *tr) {
    const int64_t i = k / 2;
    block_acts *A = &R->acts[i];
    if (k % 2 == 0) attn_forward(R, i, A, u, y, tr);
    else mlp_forward(R, i, A, u, y, tr);
}

/* Given dy = dL/dy of y = F_k(u), accumulate F_k's parameter gradients and write du. */
static void sub_backward(run *R, int64_t k, const float *u, const float *dy, float *du) {
    const int64_t i = k / 2;
    if (k % 2 == 0) attn_backward(R, i, &R->acts[i], u, dy, du);
    else mlp_backward(R, i, &R->acts[i], u, dy, du);
}

/* One transformer block forward: its two sublayers, each read, (pre-)normed, run and written
 * through the wiring (sf_wiring.h). The MLP's write goes to `out` (the next block's input, or
 * fin_h; a sink when recomputing). */
static void block_forward(run *R, int64_t i, float *out, sf_trace *tr) {
    const sf_wiring *W = R->W;
    block_acts *A = &R->acts[i];
    const int64_t Nd = R->N * R->d;
    float *rms = tr ? tr->rms : NULL;
    for (int64_t s = 0; s < 2; s++) {
        if (s == 1 && run_cancelled(R)) return; /* the caller's loop sees it next and stops */
        const int64_t k = 2 * i + s;
        float *h = s == 0 ? A->in_a : A->in_m, *u = s == 0 ? A->u_a : A->u_m;
        const float *nw, *nb;
        sub_norm(R, k, &nw, &nb);
        W->read(R, k, h, tr && tr->alpha ? tr->alpha[k] : NULL);
        if (R->patch) { /* the caller's value for what this sublayer reads (plain: the stream) */
            const float *const *p = s == 0 ? R->patch->resid_pre : R->patch->resid_mid;
            if (p && p[i]) copy(h, p[i], Nd);
        }
        if (s == 0 && tr && tr->hidden) copy(tr->hidden[i], h, Nd);
        if (s == 1 && tr && tr->hidden_mid) copy(tr->hidden_mid[i], h, Nd);
        if (rms) rms[k * SF_RMS_COLS + SF_RMS_INPUT] = rms_of(h, Nd);
        if (R->c->pre_norm) norm_fwd(R, u, h, nw, nb);
        float *y = W->out_buf(R, k, s == 0 ? A->y_a : A->y_m);
        sub_forward(R, k, u, y, tr);
        float *tout = tr ? (s == 0 ? (tr->attn_out ? tr->attn_out[i] : NULL) : (tr->mlp_out ? tr->mlp_out[i] : NULL)) : NULL;
        W->write(R, k, y, s == 0 ? A->in_m : out, tout, rms ? rms + k * SF_RMS_COLS : NULL);
    }
}

static float *block_out(run *R, int64_t i) {
    return i + 1 < R->c->n_layers ? R->acts[i + 1].in_a : R->fin_h;
}

/* Everything from the embedding to fin_u (the head's input). */
static sf_status stack_forward(run *R, const int32_t *tokens, const float *embeds, sf_trace *tr) {
    const sf_config *c = R->c;
    const int64_t Nd = R->N * R->d, n = c->n_layers, L = R->L;
    float *x0 = R->W->embed_dst(R);
    embed(R, tokens, embeds, x0);
    if (R->patch && R->patch->embed) copy(x0, R->patch->embed, Nd);
    if (tr && tr->embed) copy(tr->embed, x0, Nd);
    R->W->begin(R, x0);
    for (int64_t i = 0; i < n; i++) {
        if (run_cancelled(R)) return SF_ERR_INTERRUPTED;
        if (R->x_in) copy(R->x_in + i * Nd, R->acts[i].in_a, Nd); /* checkpoint: keep the input */
        block_forward(R, i, block_out(R, i), tr);
    }
    R->W->final(R, tr && tr->alpha ? tr->alpha[L] : NULL);
    if (tr && tr->hidden) copy(tr->hidden[n], R->fin_h, Nd);
    if (tr && tr->rms) {
        tr->rms[L * SF_RMS_COLS + SF_RMS_INPUT] = rms_of(R->fin_h, Nd);
        tr->rms[L * SF_RMS_COLS + SF_RMS_OUTPUT] = NAN;
        tr->rms[L * SF_RMS_COLS + SF_RMS_STREAM] = NAN;
    }
    if (c->final_norm) norm_fwd(R, R->fin_u, R->fin_h, R->m->final_norm_w, R->m->final_norm_b);
    return run_cancelled(R) ? SF_ERR_INTERRUPTED : SF_OK;
}

/* Backward from dlogits (in R->logits) to every parameter gradient: the head, the final norm,
 * then the sublayers from the top, each through the wiring's write and read (sf_wiring.h),
 * recomputing a block's activations first when checkpointing; the embedding last. */
static sf_status stack_backward(run *R, const int32_t *tokens) {
    const sf_config *c = R->c;
    const sf_model *m = R->m;
    const sf_wiring *W = R->W;
    const int64_t N = R->N, d = R->d, Nd = N * d, V = R->V;
    /* head: logits = fin_u head^T */
    linear_bwd(R, R->dfin, 0, R->logits, R->fin_u, m->lm_head, NULL, d, V);
    float *dfin_h = R->dfin;
    if (c->final_norm) {
        norm_bwd(R, R->dx, R->dfin, R->fin_h, m->final_norm_w, m->final_norm_b, 0);
        dfin_h = R->dx;
    }
    W->backward_begin(R, dfin_h);
    for (int64_t k = R->L - 1; k >= 0; k--) {
        if (run_cancelled(R)) return SF_ERR_INTERRUPTED;
        const int64_t i = k / 2;
        block_acts *A = &R->acts[i];
        if (!R->per_block && k % 2 == 1) { /* checkpointing: recompute block i */
            if (R->x_in) copy(A->in_a, R->x_in + i * Nd, Nd);
            block_forward(R, i, R->dfin, NULL); /* its output is not needed: a sink */
            if (run_cancelled(R)) return SF_ERR_INTERRUPTED;
        }
        const float *dy = W->write_backward(R, k), *nw, *nb;
        float *h = k % 2 == 0 ? A->in_a : A->in_m, *u = k % 2 == 0 ? A->u_a : A->u_m;
        int acc;
        if (c->pre_norm) {
            sub_backward(R, k, u, dy, R->du);
            float *dh = W->read_grad_dst(R, k, &acc);
            sub_norm(R, k, &nw, &nb);
            norm_bwd(R, dh, R->du, h, nw, nb, acc);
        } else {
            sub_backward(R, k, u, dy, W->read_grad_dst(R, k, &acc)); /* acc == 0 under post-norm */
        }
        W->read_backward(R, k);
    }
    embed_backward(R, tokens, W->embed_grad(R));
    W->backward_end(R);
    return SF_OK;
}

/* ---- public entry points ------------------------------------------------------------------ */

static sf_status check_inputs(const sf_config *c, const int32_t *tokens, const float *embeds,
                              const uint8_t *mask, int64_t B, int64_t T, int64_t max_T, char *err,
                              size_t errlen) {
    if (B < 1 || T < 1) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "the input is empty: batch and sequence length must be >= 1 (got B=%lld, T=%lld)", (long long)B, (long long)T);
    if (T > max_T) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "sequence length %lld exceeds max_seq_len %lld", (long long)T, (long long)max_T);
    if (!tokens == !embeds) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "exactly one of tokens and embeds must be given");
    int64_t N;
    if (sf_mul_ok(B, T, &N)) return sf_fail(err, errlen, SF_ERR_OVERFLOW, "B*T overflows");
    if (tokens) {
        for (int64_t r = 0; r < N; r++)
            if (tokens[r] < 0 || tokens[r] >= c->vocab_size)
                return sf_fail(err, errlen, SF_ERR_TOKEN_RANGE, "token id %d at [%lld, %lld] is outside [0, vocab_size=%lld)", (int)tokens[r], (long long)(r / T), (long long)(r % T), (long long)c->vocab_size);
    } else {
        int64_t Nd;
        if (sf_mul_ok(N, c->d_model, &Nd)) return sf_fail(err, errlen, SF_ERR_OVERFLOW, "B*T*d overflows");
        for (int64_t r = 0; r < Nd; r++)
            if (!isfinite(embeds[r])) return sf_fail(err, errlen, SF_ERR_NONFINITE, "embeds contain NaN or inf (as float32) at flat index %lld", (long long)r);
    }
    if (mask) /* 1 = real token, 0 = padding; anything else is a caller's mistake, not a 1 */
        for (int64_t r = 0; r < N; r++)
            if (mask[r] > 1) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "key_padding_mask value %d at [%lld, %lld] is not 0 or 1", (int)mask[r], (long long)(r / T), (long long)(r % T));
    return SF_OK;
}

static sf_status forward_impl(const sf_model *m, const sf_forward_args *args, float *out_logits,
                              float *out_hidden, sf_trace *trace, char *err, size_t errlen);

/* The first non-finite value of a patch array, or -1 */
static int64_t first_nonfinite(const float *x, int64_t n) {
    for (int64_t r = 0; r < n; r++)
        if (!isfinite(x[r])) return r;
    return -1;
}

/* An intervention's arrays: finite, weights and ablations only where reads have them, and
 * never a read left with nothing to mix (its softmax would be 0/0). N = B*T. */
static sf_status check_patch(const sf_config *c, const sf_patch *p, int64_t N, int cached, char *err,
                             size_t errlen) {
    const int64_t n = c->n_layers, L = 2 * n, d = c->d_model;
    const int ar = c->residual == SF_RES_ATTNRES_FULL || c->residual == SF_RES_ATTNRES_BLOCK;
    if (cached) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "interventions (patches) need a full forward, not cached decoding");
    if ((p->alpha || p->ablate) && !ar)
        return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "patching depth weights or ablating sources needs residual='attnres_full' or 'attnres_block' (this model's reads are not a mixture of sources)");
    int64_t at;
    if (p->embed && (at = first_nonfinite(p->embed, N * d)) >= 0)
        return sf_fail(err, errlen, SF_ERR_NONFINITE, "patch hook_embed has NaN or inf at flat index %lld", (long long)at);
    const float *const *lists[4] = {p->resid_pre, p->resid_mid, p->attn_out, p->mlp_out};
    static const char *names[4] = {"hook_resid_pre", "hook_resid_mid", "hook_attn_out", "hook_mlp_out"};
    for (int j = 0; j < 4; j++)
        for (int64_t i = 0; lists[j] && i < n; i++)
            if (lists[j][i] && (at = first_nonfinite(lists[j][i], N * d)) >= 0)
                return sf_fail(err, errlen, SF_ERR_NONFINITE, "patch blocks.%lld.%s has NaN or inf at flat index %lld", (long long)i, names[j], (long long)at);
    if ((p->depth_ablate || p->depth_k || p->depth_v) && !c->moda)
        return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "ablating or patching depth slots needs moda=True");
    const int64_t nslots = c->moda ? depth_slots_per_layer(c) * (n - 1) : 0, kvd = c->n_kv_heads * (d / c->n_heads);
    for (int64_t sl = 0; sl < nslots; sl++) {
        if (p->depth_k && p->depth_k[sl] && (at = first_nonfinite(p->depth_k[sl], N * kvd)) >= 0)
            return sf_fail(err, errlen, SF_ERR_NONFINITE, "patched depth slot %lld keys have NaN or inf at flat index %lld", (long long)sl, (long long)at);
        if (p->depth_v && p->depth_v[sl] && (at = first_nonfinite(p->depth_v[sl], N * kvd)) >= 0)
            return sf_fail(err, errlen, SF_ERR_NONFINITE, "patched depth slot %lld values have NaN or inf at flat index %lld", (long long)sl, (long long)at);
    }
    for (int64_t i = 0; p->depth_ablate && i < n; i++) {
        const uint8_t *ab = p->depth_ablate[i];
        const int64_t nr = sf_depth_cols(c, i) / c->moda_chunk;
        int64_t kept = 0;
        for (int64_t j = 0; ab && j < nr; j++) {
            if (ab[j] > 1) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "depth ablation mask of block %lld: value %d at slot %lld is not 0 or 1", (long long)i, (int)ab[j], (long long)j);
            kept += !ab[j];
        }
        if (ab && !kept && c->moda_depth_only && nr > 0)
            return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "ablating all %lld depth slots of block %lld leaves its depth-only attention nothing to attend", (long long)nr, (long long)i);
    }
    for (int64_t k = 0; k <= L; k++) {
        const int64_t ns = sf_attnres_num_sources(c, k);
        if (p->alpha && p->alpha[k] && (at = first_nonfinite(p->alpha[k], N * c->attnres_heads * ns)) >= 0)
            return sf_fail(err, errlen, SF_ERR_NONFINITE, "patched weights of read %lld have NaN or inf at flat index %lld", (long long)k, (long long)at);
        const uint8_t *ab = p->ablate ? p->ablate[k] : NULL;
        if (!ab) continue;
        int64_t kept = 0;
        for (int64_t i = 0; i < ns; i++) {
            if (ab[i] > 1) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "ablation mask of read %lld: value %d at source %lld is not 0 or 1", (long long)k, (int)ab[i], (long long)i);
            kept += !ab[i];
        }
        if (!kept && c->attnres_mixing != SF_MIX_SIGMOID)
            return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "ablating all %lld sources of read %lld leaves its softmax nothing to mix", (long long)ns, (long long)k);
    }
    return SF_OK;
}

sf_status sf_forward(const sf_model *m, const sf_forward_args *args, float *out_logits,
                     float *out_hidden, sf_trace *trace, char *err, size_t errlen) {
    if (!m || !args) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "model or args is NULL");
    sf_cache *cache = args->cache;
    if (!cache) return forward_impl(m, args, out_logits, out_hidden, trace, err, errlen);
    /* a cache is one sequence's state: two calls appending to it at once would both write
     * position len (and both advance it), so the second one is refused */
    int idle = 0;
    if (!atomic_compare_exchange_strong(&cache->busy, &idle, 1))
        return sf_fail(err, errlen, SF_ERR_BUSY, "the cache is in use by another call");
    sf_status st = forward_impl(m, args, out_logits, out_hidden, trace, err, errlen);
    atomic_store(&cache->busy, 0);
    return st;
}

sf_status sf_forward_check(const sf_model *m, const sf_forward_args *args, int tracing, char *err,
                           size_t errlen) {
    if (!m || !args) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "model or args is NULL");
    const sf_config *c = &m->cfg;
    sf_cache *cache = args->cache;
    int64_t max_T = c->max_seq_len;
    if (cache) {
        if (cache->m != m) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "the cache belongs to another model");
        if (args->B != cache->B) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "batch %lld does not match the cache's batch %lld", (long long)args->B, (long long)cache->B);
        if (args->key_padding_mask || tracing) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "cached decoding supports neither key_padding_mask nor traces");
        if (!c->causal) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "cached decoding needs a causal (decoder) model");
        max_T = cache->max_len - cache->len;
    }
    sf_status st = check_inputs(c, args->tokens, args->embeds, args->key_padding_mask, args->B, args->T, max_T, err, errlen);
    if (st != SF_OK && cache && args->T > max_T && args->T >= 1)
        return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "the cache holds %lld of %lld positions: no room for %lld more", (long long)cache->len, (long long)cache->max_len, (long long)args->T);
    if (st == SF_OK && args->patch) st = check_patch(c, args->patch, args->B * args->T, cache != NULL, err, errlen);
    return st;
}

/* "1.5 GiB", "12.0 MiB", "512 B" for messages. */
static const char *human_bytes(char *buf, int64_t n) {
    if (n >= ((int64_t)1 << 30)) snprintf(buf, 32, "%.1f GiB", (double)n / 1073741824.0);
    else if (n >= ((int64_t)1 << 20)) snprintf(buf, 32, "%.1f MiB", (double)n / 1048576.0);
    else snprintf(buf, 32, "%lld B", (long long)n);
    return buf;
}

sf_status sf_forward_memory_check(const sf_model *m, const sf_forward_args *args, int want_rms,
                                  int want_alpha, int64_t output_bytes, char *err, size_t errlen) {
    if (!m || !args) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "model or args is NULL");
    if (output_bytes < 0) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "output_bytes is negative (%lld)", (long long)output_bytes);
    /* lay the workspace out without allocating it (the same sizes run_init will use): each
     * part may fit on its own while the two together do not */
    run R;
    int64_t ws = -1;
    if (run_setup(&R, m, args->B, args->T, 0, 0, args->attnres_two_phase, args->cache, args->n_threads) == SF_OK) {
        bump bp = {NULL, 0, 0};
        layout(&R, &bp, (want){want_rms != 0, want_alpha != 0});
        if (!bp.bad && sf_mul_ok(bp.used + 16, (int64_t)sizeof(float), &ws)) ws = -1;
    }
    run_free(&R);
    int64_t total;
    if (ws < 0 || sf_add_ok(ws, output_bytes, &total))
        return sf_fail(err, errlen, SF_ERR_OVERFLOW, "workspace size for B=%lld, T=%lld overflows",
                       (long long)args->B, (long long)args->T);
    const int64_t lim = sf_memory_limit_bytes();
    if (total > lim) {
        char a[32], b[32], c[32], d[32];
        return sf_fail(err, errlen, SF_ERR_NOMEM,
                       "B=%lld, T=%lld would need %s (outputs and traces %s + workspace %s), more than the %s "
                       "this process may use (physical memory, cgroup limit, STACKFORMER_MEMORY_LIMIT)",
                       (long long)args->B, (long long)args->T, human_bytes(a, total),
                       human_bytes(b, output_bytes), human_bytes(c, ws), human_bytes(d, lim));
    }
    return SF_OK;
}

static sf_status forward_impl(const sf_model *m, const sf_forward_args *args, float *out_logits,
                              float *out_hidden, sf_trace *trace, char *err, size_t errlen) {
    sf_cache *cache = args->cache;
    sf_status st = sf_forward_check(m, args, trace != NULL, err, errlen);
    if (st != SF_OK) return st;
    if (!sf_model_acquire_read((sf_model *)m))
        return sf_fail(err, errlen, SF_ERR_BUSY, "the model is being trained by another thread");
    run R;
    want w = {trace && trace->rms, trace && trace->alpha};
    /* patched weights or ablated sources take the direct read (the two-phase schedule batches
     * a block's reads) */
    const int two_phase = args->attnres_two_phase && !(args->patch && (args->patch->alpha || args->patch->ablate));
    st = run_init(&R, m, args->B, args->T, 0, 0, two_phase, cache, w, args->n_threads, err, errlen);
    if (st == SF_OK) {
        R.patch = args->patch;
        R.tr = trace;
        R.pad = args->key_padding_mask;
        R.copy_rms = trace ? trace->copy_rms : NULL;
        R.cancel = args->cancel;
        st = stack_forward(&R, args->tokens, args->embeds, trace);
        if (st == SF_OK) {
            copy(out_hidden, R.fin_u, R.N * R.d);
            if (out_logits) linear(&R, out_logits, R.fin_u, m->lm_head, NULL, R.d, R.V);
            if (cache) cache->len += args->T;
        } else {
            sf_fail(err, errlen, st, "interrupted");
        }
        run_free(&R);
    }
    sf_model_release_read((sf_model *)m);
    return st;
}

void sf_model_release_workspace(sf_model *m) {
    /* As a reader, waiting for a running train step: no train step (the only user of
     * train_mem) can start while a reader holds the guard, and forward calls keep running.
     * The forward workspace is taken the way a forward call takes it; one that a running
     * forward call holds stays with it. */
    sf_model_acquire_read_wait(m);
    free(m->train_mem);
    m->train_mem = NULL;
    m->train_mem_bytes = 0;
    int idle = 0;
    if (atomic_compare_exchange_strong(&m->fwd_busy, &idle, 1)) {
        free(m->fwd_mem);
        m->fwd_mem = NULL;
        m->fwd_mem_bytes = 0;
        atomic_store(&m->fwd_busy, 0);
    }
    sf_model_release_read(m);
}

int64_t sf_train_workspace_bytes(const sf_config *cfg, int64_t B, int64_t T, int checkpoint) {
    sf_model fake;
    memset(&fake, 0, sizeof fake);
    fake.cfg = *cfg;
    run R;
    int64_t out = -1;
    if (run_setup(&R, &fake, B, T, 1, !checkpoint, 0, NULL, 0) == SF_OK) {
        bump bp = {NULL, 0, 0};
        want w = {0, 0};
        layout(&R, &bp, w);
        if (!bp.bad && sf_mul_ok(bp.used, (int64_t)sizeof(float), &out)) out = -1;
    }
    if (R.W) R.W->free(&R);
    free(R.acts);
    return out;
}

sf_status sf_forward_backward(sf_model *m, const sf_train_args *a, double *loss, int64_t *count,
                              char *err, size_t errlen) {
    if (!m || !a) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "model or args is NULL");
    const sf_config *c = &m->cfg;
    sf_status st = check_inputs(c, a->tokens, a->embeds, a->key_padding_mask, a->B, a->T, c->max_seq_len, err, errlen);
    if (st != SF_OK) return st;
    if (!a->targets) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "targets are required");
    for (int64_t r = 0; r < a->B * a->T; r++) {
        int32_t t = a->targets[r];
        if (t != a->ignore_index && (t < 0 || t >= c->vocab_size))
            return sf_fail(err, errlen, SF_ERR_TOKEN_RANGE, "target %d at [%lld, %lld] is outside [0, vocab_size=%lld) and is not ignore_index (%d)", (int)t, (long long)(r / a->T), (long long)(r % a->T), (long long)c->vocab_size, (int)a->ignore_index);
    }
    if (!sf_model_acquire_write(m))
        return sf_fail(err, errlen, SF_ERR_BUSY, "the model is in use by another thread (a train step needs it alone)");
    run R;
    want w = {0, 0};
    st = run_init(&R, m, a->B, a->T, 1, !a->checkpoint, 0, NULL, w, a->n_threads, err, errlen);
    if (st == SF_OK) {
        R.pad = a->key_padding_mask;
        R.attn_p = c->attn_dropout;
        R.resid_p = c->resid_dropout;
        { /* masks depend on the seed and the optimizer step: a resumed run repeats them */
            uint64_t z = a->dropout_seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(m->step + 1));
            z = (z ^ (z >> 31)) * 0xBF58476D1CE4E5B9ull;
            R.drop_seed = z ^ (z >> 29);
        }
        R.cancel = a->cancel;
        st = stack_forward(&R, a->tokens, a->embeds, NULL);
        if (st != SF_OK) goto interrupted;
        linear(&R, R.logits, R.fin_u, m->lm_head, NULL, R.d, R.V);
        double sum = 0.0;
        int64_t cnt = 0;
        sf_cross_entropy(R.logits, a->targets, R.N, R.V, a->ignore_index, &sum, &cnt, NULL, R.nt);
        memset(m->grads, 0, (size_t)m->num_params * sizeof(float));
        if (m->cfg.moda) {
            int64_t arena = R.N * R.n_slots * R.kvd;
            memset(R.ddepth_k, 0, (size_t)arena * sizeof(float));
            memset(R.ddepth_v, 0, (size_t)arena * sizeof(float));
        }
        if (cnt > 0 && (st = stack_backward(&R, a->tokens)) != SF_OK) goto interrupted;
        if (loss) *loss = cnt ? sum / (double)cnt : 0.0;
        if (count) *count = cnt;
        if (cnt > 0 && !isfinite(sum))
            st = sf_fail(err, errlen, SF_ERR_NONFINITE, "the loss is not finite (NaN or inf in weights or activations)");
    interrupted:
        if (st == SF_ERR_INTERRUPTED) sf_fail(err, errlen, st, "interrupted");
        run_free(&R);
    }
    sf_model_release_write(m);
    return st;
}
