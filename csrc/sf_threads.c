#define _POSIX_C_SOURCE 200809L
/* stackformer threads: how many the parallel kernels use, and what a forked child may use.
 *
 * GNU OpenMP's thread pool does not survive fork(): the child inherits the pool's bookkeeping
 * but not its threads, so the child's first parallel region of more than one thread waits
 * forever for workers that do not exist (and libgomp offers no way to re-create the pool).
 * A region of one thread never touches the pool. So a pthread_atfork child handler makes a
 * child single-threaded when its parent had asked for a team (g_team_used); a child of a
 * process that never ran a team keeps the full thread count. Results are the same bits for
 * any thread count, so the child computes what the parent would. The parent's hot path pays
 * one relaxed load of g_team_used per sf_threads_resolve (already taken, no store: a plain
 * mov and a predicted branch). */
#include "sf_kernels.h"
#include "sf_internal.h"

#include <pthread.h>
#include <stdatomic.h>

static int g_num_threads = 0; /* 0: ask OpenMP (OMP_NUM_THREADS or the core count) */
static atomic_int g_team_used;     /* this process asked for a team of > 1 threads */
static atomic_int g_single;        /* forked after a team ran: one thread from now on */

void sf_set_num_threads(int n) { g_num_threads = n > 0 ? n : 0; }

static int base_num_threads(void) {
    if (g_num_threads > 0) return g_num_threads;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int sf_get_num_threads(void) {
    return atomic_load_explicit(&g_single, memory_order_relaxed) ? 1 : base_num_threads();
}

int sf_threads_resolve(int n_threads) {
    int n = n_threads > 0 ? n_threads : base_num_threads();
    if (n > 1) {
        if (atomic_load_explicit(&g_single, memory_order_relaxed)) return 1;
        if (!atomic_load_explicit(&g_team_used, memory_order_relaxed))
            atomic_store_explicit(&g_team_used, 1, memory_order_relaxed);
    }
    return n;
}

int sf_threads_forked_single(void) { return atomic_load_explicit(&g_single, memory_order_relaxed); }

static void atfork_child(void) {
    if (atomic_load_explicit(&g_team_used, memory_order_relaxed))
        atomic_store_explicit(&g_single, 1, memory_order_relaxed);
    sf_models_after_fork(); /* the parent's other threads are gone: so are their guards */
}

static void atfork_prepare(void) { sf_models_registry_lock(); }
static void atfork_parent(void) { sf_models_registry_unlock(); }

/* registered when the library loads, before any model or team exists */
__attribute__((constructor)) static void sf_threads_init(void) {
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}
