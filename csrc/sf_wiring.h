/* A depth wiring: how the sublayers of the stack are connected through depth — what each
 * sublayer reads, what its output does to the state, what the head reads at the end — as one
 * unit behind this interface, one file per wiring in csrc/wiring/ (private to the C core).
 *
 * The stack (sf_model.c) owns the loop over sublayers k = 0 .. L-1 (L = 2 n_layers: 2i the
 * attention, 2i+1 the MLP of block i), the sublayers themselves with their pre-norms, the
 * embedding and the head, gradient checkpointing, and the embedding's backward. A wiring only
 * reads, writes and hands gradients back; it never calls the stack, the stack calls it through
 * these hooks. Per sublayer k the forward is
 *
 *     h = sub_in(R, k);  W->read(R, k, h, ...)          the wiring fills the sublayer's input
 *     u = pre_norm ? Norm_k(h) : h
 *     y = W->out_buf(R, k, own)                          where the sublayer writes its output
 *     y = F_k(u)                                         attention or MLP (the stack's)
 *     W->write(R, k, y, next, ...)                       the output joins the wiring's state
 *
 * and after the last sublayer W->final(R) leaves the head's input in R->fin_h. The backward
 * walks k = L-1 .. 0:
 *
 *     dy = W->write_backward(R, k)                       dL/dy of F_k's output
 *     pre-norm:  du = F_k'(dy);  dst = W->read_grad_dst(R, k, &acc);  dst (+)= Norm_k'(du)
 *     post-norm: dst = W->read_grad_dst(R, k, &acc) (acc == 0);  dst = F_k'(dy)
 *     W->read_backward(R, k)                             dL/dh_k reaches the wiring's sources
 *
 * then W->embed_grad(R) gives dL/d(embedding output) and W->backward_end(R) finishes the
 * wiring's own parameter gradients. Every wiring here keeps its state per position, so the
 * decoding cache needs nothing from it (cached decoding runs the same hooks on the new
 * positions only when the wiring's read of a position depends on that position alone: true
 * for all wirings so far — a wiring that mixes positions must add a cache hook).
 *
 * Parameters: W->table_layer(c, i, tb) adds block i's tensors after the block's own (and
 * MoDA's), W->table_model(c, tb) the model-level ones before the final norm (sf_params.c);
 * the stack finds them by name (sf_lifecycle.c). Traces: `read` writes the wiring's depth
 * weights for sublayer k (alpha), `write` a sublayer's output as the trace shows it and the
 * rms summary's OUTPUT/STREAM columns. */
#ifndef SF_WIRING_H
#define SF_WIRING_H

#include "sf_stack.h"

typedef struct sf_wiring {
    const char *name;  /* the Config's residual= name */
    /* gradient checkpointing: 1 when a block cannot be recomputed from the wiring's state and
     * the stack must keep each block's input (sub_in(R, 2i)) */
    int save_block_input;

    /* ---- parameters and traces ---- */
    void (*table_layer)(const sf_config *c, int layer, sf_table_builder *tb);
    void (*table_model)(const sf_config *c, sf_table_builder *tb);
    /* depth sources sublayer k mixes (k = L: the final read); 0 when it keeps no weights */
    int64_t (*num_sources)(const sf_config *c, int64_t k);

    /* ---- per call ---- */
    sf_status (*init)(run *R);                 /* allocate R->ws (outside the layer loop) */
    void (*free)(run *R);
    void (*layout_block)(run *R, bump *bp, block_acts *A); /* block activations it needs */
    void (*layout)(run *R, bump *bp, want w);  /* its other buffers */

    /* ---- forward ---- */
    float *(*embed_dst)(run *R);               /* where the embedding output goes */
    void (*begin)(run *R, float *x0);          /* after the embedding is in place */
    void (*read)(run *R, int64_t k, float *h, float *alpha_trace);
    float *(*out_buf)(run *R, int64_t k, float *own);
    /* next: the next sublayer's input buffer (the last one's: R->fin_h, or a sink when
     * recomputing); trace_out (N, d) or NULL; rms: row k of the rms summary or NULL */
    void (*write)(run *R, int64_t k, float *y, float *next, float *trace_out, float *rms);
    void (*final)(run *R, float *alpha_trace);

    /* ---- backward ---- */
    void (*backward_begin)(run *R, const float *dfin_h);
    const float *(*write_backward)(run *R, int64_t k);
    float *(*read_grad_dst)(run *R, int64_t k, int *accumulate);
    void (*read_backward)(run *R, int64_t k);
    const float *(*embed_grad)(run *R);
    void (*backward_end)(run *R);
} sf_wiring;

/* one per entry of SF_WIRINGS (sf.h), each in its csrc/wiring/ file */
#define SF_WIRING_DECL_(id, name, sym) extern const sf_wiring sf_wiring_##sym;
SF_WIRINGS(SF_WIRING_DECL_)
#undef SF_WIRING_DECL_

/* The wiring of a config (its residual field; validated configs only). */
const sf_wiring *sf_wiring_of(const sf_config *c);

#endif
