/* stackformer C core — public API.
 *
 * The C library owns the math: a stacked self-attention transformer over plain float32
 * buffers. No Python headers here; the CPython binding (python/stackformer/_core.c) is a
 * thin layer over exactly these functions. See DEVELOPERS.md for the math contract.
 *
 * Conventions (ggml-like): every function that can fail returns an sf_status and writes a
 * human-readable message into a caller buffer; sizes are explicit int64_t; nothing aborts.
 */
#ifndef SF_H
#define SF_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    SF_OK = 0,
    SF_ERR_INVALID_CONFIG = 1,  /* config fails validation */
    SF_ERR_INVALID_ARG = 2,     /* a call argument is wrong (shape, range, NULL) */
    SF_ERR_NOMEM = 3,           /* allocation failed or would be absurdly large */
    SF_ERR_OVERFLOW = 4,        /* a size computation overflowed 64 bits */
    SF_ERR_TOKEN_RANGE = 5,     /* a token id outside [0, vocab_size) */
    SF_ERR_NONFINITE = 6,       /* NaN or inf where a finite value is required */
    SF_ERR_BUSY = 7,            /* the model is being trained by another thread */
    SF_ERR_INTERRUPTED = 8,     /* the call's cancel flag was raised (Ctrl-C): nothing kept */
} sf_status;

const char *sf_status_name(sf_status s);

typedef enum { SF_POS_NONE = 0, SF_POS_LEARNED = 1, SF_POS_SINUSOIDAL = 2, SF_POS_ROPE = 3 } sf_pos;
typedef enum { SF_ACT_GELU = 0, SF_ACT_GELU_TANH = 1, SF_ACT_RELU = 2, SF_ACT_SWIGLU = 3 } sf_act;
typedef enum { SF_NORM_LAYERNORM = 0, SF_NORM_RMSNORM = 1 } sf_norm;
typedef enum { SF_DTYPE_FLOAT32 = 0, SF_DTYPE_BFLOAT16 = 1 } sf_compute_dtype;
/* moda_depth_rope: how MoDA's depth logits see RoPE positions (sf_config_fields.h) */
typedef enum { SF_DROPE_LEGACY = 0, SF_DROPE_NONE = 1, SF_DROPE_OWN = 2 } sf_depth_rope;
/* moda_depth_kv: which sublayers write depth slots, and from what */
typedef enum { SF_DKV_ATTN = 0, SF_DKV_ATTN_FFN = 1, SF_DKV_EXTRA = 2 } sf_depth_kv;
/* attnres_mixing: how AttnRes turns its logits into depth weights */
typedef enum { SF_MIX_SOFTMAX = 0, SF_MIX_SIGMOID = 1, SF_MIX_STATIC = 2 } sf_attnres_mixing;
/* attnres_query: where AttnRes' query comes from */
typedef enum { SF_ARQ_STATIC = 0, SF_ARQ_INPUT = 1 } sf_attnres_query;
/* The depth wirings, in enum order (csrc/wiring/: one file each). */
/* X(enum id, Config name, symbol: sf_wiring_<symbol> in csrc/wiring/) */
#define SF_WIRINGS(X)                                   \
    X(SF_RES_PLAIN, "plain", plain)                     \
    X(SF_RES_ATTNRES_FULL, "attnres_full", attnres_full) \
    X(SF_RES_ATTNRES_BLOCK, "attnres_block", attnres_block) \
    X(SF_RES_DENSEFORMER, "denseformer", denseformer) \
    X(SF_RES_HYPER_CONNECTIONS, "hyper_connections", hyper_connections) \
    X(SF_RES_MHC, "mhc", mhc)
#define SF_WIRING_ENUM_(id, name, sym) id,
typedef enum { SF_WIRINGS(SF_WIRING_ENUM_) SF_NUM_WIRINGS } sf_residual;
#undef SF_WIRING_ENUM_
#define SF_WIRING_NAME_(id, name, sym) "|" name
#define SF_WIRING_CHOICES (SF_WIRINGS(SF_WIRING_NAME_) + 1) /* "plain|attnres_full|..." */

/* Upper bound on any single dimension: keeps every derived size far from int64 overflow
 * and turns absurd configs into a clear error instead of a giant allocation attempt. */
#define SF_DIM_MAX ((int64_t)1 << 24)
/* an INT field's default that is computed from other fields (sf_config_default) */
#define SF_DERIVED 0

/* The configuration. Its fields, types, defaults, ranges and documentation are one table,
 * sf_config_fields.h; read them there. */
#define SF_CTYPE_INT int64_t
#define SF_CTYPE_BOOL int32_t
#define SF_CTYPE_ENUM int32_t
#define SF_CTYPE_REAL float
#define SF_CTYPE_PROB float
typedef struct {
#define SF_FIELD(c_name, py_name, kind, def, lo, hi, choices, doc) SF_CTYPE_##kind c_name;
#include "sf_config_fields.h"
#undef SF_FIELD
} sf_config;

/* The same table at run time, for bindings: name (the Python name), c_name, kind, default,
 * range, choices, doc, and where the field sits in sf_config. */
typedef enum { SF_FIELD_INT, SF_FIELD_BOOL, SF_FIELD_ENUM, SF_FIELD_REAL, SF_FIELD_PROB } sf_field_kind;
typedef struct {
    const char *name, *c_name;
    sf_field_kind kind;
    double def, lo, hi;
    const char *choices; /* ENUM: '|'-separated names in value order; "" otherwise */
    const char *doc;
    size_t offset;       /* offsetof(sf_config, c_name) */
} sf_config_field;
int32_t sf_config_num_fields(void);
const sf_config_field *sf_config_field_at(int32_t i); /* NULL outside [0, num_fields) */

/* Fill a config with the table's defaults for the given sizes (n_kv_heads = n_heads, d_ff =
 * 4 d_model). */
void sf_config_default(sf_config *cfg, int64_t vocab_size, int64_t d_model, int64_t n_heads,
                       int64_t n_layers, int64_t max_seq_len);
/* Validate every field; on failure writes why into err (may be NULL). */
sf_status sf_config_validate(const sf_config *cfg, char *err, size_t errlen);

/* ---- parameters ------------------------------------------------------------------------ */

#define SF_NAME_MAX 64
/* Initialization (GPT-2 style): normal(0, 0.02); the residual projections (o_proj, down_proj)
 * normal(0, 0.02 / sqrt(2 n_layers)); ones (norm gains); zeros (biases, AttnRes queries). */
typedef enum { SF_INIT_NORMAL = 0, SF_INIT_NORMAL_RESID = 1, SF_INIT_ONES = 2, SF_INIT_ZEROS = 3,
               SF_INIT_LAST_ONE = 4,     /* zeros but the last entry 1 (DenseFormer's identity DWA) */
               SF_INIT_HC_ALPHA_ATTN = 5, /* Hyper-Connections' [e_{k mod n}, I_n] for sublayer k = 2i */
               SF_INIT_HC_ALPHA_MLP = 6,  /* ... and k = 2i+1 */
               SF_INIT_HC_SCALE = 7,      /* 0.01 (the dynamic scales s_alpha, s_beta; mHC's a) */
               SF_INIT_MHC_BASE = 8       /* mHC's b: -log(n-1) for H_pre, 0 for H_post and H_res */ } sf_init;
typedef struct {
    char name[SF_NAME_MAX];  /* state_dict name, PyTorch conventions */
    int64_t offset;          /* in floats, into the flat parameter buffer */
    int64_t numel;
    int32_t ndim;            /* 1 or 2 */
    int64_t shape[2];
    int32_t layer;           /* block index, or -1 for model-level tensors */
    int32_t no_decay;        /* 1 for norms, biases, AttnRes pseudo-queries (for AdamW) */
    int32_t init;            /* sf_init: how sf_model_create initializes it */
} sf_tensor_info;

typedef struct sf_model sf_model;

/* Build a model and initialize its weights from seed (GPT-2 style, see DEVELOPERS.md). */
sf_status sf_model_create(const sf_config *cfg, uint64_t seed, sf_model **out, char *err, size_t errlen);
void sf_model_free(sf_model *m);
/* The tensor table a model of cfg would have (names, shapes, offsets), without allocating
 * the model: *out (free() it) holds *n entries, *num_params the total floats. Lets a loader
 * check a file's tensor list before it builds anything. */
sf_status sf_config_tensors(const sf_config *cfg, sf_tensor_info **out, int32_t *n, int64_t *num_params,
                            char *err, size_t errlen);
const sf_config *sf_model_config(const sf_model *m);
float *sf_model_params(sf_model *m);
int64_t sf_model_num_params(const sf_model *m);
int32_t sf_model_num_tensors(const sf_model *m);
const sf_tensor_info *sf_model_tensor(const sf_model *m, int32_t i);
/* index of a tensor by name, or -1 */
int32_t sf_model_find_tensor(const sf_model *m, const char *name);
/* Number of floats the parameter table needs for cfg (no allocation); -1 on overflow. */
int64_t sf_config_num_params(const sf_config *cfg);

/* ---- forward ------------------------------------------------------------------------------ */

/* Optional recordings of a forward pass. Every pointer may be NULL (= not recorded); arrays
 * are caller-owned, float32, C-contiguous, of exactly the documented shapes. Recording costs
 * nothing when off. n = n_layers, L = 2n. */
typedef struct {
    float **attention;   /* [n] (B, H, T, T + depth_cols(l)), NULL entries skip that layer */
    float **hidden;      /* [n+1] (B, T, d) stream entering block i / after the last block */
    float **attn_out;    /* [n] (B, T, d) attention sublayer output */
    float **mlp_out;     /* [n] (B, T, d) MLP sublayer output */
    float **alpha;       /* [L+1] (B, T, n_sources(k)) AttnRes depth weights (k = L: output) */
    float **depth_mass;  /* [n] (B, H, T) MoDA attention mass on depth columns */
    float *rms;          /* (L+1, SF_RMS_COLS) per-sublayer RMS summary, see below */
    float *copy_rms;     /* (L+1, hc_expansion) Hyper-Connections/mHC only: RMS of each copy of
                          * the stream entering sublayer k (row L: the copies the head sums) */
    /* activations (issue 23, the TransformerLens-style cache): copies of buffers the forward
     * computes anyway, taken where they are complete; recording them changes no result */
    float *embed;        /* (B, T, d) the embedding output (token + learned/sinusoidal position) */
    float **hidden_mid;  /* [n] (B, T, d) what block i's MLP sublayer reads (before its norm) */
    float **q;           /* [n] (B, T, H, dh) query projection, before RoPE */
    float **k;           /* [n] (B, T, Hkv, dh) key projection, before RoPE */
    float **v;           /* [n] (B, T, Hkv, dh) value projection */
    float **z;           /* [n] (B, T, H, dh) attention's per-head output, before o_proj */
    float **mlp_post;    /* [n] (B, T, d_ff) the MLP's activation (swiglu: act(gate) * up), what
                          * down_proj reads */
    float **depth_k;     /* MoDA [slots written] (B, T, Hkv, dh): what depth slot s holds, as
                          * stored (slot 2j = attn_j, 2j+1 = ffn_j; j under moda_depth_kv='attn') */
    float **depth_v;
} sf_trace;

/* rms rows k = 0..L-1 are sublayers (2i attention, 2i+1 MLP of block i), row L the output:
 *   INPUT  = RMS of what sublayer k reads (plain: the stream x; AttnRes: the aggregate h_k);
 *   OUTPUT = RMS of what it writes (plain: the update added; AttnRes: v_{k+1});
 *   STREAM = RMS of the plain running sum after it (plain: x after the update; AttnRes: the
 *            sum of all sources v_0..v_{k+1}, i.e. what a plain residual stream would carry).
 * Row L: INPUT = RMS of the final stream/aggregate before final_norm, others NaN.
 * RMS is over all B*T*d elements. */
enum { SF_RMS_INPUT = 0, SF_RMS_OUTPUT = 1, SF_RMS_STREAM = 2, SF_RMS_COLS = 3 };

typedef struct sf_cache sf_cache;

/* Interventions on a forward pass (no cache): values that replace activations at hook points,
 * and sources removed from Attention Residuals reads. Every pointer may be NULL (= untouched);
 * arrays are caller-owned float32 (ablate: uint8), C-contiguous, of exactly the trace's shape
 * at the same point, so a recorded value patched back in changes nothing. n = n_layers. */
typedef struct {
    const float *embed;       /* (B, T, d) the embedding x0 (positions included) */
    const float **resid_pre;  /* [n] (B, T, d) what block i's attention sublayer reads (plain:
                                 the residual stream itself; AttnRes: the aggregate h_{2i}) */
    const float **resid_mid;  /* [n] (B, T, d) what block i's MLP sublayer reads */
    const float **attn_out;   /* [n] (B, T, d) the attention sublayer's output as the wiring
                                 takes it (trace attn_out: post-norm, after the norm) */
    const float **mlp_out;    /* [n] (B, T, d) the MLP sublayer's, likewise */
    const float **alpha;      /* [L+1] AttnRes only: (B, T[, H], n_sources(k)) the weights read
                                 k mixes its sources with (k = L: the output read) */
    const uint8_t **ablate;   /* [L+1] AttnRes only: (n_sources(k)) 1 = source removed from read
                                 k: softmax renormalised over the rest, a sigmoid gate 0 */
    const float **depth_k;    /* MoDA [slots written] (B, T, Hkv, dh): replaces what depth slot s
                                 holds (numbering as sf_trace.depth_k), for every later reader */
    const float **depth_v;
    const uint8_t **depth_ablate; /* [n] MoDA only: (depth slots block i reads: 2i, or i under
                                 moda_depth_kv='attn') 1 = slot removed from block i's attention
                                 (every position's copy of it; the softmax renormalises) */
} sf_patch;

typedef struct {
    const int32_t *tokens;          /* (B, T) ids in [0, V), or NULL when embeds is given */
    const float *embeds;            /* (B, T, d) input embeddings, or NULL */
    const uint8_t *key_padding_mask;/* (B, T), 1 = real key, 0 = padding; NULL = none */
    int64_t B, T;
    int32_t attnres_two_phase;      /* Block AttnRes: 1 = paper's two-phase schedule */
    int32_t n_threads;              /* 0 = library default */
    sf_cache *cache;                /* NULL, or: the T inputs are positions len..len+T-1 after
                                       the cached ones (no mask, no trace); the cache grows */
    const volatile int *cancel;     /* NULL, or read between blocks: nonzero stops the call with
                                       SF_ERR_INTERRUPTED (outputs undefined, a cache keeps its
                                       length, the model untouched) */
    const sf_patch *patch;          /* NULL, or interventions (forward only, no cache) */
} sf_forward_args;

/* Depth columns of layer l in the attention trace: 0 without MoDA, else 2l * moda_chunk. */
int64_t sf_depth_cols(const sf_config *cfg, int64_t layer);
/* Number of AttnRes sources seen by sublayer k (k = L is the output aggregator). */
int64_t sf_attnres_num_sources(const sf_config *cfg, int64_t k);

/* Run the model. out_logits (B,T,V) and/or out_hidden (B,T,d, after final norm) may be NULL.
 * Thread-safe for concurrent calls on one model (reads weights only, allocates its own
 * workspace). */
sf_status sf_forward(const sf_model *m, const sf_forward_args *args, float *out_logits,
                     float *out_hidden, sf_trace *trace, char *err, size_t errlen);
/* The checks sf_forward starts with (shapes, ranges, finiteness, mask values, the cache's
 * room), without running anything: lets a caller refuse bad arguments before it allocates
 * outputs. tracing: a trace will be passed. */
sf_status sf_forward_check(const sf_model *m, const sf_forward_args *args, int tracing, char *err,
                           size_t errlen);
/* The memory a forward call needs on top of what the model holds -- its workspace (laid out,
 * not allocated) plus output_bytes the caller allocates for it (logits, hidden, traces) --
 * checked as one total against sf_memory_limit_bytes() before either is allocated:
 * SF_ERR_NOMEM naming both parts. want_rms / want_alpha: the trace kinds that add workspace. */
sf_status sf_forward_memory_check(const sf_model *m, const sf_forward_args *args, int want_rms,
                                  int want_alpha, int64_t output_bytes, char *err, size_t errlen);

/* ---- key/value cache for incremental decoding ------------------------------------------- */
/* Holds every layer's keys/values (and MoDA depth slots) for B sequences of up to max_len
 * positions. AttnRes needs no cache: its sources are per position. */
sf_status sf_cache_create(const sf_model *m, int64_t B, int64_t max_len, sf_cache **out,
                          char *err, size_t errlen);
void sf_cache_free(sf_cache *c);
int64_t sf_cache_len(const sf_cache *c);
int64_t sf_cache_batch(const sf_cache *c);
sf_status sf_cache_reset(sf_cache *c); /* SF_ERR_BUSY while a call uses it */

/* ---- training ----------------------------------------------------------------------------- */
typedef struct {
    const int32_t *tokens;           /* (B, T) inputs, or NULL when embeds is given */
    const float *embeds;             /* (B, T, d) */
    const uint8_t *key_padding_mask; /* (B, T) or NULL */
    const int32_t *targets;          /* (B, T) target ids; ignore_index entries are skipped */
    int64_t B, T;
    int32_t ignore_index;
    int32_t checkpoint;              /* 1: keep only block inputs, recompute in backward */
    int32_t n_threads;
    uint64_t dropout_seed;           /* dropout masks are a hash of (seed, optimizer step,
                                        position): recomputed in the backward, never stored */
    const volatile int *cancel;      /* as in sf_forward_args: between sublayers; the gradient
                                        buffer is then undefined, the weights untouched */
} sf_train_args;

/* Forward + backward of mean cross-entropy. Overwrites the model's gradient buffer (same
 * layout as the parameters). *loss = mean loss over counted targets, *count = their number.
 * Fails with SF_ERR_BUSY when another thread is using the model. */
sf_status sf_forward_backward(sf_model *m, const sf_train_args *args, double *loss,
                              int64_t *count, char *err, size_t errlen);
/* Gradient buffer (num_params floats; zeros before the first backward). */
float *sf_model_grads(sf_model *m);
/* The training workspace (kept between train steps) and the forward workspace (kept between
 * forward calls) are the model's; this frees both (waiting for a running train step; a forward
 * workspace that a running forward call holds stays with it). */
void sf_model_release_workspace(sf_model *m);
/* A consistent copy of the model's state while other threads may train it or run forward
 * calls: waits for a running train step (never for forward calls), then copies under the read
 * guard. Any output may be NULL (num_params floats each). */
void sf_model_snapshot(sf_model *m, float *params, float *grads, float *adam_m, float *adam_v,
                       int64_t *step);
/* Write state: waits for running forward calls and train steps (calls that start meanwhile
 * fail with SF_ERR_BUSY, as during a train step), then copies under the write guard. params
 * (num_params floats, the flat layout) is copied tensor by tensor where which[t] != 0 (which
 * NULL: all); adam_m, adam_v, step: NULL keeps them. adam_v must be finite and >= 0 (checked
 * before anything is written). */
sf_status sf_model_restore(sf_model *m, const float *params, const uint8_t *which,
                           const float *adam_m, const float *adam_v, const int64_t *step,
                           char *err, size_t errlen);
/* Activation memory (bytes) one forward_backward call needs for (B, T); -1 when the sizes
 * overflow 64 bits. */
int64_t sf_train_workspace_bytes(const sf_config *cfg, int64_t B, int64_t T, int checkpoint);

typedef struct {
    float lr, beta1, beta2, eps, weight_decay;
    float clip_norm; /* <= 0: no clipping */
} sf_adamw;
/* One AdamW step from the gradient buffer: decoupled weight decay on tensors whose
 * no_decay flag is 0, global-norm clipping first. *grad_norm = norm before clipping. A
 * non-finite gradient norm returns SF_ERR_NONFINITE and leaves the model unchanged. */
sf_status sf_adamw_step(sf_model *m, const sf_adamw *opt, float *grad_norm, char *err,
                        size_t errlen);
/* Optimizer state: first/second moments (num_params floats each) and the step count. */
float *sf_model_adam_m(sf_model *m);
float *sf_model_adam_v(sf_model *m);
int64_t sf_model_step_count(const sf_model *m);
void sf_model_set_step_count(sf_model *m, int64_t step);

/* What this process may allocate: physical memory, lowered by its cgroup limit and by
 * STACKFORMER_MEMORY_LIMIT (bytes); larger requests fail with SF_ERR_NOMEM before allocating. */
int64_t sf_memory_limit_bytes(void);
/* The lowest cgroup memory limit over this process's group and its ancestors (v2
 * <root>/<group>/memory.max, the group read from self_cgroup, e.g. /proc/self/cgroup) and v1
 * (<root>/memory/memory.limit_in_bytes); -1 when none. sf_memory_limit_bytes uses it with
 * "/sys/fs/cgroup"; tests pass a directory of their own. */
int64_t sf_cgroup_limit_bytes(const char *root, const char *self_cgroup);

/* Threads used when n_threads == 0. */
void sf_set_num_threads(int n);
int sf_get_num_threads(void);
/* NULL, or why teams are capped below what was asked: before a team larger than any this
 * process ran, the library checks that its threads can start (libgomp would end the process
 * when they cannot) and caps every later team at what could start. */
const char *sf_threads_capped(void);

/* The register tile the matrix products run on this CPU: "avx512" (8 x 32), "avx2" (6 x 16)
 * or "generic" (portable C). Chosen once at the first call from CPU features and the
 * STACKFORMER_NO_AVX512 / STACKFORMER_NO_AVX2 environment variables; every tile gives the
 * same bits. */
const char *sf_matmul_kernel(void);

/* Optional BLAS backend. stackformer links no BLAS; a caller that has loaded one passes its
 * row-major cblas_sgemm here (ilp64 = 0: 32-bit integer arguments, 1: 64-bit, as in
 * OpenBLAS's INTERFACE64 builds), and from then on every Linear product (sf_gemm, sf_matmul,
 * sf_matmul_act) runs in it, with the library's own threads; attention keeps its tiles. The
 * function is checked first on three small products against a double-precision loop:
 * wrong results return SF_ERR_INVALID_ARG and keep the previous backend. NULL restores the
 * built-in tiles. With a BLAS the bitwise guarantees (same bits for any thread count, cached
 * decoding equal to the full pass) are the BLAS's, not ours; sf_matmul_kernel() says "blas". */
sf_status sf_set_blas_sgemm(void *cblas_sgemm, int ilp64, char *err, size_t errlen);

/* bfloat16 products (Config compute_dtype = "bfloat16"; semantics in sf_bf16.h: VDPBF16PS).
 * sf_bf16_kernel: "avx512_bf16" where the CPU has it (vdpbf16ps), else
 * "emulated (...)" (the same bits on AVX2/FMA or portable C); STACKFORMER_NO_BF16=1 forces
 * the emulated kernel. */
const char *sf_bf16_kernel(void);
/* 1 when this CPU has AVX512_BF16 (whatever STACKFORMER_NO_BF16 says) */
int sf_bf16_cpu_has_native(void);
/* ... and its results passed the once-per-process bit-for-bit probe (only then is it used) */
int sf_bf16_native_usable(void);
/* y (N,M) = bf16(x) (N,K) . bf16(w)^T (w (M,K)) + bias, fp32 accumulation: operands converted
 * and packed per call (tests, benchmarks). path -1 the default kernel, 0 emulated, 1 native
 * (SF_ERR_INVALID_ARG without AVX512_BF16), 2 the portable model. */
sf_status sf_bf16_matmul(float *y, const float *x, const float *w, const float *bias, int64_t N,
                         int64_t K, int64_t M, int path, int n_threads);
/* Benchmarks: seconds of the fastest of reps runs of the default kernel's y (N,M) = A (N,K) .
 * B (K,M) on already packed bf16 operands (packing not timed; 2*N*K*M flops); -1 on bad
 * arguments or no memory. */
double sf_bf16_gemm_bench(int64_t N, int64_t K, int64_t M, int reps, int n_threads);

#ifdef __cplusplus
}
#endif
#endif
