/* CPU features and the attributes that compile a kernel's 512-bit clone (private). */
#ifndef SF_CPU_H
#define SF_CPU_H

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SF_X86 1
#endif

/* 1 when the CPU has AVX2 and FMA (STACKFORMER_NO_AVX2=1 says 0, to test the generic paths)
 * and when it also has AVX-512F (STACKFORMER_NO_AVX512=1 says 0: the same bits on the AVX2
 * tiles).
 * Inline so the per-row checks in hot loops cost a load, as when this was one file's static. */
#include <stdatomic.h>
extern _Atomic int sf_cpu_avx2_fma_flag, sf_cpu_avx512_flag; /* -1 until asked */
int sf_cpu_detect_avx2_fma(void);
int sf_cpu_detect_avx512(void);
static inline int sf_cpu_avx2_fma(void) {
    int have = atomic_load_explicit(&sf_cpu_avx2_fma_flag, memory_order_relaxed);
    return have >= 0 ? have : sf_cpu_detect_avx2_fma();
}
static inline int sf_cpu_avx512(void) {
    int have = atomic_load_explicit(&sf_cpu_avx512_flag, memory_order_relaxed);
    return have >= 0 ? have : sf_cpu_detect_avx512();
}

#ifdef SF_X86
/* Element-wise loops compiled again for 512-bit vectors: the same operations per element (the
 * same bits), with half the instructions of the AVX2 loop. */
#if defined(__clang__)
#define SF_TARGET_AVX512_WIDE __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw"), min_vector_width(512)))
#else
#define SF_TARGET_AVX512_WIDE __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,prefer-vector-width=512")))
#endif
/* the 512-bit clone's call where the CPU allows it, else the plain body's */
#define SF_WIDE_OR(wide_call, plain_call) \
    do { if (sf_cpu_avx512()) wide_call; else plain_call; } while (0)
#else
#define SF_WIDE_OR(wide_call, plain_call) plain_call
#endif

#endif
