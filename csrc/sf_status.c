#define _POSIX_C_SOURCE 200809L
/* Status codes, error messages, checked size arithmetic and the memory limit. */
#include "sf_internal.h"
#include "sf_kernels.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <unistd.h>

const char *sf_status_name(sf_status s) {
    switch (s) {
    case SF_OK: return "ok";
    case SF_ERR_INVALID_CONFIG: return "invalid config";
    case SF_ERR_INVALID_ARG: return "invalid argument";
    case SF_ERR_NOMEM: return "out of memory";
    case SF_ERR_OVERFLOW: return "size overflow";
    case SF_ERR_TOKEN_RANGE: return "token id out of range";
    case SF_ERR_NONFINITE: return "non-finite value";
    case SF_ERR_BUSY: return "model busy";
    case SF_ERR_INTERRUPTED: return "interrupted";
    }
    return "unknown status";
}

sf_status sf_fail(char *err, size_t errlen, sf_status st, const char *fmt, ...) {
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return st;
}

/* The first number in a cgroup limit file ("max" or unreadable: none, -1). */
static int64_t limit_file(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char buf[64] = {0};
    const int ok = fgets(buf, sizeof buf, f) != NULL;
    fclose(f);
    if (!ok || strncmp(buf, "max", 3) == 0) return -1;
    char *end = NULL;
    const long long v = strtoll(buf, &end, 10);
    return end != buf && v > 0 ? (int64_t)v : -1;
}

int64_t sf_cgroup_limit_bytes(const char *root, const char *self_cgroup) {
    int64_t best = -1;
    char path[4096];
    /* cgroup v1: the memory controller's own hierarchy */
    snprintf(path, sizeof path, "%s/memory/memory.limit_in_bytes", root);
    best = limit_file(path);
    /* cgroup v2: this process's group ("0::/a/b" in /proc/self/cgroup) and every ancestor,
     * each of which caps it; the root's own file, where a container mounts its group there */
    char grp[2400] = "";
    FILE *f = fopen(self_cgroup, "r");
    if (f) {
        char line[2304];
        while (fgets(line, sizeof line, f))
            if (strncmp(line, "0::", 3) == 0) {
                snprintf(grp, sizeof grp, "%s", line + 3);
                grp[strcspn(grp, "\n")] = '\0';
                break;
            }
        fclose(f);
    }
    for (;;) { /* "/a/b", then "/a", then "" (the root) */
        snprintf(path, sizeof path, "%s%s/memory.max", root, grp);
        const int64_t v = limit_file(path);
        if (v > 0 && (best < 0 || v < best)) best = v;
        char *slash = grp[0] ? strrchr(grp, '/') : NULL;
        if (!slash) break;
        *slash = '\0';
    }
    return best;
}

/* What one process may allocate: physical memory, lowered by this process's cgroup limit
 * (a container's memory.max; exceeding it is an OOM kill, not a failed malloc) and by
 * STACKFORMER_MEMORY_LIMIT (bytes) when set. Allocations beyond it are refused up front with
 * SF_ERR_NOMEM: with overcommit a huge malloc "succeeds" and the process dies later. The
 * cgroup files are read once per process. */
int64_t sf_memory_limit_bytes(void) {
    static _Atomic int64_t cached = 0;
    int64_t lim = atomic_load_explicit(&cached, memory_order_relaxed);
    if (lim == 0) {
        lim = (int64_t)1 << 40;
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
        long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
        if (pages > 0 && size > 0) lim = (int64_t)pages * (int64_t)size;
#endif
        const int64_t cg = sf_cgroup_limit_bytes("/sys/fs/cgroup", "/proc/self/cgroup");
        if (cg > 0 && cg < lim) lim = cg;
        atomic_store_explicit(&cached, lim, memory_order_relaxed);
    }
    const char *env = getenv("STACKFORMER_MEMORY_LIMIT");
    if (env && *env) {
        char *end = NULL;
        const long long v = strtoll(env, &end, 10);
        if (end != env && *end == '\0' && v > 0 && v < lim) lim = (int64_t)v;
    }
    return lim;
}

int sf_mul_ok(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0) return 1;
    if (a != 0 && b > INT64_MAX / a) return 1;
    *out = a * b;
    return 0;
}

int sf_add_ok(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0 || a > INT64_MAX - b) return 1;
    *out = a + b;
    return 0;
}
