/* stackformer threads: how many the parallel kernels use. */
#include "sf_kernels.h"
#include "sf_internal.h"

static int g_num_threads = 0; /* 0: ask OpenMP (OMP_NUM_THREADS or the core count) */

void sf_set_num_threads(int n) { g_num_threads = n > 0 ? n : 0; }

int sf_get_num_threads(void) {
    if (g_num_threads > 0) return g_num_threads;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int sf_threads_resolve(int n_threads) { return n_threads > 0 ? n_threads : sf_get_num_threads(); }
