#define _POSIX_C_SOURCE 200809L
/* Status codes, error messages, checked size arithmetic and the memory limit. */
#include "sf_internal.h"
#include "sf_kernels.h"

#include <stdarg.h>
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

/* Allocations larger than the machine's physical memory are refused up front with
 * SF_ERR_NOMEM: with overcommit a huge malloc "succeeds" and the process dies later. */
int64_t sf_memory_limit_bytes(void) {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
    if (pages > 0 && size > 0) return (int64_t)pages * (int64_t)size;
#endif
    return (int64_t)1 << 40;
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
