/* stackformer C tests: the shared check framework and helpers (check.c defines the counters,
 * check_failed and the RNG; everything else is inline here). Each tests/test_*.c file holds
 * one feature's tests; test_main.c runs them in order. */
#ifndef SF_TESTS_CHECK_H
#define SF_TESTS_CHECK_H
#include "sf.h"
#include "sf_internal.h"
#include "sf_kernels.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <string.h>

/* ============================================================================================
 * A tiny check framework
 * ============================================================================================ */

extern long g_checks, g_failed;
enum { MAX_PRINTED = 200 }; /* a broken kernel fails thousands of cases: print the first few */

#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
void check_failed(const char *file, int line, const char *expr, const char *fmt, ...);

/* CHECK(condition, printf-style message with the failing values) */
#define CHECK(cond, ...)                                                                 \
    do {                                                                                 \
        g_checks++;                                                                      \
        if (!(cond)) check_failed(__FILE__, __LINE__, #cond, __VA_ARGS__);               \
    } while (0)

/* The worst element of |got - want| / (atol + rtol |want|); a non-finite got is infinitely bad. */
typedef struct { int64_t i; double ratio; } worst;

static inline worst worst_vs_double(const float *got, const double *want, int64_t n, double atol,
                             double rtol) {
    worst w = {0, 0.0};
    for (int64_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - want[i]);
        double r = isfinite(got[i]) && isfinite(err) ? err / (atol + rtol * fabs(want[i])) : INFINITY;
        if (r > w.ratio) { w.i = i; w.ratio = r; }
    }
    return w;
}

static inline worst worst_vs_float(const float *got, const float *want, int64_t n, double atol,
                            double rtol) {
    worst w = {0, 0.0};
    for (int64_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - (double)want[i]);
        double r = isfinite(got[i]) && isfinite(err) ? err / (atol + rtol * fabs((double)want[i])) : INFINITY;
        if (r > w.ratio) { w.i = i; w.ratio = r; }
    }
    return w;
}

/* got (float) close to want (double) elementwise */
#define CHECK_CLOSE(what, got, want, n, atol, rtol)                                                \
    do {                                                                                           \
        worst w_ = worst_vs_double((got), (want), (n), (atol), (rtol));                           \
        CHECK(w_.ratio <= 1.0, "%s: worst at [%lld]: got %.9g, want %.9g (|err|/tol = %.3g)",     \
              (what), (long long)w_.i, (double)(got)[w_.i], (double)(want)[w_.i], w_.ratio);     \
    } while (0)

/* got (float) close to want (float) elementwise */
#define CHECK_CLOSE_F(what, got, want, n, atol, rtol)                                              \
    do {                                                                                           \
        worst w_ = worst_vs_float((got), (want), (n), (atol), (rtol));                            \
        CHECK(w_.ratio <= 1.0, "%s: worst at [%lld]: got %.9g, want %.9g (|err|/tol = %.3g)",     \
              (what), (long long)w_.i, (double)(got)[w_.i], (double)(want)[w_.i], w_.ratio);     \
    } while (0)

static inline int64_t first_difference(const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0) return i;
    return -1;
}

/* a and b bitwise identical */
#define CHECK_SAME(what, a, b, n)                                                                  \
    do {                                                                                           \
        int64_t d_ = first_difference((a), (b), (n));                                             \
        CHECK(d_ < 0, "%s: first difference at [%lld]: %.9g vs %.9g", (what), (long long)d_,     \
              (double)(a)[d_ < 0 ? 0 : d_], (double)(b)[d_ < 0 ? 0 : d_]);                        \
    } while (0)

static inline int all_finite(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* ============================================================================================
 * Helpers: allocation, a deterministic RNG
 * ============================================================================================ */

static inline void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) { fprintf(stderr, "test_sf: out of memory\n"); exit(2); }
    return p;
}
static inline float *falloc(int64_t n) { return xmalloc((size_t)n * sizeof(float)); }
static inline double *dalloc(int64_t n) { return xmalloc((size_t)n * sizeof(double)); }
static inline float *fdup(const float *x, int64_t n) {
    float *p = falloc(n);
    memcpy(p, x, (size_t)n * sizeof(float));
    return p;
}

extern uint64_t g_rng;
double urand(void); /* xorshift64*, uniform [0, 1) */
static inline float frand(float lo, float hi) { return lo + (hi - lo) * (float)urand(); }
static inline void fill(float *x, int64_t n, float lo, float hi) {
    for (int64_t i = 0; i < n; i++) x[i] = frand(lo, hi);
}

/* the test groups, one feature per file */
void test_matmul(void);
void test_gemm(void);
void test_blas_backend(void);
void test_norms(void);
void test_activations(void);
void test_rope(void);
void test_attention(void);
void test_attnres(void);
void test_config_validation(void);
void test_tensor_table(void);
void test_forward_variants(void);
void test_block_s1_is_full(void);
void test_traces(void);
void test_trace_activations(void);
void test_forward_threads(void);
void test_cache(void);
void test_forward_errors(void);
void test_wirings(void);
void test_bf16(void);
void test_faults(void);

/* model-level helpers (test_model.c), shared with test_wirings.c */
sf_model *make_model(const sf_config *c, uint64_t seed, const char *label);
void random_tokens(int32_t *tok, int64_t n, int64_t V);
int ends_with(const char *s, const char *suffix);
void check_forward_config(const sf_config *c, const char *name);
void check_cache_config(const sf_config *c, const char *name);

#endif
