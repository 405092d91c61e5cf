/* The stack: embedding, n blocks of (attention, MLP) sublayers wired by plain residuals or by
 * Attention Residuals, optional Mixture-of-Depths attention, final norm, head — forward,
 * backward, traces and the decoding cache. See DEVELOPERS.md for the math.
 *
 * Memory: every call lays all of its buffers out in one allocation (see `layout`), made
 * before the layer loop and freed after it, so concurrent forward calls never share mutable
 * state and nothing is allocated inside the loop. Per transformer block the activations the
 * backward pass needs live in a `block_acts`; inference (and gradient checkpointing) give all
 * blocks one shared set, training without checkpointing gives each block its own.
 */
#include "sf_internal.h"
#include "sf_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Full AttnRes backward: sources whose gradients one pass over their readers gathers together
 * (full_source_grad). At M (25 readers, 2 threads, kernel microbenchmark): 60-66 -> 57-58 ms. */
#define SF_AR_GROUP 4

int64_t sf_depth_cols(const sf_config *c, int64_t layer) {
    return c->moda ? 2 * layer * c->moda_chunk : 0;
}

int64_t sf_attnres_num_sources(const sf_config *c, int64_t k) {
    int64_t L = 2 * c->n_layers;
    if (c->residual == SF_RES_ATTNRES_FULL) return k + 1;
    if (c->residual != SF_RES_ATTNRES_BLOCK) return 0;
    int64_t S = c->attnres_block_size;
    if (k >= L) return 1 + (L + S - 1) / S; /* output: b_0 .. b_N */
    return 1 + k / S + (k % S != 0);
}

/* ---- the decoding cache --------------------------------------------------------------------- */

struct sf_cache {
    const sf_model *m;
    int64_t B, max_len, len;
    float *k, *v;             /* (n_layers, B, max_len, kvd) */
    float *depth_k, *depth_v; /* (B, Hkv, max_len, n_slots, dh) */
};

static int64_t n_depth_slots(const sf_config *c) { return c->moda ? 2 * (c->n_layers - 1) : 0; }

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
void sf_cache_reset(sf_cache *c) { c->len = 0; }

/* ---- one call's buffers ------------------------------------------------------------------- */

typedef struct {
    float *in_a, *u_a, *q, *k, *v, *att, *lse, *y_a, *z_a; /* attention sublayer */
    float *in_m, *u_m, *f1, *f2, *g, *y_m, *z_m;            /* MLP sublayer */
    float *alpha_a, *alpha_m;                               /* AttnRes weights (N, nsrc) */
} block_acts;

typedef struct {
    const sf_model *m;
    const sf_config *c;
    int64_t B, T, N, d, dh, qd, kvd, F, V, L, S, nb, nsrc_max, n_slots;
    int nt, attnres, block, training, per_block, two_phase;
    const uint8_t *pad;
    sf_cache *cache;
    int64_t pos0;           /* absolute position of row 0 (cache length before the call) */
    block_acts *acts;       /* n_layers entries (shared pointers when !per_block) */
    float *x_in;            /* checkpointing, plain: (n, N, d) block inputs */
    float *src, *src_rms;   /* AttnRes: Full (L+1) sources, Block (nb+1) completed blocks */
    float *part, *part_rms; /* Block: partial sum read by sublayer k (training: L of them) */
    float *vtmp;            /* Block/post-norm: a sublayer's output before it joins a sum */
    float *running;         /* rms trace under AttnRes: the plain running sum */
    float *fin_h, *fin_u, *logits; /* final stream/aggregate, after final norm, head output */
    float *alpha_out;              /* AttnRes output aggregator weights (training) */
    float *kvtmp;                  /* MoDA: an FFN's depth k or v rows before they are placed */
    float *depth_k, *depth_v; /* MoDA arena (own, or the cache's) */
    int64_t depth_bstride, depth_len, kv_bstride;
    float *pack, *attn_scratch, *ar_scratch, *stats;
    float *rope; /* RoPE cos/sin for this call's T positions (sf_rope_table), or NULL */
    float *p1_m, *p1_l, *p1_o, *p1_qg, *p1_logits;
    const float **src_ptr, **rms_ptr;
    float **dsrc_ptr;
    /* backward */
    sf_attnres_reader *readers;         /* AttnRes: the L+1 aggregations (sublayers, output) */
    float *ar_S, *ar_qg, *ar_e;         /* their dh·h (L+1, N), q⊙g (L+1, d), e (nt, L+1, d) */
    float *ar_dh, *ar_alpha;            /* Block: one block's readers' dh and (checkpointing) alpha */
    float *ar_part, *ar_pbuf[SF_AR_GROUP - 1]; /* Full: partial source gradients (see full_source_grad) */
    int64_t ar_top;                     /* Full: the top source of the group gathered last */
    float *d_src, *d_acc, *dx, *du, *dy, *dq, *dk, *dv, *datt, *df1, *df2, *dg, *dfin;
    float *ddepth_k, *ddepth_v, *dtmp_kv;
    float *dmask;                       /* residual dropout: a masked copy of a gradient */
    float attn_p, resid_p;              /* dropout rates (0 outside training) */
    uint64_t drop_seed;
    void *mem; /* the one allocation */
    int fwd_cached; /* mem is the model's cached forward workspace (give it back, do not free) */
} run;

/* bump allocator over floats: measure with base == NULL, then assign */
typedef struct { float *base; int64_t used; int bad; } bump;

static float *take(bump *b, int64_t n) {
    if (n <= 0) return NULL;
    int64_t start = (b->used + 15) & ~(int64_t)15, end; /* 64-byte aligned */
    if (sf_add_ok(start, n, &end)) { b->bad = 1; return NULL; }
    b->used = end;
    return b->base ? b->base + start : NULL;
}

static int64_t cmul(int *bad, int64_t a, int64_t b) {
    int64_t r = 0;
    if (sf_mul_ok(a, b, &r)) { *bad = 1; return 0; }
    return r;
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

typedef struct { int rms, alpha; } want;

/* Lay out every buffer of a call. Run once to measure (bp->base NULL), once to assign. */
static void layout(run *R, bump *bp, want w) {
    const sf_config *c = R->c;
    int bad = 0;
    const int64_t N = R->N, d = R->d, Nd = cmul(&bad, N, d), L = R->L, n = c->n_layers;
    const int64_t nacts = R->per_block ? n : 1;
    const int pre = c->pre_norm, post_plain = !pre && !R->attnres;
    block_acts shared = {0};
    for (int64_t i = 0; i < n; i++) {
        block_acts *A = &R->acts[i];
        if (i < nacts) {
            A->in_a = take(bp, Nd);
            A->u_a = pre ? take(bp, Nd) : NULL;
            A->q = take(bp, cmul(&bad, N, R->qd));
            A->k = take(bp, cmul(&bad, N, R->kvd));
            A->v = take(bp, cmul(&bad, N, R->kvd));
            A->att = take(bp, cmul(&bad, N, R->qd));
            A->lse = R->training ? take(bp, cmul(&bad, N, c->n_heads)) : NULL;
            A->y_a = (R->attnres && pre) ? NULL : take(bp, Nd); /* see sublayer_out */
            A->z_a = post_plain ? take(bp, Nd) : NULL;
            A->in_m = take(bp, Nd);
            A->u_m = pre ? take(bp, Nd) : NULL;
            A->f1 = take(bp, cmul(&bad, N, R->F));
            A->f2 = c->act == SF_ACT_SWIGLU ? take(bp, cmul(&bad, N, R->F)) : NULL;
            A->g = take(bp, cmul(&bad, N, R->F));
            A->y_m = (R->attnres && pre) ? NULL : take(bp, Nd);
            A->z_m = post_plain ? take(bp, Nd) : NULL;
            A->alpha_a = (R->block && R->training) ? take(bp, cmul(&bad, N, R->nsrc_max)) : NULL;
            A->alpha_m = (R->block && R->training) ? take(bp, cmul(&bad, N, R->nsrc_max)) : NULL;
            if (i == 0) shared = *A;
        } else {
            *A = shared;
        }
        if (!pre) { A->u_a = A->in_a; A->u_m = A->in_m; }
    }
    R->x_in = (R->training && !R->per_block && !R->attnres) ? take(bp, cmul(&bad, n, Nd)) : NULL;
    int64_t nsrc_store = R->attnres ? (R->block ? R->nb + 1 : L + 1) : 0;
    int64_t npart = R->block ? (R->training ? L : 1) : 0;
    R->src = take(bp, cmul(&bad, nsrc_store, Nd));
    R->src_rms = take(bp, cmul(&bad, nsrc_store, N));
    R->part = take(bp, cmul(&bad, npart, Nd));
    R->part_rms = take(bp, cmul(&bad, npart, N));
    R->vtmp = R->attnres ? take(bp, Nd) : NULL;
    R->running = (R->attnres && w.rms) ? take(bp, Nd) : NULL;
    R->fin_h = take(bp, Nd);
    R->fin_u = c->final_norm ? take(bp, Nd) : R->fin_h;
    R->alpha_out = (R->block && R->training) ? take(bp, cmul(&bad, N, R->nsrc_max)) : NULL;
    if (R->attnres && R->training) {
        if (!R->block) {
            /* Full: the gathered backward reads every reader's weights at every source, so all
             * of them are kept (also when checkpointing), reader j's (N, j+1) at N j(j+1)/2 */
            float *al = take(bp, cmul(&bad, N, (L + 1) * (L + 2) / 2));
            for (int64_t j = 0; al && j <= L; j++) {
                float *aj = al + N * (j * (j + 1) / 2);
                if (j == L) R->alpha_out = aj;
                else if (j % 2 == 0) R->acts[j / 2].alpha_a = aj;
                else R->acts[j / 2].alpha_m = aj;
            }
        } else {
            /* Block: the readers of one block wait for their batched backward; with
             * checkpointing their alphas are copied out of the shared block activations */
            R->ar_dh = take(bp, cmul(&bad, R->S, Nd));
            R->ar_alpha = R->per_block ? NULL : take(bp, cmul(&bad, cmul(&bad, R->S, N), R->nsrc_max));
        }
        R->ar_S = take(bp, cmul(&bad, L + 1, N));
        R->ar_qg = take(bp, cmul(&bad, L + 1, d));
        R->ar_e = take(bp, cmul(&bad, R->nt, cmul(&bad, L + 1, d)));
    }
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
    sf_attn_args aa = {0};
    aa.Tk = R->cache ? R->cache->max_len : R->T;
    aa.n_read = R->n_slots;
    aa.chunk = c->moda_chunk;
    aa.dh = R->dh;
    R->attn_scratch = take(bp, sf_attention_scratch_floats(&aa, R->nt));
    R->ar_scratch = R->attnres ? take(bp, sf_attnres_scratch_floats(R->nsrc_max, d, R->nt)) : NULL;
    R->stats = take(bp, 2 * N);
    R->rope = c->pos == SF_POS_ROPE ? take(bp, cmul(&bad, R->T, R->dh)) : NULL;
    if (R->block && R->two_phase) {
        int64_t nq = R->S < L ? R->S : L;
        R->p1_m = take(bp, cmul(&bad, nq, N));
        R->p1_l = take(bp, cmul(&bad, nq, N));
        R->p1_o = take(bp, cmul(&bad, nq, Nd));
        R->p1_qg = take(bp, cmul(&bad, nq, d));
        R->p1_logits = w.alpha ? take(bp, cmul(&bad, cmul(&bad, nq, N), R->nsrc_max)) : NULL;
    }
    if (R->training) {
        R->d_src = take(bp, cmul(&bad, nsrc_store, Nd));
        R->d_acc = R->block ? take(bp, Nd) : NULL;
        R->ar_part = (R->attnres && !R->block) ? take(bp, cmul(&bad, SF_AR_GROUP - 1, Nd)) : NULL;
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
    free(R->acts);
    free(R->src_ptr);
    free(R->rms_ptr);
    free(R->dsrc_ptr);
    free(R->readers);
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

/* Set up sizes and allocate everything; on failure nothing is left allocated. */
static sf_status run_init(run *R, const sf_model *m, int64_t B, int64_t T, int training,
                          int per_block, int two_phase, sf_cache *cache, want w, int n_threads,
                          char *err, size_t errlen) {
    const sf_config *c = &m->cfg;
    memset(R, 0, sizeof *R);
    R->m = m; R->c = c; R->B = B; R->T = T; R->N = B * T; R->d = c->d_model;
    R->dh = c->d_model / c->n_heads; R->qd = c->n_heads * R->dh; R->kvd = c->n_kv_heads * R->dh;
    R->F = c->d_ff; R->V = c->vocab_size; R->L = 2 * c->n_layers; R->S = c->attnres_block_size;
    R->nb = (R->L + R->S - 1) / R->S;
    R->attnres = c->residual != SF_RES_PLAIN;
    R->block = c->residual == SF_RES_ATTNRES_BLOCK;
    R->nsrc_max = !R->attnres ? 0 : R->block ? R->nb + 1 : R->L + 1;
    R->n_slots = n_depth_slots(c);
    R->nt = sf_threads_resolve(n_threads);
    R->training = training; R->per_block = per_block; R->two_phase = R->block && two_phase;
    R->cache = cache; R->pos0 = cache ? cache->len : 0;
    R->acts = calloc((size_t)c->n_layers, sizeof *R->acts);
    int64_t nptr = R->nsrc_max + 2;
    R->src_ptr = calloc((size_t)nptr, sizeof *R->src_ptr);
    R->rms_ptr = calloc((size_t)nptr, sizeof *R->rms_ptr);
    R->dsrc_ptr = calloc((size_t)nptr, sizeof *R->dsrc_ptr);
    R->readers = calloc((size_t)R->L + 1, sizeof *R->readers); /* every sublayer, the output */
    if (!R->acts || !R->src_ptr || !R->rms_ptr || !R->dsrc_ptr || !R->readers) goto nomem;
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
    if (R->rope) sf_rope_table(R->rope, T, R->pos0, R->dh, c->rope_theta, R->nt);
    return SF_OK;
nomem:
    run_free(R);
    return sf_fail(err, errlen, SF_ERR_NOMEM, "cannot allocate workspace tables");
}

/* ---- small helpers ------------------------------------------------------------------------ */

#define GRAD(R, p) ((p) ? ((sf_model *)(R)->m)->grads + ((p) - (R)->m->params) : NULL)

static void norm_fwd(const run *R, float *y, const float *x, const float *w, const float *b) {
    if (R->c->norm == SF_NORM_LAYERNORM) sf_layernorm(y, x, w, b, R->N, R->d, R->c->norm_eps, R->nt);
    else sf_rmsnorm(y, x, w, R->N, R->d, R->c->norm_eps, R->nt);
}

/* dx (=|+=) d Norm(x) / dx · dy; weight/bias gradients accumulate into the model's grads. */
static void norm_bwd(const run *R, float *dx, const float *dy, const float *x, const float *w,
                     const float *b, int accumulate) {
    if (R->c->norm == SF_NORM_LAYERNORM)
        sf_layernorm_backward(dx, GRAD(R, w), GRAD(R, b), dy, x, w, R->N, R->d, R->c->norm_eps, R->stats, accumulate, R->nt);
    else
        sf_rmsnorm_backward(dx, GRAD(R, w), dy, x, w, R->N, R->d, R->c->norm_eps, R->stats, accumulate, R->nt);
}

static void linear(const run *R, float *y, const float *x, const float *w, const float *b,
                   int64_t K, int64_t M) {
    sf_matmul(y, x, w, b, R->N, K, M, 0, R->pack, R->nt);
}

/* Backward of y = x W^T + b (W (M,K)): dW += dy^T x, db += colsum(dy), dx (=|+=) dy W. */
static void linear_bwd(const run *R, float *dx, int dx_accumulate, const float *dy,
                       const float *x, const float *w, const float *b, int64_t K, int64_t M) {
    sf_gemm(GRAD(R, w), K, dy, 1, M, x, 0, NULL, M, R->N, K, 1, R->pack, R->nt);
    if (b) sf_colsum(GRAD(R, b), dy, R->N, M, R->nt);
    if (dx) sf_gemm(dx, K, dy, M, 1, w, 0, NULL, R->N, M, K, dx_accumulate, R->pack, R->nt);
}

static void copy(float *dst, const float *src, int64_t n) {
    if (dst && dst != src) memcpy(dst, src, (size_t)n * sizeof(float));
}

/* out = a + b over n floats (residual adds: memory-bound, so both cores' bandwidth helps) */
static void add3(const run *R, float *out, const float *a, const float *b, int64_t n) {
#pragma omp parallel for schedule(static) num_threads(R->nt) if (n > 65536)
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

/* depth slot `slot` of row r (batch r / T, position pos0 + r % T), kv head g, in an arena
 * laid out (B, Hkv, depth_len, n_slots, dh) (see sf_attn_args) */
static float *depth_at(const run *R, float *arena, int64_t r, int64_t g, int64_t slot) {
    int64_t b = r / R->T, t = R->pos0 + r % R->T;
    return arena + b * R->depth_bstride + ((g * R->depth_len + t) * R->n_slots + slot) * R->dh;
}

/* rows (N, Hkv*dh) -> the arena's slot `slot`, one head's d_head floats at a time */
static void write_depth(const run *R, float *arena, int64_t slot, const float *rows) {
    const int64_t Hkv = R->c->n_kv_heads;
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
    a.n_slots = R->n_slots; a.n_read = c->moda ? 2 * i : 0; a.chunk = c->moda_chunk;
    a.depth_only = c->moda_depth_only;
    a.dropout = R->attn_p;
    a.dropout_seed = R->drop_seed;
    a.dropout_stream = 4 * (uint64_t)i;
    return a;
}

/* Residual dropout of sublayer k's output (stream 4i+1 attention, 4i+2 MLP): x *= keep. The
 * same call on a gradient applies the same mask (the mask is a hash, not stored). */
static void resid_dropout(const run *R, float *x, int64_t k) {
    if (R->resid_p <= 0.0f) return;
    const uint64_t stream = 4 * (uint64_t)(k / 2) + 1 + (uint64_t)(k % 2);
    const int64_t n = R->N * R->d;
#pragma omp parallel for schedule(static) num_threads(R->nt) if (n > 65536)
    for (int64_t j = 0; j < n; j++) x[j] *= sf_dropout_scale(R->drop_seed, stream, (uint64_t)j, R->resid_p);
}

/* ---- sublayers: forward ------------------------------------------------------------------- */

/* y = Attn_i(u): projections, RoPE, cache and depth writes, attention, output projection. */
static void attn_forward(const run *R, int64_t i, block_acts *A, const float *u, float *y,
                         float *probs, float *depth_mass) {
    const sf_layer_views *Lv = &R->m->layers[i];
    const sf_config *c = R->c;
    linear(R, A->q, u, Lv->q_w, Lv->q_b, R->d, R->qd);
    linear(R, A->k, u, Lv->k_w, Lv->k_b, R->d, R->kvd);
    linear(R, A->v, u, Lv->v_w, Lv->v_b, R->d, R->kvd);
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
    if (c->moda && i < c->n_layers - 1) { /* this layer's (rotated) K and V: depth slot 2i */
        write_depth(R, R->depth_k, 2 * i, A->k);
        write_depth(R, R->depth_v, 2 * i, A->v);
    }
    sf_attention_forward(&a, A->q, A->att, A->lse, probs, depth_mass, R->attn_scratch, R->nt);
    linear(R, y, A->att, Lv->o_w, Lv->o_b, R->qd, R->d);
}

/* y = MLP_i(u); under MoDA also writes depth slot 2i+1 = (u Wdk^T, u Wdv^T). */
static void mlp_forward(const run *R, int64_t i, block_acts *A, const float *u, float *y) {
    const sf_layer_views *Lv = &R->m->layers[i];
    const sf_config *c = R->c;
    int64_t nF = R->N * R->F;
    if (c->act == SF_ACT_SWIGLU) {
        linear(R, A->f1, u, Lv->gate_w, Lv->gate_b, R->d, R->F);
        linear(R, A->f2, u, Lv->up_w, Lv->up_b, R->d, R->F);
        sf_swiglu(A->g, A->f1, A->f2, nF, R->nt);
    } else {
        /* the activation runs in the matmul's epilogue; the pre-activation is kept for training */
        sf_matmul_act(R->training ? A->f1 : NULL, A->g, c->act, u, Lv->up_w, Lv->up_b, R->N, R->d,
                      R->F, R->pack, R->nt);
    }
    linear(R, y, A->g, Lv->down_w, Lv->down_b, R->F, R->d);
    if (c->moda && i < c->n_layers - 1) {
        linear(R, R->kvtmp, u, Lv->depth_k_w, NULL, R->d, R->kvd);
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
    if (c->moda && i < c->n_layers - 1) { /* later layers read this K, V as depth slot 2i */
        read_depth(R, R->dk, R->ddepth_k, 2 * i, 1);
        read_depth(R, R->dv, R->ddepth_v, 2 * i, 1);
    }
    if (c->pos == SF_POS_ROPE) {
        sf_rope_backward(R->dq, R->N, R->T, c->n_heads, R->dh, R->qd, R->rope, R->nt);
        sf_rope_backward(R->dk, R->N, R->T, c->n_kv_heads, R->dh, R->kvd, R->rope, R->nt);
    }
    linear_bwd(R, du, 0, R->dq, u, Lv->q_w, Lv->q_b, R->d, R->qd);
    linear_bwd(R, du, 1, R->dk, u, Lv->k_w, Lv->k_b, R->d, R->kvd);
    linear_bwd(R, du, 1, R->dv, u, Lv->v_w, Lv->v_b, R->d, R->kvd);
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
    if (c->moda && i < c->n_layers - 1) {
        read_depth(R, R->dtmp_kv, R->ddepth_k, 2 * i + 1, 0);
        linear_bwd(R, du, 1, R->dtmp_kv, u, Lv->depth_k_w, NULL, R->d, R->kvd);
        read_depth(R, R->dtmp_kv, R->ddepth_v, 2 * i + 1, 0);
        linear_bwd(R, du, 1, R->dtmp_kv, u, Lv->depth_v_w, NULL, R->d, R->kvd);
    }
}

/* ---- Attention Residuals bookkeeping -------------------------------------------------------- */

static int64_t part_index(const run *R, int64_t k) { return R->training ? k : 0; }

/* Point src_ptr/rms_ptr (and dsrc_ptr in training) at sublayer k's sources; returns count.
 * k == L is the output aggregator. */
static int64_t gather_sources(const run *R, int64_t k) {
    const int64_t Nd = R->N * R->d, N = R->N;
    int64_t ns;
    if (!R->block) ns = (k < R->L) ? k + 1 : R->L + 1;
    else ns = (k < R->L) ? k / R->S + 1 : R->nb + 1;
    for (int64_t j = 0; j < ns; j++) {
        R->src_ptr[j] = R->src + j * Nd;
        R->rms_ptr[j] = R->src_rms + j * N;
        if (R->d_src) R->dsrc_ptr[j] = R->d_src + j * Nd;
    }
    if (R->block && k < R->L && k % R->S != 0) { /* the running partial sum of this block */
        int64_t p = part_index(R, k);
        R->src_ptr[ns] = R->part + p * Nd;
        R->rms_ptr[ns] = R->part_rms + p * N;
        if (R->d_src) R->dsrc_ptr[ns] = R->d_acc;
        ns++;
    }
    return ns;
}

static const float *res_q(const run *R, int64_t k) {
    if (k >= R->L) return R->m->out_res_q;
    const sf_layer_views *Lv = &R->m->layers[k / 2];
    return k % 2 == 0 ? Lv->attn_res_q : Lv->mlp_res_q;
}
static const float *res_g(const run *R, int64_t k) {
    if (k >= R->L) return R->m->out_res_g;
    const sf_layer_views *Lv = &R->m->layers[k / 2];
    return k % 2 == 0 ? Lv->attn_res_g : Lv->mlp_res_g;
}

/* The forward weights aggregation j (sublayer j, or j = L the output) keeps for training */
static float *reader_alpha(const run *R, int64_t j) {
    if (j >= R->L) return R->alpha_out;
    return j % 2 == 0 ? R->acts[j / 2].alpha_a : R->acts[j / 2].alpha_m;
}

/* h = AttnRes_k(sources); alpha (N, nsrc) optional */
static void attnres_input(run *R, int64_t k, float *h, float *alpha) {
    const int64_t N = R->N, d = R->d;
    int64_t pos = R->block ? k % R->S : 0;
    if (R->two_phase && k < R->L) {
        int64_t nsrc = k / R->S + 1; /* completed blocks b_0 .. b_{m-1} */
        gather_sources(R, k);
        if (pos == 0) { /* phase 1 at block start: all of the block's queries at once */
            int64_t nq = (R->L - k) < R->S ? (R->L - k) : R->S;
            for (int64_t j = 0; j < nq; j++) {
                const float *q = res_q(R, k + j), *g = res_g(R, k + j);
                for (int64_t e = 0; e < d; e++) R->p1_qg[j * d + e] = q[e] * g[e];
            }
            sf_attnres_phase1(R->p1_m, R->p1_l, R->p1_o, R->p1_logits, R->src_ptr, R->rms_ptr,
                              nsrc, R->p1_qg, nq, N, d, R->nt);
        }
        sf_attnres_phase2(h, alpha, R->p1_m + pos * N, R->p1_l + pos * N, R->p1_o + pos * N * d,
                          R->p1_logits ? R->p1_logits + pos * N * nsrc : NULL, nsrc,
                          pos ? R->part : NULL, R->part_rms, R->p1_qg + pos * d, N, d, R->nt);
        return;
    }
    int64_t ns = gather_sources(R, k);
    sf_attnres_aggregate(h, alpha, R->src_ptr, R->rms_ptr, ns, res_q(R, k), res_g(R, k), N, d,
                         R->ar_scratch, R->nt);
}

/* Where sublayer k's output v is kept: Full, its source slot k+1; Block, the staging row. */
static float *attnres_v(const run *R, int64_t k) {
    return R->block ? R->vtmp : R->src + (k + 1) * R->N * R->d;
}

/* Sublayer k produced y; store its output v (post-norm: Norm(y)) where later readers find it. */
static void attnres_output(run *R, int64_t k, const float *y, const float *nw, const float *nb,
                           float *trace_out) {
    const int64_t N = R->N, d = R->d, Nd = N * d;
    const float eps = R->c->attnres_eps;
    float *v = attnres_v(R, k);
    if (R->c->pre_norm) copy(v, y, Nd); /* nothing to copy when y was written there */
    else norm_fwd(R, v, y, nw, nb);
    resid_dropout(R, v, k);
    copy(trace_out, v, Nd);
    if (R->running) sf_add(R->running, v, Nd, R->nt);
    if (!R->block) {
        sf_attnres_inv_rms(R->src_rms + (k + 1) * N, v, N, d, eps, R->nt);
        return;
    }
    int64_t pos = k % R->S;
    const float *prev = pos ? R->part + part_index(R, k) * Nd : NULL;
    float *dst, *dst_rms;
    if (pos == R->S - 1 || k == R->L - 1) { /* block complete: b_m */
        int64_t m = k / R->S + 1;
        dst = R->src + m * Nd;
        dst_rms = R->src_rms + m * N;
    } else { /* the partial sum the next sublayer reads */
        dst = R->part + part_index(R, k + 1) * Nd;
        dst_rms = R->part_rms + part_index(R, k + 1) * N;
    }
    if (prev) add3(R, dst, prev, v, Nd);
    else copy(dst, v, Nd);
    sf_attnres_inv_rms(dst_rms, dst, N, d, eps, R->nt);
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

static float rms_of(const float *x, int64_t n) { return (float)sf_rms(x, n); }

/* Where sublayer k writes its output y. Under AttnRes pre-norm the output is stored as is (v =
 * y), so the sublayer writes it straight to where it is kept (Full: its source slot; Block: the
 * staging row vtmp) instead of to its activation buffer and a copy; post-norm keeps y for the
 * norm's backward. */
static float *sublayer_out(const run *R, int64_t k, float *own) {
    return R->attnres && R->c->pre_norm ? attnres_v(R, k) : own;
}

/* One transformer block forward. Its input is already in A->in_a (plain) or in the sources
 * (AttnRes). Plain blocks leave their output in `out` (the next block's in_a, or fin_h). */
static void block_forward(run *R, int64_t i, float *out, sf_trace *tr) {
    const sf_config *c = R->c;
    const sf_layer_views *Lv = &R->m->layers[i];
    block_acts *A = &R->acts[i];
    const int64_t Nd = R->N * R->d, ka = 2 * i, km = 2 * i + 1;
    const int pre = c->pre_norm;
    float *rms = tr ? tr->rms : NULL;

    /* attention sublayer */
    if (R->attnres) attnres_input(R, ka, A->in_a, tr && tr->alpha ? tr->alpha[ka] : A->alpha_a);
    if (tr && tr->hidden) copy(tr->hidden[i], A->in_a, Nd);
    if (rms) rms[ka * SF_RMS_COLS + SF_RMS_INPUT] = rms_of(A->in_a, Nd);
    if (pre) norm_fwd(R, A->u_a, A->in_a, Lv->attn_norm_w, Lv->attn_norm_b);
    float *ya = sublayer_out(R, ka, A->y_a);
    attn_forward(R, i, A, A->u_a, ya, tr && tr->attention ? tr->attention[i] : NULL,
                 tr && tr->depth_mass ? tr->depth_mass[i] : NULL);
    float *tout = tr && tr->attn_out ? tr->attn_out[i] : NULL;
    if (R->attnres) {
        attnres_output(R, ka, ya, Lv->attn_norm_w, Lv->attn_norm_b, tout);
        if (rms) {
            rms[ka * SF_RMS_COLS + SF_RMS_OUTPUT] = rms_of(attnres_v(R, ka), Nd);
            rms[ka * SF_RMS_COLS + SF_RMS_STREAM] = rms_of(R->running, Nd);
        }
        attnres_input(R, km, A->in_m, tr && tr->alpha ? tr->alpha[km] : A->alpha_m);
    } else {
        resid_dropout(R, A->y_a, ka);
        copy(tout, A->y_a, Nd);
        if (rms) rms[ka * SF_RMS_COLS + SF_RMS_OUTPUT] = rms_of(A->y_a, Nd);
        if (pre) add3(R, A->in_m, A->in_a, A->y_a, Nd);
        else { add3(R, A->z_a, A->in_a, A->y_a, Nd); norm_fwd(R, A->in_m, A->z_a, Lv->attn_norm_w, Lv->attn_norm_b); }
        if (rms) rms[ka * SF_RMS_COLS + SF_RMS_STREAM] = rms_of(A->in_m, Nd);
    }

    /* MLP sublayer */
    if (rms) rms[km * SF_RMS_COLS + SF_RMS_INPUT] = rms_of(A->in_m, Nd);
    if (pre) norm_fwd(R, A->u_m, A->in_m, Lv->mlp_norm_w, Lv->mlp_norm_b);
    float *ym = sublayer_out(R, km, A->y_m);
    mlp_forward(R, i, A, A->u_m, ym);
    tout = tr && tr->mlp_out ? tr->mlp_out[i] : NULL;
    if (R->attnres) {
        attnres_output(R, km, ym, Lv->mlp_norm_w, Lv->mlp_norm_b, tout);
        if (rms) {
            rms[km * SF_RMS_COLS + SF_RMS_OUTPUT] = rms_of(attnres_v(R, km), Nd);
            rms[km * SF_RMS_COLS + SF_RMS_STREAM] = rms_of(R->running, Nd);
        }
    } else {
        resid_dropout(R, A->y_m, km);
        copy(tout, A->y_m, Nd);
        if (rms) rms[km * SF_RMS_COLS + SF_RMS_OUTPUT] = rms_of(A->y_m, Nd);
        if (pre) add3(R, out, A->in_m, A->y_m, Nd);
        else { add3(R, A->z_m, A->in_m, A->y_m, Nd); norm_fwd(R, out, A->z_m, Lv->mlp_norm_w, Lv->mlp_norm_b); }
        if (rms) rms[km * SF_RMS_COLS + SF_RMS_STREAM] = rms_of(out, Nd);
    }
}

static float *block_out(run *R, int64_t i) {
    return i + 1 < R->c->n_layers ? R->acts[i + 1].in_a : R->fin_h;
}

/* Everything from the embedding to fin_u (the head's input). */
static void stack_forward(run *R, const int32_t *tokens, const float *embeds, sf_trace *tr) {
    const sf_config *c = R->c;
    const int64_t N = R->N, d = R->d, Nd = N * d, n = c->n_layers, L = R->L;
    float *x0 = R->attnres ? R->src : R->acts[0].in_a;
    embed(R, tokens, embeds, x0);
    if (R->attnres) {
        sf_attnres_inv_rms(R->src_rms, x0, N, d, c->attnres_eps, R->nt);
        if (R->running) copy(R->running, x0, Nd);
    }
    for (int64_t i = 0; i < n; i++) {
        if (R->x_in) copy(R->x_in + i * Nd, R->acts[i].in_a, Nd); /* checkpoint: keep the input */
        block_forward(R, i, block_out(R, i), tr);
    }
    if (R->attnres) {
        int64_t ns = gather_sources(R, L);
        sf_attnres_aggregate(R->fin_h, tr && tr->alpha ? tr->alpha[L] : R->alpha_out, R->src_ptr,
                             R->rms_ptr, ns, R->m->out_res_q, R->m->out_res_g, N, d, R->ar_scratch, R->nt);
    }
    if (tr && tr->hidden) copy(tr->hidden[n], R->fin_h, Nd);
    if (tr && tr->rms) {
        tr->rms[L * SF_RMS_COLS + SF_RMS_INPUT] = rms_of(R->fin_h, Nd);
        tr->rms[L * SF_RMS_COLS + SF_RMS_OUTPUT] = NAN;
        tr->rms[L * SF_RMS_COLS + SF_RMS_STREAM] = NAN;
    }
    if (c->final_norm) norm_fwd(R, R->fin_u, R->fin_h, R->m->final_norm_w, R->m->final_norm_b);
}

/* Backward of one AttnRes sublayer k (y = F(Norm(h)) or v = Norm(F(h))), given dv in R->dy. */
static void attnres_sublayer_backward(run *R, int64_t k) {
    const int64_t i = k / 2;
    const int is_attn = k % 2 == 0;
    const sf_layer_views *Lv = &R->m->layers[i];
    block_acts *A = &R->acts[i];
    const float *nw = is_attn ? Lv->attn_norm_w : Lv->mlp_norm_w;
    const float *nb = is_attn ? Lv->attn_norm_b : Lv->mlp_norm_b;
    const float *h = is_attn ? A->in_a : A->in_m, *u = is_attn ? A->u_a : A->u_m;
    const float *y = is_attn ? A->y_a : A->y_m;
    resid_dropout(R, R->dy, k); /* R->dy is this sublayer's own copy of dv */
    const float *dy = R->dy;
    if (!R->c->pre_norm) { norm_bwd(R, R->dx, R->dy, y, nw, nb, 0); dy = R->dx; }
    /* this sublayer's input gradient: reader k's dh, kept until its sources' gradients are
     * gathered (Full: d_src slot k; Block: its slot among the block's waiting readers) */
    const int64_t N = R->N, d = R->d, L = R->L;
    float *dh = !R->block ? R->d_src + k * N * d : R->ar_dh + (k % R->S) * N * d;
    float *dsub = R->c->pre_norm ? R->du : dh;
    if (is_attn) attn_backward(R, i, A, u, dy, dsub);
    else mlp_backward(R, i, A, u, dy, dsub);
    if (R->c->pre_norm) norm_bwd(R, dh, R->du, h, nw, nb, 0);
    sf_attnres_row_dots(R->ar_S + k * N, dh, h, N, d, R->nt);
    if (!R->block) return;
    sf_attnres_reader *rd = &R->readers[k];
    rd->dh = dh;
    rd->alpha = reader_alpha(R, k);
    if (R->ar_alpha) { /* checkpointing: the next recompute reuses the block activations */
        float *keep = R->ar_alpha + (k % R->S) * N * R->nsrc_max;
        copy(keep, rd->alpha, N * rd->ld);
        rd->alpha = keep;
    }
    if (k % R->S != 0) { /* the partial sum it read: its gradient joins d_acc now */
        int64_t p = part_index(R, k);
        const float *ps = R->part + p * N * d, *pr = R->part_rms + p * N;
        float *dacc = R->d_acc;
        sf_attnres_sources_backward(&dacc, &ps, &pr, 1, k / R->S + 1, 1, rd, 1, (L + 1) * d, N, d, R->nt);
    }
}

/* Full: dv_s (N, d) of source s (the embedding, or sublayer s-1's output) into R->dy, gathered
 * from its readers s .. L, whose input gradients are all known by the time it is needed.
 * Sources are gathered SF_AR_GROUP at a time: when the walk reaches the top source s of a
 * group, one pass over readers s .. L serves the group's sources s-G+1 .. s too (each reader's
 * dh rows come from memory once per group instead of once per source: these L²/2 reads are
 * the pass's cost), and each lower source s' keeps that partial sum until the walk reaches it
 * and adds its last readers s' .. s-1. The partials rotate with R->dy, so none is copied. */
static void full_source_grad(run *R, int64_t s) {
    const int64_t N = R->N, d = R->d, Nd = N * d, L = R->L, G = SF_AR_GROUP;
    const int64_t top = R->ar_top;
    if (top > s && top - s < G) {
        float **part = &R->ar_pbuf[top - s - 1], *done;
        const float *x = R->src + s * Nd, *r = R->src_rms + s * N;
        sf_attnres_sources_backward(part, &x, &r, 1, s, 1, R->readers + s, top - s, (L + 1) * d, N,
                                    d, R->nt);
        done = *part;
        *part = R->dy;
        R->dy = done;
        return;
    }
    const int64_t lo = s - G + 1 < 0 ? 0 : s - G + 1, n = s - lo + 1;
    for (int64_t i = 0; i < n; i++) {
        int64_t si = lo + i;
        R->src_ptr[i] = R->src + si * Nd;
        R->rms_ptr[i] = R->src_rms + si * N;
        R->dsrc_ptr[i] = si == s ? R->dy : R->ar_pbuf[s - si - 1];
    }
    sf_attnres_sources_backward(R->dsrc_ptr, R->src_ptr, R->rms_ptr, n, lo, 0, R->readers + s,
                                L + 1 - s, (L + 1) * d, N, d, R->nt);
    R->ar_top = s;
}

/* Block: the waiting readers of block m+1 (or the output, m = nb) over the completed blocks
 * they read, b_0 .. b_m; afterwards d b_m is complete. */
static void block_flush(run *R, int64_t m) {
    const int64_t N = R->N, d = R->d, Nd = N * d, L = R->L;
    int64_t j0 = m == R->nb ? L : m * R->S, nr = m == R->nb ? 1 : (L - j0 < R->S ? L - j0 : R->S);
    for (int64_t c = 0; c <= m; c++) {
        R->src_ptr[c] = R->src + c * Nd;
        R->rms_ptr[c] = R->src_rms + c * N;
        R->dsrc_ptr[c] = R->d_src + c * Nd;
    }
    sf_attnres_sources_backward(R->dsrc_ptr, R->src_ptr, R->rms_ptr, m + 1, 0, 1, R->readers + j0, nr,
                                (L + 1) * d, N, d, R->nt);
}

/* AttnRes: walk back from the output aggregation. Each aggregation ("reader": sublayer j, or
 * the output, j = L) leaves its input gradient dh_j and dh_j·h_j; the gradients of the sources
 * it read are then computed in batches (sf_attnres_sources_backward): Full gathers each source
 * from all of its readers when the walk reaches the sublayer that wrote it; Block runs one
 * block's readers at once over the completed blocks when the walk leaves that block, and each
 * reader's partial-sum source right away. */
static void attnres_backward(run *R, const int32_t *tokens, const float *dfin_h) {
    const int64_t N = R->N, d = R->d, Nd = N * d, L = R->L, S = R->S;
    for (int64_t j = 0; j <= L; j++) {
        const float *q = res_q(R, j), *g = res_g(R, j);
        float *qg = R->ar_qg + j * d;
        for (int64_t e = 0; e < d; e++) qg[e] = q[e] * g[e];
        sf_attnres_reader *rd = &R->readers[j];
        *rd = (sf_attnres_reader){.S = R->ar_S + j * N, .qg = qg, .e = R->ar_e + j * d};
        if (!R->block) {
            rd->dh = R->d_src + j * Nd;
            rd->alpha = reader_alpha(R, j);
            rd->ld = j + 1;
        } else {
            rd->ld = j == L ? R->nb + 1 : j / S + 1 + (j % S != 0);
        }
    }
    memset(R->ar_e, 0, (size_t)(R->nt * (L + 1) * d) * sizeof(float));
    if (!R->block) {
        for (int64_t i = 0; i < SF_AR_GROUP - 1; i++) R->ar_pbuf[i] = R->ar_part + i * Nd;
        R->ar_top = -1;
    }
    float *dh_out = R->block ? R->ar_dh : R->d_src + L * Nd; /* Block: the output waits alone */
    if (R->block) {
        memset(R->d_src, 0, (size_t)((R->nb + 1) * Nd) * sizeof(float));
        R->readers[L].dh = dh_out;
        R->readers[L].alpha = reader_alpha(R, L);
    }
    copy(dh_out, dfin_h, Nd);
    sf_attnres_row_dots(R->ar_S + L * N, dfin_h, R->fin_h, N, d, R->nt);
    for (int64_t k = L - 1; k >= 0; k--) {
        if (!R->per_block && k % 2 == 1) block_forward(R, k / 2, NULL, NULL); /* recompute */
        if (!R->block) {
            full_source_grad(R, k + 1);
        } else {
            int64_t m = k / S + 1;
            if (k % S == S - 1 || k == L - 1) { /* entering block m from above */
                block_flush(R, m);
                memset(R->d_acc, 0, (size_t)Nd * sizeof(float));
            }
            add3(R, R->dy, R->d_src + m * Nd, R->d_acc, Nd); /* d v_k = d b_m + later partials */
        }
        attnres_sublayer_backward(R, k);
    }
    if (!R->block) {
        full_source_grad(R, 0);
        embed_backward(R, tokens, R->dy);
    } else {
        block_flush(R, 0);
        embed_backward(R, tokens, R->d_src);
    }
    for (int64_t j = 0; j <= L; j++) { /* dq = g ⊙ e, dg = q ⊙ e, threads' partials in order */
        const float *q = res_q(R, j), *g = res_g(R, j);
        float *dq = GRAD(R, q), *dg = GRAD(R, g);
        for (int t = 0; t < R->nt; t++) {
            const float *e = R->ar_e + ((int64_t)t * (L + 1) + j) * d;
            for (int64_t i = 0; i < d; i++) { dq[i] += g[i] * e[i]; dg[i] += q[i] * e[i]; }
        }
    }
}

/* Backward from dlogits (in R->logits) to every parameter gradient. */
static void stack_backward(run *R, const int32_t *tokens) {
    const sf_config *c = R->c;
    const sf_model *m = R->m;
    const int64_t N = R->N, d = R->d, Nd = N * d, n = c->n_layers, V = R->V;
    /* head: logits = fin_u head^T */
    sf_gemm(GRAD(R, m->lm_head), d, R->logits, 1, V, R->fin_u, 0, NULL, V, N, d, 1, R->pack, R->nt);
    sf_gemm(R->dfin, d, R->logits, V, 1, m->lm_head, 0, NULL, N, V, d, 0, R->pack, R->nt);
    float *dfin_h = R->dfin;
    if (c->final_norm) {
        norm_bwd(R, R->dx, R->dfin, R->fin_h, m->final_norm_w, m->final_norm_b, 0);
        dfin_h = R->dx;
    }
    if (!R->attnres) {
        if (dfin_h != R->dx) copy(R->dx, dfin_h, Nd);
        for (int64_t i = n - 1; i >= 0; i--) {
            const sf_layer_views *Lv = &m->layers[i];
            block_acts *A = &R->acts[i];
            if (!R->per_block) { /* checkpointing: recompute this block from its saved input */
                copy(A->in_a, R->x_in + i * Nd, Nd);
                block_forward(R, i, R->dfin, NULL); /* its output is not needed: a sink */
            }
            /* dropout: the update added is y * keep, so the sublayer sees d(update) * keep */
            const float *gm, *ga;
            if (c->pre_norm) {
                gm = R->dx;
                if (R->dmask) { copy(R->dmask, R->dx, Nd); resid_dropout(R, R->dmask, 2 * i + 1); gm = R->dmask; }
                mlp_backward(R, i, A, A->u_m, gm, R->du);
                norm_bwd(R, R->dx, R->du, A->in_m, Lv->mlp_norm_w, Lv->mlp_norm_b, 1);
                ga = R->dx;
                if (R->dmask) { copy(R->dmask, R->dx, Nd); resid_dropout(R, R->dmask, 2 * i); ga = R->dmask; }
                attn_backward(R, i, A, A->u_a, ga, R->du);
                norm_bwd(R, R->dx, R->du, A->in_a, Lv->attn_norm_w, Lv->attn_norm_b, 1);
            } else {
                norm_bwd(R, R->dy, R->dx, A->z_m, Lv->mlp_norm_w, Lv->mlp_norm_b, 0);
                gm = R->dy;
                if (R->dmask) { copy(R->dmask, R->dy, Nd); resid_dropout(R, R->dmask, 2 * i + 1); gm = R->dmask; }
                mlp_backward(R, i, A, A->in_m, gm, R->du);
                add3(R, R->dx, R->dy, R->du, Nd);
                norm_bwd(R, R->dy, R->dx, A->z_a, Lv->attn_norm_w, Lv->attn_norm_b, 0);
                ga = R->dy;
                if (R->dmask) { copy(R->dmask, R->dy, Nd); resid_dropout(R, R->dmask, 2 * i); ga = R->dmask; }
                attn_backward(R, i, A, A->in_a, ga, R->du);
                add3(R, R->dx, R->dy, R->du, Nd);
            }
        }
        embed_backward(R, tokens, R->dx);
        return;
    }
    attnres_backward(R, tokens, dfin_h);
}

/* ---- public entry points ------------------------------------------------------------------ */

static sf_status check_inputs(const sf_config *c, const int32_t *tokens, const float *embeds,
                              int64_t B, int64_t T, int64_t max_T, char *err, size_t errlen) {
    if (B < 1 || T < 1) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "batch and sequence length must be >= 1 (got B=%lld, T=%lld)", (long long)B, (long long)T);
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
            if (!isfinite(embeds[r])) return sf_fail(err, errlen, SF_ERR_NONFINITE, "embeds contain NaN or inf at flat index %lld", (long long)r);
    }
    return SF_OK;
}

sf_status sf_forward(const sf_model *m, const sf_forward_args *args, float *out_logits,
                     float *out_hidden, sf_trace *trace, char *err, size_t errlen) {
    if (!m || !args) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "model or args is NULL");
    const sf_config *c = &m->cfg;
    sf_cache *cache = args->cache;
    int64_t max_T = c->max_seq_len;
    if (cache) {
        if (cache->m != m) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "the cache belongs to another model");
        if (args->B != cache->B) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "batch %lld does not match the cache's batch %lld", (long long)args->B, (long long)cache->B);
        if (args->key_padding_mask || trace) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "cached decoding supports neither key_padding_mask nor traces");
        if (!c->causal) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "cached decoding needs a causal (decoder) model");
        max_T = cache->max_len - cache->len;
    }
    sf_status st = check_inputs(c, args->tokens, args->embeds, args->B, args->T, max_T, err, errlen);
    if (st != SF_OK) {
        if (cache && args->T > max_T && args->T >= 1)
            return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "the cache holds %lld of %lld positions: no room for %lld more", (long long)cache->len, (long long)cache->max_len, (long long)args->T);
        return st;
    }
    if (!sf_model_acquire_read((sf_model *)m))
        return sf_fail(err, errlen, SF_ERR_BUSY, "the model is being trained by another thread");
    run R;
    want w = {trace && trace->rms, trace && trace->alpha};
    st = run_init(&R, m, args->B, args->T, 0, 0, args->attnres_two_phase, cache, w, args->n_threads, err, errlen);
    if (st == SF_OK) {
        R.pad = args->key_padding_mask;
        stack_forward(&R, args->tokens, args->embeds, trace);
        copy(out_hidden, R.fin_u, R.N * R.d);
        if (out_logits) sf_matmul(out_logits, R.fin_u, m->lm_head, NULL, R.N, R.d, R.V, 0, R.pack, R.nt);
        if (cache) cache->len += args->T;
        run_free(&R);
    }
    sf_model_release_read((sf_model *)m);
    return st;
}

void sf_model_release_workspace(sf_model *m) {
    if (!sf_model_acquire_write(m)) return;
    free(m->train_mem);
    m->train_mem = NULL;
    m->train_mem_bytes = 0;
    free(m->fwd_mem); /* no forward is in flight under the write guard */
    m->fwd_mem = NULL;
    m->fwd_mem_bytes = 0;
    sf_model_release_write(m);
}

int64_t sf_train_workspace_bytes(const sf_config *cfg, int64_t B, int64_t T, int checkpoint) {
    sf_model fake;
    memset(&fake, 0, sizeof fake);
    fake.cfg = *cfg;
    run R;
    memset(&R, 0, sizeof R);
    R.m = &fake; R.c = cfg; R.B = B; R.T = T; R.N = B * T; R.d = cfg->d_model;
    R.dh = cfg->d_model / cfg->n_heads; R.qd = cfg->n_heads * R.dh; R.kvd = cfg->n_kv_heads * R.dh;
    R.F = cfg->d_ff; R.V = cfg->vocab_size; R.L = 2 * cfg->n_layers; R.S = cfg->attnres_block_size;
    R.nb = (R.L + R.S - 1) / R.S;
    R.attnres = cfg->residual != SF_RES_PLAIN; R.block = cfg->residual == SF_RES_ATTNRES_BLOCK;
    R.nsrc_max = !R.attnres ? 0 : R.block ? R.nb + 1 : R.L + 1;
    R.n_slots = n_depth_slots(cfg); R.nt = sf_threads_resolve(0);
    R.training = 1; R.per_block = !checkpoint;
    R.acts = calloc((size_t)cfg->n_layers, sizeof *R.acts);
    if (!R.acts) return -1;
    bump bp = {NULL, 0, 0};
    want w = {0, 0};
    layout(&R, &bp, w);
    free(R.acts);
    return bp.bad ? -1 : bp.used * (int64_t)sizeof(float);
}

sf_status sf_forward_backward(sf_model *m, const sf_train_args *a, double *loss, int64_t *count,
                              char *err, size_t errlen) {
    if (!m || !a) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "model or args is NULL");
    const sf_config *c = &m->cfg;
    sf_status st = check_inputs(c, a->tokens, a->embeds, a->B, a->T, c->max_seq_len, err, errlen);
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
        stack_forward(&R, a->tokens, a->embeds, NULL);
        sf_matmul(R.logits, R.fin_u, m->lm_head, NULL, R.N, R.d, R.V, 0, R.pack, R.nt);
        double sum = 0.0;
        int64_t cnt = 0;
        sf_cross_entropy(R.logits, a->targets, R.N, R.V, a->ignore_index, &sum, &cnt, NULL, R.nt);
        memset(m->grads, 0, (size_t)m->num_params * sizeof(float));
        if (m->cfg.moda) {
            int64_t arena = R.N * R.n_slots * R.kvd;
            memset(R.ddepth_k, 0, (size_t)arena * sizeof(float));
            memset(R.ddepth_v, 0, (size_t)arena * sizeof(float));
        }
        if (cnt > 0) stack_backward(&R, a->tokens);
        if (loss) *loss = cnt ? sum / (double)cnt : 0.0;
        if (count) *count = cnt;
        if (cnt > 0 && !isfinite(sum))
            st = sf_fail(err, errlen, SF_ERR_NONFINITE, "the loss is not finite (NaN or inf in weights or activations)");
        run_free(&R);
    }
    sf_model_release_write(m);
    return st;
}
