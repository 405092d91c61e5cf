/* stackformer C core: the library's own tests (this file runs the groups; each
 * tests/test_*.c holds one feature's).
 *
 * Every kernel is compared with a plain double-precision loop written here from the contract in
 * sf_kernels.h / sf_internal.h / DEVELOPERS.md (never with another optimized kernel), and the
 * model-level API is checked for the properties it promises: validation with messages, the
 * parameter table layout, finite outputs, causality, padding, thread-count determinism, the
 * equivalences between AttnRes schedules, and cached decoding = one full pass.
 *
 *   make -C csrc test    build and run
 *   make -C csrc asan    the same under AddressSanitizer + UndefinedBehaviorSanitizer
 *
 * Buffers are allocated at exactly their documented sizes so the sanitizer build catches any
 * out-of-bounds access. Each CHECK counts; a failure prints file:line and the values involved;
 * main returns 1 when anything failed.
 */
#include "check.h"

int main(void) {
    struct { const char *name; void (*fn)(void); } tests[] = {
        {"matmul", test_matmul},
        {"gemm", test_gemm},
        {"blas backend", test_blas_backend},
        {"norms", test_norms},
        {"activations", test_activations},
        {"rope", test_rope},
        {"attention", test_attention},
        {"attnres", test_attnres},
        {"config validation", test_config_validation},
        {"tensor table", test_tensor_table},
        {"forward variants", test_forward_variants},
        {"block S=1 is full", test_block_s1_is_full},
        {"traces", test_traces},
        {"trace activations", test_trace_activations},
        {"forward threads", test_forward_threads},
        {"kv cache", test_cache},
        {"forward errors", test_forward_errors},
        {"wirings", test_wirings},
        {"bf16", test_bf16},
        {"faults", test_faults},
    };
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        long c0 = g_checks, f0 = g_failed;
        tests[i].fn();
        printf("%-20s %6ld checks, %ld failed\n", tests[i].name, g_checks - c0, g_failed - f0);
    }
    printf("%ld checks, %ld failed\n", g_checks, g_failed);
    return g_failed ? 1 : 0;
}
