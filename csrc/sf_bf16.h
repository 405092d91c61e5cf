/* bfloat16 products (sf_gemm_bf16.c), private to the C core.
 *
 * What a product computes, exactly: Intel's VDPBF16PS (SDM vol. 2, "VDPBF16PS - Dot Product of
 * BF16 Pairs Accumulated into Packed Single Precision"). Operands are bf16, stored in pairs:
 * a 32-bit word holds elements 2i (low half) and 2i+1 (high half) of the reduction. For each
 * fp32 output and each pair i, in ascending i:
 *     acc = fma(a[2i+1], b[2i+1], acc)      (the high, odd element first)
 *     acc = fma(a[2i],   b[2i],   acc)
 * each an fp32 fused multiply-add rounded to nearest even, with denormal inputs (a, b and
 * acc) read as zero (DAZ) and a tiny result written as a zero of its sign (FTZ; x86 detects
 * tininess after rounding). The SDM's pseudo-code: "FP32 FMA with daz in, ftz out and RNE
 * rounding. MXCSR neither consulted nor updated." The chain starts from the bias (or 0, or y
 * when accumulating); an odd K is padded with a zero pair half.
 *
 * Because a bf16 x bf16 product has at most 16 significant bits it is exact in fp32 (unless it
 * leaves fp32's exponent range), so a widened fp32 FMA computes each step exactly as the native
 * instruction does: the AVX2 kernel widens with a shift / mask and runs two vfmadd231ps per
 * pair in that order under MXCSR.DAZ|FTZ (set for the kernel's duration, restored after), so
 * the tiny cases are flushed by the same hardware rule. NaN payloads are not modelled (a NaN
 * in gives a NaN out on every path; which payload is path-specific).
 *
 * Conversion fp32 -> bf16 is the SDM's convert_fp32_to_bfloat16 (VCVTNEPS2BF16): zero and
 * denormal -> signed zero, inf kept, NaN truncated and made quiet, normal numbers rounded to
 * nearest even (integer add of 0x7FFF + lsb). So no bf16 operand here is ever denormal.
 */
#ifndef SF_BF16_H
#define SF_BF16_H

#include <stdint.h>
#include <string.h>

typedef uint16_t sf_bf16;

static inline sf_bf16 sf_bf16_from_f32(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint32_t e = u & 0x7F800000u, mant = u & 0x007FFFFFu;
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;            /* normal: RNE */
    r = e == 0 ? (u >> 16) & 0x8000u : r;                            /* zero, denormal */
    r = e == 0x7F800000u ? ((u >> 16) | (mant ? 0x40u : 0u)) : r;    /* inf, NaN (quiet) */
    return (sf_bf16)r;
}
static inline float sf_bf16_to_f32(sf_bf16 h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}
/* one packed word: elements lo (even k) and hi (odd k) */
static inline uint32_t sf_bf16_pair(float lo, float hi) {
    return (uint32_t)sf_bf16_from_f32(lo) | (uint32_t)sf_bf16_from_f32(hi) << 16;
}

#define SF_BF16_NR 16 /* columns per packed B panel (one 512-bit register of fp32 outputs) */

/* Words a packed B (K x M) takes: ceil(M/16) panels of ceil(K/2) pairs x 16 columns. */
int64_t sf_bf16_pack_words(int64_t K, int64_t M);
/* Pack B (K x M), element (k, j) at b[k*rs + j*cs], into panels: word
 * pack[(p*Kh + i)*16 + j] holds B(2i, 16p+j) (low) and B(2i+1, 16p+j) (high), Kh = ceil(K/2),
 * zeros past K and M. Forward W^T (W (M,K)): rs = 1, cs = K; W itself (dX = dy W): rs = K,
 * cs = 1. */
void sf_bf16_pack_b(uint32_t *pack, const float *b, int64_t rs, int64_t cs, int64_t K,
                    int64_t M, int n_threads);
/* Pack A (N x K), element (r, k) at src[r*rs + k*cs], into rows of ceil(K/2) words (row r at
 * a + r*lda, lda >= ceil(K/2)); a zero pad half past an odd K. */
void sf_bf16_pack_a(uint32_t *a, int64_t lda, const float *src, int64_t rs, int64_t cs,
                    int64_t N, int64_t K, int n_threads);
/* y (N x M, row stride ldy) = A (packed rows) . B (packed panels) + bias (M, may be NULL),
 * or y += A.B when accumulate (bias ignored). Each element is one chain in the order above,
 * run by one thread: the same bits for any thread count, for any row alone or in a batch, and
 * on the native and the emulated kernel. */
void sf_bf16_gemm(float *y, int64_t ldy, const uint32_t *a, int64_t lda, const uint32_t *b,
                  const float *bias, int64_t N, int64_t K, int64_t M, int accumulate,
                  int n_threads);

/* Which kernel sf_bf16_gemm runs: 1 native AVX512_BF16 (vdpbf16ps), 0 emulated (AVX2/FMA or
 * portable C). STACKFORMER_NO_BF16=1 (or STACKFORMER_NO_AVX512=1) in the environment forces
 * the emulated kernel. */
int sf_bf16_native(void);
/* 1 when this CPU has AVX512_BF16 (whatever STACKFORMER_NO_BF16 says). */
int sf_bf16_cpu_has_native(void);
/* The CPU has it and its results passed the once-per-process bit-for-bit probe against the
 * scalar model (only then does sf_bf16_native() pick it). */
int sf_bf16_native_usable(void);
/* Tests: run sf_bf16_gemm on a chosen kernel: 0 emulated (AVX2 where the CPU has it), 1
 * native (only where sf_bf16_cpu_has_native), 2 the scalar model below (portable). */
void sf_bf16_gemm_path(int path, float *y, int64_t ldy, const uint32_t *a, int64_t lda,
                       const uint32_t *b, const float *bias, int64_t N, int64_t K, int64_t M,
                       int accumulate, int n_threads);
/* One step of the chain, in portable C with no help from the FPU's modes: the exact value
 * a*b + c (DAZ on a, b, c) computed in double with an error-free sum, rounded once to fp32,
 * then flushed to zero when tiny after rounding. The reference every kernel is tested against. */
float sf_bf16_fma_model(float a, float b, float c);

/* ---- for kernels that tile their own products (attention's QK^T, PV and their gradients) ----
 * The kernel bf16 products run on now: sf_bf16_native() ? 1 : 0 (2, the scalar model, where
 * there is no AVX2/FMA), unless a test forced one with sf_bf16_force_path (-1: automatic). */
int sf_bf16_path(void);
void sf_bf16_force_path(int path);
/* Rows per register tile on a path (8 native, 6 emulated / model). */
int sf_bf16_path_mr(int path);
/* Single-threaded sf_bf16_gemm on `path`: y (N x M, row stride ldy) (=|+=) A . B where A is N
 * packed rows (row r at a + r*lda, its first Kh words used) and B packed panels whose panel p
 * starts at b + p*pstride words (its first Kh pairs used: a pair-prefix of a panel is a panel
 * of a shorter reduction). No bias. Each element one chain, as sf_bf16_gemm. */
void sf_bf16_rows(int path, float *y, int64_t ldy, const uint32_t *a, int64_t lda, const uint32_t *b,
                  int64_t pstride, int64_t N, int64_t Kh, int64_t M, int accumulate);
/* The same chains without packing, for a single row (decoding): out[j] = the chain from 0 over
 * the K elements of a and of row j of B (b + j*b_rs), j < n; and y[e] = the chain from 0 over
 * the n elements of p and column e of V (v + u*v_rs + e), e < M. Operands rounded with
 * sf_bf16_from_f32; an odd length gets the zero pad half, as packed. Same bits as
 * sf_bf16_rows on every path (path 2: the scalar model). */
void sf_bf16_dots(int path, float *out, const float *a, const float *b, int64_t b_rs, int64_t n,
                  int64_t K);
void sf_bf16_combine(int path, float *y, const float *p, const float *v, int64_t v_rs, int64_t n,
                     int64_t M);

#endif
