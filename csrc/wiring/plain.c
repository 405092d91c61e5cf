/* The plain residual stream (He et al. 2016; pre-norm as in GPT-2, post-norm as in Vaswani et
 * al. 2017): x_{k+1} = x_k + y_k, or under post-norm x_{k+1} = Norm_k(x_k + y_k), where y_k is
 * sublayer k's output (after residual dropout). Sublayer k reads h_k = x_k. No parameters of
 * its own. See sf_wiring.h for the hooks' contract. */
#include "../sf_wiring.h"

static void table_layer(const sf_config *c, int layer, sf_table_builder *tb) {}
static void table_model(const sf_config *c, sf_table_builder *tb) {}
static int64_t num_sources(const sf_config *c, int64_t k) { return 0; }

static sf_status init(run *R) { return SF_OK; }
static void free_state(run *R) {}

static void layout_block(run *R, bump *bp, block_acts *A) {
    const int64_t Nd = R->N * R->d;
    const int post = !R->c->pre_norm;
    A->y_a = take(bp, Nd);
    A->z_a = post ? take(bp, Nd) : NULL; /* x + y before the post-norm, for its backward */
    A->y_m = take(bp, Nd);
    A->z_m = post ? take(bp, Nd) : NULL;
}
static void layout(run *R, bump *bp, want w) {}

/* the stream enters block 0 as its attention sublayer's input */
static float *embed_dst(run *R) { return R->acts[0].in_a; }
static void begin(run *R, float *x0) {}

/* h_k is already there: the previous write put x_k into it */
static void read(run *R, int64_t k, float *h, float *alpha_trace) {}
static float *out_buf(run *R, int64_t k, float *own) { return own; }

static void write(run *R, int64_t k, float *y, float *next, float *trace_out, float *rms) {
    const int64_t Nd = R->N * R->d;
    const float *h = sub_in(R, k);
    resid_dropout(R, y, k);
    sub_out_hook(R, k, y, trace_out);
    if (rms) rms[SF_RMS_OUTPUT] = rms_of(y, Nd);
    if (R->c->pre_norm) {
        add3(R, next, h, y, Nd);
    } else {
        float *z = k % 2 == 0 ? R->acts[k / 2].z_a : R->acts[k / 2].z_m;
        const float *nw, *nb;
        sub_norm(R, k, &nw, &nb);
        add3(R, z, h, y, Nd);
        norm_fwd(R, next, z, nw, nb);
    }
    if (rms) rms[SF_RMS_STREAM] = rms_of(next, Nd);
}

/* the last write left the stream in R->fin_h */
static void final(run *R, float *alpha_trace) {}

/* ---- backward: R->dx carries dL/dx_k down the stream ---- */

static void backward_begin(run *R, const float *dfin_h) {
    if (dfin_h != R->dx) copy(R->dx, dfin_h, R->N * R->d);
}

/* dL/dy_k: the stream's gradient (through the post-norm first), times the dropout mask (the
 * update added was y * keep); masked in a copy, since dx (dy) is still needed below. */
static const float *write_backward(run *R, int64_t k) {
    const int64_t Nd = R->N * R->d;
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

/* pre-norm: dL/dx_k = dL/dx_{k+1} + the sublayer's path, accumulated into dx in place;
 * post-norm: the sublayer's path lands in du and joins dz in read_backward */
static float *read_grad_dst(run *R, int64_t k, int *accumulate) {
    *accumulate = R->c->pre_norm;
    return R->c->pre_norm ? R->dx : R->du;
}

static void read_backward(run *R, int64_t k) {
    if (!R->c->pre_norm) add3(R, R->dx, R->dy, R->du, R->N * R->d);
}

static const float *embed_grad(run *R) { return R->dx; }
static void backward_end(run *R) {}

const sf_wiring sf_wiring_plain = {
    .name = "plain",
    .save_block_input = 1, /* the stream is overwritten block by block */
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
