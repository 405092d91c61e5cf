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
 * mov and a predicted branch).
 *
 * libgomp ends the process ("libgomp: Thread creation failed", exit status 1) when it cannot
 * start a team's threads (RLIMIT_NPROC, memory for their stacks, a container's pids.max). So
 * before a team larger than any this process has run, sf_threads_resolve starts the same
 * number of threads itself, with the default stack libgomp also uses, waits until all exist and
 * lets them go: if only k+1 can exist at once, teams are capped at k+1 from then on (bits do not
 * depend on the thread count, so results are unchanged; sf_threads_capped says what happened).
 * Once per new team size per process; the parent's hot path is one more relaxed load. The
 * probe covers one team at a time: several Python threads each running a team need a team's
 * threads each. */
#include "sf_kernels.h"
#include "sf_internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

static int g_num_threads = 0; /* 0: ask OpenMP (OMP_NUM_THREADS or the core count) */
static atomic_int g_team_used;     /* this process asked for a team of > 1 threads */
static atomic_int g_single;        /* forked after a team ran: one thread from now on */
static atomic_int g_team_ok = 1;   /* the largest team this process has seen it can start */
static atomic_int g_team_cap;      /* > 0: teams capped here after a failed probe */
static char g_cap_note[160];       /* why, for sf_threads_capped (written once under g_probe) */
static pthread_mutex_t g_probe = PTHREAD_MUTEX_INITIALIZER;

void sf_set_num_threads(int n) { g_num_threads = n > 0 ? n : 0; }

/* ---- can a team of n threads start? ------------------------------------------------------ */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int go;
} probe_gate;

static void *probe_thread(void *arg) {
    probe_gate *g = arg;
    pthread_mutex_lock(&g->mu);
    while (!g->go) pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
    return NULL;
}

/* How many threads of a team of n (this one included) can exist at once: n, or fewer when
 * pthread_create fails on the (k+1)-th helper (errno in *why). */
static int probe_team(int n, int *why) {
    enum { MAX = 1024 };
    pthread_t tid[MAX];
    probe_gate g = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
    int made = 0;
    *why = 0;
    if (n > MAX) n = MAX;
    while (made < n - 1) {
        const int e = pthread_create(&tid[made], NULL, probe_thread, &g);
        if (e) { *why = e; break; }
        made++;
    }
    pthread_mutex_lock(&g.mu);
    g.go = 1;
    pthread_cond_broadcast(&g.cv);
    pthread_mutex_unlock(&g.mu);
    for (int i = 0; i < made; i++) pthread_join(tid[i], NULL);
    return made + 1;
}

/* n, or the cap after a failed probe; probes a team size larger than any seen so far */
static int team_allowed(int n) {
    if (n <= atomic_load_explicit(&g_team_ok, memory_order_relaxed)) return n;
    const int cap = atomic_load_explicit(&g_team_cap, memory_order_relaxed);
    if (cap > 0) return n < cap ? n : cap;
    pthread_mutex_lock(&g_probe);
    int out = n;
    if (n > atomic_load_explicit(&g_team_ok, memory_order_relaxed) &&
        atomic_load_explicit(&g_team_cap, memory_order_relaxed) == 0) {
        int why = 0;
        const int got = probe_team(n, &why);
        if (got < n) {
            snprintf(g_cap_note, sizeof g_cap_note, "could start only %d of %d threads (%s); running on %d",
                     got, n, strerror(why), got);
            atomic_store_explicit(&g_team_cap, got, memory_order_relaxed);
            out = got;
        }
        atomic_store_explicit(&g_team_ok, got, memory_order_relaxed);
    } else {
        const int c = atomic_load_explicit(&g_team_cap, memory_order_relaxed);
        if (c > 0 && c < n) out = c;
    }
    pthread_mutex_unlock(&g_probe);
    return out;
}

const char *sf_threads_capped(void) {
    return atomic_load_explicit(&g_team_cap, memory_order_relaxed) > 0 ? g_cap_note : NULL;
}

static int base_num_threads(void) {
    if (g_num_threads > 0) return g_num_threads;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int sf_get_num_threads(void) {
    if (atomic_load_explicit(&g_single, memory_order_relaxed)) return 1;
    const int n = base_num_threads(), cap = atomic_load_explicit(&g_team_cap, memory_order_relaxed);
    return cap > 0 && cap < n ? cap : n;
}

int sf_threads_resolve(int n_threads) {
    int n = n_threads > 0 ? n_threads : base_num_threads();
    if (n > 1) {
        if (atomic_load_explicit(&g_single, memory_order_relaxed)) return 1;
        if (!atomic_load_explicit(&g_team_used, memory_order_relaxed))
            atomic_store_explicit(&g_team_used, 1, memory_order_relaxed);
        n = team_allowed(n);
    }
    return n;
}

int sf_threads_forked_single(void) { return atomic_load_explicit(&g_single, memory_order_relaxed); }

static void atfork_child(void) {
    if (atomic_load_explicit(&g_team_used, memory_order_relaxed))
        atomic_store_explicit(&g_single, 1, memory_order_relaxed);
    sf_models_after_fork(); /* the parent's other threads are gone: so are their guards */
    pthread_mutex_init(&g_probe, NULL); /* ... and a probe one of them may have been running */
}

static void atfork_prepare(void) { sf_models_registry_lock(); }
static void atfork_parent(void) { sf_models_registry_unlock(); }

/* registered when the library loads, before any model or team exists */
__attribute__((constructor)) static void sf_threads_init(void) {
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}
