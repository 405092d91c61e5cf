/* fp32 FMA-throughput probe for benchmarks/bench.py (built at run time with
 *   cc -O2 -mavx2 -mfma -shared -fPIC -pthread peak.c -o libpeak.so).
 * Each thread runs NACC independent accumulator chains of vector FMAs, enough to cover
 * FMA latency x FMA ports on current x86 cores, so the loop is throughput-bound.
 * peak_gflops(kind, threads, iters) -> GFLOP/s (2 flops per lane per FMA); kind 0 = AVX2
 * (8 lanes), 1 = AVX-512 (16 lanes, only if the CPU has avx512f), 2 = AVX512_BF16's
 * vdpbf16ps (16 fp32 lanes, each += two bf16 products: 4 flops per lane per instruction; only
 * if the CPU has avx512_bf16) -- the ceiling of a bf16 product with fp32 accumulation. Threads start together on
 * a barrier; time is wall time from the barrier to the last thread's finish. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NACC 12

__attribute__((noinline)) static float fma_avx2(int64_t iters) {
    __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-6f);
    __m256 a0 = _mm256_set1_ps(1.0f), a1 = _mm256_set1_ps(1.1f), a2 = _mm256_set1_ps(1.2f),
           a3 = _mm256_set1_ps(1.3f), a4 = _mm256_set1_ps(1.4f), a5 = _mm256_set1_ps(1.5f),
           a6 = _mm256_set1_ps(1.6f), a7 = _mm256_set1_ps(1.7f), a8 = _mm256_set1_ps(1.8f),
           a9 = _mm256_set1_ps(1.9f), a10 = _mm256_set1_ps(2.0f), a11 = _mm256_set1_ps(2.1f);
    for (int64_t i = 0; i < iters; i++) {
        a0 = _mm256_fmadd_ps(a0, m, c); a1 = _mm256_fmadd_ps(a1, m, c);
        a2 = _mm256_fmadd_ps(a2, m, c); a3 = _mm256_fmadd_ps(a3, m, c);
        a4 = _mm256_fmadd_ps(a4, m, c); a5 = _mm256_fmadd_ps(a5, m, c);
        a6 = _mm256_fmadd_ps(a6, m, c); a7 = _mm256_fmadd_ps(a7, m, c);
        a8 = _mm256_fmadd_ps(a8, m, c); a9 = _mm256_fmadd_ps(a9, m, c);
        a10 = _mm256_fmadd_ps(a10, m, c); a11 = _mm256_fmadd_ps(a11, m, c);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                             _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    float out[8];
    _mm256_storeu_ps(out, s);
    return out[0] + out[7];
}

__attribute__((target("avx512f"), noinline)) static float fma_avx512(int64_t iters) {
    __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-6f);
    __m512 a0 = _mm512_set1_ps(1.0f), a1 = _mm512_set1_ps(1.1f), a2 = _mm512_set1_ps(1.2f),
           a3 = _mm512_set1_ps(1.3f), a4 = _mm512_set1_ps(1.4f), a5 = _mm512_set1_ps(1.5f),
           a6 = _mm512_set1_ps(1.6f), a7 = _mm512_set1_ps(1.7f), a8 = _mm512_set1_ps(1.8f),
           a9 = _mm512_set1_ps(1.9f), a10 = _mm512_set1_ps(2.0f), a11 = _mm512_set1_ps(2.1f);
    for (int64_t i = 0; i < iters; i++) {
        a0 = _mm512_fmadd_ps(a0, m, c); a1 = _mm512_fmadd_ps(a1, m, c);
        a2 = _mm512_fmadd_ps(a2, m, c); a3 = _mm512_fmadd_ps(a3, m, c);
        a4 = _mm512_fmadd_ps(a4, m, c); a5 = _mm512_fmadd_ps(a5, m, c);
        a6 = _mm512_fmadd_ps(a6, m, c); a7 = _mm512_fmadd_ps(a7, m, c);
        a8 = _mm512_fmadd_ps(a8, m, c); a9 = _mm512_fmadd_ps(a9, m, c);
        a10 = _mm512_fmadd_ps(a10, m, c); a11 = _mm512_fmadd_ps(a11, m, c);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
    return _mm512_reduce_add_ps(s);
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10)
#define PEAK_HAVE_BF16 1
__attribute__((target("avx512f,avx512bf16"), noinline)) static float dp_bf16(int64_t iters) {
    /* bf16 operands are two per 32-bit lane; 1.0 and a small value as bf16 pairs */
    __m512bh m = (__m512bh)_mm512_set1_epi32(0x3f803f80), c = (__m512bh)_mm512_set1_epi32(0x33803380);
    __m512 a0 = _mm512_set1_ps(1.0f), a1 = _mm512_set1_ps(1.1f), a2 = _mm512_set1_ps(1.2f),
           a3 = _mm512_set1_ps(1.3f), a4 = _mm512_set1_ps(1.4f), a5 = _mm512_set1_ps(1.5f),
           a6 = _mm512_set1_ps(1.6f), a7 = _mm512_set1_ps(1.7f), a8 = _mm512_set1_ps(1.8f),
           a9 = _mm512_set1_ps(1.9f), a10 = _mm512_set1_ps(2.0f), a11 = _mm512_set1_ps(2.1f);
    for (int64_t i = 0; i < iters; i++) {
        a0 = _mm512_dpbf16_ps(a0, m, c); a1 = _mm512_dpbf16_ps(a1, m, c);
        a2 = _mm512_dpbf16_ps(a2, m, c); a3 = _mm512_dpbf16_ps(a3, m, c);
        a4 = _mm512_dpbf16_ps(a4, m, c); a5 = _mm512_dpbf16_ps(a5, m, c);
        a6 = _mm512_dpbf16_ps(a6, m, c); a7 = _mm512_dpbf16_ps(a7, m, c);
        a8 = _mm512_dpbf16_ps(a8, m, c); a9 = _mm512_dpbf16_ps(a9, m, c);
        a10 = _mm512_dpbf16_ps(a10, m, c); a11 = _mm512_dpbf16_ps(a11, m, c);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
    return _mm512_reduce_add_ps(s);
}
int peak_has_avx512_bf16(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
}
#else
static float dp_bf16(int64_t iters) { (void)iters; return 0.0f; }
int peak_has_avx512_bf16(void) { return 0; }
#endif

int peak_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}
int peak_has_avx2_fma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
/* flops per instruction / 2: lanes x products per lane */
static int lanes(int kind) { return kind == 2 ? 32 : kind == 1 ? 16 : 8; }
static float run_kind(int kind, int64_t iters) {
    return kind == 2 ? dp_bf16(iters) : kind == 1 ? fma_avx512(iters) : fma_avx2(iters);
}
#else
#define NACC 1
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10)
#define PEAK_HAVE_BF16 1
__attribute__((target("avx512f,avx512bf16"), noinline)) static float dp_bf16(int64_t iters) {
    /* bf16 operands are two per 32-bit lane; 1.0 and a small value as bf16 pairs */
    __m512bh m = (__m512bh)_mm512_set1_epi32(0x3f803f80), c = (__m512bh)_mm512_set1_epi32(0x33803380);
    __m512 a0 = _mm512_set1_ps(1.0f), a1 = _mm512_set1_ps(1.1f), a2 = _mm512_set1_ps(1.2f),
           a3 = _mm512_set1_ps(1.3f), a4 = _mm512_set1_ps(1.4f), a5 = _mm512_set1_ps(1.5f),
           a6 = _mm512_set1_ps(1.6f), a7 = _mm512_set1_ps(1.7f), a8 = _mm512_set1_ps(1.8f),
           a9 = _mm512_set1_ps(1.9f), a10 = _mm512_set1_ps(2.0f), a11 = _mm512_set1_ps(2.1f);
    for (int64_t i = 0; i < iters; i++) {
        a0 = _mm512_dpbf16_ps(a0, m, c); a1 = _mm512_dpbf16_ps(a1, m, c);
        a2 = _mm512_dpbf16_ps(a2, m, c); a3 = _mm512_dpbf16_ps(a3, m, c);
        a4 = _mm512_dpbf16_ps(a4, m, c); a5 = _mm512_dpbf16_ps(a5, m, c);
        a6 = _mm512_dpbf16_ps(a6, m, c); a7 = _mm512_dpbf16_ps(a7, m, c);
        a8 = _mm512_dpbf16_ps(a8, m, c); a9 = _mm512_dpbf16_ps(a9, m, c);
        a10 = _mm512_dpbf16_ps(a10, m, c); a11 = _mm512_dpbf16_ps(a11, m, c);
    }
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                             _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
    return _mm512_reduce_add_ps(s);
}
int peak_has_avx512_bf16(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
}
#else
static float dp_bf16(int64_t iters) { (void)iters; return 0.0f; }
int peak_has_avx512_bf16(void) { return 0; }
#endif

int peak_has_avx512(void) { return 0; }
int peak_has_avx2_fma(void) { return 0; }
static int lanes(int kind) { return 1; }
static float run_kind(int kind, int64_t iters) {
    volatile float a = 1.0f;
    for (int64_t i = 0; i < iters; i++) a = a * 0.999999f + 1e-6f;
    return a;
}
#endif

typedef struct {
    int kind;
    int64_t iters;
    pthread_barrier_t *bar;
    float sink;
    double t0, t1;
} job;

static volatile float g_sink;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* Each thread stamps its own start and end: the span is first start .. last end, so a
 * caller thread that is descheduled after the barrier cannot shrink the measured time. */
static void *worker(void *p) {
    job *j = p;
    pthread_barrier_wait(j->bar);
    j->t0 = now();
    j->sink = run_kind(j->kind, j->iters);
    j->t1 = now();
    return NULL;
}

/* GFLOP/s of `threads` threads each running `iters` loop iterations; -1 on error. */
double peak_gflops(int kind, int threads, int64_t iters) {
    if (threads < 1 || threads > 1024) return -1.0;
    pthread_t tid[1024];
    job jobs[1024];
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, (unsigned)threads + 1);
    for (int t = 0; t < threads; t++) {
        jobs[t].kind = kind; jobs[t].iters = iters; jobs[t].bar = &bar;
        if (pthread_create(&tid[t], NULL, worker, &jobs[t]) != 0) return -1.0;
    }
    pthread_barrier_wait(&bar);
    for (int t = 0; t < threads; t++) pthread_join(tid[t], NULL);
    double t0 = jobs[0].t0, t1 = jobs[0].t1;
    for (int t = 1; t < threads; t++) {
        if (jobs[t].t0 < t0) t0 = jobs[t].t0;
        if (jobs[t].t1 > t1) t1 = jobs[t].t1;
    }
    double dt = t1 - t0;
    pthread_barrier_destroy(&bar);
    if (dt <= 0) return -1.0;
    for (int t = 0; t < threads; t++) g_sink += jobs[t].sink;
    double flops = (double)threads * (double)iters * NACC * lanes(kind) * 2.0;
    return flops / dt / 1e9;
}
