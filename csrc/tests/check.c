/* The check framework's state: counters, the failure printer and the tests' RNG. */
#include "check.h"

long g_checks = 0, g_failed = 0;

void check_failed(const char *file, int line, const char *expr, const char *fmt, ...) {
    g_failed++;
    if (g_failed > MAX_PRINTED) {
        if (g_failed == MAX_PRINTED + 1) printf("... (further failures are counted, not printed)\n");
        return;
    }
    printf("%s:%d: CHECK(%s) failed: ", file, line, expr);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
}


uint64_t g_rng = 0x9E3779B97F4A7C15ull;
double urand(void) { /* xorshift64*, uniform [0, 1) */
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return (double)((g_rng * 0x2545F4914F6CDD1Dull) >> 11) * (1.0 / 9007199254740992.0);
}
