/* What this CPU can run, asked once (the answers are cached). */
#include "sf_cpu.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

_Atomic int sf_cpu_avx2_fma_flag = -1, sf_cpu_avx512_flag = -1;

#ifdef SF_X86
/* STACKFORMER_NO_AVX2=1 in the environment makes the kernels take their generic paths, as on a
 * CPU without AVX2/FMA (so those paths can be tested on any machine). */
int sf_cpu_detect_avx2_fma(void) {
    /* atomic: the first calls can come from several threads at once (all store the same) */
    int have = atomic_load_explicit(&sf_cpu_avx2_fma_flag, memory_order_relaxed);
    if (have < 0) {
        const char *off = getenv("STACKFORMER_NO_AVX2");
        __builtin_cpu_init();
        have = !(off && strcmp(off, "1") == 0) && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma");
        atomic_store_explicit(&sf_cpu_avx2_fma_flag, have, memory_order_relaxed);
    }
    return have;
}

/* STACKFORMER_NO_AVX512=1 keeps the products on the AVX2 tiles (same bits, so tests compare
 * the two paths on one machine). */
int sf_cpu_detect_avx512(void) {
    int have = atomic_load_explicit(&sf_cpu_avx512_flag, memory_order_relaxed);
    if (have < 0) {
        const char *off = getenv("STACKFORMER_NO_AVX512");
        __builtin_cpu_init();
        have = sf_cpu_avx2_fma() && !(off && strcmp(off, "1") == 0) && __builtin_cpu_supports("avx512f");
        atomic_store_explicit(&sf_cpu_avx512_flag, have, memory_order_relaxed);
    }
    return have;
}
#else
int sf_cpu_detect_avx2_fma(void) { atomic_store(&sf_cpu_avx2_fma_flag, 0); return 0; }
int sf_cpu_detect_avx512(void) { atomic_store(&sf_cpu_avx512_flag, 0); return 0; }
#endif
