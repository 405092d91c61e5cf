/* DenseFormer (Pagliardini et al. 2024, "Enhancing Information Flow in Transformers via Depth
 * Weighted Averaging", arXiv 2402.02622): inside each block the plain residual stream; after
 * block i a Depth-Weighted-Average (DWA) of the embedding and the block outputs so far,
 *
 *     X_0 = embedding,  X_{i+1} = Block_i(x_i),  x_{i+1} = sum_{j in J_i} alpha_{i,j} X_j    (eq. 1-2)
 *
 * with learned scalars alpha. Dilation k (sec. 3.3, "DenseFormer with dilation") keeps the
 * sources with j = i+1 (mod k); period p ("DWA period") puts a DWA only after blocks with
 * (i+1) % p == 0, the others pass x_{i+1} = X_{i+1}. As in the authors' released package
 * (epfml/DenseFormer, denseformer/denseformer.py, DWAModules): every block output is stored,
 * the weights of block i are one row of (i+1)//k + 1 entries over J_i in increasing j,
 * initialised to (0, ..., 0, 1) so the model starts as the plain residual stack; the weights
 * get weight decay like every Linear weight in their training code (experiments/models/
 * denseformer.py: get_parameter_group_specs puts nn.Linear weights in the decay group).
 * Traces: sublayer 2(i+1)'s depth weights (and the head's, k = L) are the DWA weights that
 * produced its input, written per token over all sources X_0..X_i (0 where dilation skips).
 * See sf_wiring.h for the hooks' contract. */
#include "../sf_wiring.h"

#include <stdlib.h>

/* Row chunks of the alpha gradients' dot products: a constant, so the sums (in double, chunk
 * by chunk in order) do not depend on the thread count. Inside a chunk each dot keeps DF_PART
 * partial sums (element e into partial e % DF_PART), added in order at the end: one running
 * double sum is a chain of dependent adds (~4 cycles each), several are a vector. */
#define DF_LANES 16
#define DF_PART 8
#define DF_CHUNK 1024 /* floats of dL/dx per pass over a DWA's sources (stays in L1) */

typedef struct {
    float *X;  /* (n+1, N, d): X_0 the embedding, X_{i+1} block i's output */
    float *dxs; /* training: (n, N, d) slot i: dL/dx_{i+1}, the gradient at block i's DWA */
    double *lane; /* (DF_LANES, n_layers + 1, DF_PART) partial dots */
} df_state;

static int has_dwa(const sf_config *c, int64_t i) { return (i + 1) % c->denseformer_period == 0; }
/* sources of block i's DWA: j = (i+1) % k, +k, ..., i+1 */
static int64_t dwa_len(const sf_config *c, int64_t i) { return (i + 1) / c->denseformer_dilation + 1; }
static int64_t dwa_src(const sf_config *c, int64_t i, int64_t m) {
    return (i + 1) % c->denseformer_dilation + m * c->denseformer_dilation;
}

static void table_layer(const sf_config *c, int i, sf_table_builder *tb) {
    if (!has_dwa(c, i)) return;
    char nm[SF_NAME_MAX];
    snprintf(nm, sizeof nm, "layers.%d.dwa.weight", i);
    sf_params_emit(tb, nm, i, 2, 1, dwa_len(c, i), 0, SF_INIT_LAST_ONE, SF_LAYER_VIEW(dwa_w));
}
static void table_model(const sf_config *c, sf_table_builder *tb) {}

/* the reads that follow a DWA: block i+1's attention (k = 2i+2) and the head (k = L) see
 * X_0..X_{i+1}; the others (MLPs) read inside a block */
static int64_t num_sources(const sf_config *c, int64_t k) {
    const int64_t L = 2 * c->n_layers;
    if (k > L || k % 2) return 0;
    return k / 2 + 1;
}

static sf_status init(run *R) {
    df_state *s = calloc(1, sizeof *s);
    if (!s) return SF_ERR_NOMEM;
    R->ws = s;
    return SF_OK;
}
static void free_state(run *R) {
    free(R->ws);
    R->ws = NULL;
}

static void layout_block(run *R, bump *bp, block_acts *A) {
    const int64_t Nd = R->N * R->d;
    const int post = !R->c->pre_norm;
    A->y_a = take(bp, Nd);
    A->z_a = post ? take(bp, Nd) : NULL;
    A->y_m = take(bp, Nd);
    A->z_m = post ? take(bp, Nd) : NULL;
}

static void layout(run *R, bump *bp, want w) {
    df_state *s = R->ws;
    int bad = 0;
    const int64_t slots = cmul(&bad, R->c->n_layers + 1, cmul(&bad, R->N, R->d));
    s->X = take(bp, slots);
    s->dxs = R->training ? take(bp, slots) : NULL;
    s->lane = (double *)take(bp, cmul(&bad, 2 * DF_LANES * DF_PART, R->c->n_layers + 1)); /* doubles, in floats */
    if (bad) bp->bad = 1;
}

static float *embed_dst(run *R) { return ((df_state *)R->ws)->X; }
static void begin(run *R, float *x0) { copy(R->acts[0].in_a, x0, R->N * R->d); }

/* The DWA weights of block i written as sublayer 2(i+1)'s depth weights, per token. */
static void trace_weights(const run *R, int64_t i, float *alpha) {
    if (!alpha) return;
    const sf_config *c = R->c;
    const int64_t ns = i + 2;
    const float *w = R->m->layers[i].dwa_w;
    for (int64_t r = 0; r < R->N; r++) {
        float *row = alpha + r * ns;
        for (int64_t j = 0; j < ns; j++) row[j] = 0.0f;
        if (!has_dwa(c, i)) { row[i + 1] = 1.0f; continue; }
        for (int64_t m = 0; m < dwa_len(c, i); m++) row[dwa_src(c, i, m)] = w[m];
    }
}

static void read(run *R, int64_t k, float *h, float *alpha_trace) {
    if (k % 2 == 0 && k > 0) trace_weights(R, k / 2 - 1, alpha_trace);
    else if (k == 0 && alpha_trace)
        for (int64_t r = 0; r < R->N; r++) alpha_trace[r] = 1.0f; /* x_0 = X_0 */
}
static float *out_buf(run *R, int64_t k, float *own) { return own; }

/* x_{i+1} = sum_m w_m X_{j_m}, each output element summed in m order. By chunks of DF_CHUNK
 * floats, one source at a time into the chunk (in L1): walking all n sources element by
 * element interleaved n streams (13 at M's last block), which the hardware prefetchers follow
 * far worse than one (see hyper.c's mixing). */
static void dwa_forward(run *R, int64_t i, float *next) {
    df_state *s = R->ws;
    const sf_config *c = R->c;
    const int64_t Nd = R->N * R->d, n = dwa_len(c, i), nch = (Nd + DF_CHUNK - 1) / DF_CHUNK;
    const float *w = R->m->layers[i].dwa_w;
#pragma omp parallel for schedule(static) num_threads(R->nt) if (Nd * n > 65536)
    for (int64_t ch = 0; ch < nch; ch++) {
        const int64_t c0 = ch * DF_CHUNK, cn = Nd - c0 < DF_CHUNK ? Nd - c0 : DF_CHUNK;
        float *o = next + c0;
        for (int64_t e = 0; e < cn; e++) o[e] = 0.0f;
        for (int64_t m = 0; m < n; m++) {
            const float wm = w[m], *x = s->X + dwa_src(c, i, m) * Nd + c0;
            for (int64_t e = 0; e < cn; e++) o[e] += wm * x[e];
        }
    }
}

static void write(run *R, int64_t k, float *y, float *next, float *trace_out, float *rms) {
    df_state *s = R->ws;
    const int64_t Nd = R->N * R->d, i = k / 2;
    const float *h = sub_in(R, k);
    /* the block's own residual stream, as in the plain wiring; the MLP's sum is X_{i+1} */
    float *out = k % 2 == 0 ? next : s->X + (i + 1) * Nd;
    resid_dropout(R, y, k);
    sub_out_hook(R, k, y, trace_out);
    if (rms) rms[SF_RMS_OUTPUT] = rms_of(y, Nd);
    if (R->c->pre_norm) {
        add3(R, out, h, y, Nd);
    } else {
        float *z = k % 2 == 0 ? R->acts[i].z_a : R->acts[i].z_m;
        const float *nw, *nb;
        sub_norm(R, k, &nw, &nb);
        add3(R, z, h, y, Nd);
        norm_fwd(R, out, z, nw, nb);
    }
    if (k % 2 == 1) {
        if (has_dwa(R->c, i)) dwa_forward(R, i, next);
        else copy(next, out, Nd);
    }
    if (rms) rms[SF_RMS_STREAM] = rms_of(next, Nd);
}

static void final(run *R, float *alpha_trace) { trace_weights(R, R->c->n_layers - 1, alpha_trace); }

/* ---- backward: R->dx carries the stream's gradient inside a block; s->dxs keeps each DWA's
 * output gradient until the walk reaches the sources it read ---- */

static void backward_begin(run *R, const float *dfin_h) {
    if (dfin_h != R->dx) copy(R->dx, dfin_h, R->N * R->d);
}

/* source j in DWA i's list: its index m there, or -1 */
static int64_t dwa_index(const sf_config *c, int64_t i, int64_t j) {
    const int64_t k = c->denseformer_dilation;
    if (!has_dwa(c, i) || j > i + 1 || (j - (i + 1) % k) % k != 0 || j < (i + 1) % k) return -1;
    return (j - (i + 1) % k) / k;
}

/* out = dL/dX_j, for source j, in one pass: the DWAs that read X_j (blocks n-1 down to `own`
 * = j - 1; own = -1 for the embedding's j = 0, down to block 0) add w dx of their output gradient (s->dxs,
 * the own block's in dx_own, stored into s->dxs[own] on the way), each weight's gradient is
 * <dx, X_j>, and dx_own itself joins where block j-1 has no DWA (x_j = X_j), or for j = 0 (block
 * 0 reads X_0 directly). Per element the terms are added in the walk's order (later blocks
 * first). out may be dx_own: a chunk is read completely before it is written. */
static void source_backward(run *R, int64_t j, int64_t own, const float *dx_own, float *out) {
    df_state *s = R->ws;
    const sf_config *c = R->c;
    const int64_t Nd = R->N * R->d, nl = c->n_layers;
    const float *Xj = s->X + j * Nd;
    const int direct = own < 0 || !has_dwa(c, own);
    const int64_t lo = own < 0 ? 0 : own;
    int64_t nd = 0; /* dots: DWAs that read X_j */
    for (int64_t i = nl - 1; i >= lo; i--) nd += dwa_index(c, i, j) >= 0;
#pragma omp parallel for schedule(static) num_threads(R->nt) if (Nd * (nd + 1) > 65536)
    for (int64_t l = 0; l < DF_LANES; l++) {
        double *part = s->lane + l * nd * DF_PART;
        for (int64_t t = 0; t < nd * DF_PART; t++) part[t] = 0.0;
        const int64_t e1 = Nd * (l + 1) / DF_LANES;
        float acc[DF_CHUNK];
        for (int64_t c0 = Nd * l / DF_LANES; c0 < e1; c0 += DF_CHUNK) {
            const int64_t cn = e1 - c0 < DF_CHUNK ? e1 - c0 : DF_CHUNK;
            for (int64_t e = 0; e < cn; e++) acc[e] = 0.0f;
            int64_t t = 0;
            for (int64_t i = nl - 1; i >= lo; i--) {
                const int64_t m = dwa_index(c, i, j);
                if (m < 0) continue;
                const float *g = (i == own ? dx_own : s->dxs + i * Nd) + c0, *x = Xj + c0;
                const float wm = R->m->layers[i].dwa_w[m];
                for (int64_t e = 0; e < cn; e++) acc[e] += wm * g[e];
                double d[DF_PART];
                for (int64_t q = 0; q < DF_PART; q++) d[q] = part[t * DF_PART + q];
                int64_t e = 0;
                for (; e + DF_PART <= cn; e += DF_PART)
                    for (int64_t q = 0; q < DF_PART; q++) d[q] += (double)g[e + q] * x[e + q];
                for (int64_t q = 0; e < cn; e++, q++) d[q] += (double)g[e] * x[e];
                for (int64_t q = 0; q < DF_PART; q++) part[t * DF_PART + q] = d[q];
                if (i == own) memcpy(s->dxs + i * Nd + c0, g, (size_t)cn * sizeof(float));
                t++;
            }
            float *o = out + c0;
            const float *g = dx_own + c0;
            if (direct) for (int64_t e = 0; e < cn; e++) o[e] = acc[e] + g[e];
            else for (int64_t e = 0; e < cn; e++) o[e] = acc[e];
        }
    }
    int64_t t = 0;
    for (int64_t i = nl - 1; i >= lo; i--) {
        const int64_t m = dwa_index(c, i, j);
        if (m < 0) continue;
        double sum = 0.0;
        for (int64_t l = 0; l < DF_LANES; l++)
            for (int64_t q = 0; q < DF_PART; q++) sum += s->lane[(l * nd + t) * DF_PART + q];
        GRAD(R, R->m->layers[i].dwa_w)[m] += (float)sum;
        t++;
    }
}

/* Block i's DWA backward, given dL/dx_{i+1} in R->dx: R->dx becomes dL/dX_{i+1}, complete
 * because every later DWA is already walked. */
static void dwa_backward(run *R, int64_t i) { source_backward(R, i + 1, i, R->dx, R->dx); }

static const float *write_backward(run *R, int64_t k) {
    const int64_t Nd = R->N * R->d;
    if (k % 2 == 1) dwa_backward(R, k / 2);
    float *g = R->dx;
    if (!R->c->pre_norm) {
        const float *z = k % 2 == 0 ? R->acts[k / 2].z_a : R->acts[k / 2].z_m, *nw, *nb;
        sub_norm(R, k, &nw, &nb);
        norm_bwd(R, R->dy, R->dx, z, nw, nb, 0);
        g = R->dy;
    }
    if (R->dmask) {
        copy(R->dmask, g, Nd);
        resid_dropout(R, R->dmask, k);
        g = R->dmask;
    }
    return g;
}

static float *read_grad_dst(run *R, int64_t k, int *accumulate) {
    *accumulate = R->c->pre_norm;
    return R->c->pre_norm ? R->dx : R->du;
}

static void read_backward(run *R, int64_t k) {
    if (!R->c->pre_norm) add3(R, R->dx, R->dy, R->du, R->N * R->d);
}

/* block 0 read X_0 directly; the DWAs read it too */
static const float *embed_grad(run *R) {
    source_backward(R, 0, -1, R->dx, R->dx);
    return R->dx;
}
static void backward_end(run *R) {}

const sf_wiring sf_wiring_denseformer = {
    .name = "denseformer",
    .save_block_input = 1, /* the stream inside a block is overwritten block by block */
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
