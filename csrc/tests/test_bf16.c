/* bfloat16 products: the conversion, the reference step, and every kernel against them.
 *
 *   conversion      vs an independent RNE written with ilogb / nearbyint in double
 *   model step      vs fmaf (correctly rounded) away from the tiny range; hand-made DAZ/FTZ
 *                   cases (tininess after rounding) at fp32's bottom
 *   emulated kernel vs the model, bit for bit (shapes with edges, odd K, bias, accumulate,
 *                   1-3 threads, operands whose products land on fp32's bottom)
 *   native kernel   vs the emulated one, bit for bit (only where the CPU has AVX512_BF16)
 *   error bound     |y - exact| <= sum|a||b| (2^-7 + 2^-16 + g_K (1 + 2^-7)) + g_K |bias|
 *                   + K 2^-126, g_K = K 2^-24 / (1 - K 2^-24) (docs/SPEED.md derives it)
 * Part of `make -C csrc test` (the "bf16" group). */
#include "check.h"
#include "sf_bf16.h"

/* 32 random bits from the shared RNG (check.c) */
static uint32_t rnd32(void) { return (uint32_t)(urand() * 4294967296.0); }
static float f_of(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
static uint32_t u_of(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static float unif(void) { return (float)((double)rnd32() / 4294967296.0 * 2.0 - 1.0); }

/* ---- conversion ---- */
static float bf16_round_ref(float x) { /* normal x: keep 8 significant bits, ties to even */
    int e = ilogbf(x);
    double q = ldexp((double)x, 7 - e); /* |q| in [128, 256) */
    double r = nearbyint(q);            /* default mode: to nearest, ties to even */
    return (float)ldexp(r, e - 7);      /* may overflow to inf, as RNE must */
}

static void test_conversion(void) {
    for (int t = 0; t < 200000; t++) {
        uint32_t u = rnd32();
        if (t % 4 == 0) u = (u & 0xFFFF0000u) | 0x8000u; /* exact ties */
        float x = f_of(u);
        sf_bf16 h = sf_bf16_from_f32(x);
        float y = sf_bf16_to_f32(h);
        if (isnan(x)) {
            CHECK(isnan(y) && (h & 0x40) && (h >> 15) == (u >> 31), "NaN %08x -> %04x", u, h);
        } else if (isinf(x)) {
            CHECK(u_of(y) == u, "inf %08x -> %04x", u, h);
        } else if (x == 0.0f || fpclassify(x) == FP_SUBNORMAL) {
            CHECK(y == 0.0f && signbit(y) == signbit(x), "denormal/zero %08x -> %04x", u, h);
        } else {
            float r = bf16_round_ref(x);
            CHECK(u_of(y) == u_of(r), "%08x (%g) -> %04x (%g), expected %g", u, x, h, y, r);
        }
    }
    CHECK(sf_bf16_from_f32(1.0f) == 0x3F80, "1.0");
    CHECK(sf_bf16_from_f32(f_of(0x3F808000u)) == 0x3F80, "tie to even (down)");
    CHECK(sf_bf16_from_f32(f_of(0x3F818000u)) == 0x3F82, "tie to even (up)");
    CHECK(sf_bf16_from_f32(f_of(0x7F7FFFFFu)) == 0x7F80, "FLT_MAX rounds to inf");
    CHECK(sf_bf16_from_f32(f_of(0x00800000u)) == 0x0080, "FLT_MIN stays");
}

/* ---- packing: the vector paths against plain loops of sf_bf16_pair, every stride ---- */
static uint32_t ref_pair(const float *src, int64_t rs, int64_t cs, int64_t r, int64_t i, int64_t K) {
    return sf_bf16_pair(src[r * rs + 2 * i * cs], 2 * i + 1 < K ? src[r * rs + (2 * i + 1) * cs] : 0.0f);
}

static void test_packing(void) {
    const int64_t dims[][2] = {{1, 1}, {8, 16}, {9, 17}, {16, 32}, {23, 35}, {40, 64}, {17, 130}};
    for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++) {
        const int64_t R = dims[di][0], K = dims[di][1], Kh = (K + 1) / 2;
        float *src = malloc((size_t)(R * K) * sizeof(float));
        for (int64_t i = 0; i < R * K; i++) { /* ordinary values, ties, and every special */
            uint32_t u = rnd32();
            switch (i % 7) {
                case 0: u = (u & 0xFFFF0000u) | 0x8000u; break;
                case 1: u &= 0x807FFFFFu; break;                 /* zero / denormal */
                case 2: u = (u & 0x80000000u) | 0x7F800000u | (u & 0x7Fu); break; /* inf / NaN */
                default: u = (u & 0xBFFFFFFFu) | 0x30000000u; break;
            }
            src[i] = f_of(u);
        }
        uint32_t *a = malloc((size_t)(R * Kh + 8) * sizeof(uint32_t));
        for (int t = 0; t < 2; t++) { /* A rows: row-major (cs 1) and transposed (rs 1) */
            const int64_t rs = t ? 1 : K, cs = t ? R : 1;
            sf_bf16_pack_a(a, Kh, src, rs, cs, R, K, 2);
            long bad = 0;
            for (int64_t r = 0; r < R; r++)
                for (int64_t i = 0; i < Kh; i++) bad += a[r * Kh + i] != ref_pair(src, rs, cs, r, i, K);
            CHECK(bad == 0, "pack_a R=%lld K=%lld rs=%lld cs=%lld: %ld words differ", (long long)R, (long long)K, (long long)rs, (long long)cs, bad);
        }
        /* B (K x M) with M = R columns: unit column stride, and W^T */
        const int64_t M = R;
        uint32_t *b = malloc((size_t)sf_bf16_pack_words(K, M) * sizeof(uint32_t));
        for (int t = 0; t < 2; t++) {
            const int64_t rs = t ? 1 : M, cs = t ? K : 1; /* src viewed as (K x M) or as W (M x K) */
            sf_bf16_pack_b(b, src, rs, cs, K, M, 2);
            long bad = 0;
            for (int64_t p = 0; p * 16 < M; p++)
                for (int64_t i = 0; i < Kh; i++)
                    for (int64_t j = 0; j < 16; j++) {
                        const int64_t col = p * 16 + j;
                        uint32_t want = col < M ? sf_bf16_pair(src[2 * i * rs + col * cs], 2 * i + 1 < K ? src[(2 * i + 1) * rs + col * cs] : 0.0f) : 0u;
                        bad += b[(p * Kh + i) * 16 + j] != want;
                    }
            CHECK(bad == 0, "pack_b K=%lld M=%lld rs=%lld cs=%lld: %ld words differ", (long long)K, (long long)M, (long long)rs, (long long)cs, bad);
        }
        free(src); free(a); free(b);
    }
}

/* ---- the model step ---- */
static void test_model_step(void) {
    /* away from the bottom (and with no denormal input) the model is a correctly rounded fma */
    for (int t = 0; t < 300000; t++) {
        float a = unif() * ldexpf(1.0f, (int)(rnd32() % 40) - 20);
        float b = unif() * ldexpf(1.0f, (int)(rnd32() % 40) - 20);
        float c = unif() * ldexpf(1.0f, (int)(rnd32() % 60) - 30);
        if (t % 3 == 0) c = -a * b * (1.0f + ldexpf(unif(), -20)); /* heavy cancellation */
        float want = fmaf(a, b, c), got = sf_bf16_fma_model(a, b, c);
        if (fabsf(want) >= 0x1p-100f)
            CHECK(u_of(got) == u_of(want), "fma(%a, %a, %a): model %a, fmaf %a", a, b, c, got, want);
    }
    const float m = 0x1p-126f; /* FLT_MIN */
    /* DAZ: denormal inputs read as zero */
    CHECK(sf_bf16_fma_model(0x1p-140f, 1.0f, 1.0f) == 1.0f, "DAZ a");
    CHECK(u_of(sf_bf16_fma_model(1.0f, 1.0f, 0x1p-140f)) == u_of(1.0f), "DAZ c");
    CHECK(sf_bf16_fma_model(1.0f, 0x1p-130f, 0.0f) == 0.0f, "DAZ b -> 0");
    /* FTZ: a tiny result is a signed zero */
    CHECK(u_of(sf_bf16_fma_model(0x1p-70f, 0x1p-60f, 0.0f)) == 0u, "2^-130 -> +0");
    CHECK(u_of(sf_bf16_fma_model(-0x1p-70f, 0x1p-60f, 0.0f)) == 0x80000000u, "-2^-130 -> -0");
    CHECK(sf_bf16_fma_model(0x1p-63f, 0x1p-63f, 0.0f) == m, "2^-126 stays");
    /* the two sides of tininess after rounding: exact value FLT_MIN - 0.375 * 2^-149 rounds
     * (24 bits, unbounded exponent) to FLT_MIN - 2^-150: tiny, 0 (a plain fmaf gives FLT_MIN);
     * FLT_MIN - 0.25 * 2^-150 rounds to FLT_MIN: not tiny, FLT_MIN */
    CHECK(sf_bf16_fma_model(-0x1.8p-76f, 0x1p-75f, m) == 0.0f, "tiny after rounding -> 0 (got %a)",
          sf_bf16_fma_model(-0x1.8p-76f, 0x1p-75f, m));
    CHECK(sf_bf16_fma_model(-0x1p-76f, 0x1p-76f, m) == m, "rounds up to FLT_MIN: kept (got %a)",
          sf_bf16_fma_model(-0x1p-76f, 0x1p-76f, m));
    /* exact cancellation gives +0 (round to nearest) */
    CHECK(u_of(sf_bf16_fma_model(1.5f, 2.0f, -3.0f)) == 0u, "x - x = +0");
    CHECK(isinf(sf_bf16_fma_model(0x1p100f, 0x1p100f, 0.0f)), "overflow -> inf");
}

/* ---- kernels ---- */
typedef struct { int64_t N, K, M; } shape;

/* operands: kind 0 ordinary, 1 products near fp32's bottom (DAZ/FTZ paths), 2 with infs */
static void fill_kind(float *x, int64_t n, int kind) {
    for (int64_t i = 0; i < n; i++) {
        float v = unif();
        if (kind == 1) v = ldexpf(v, -62 - (int)(rnd32() % 3));
        if (kind == 2 && rnd32() % 97 == 0) v = (rnd32() & 1) ? INFINITY : -INFINITY;
        x[i] = v;
    }
}

static int same_bits(const float *a, const float *b, int64_t n, int64_t *where) {
    for (int64_t i = 0; i < n; i++) {
        int both_nan = isnan(a[i]) && isnan(b[i]);
        if (!both_nan && u_of(a[i]) != u_of(b[i])) { *where = i; return 0; }
    }
    return 1;
}

static void run_path(int path, float *y, const uint32_t *a, const uint32_t *b, const float *bias,
                     shape s, int acc, int nt, const float *y0) {
    memcpy(y, y0, (size_t)(s.N * s.M) * sizeof(float));
    sf_bf16_gemm_path(path, y, s.M, a, (s.K + 1) / 2, b, bias, s.N, s.K, s.M, acc, nt);
}

static void test_kernels(void) {
    const shape shapes[] = {{1, 1, 1}, {1, 2, 16}, {5, 7, 17}, {6, 32, 16}, {13, 33, 40},
                            {8, 64, 32}, {17, 128, 47}, {3, 255, 100}, {50, 96, 130}, {9, 1, 33}};
    const int native = sf_bf16_native_usable();
    if (!native)
        printf("  native kernel vs emulated: SKIPPED (%s)\n", sf_bf16_cpu_has_native()
               ? "this CPU's vdpbf16ps failed the bit-for-bit probe: the native kernel is off"
               : "this CPU has no AVX512_BF16; the native tile is compiled but cannot run here");
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int kind = 0; kind < 3; kind++)
            for (int acc = 0; acc < 2; acc++) {
                shape s = shapes[si];
                const int64_t Kh = (s.K + 1) / 2;
                float *x = malloc((size_t)(s.N * s.K) * sizeof(float));
                float *w = malloc((size_t)(s.M * s.K) * sizeof(float));
                float *bias = malloc((size_t)s.M * sizeof(float));
                float *y0 = malloc((size_t)(s.N * s.M) * sizeof(float));
                float *ym = malloc((size_t)(s.N * s.M) * sizeof(float));
                float *ye = malloc((size_t)(s.N * s.M) * sizeof(float));
                uint32_t *a = malloc((size_t)(s.N * Kh) * sizeof(uint32_t));
                uint32_t *b = malloc((size_t)sf_bf16_pack_words(s.K, s.M) * sizeof(uint32_t));
                fill_kind(x, s.N * s.K, kind);
                fill_kind(w, s.M * s.K, kind == 2 ? 0 : kind);
                fill_kind(bias, s.M, 0);
                fill_kind(y0, s.N * s.M, 0);
                if (kind == 1) /* chain starts near the bottom too, some of them denormal */
                    for (int64_t i = 0; i < s.N * s.M; i++) y0[i] = ldexpf(y0[i], -124 - (int)(i % 4));
                sf_bf16_pack_a(a, Kh, x, s.K, 1, s.N, s.K, 1);
                sf_bf16_pack_b(b, w, 1, s.K, s.K, s.M, 1);
                run_path(2, ym, a, b, bias, s, acc, 1, y0);
                int64_t at = 0;
                for (int nt = 1; nt <= 3; nt++) {
                    run_path(0, ye, a, b, bias, s, acc, nt, y0);
                    CHECK(same_bits(ye, ym, s.N * s.M, &at),
                          "emulated vs model, N=%lld K=%lld M=%lld kind %d acc %d nt %d: [%lld] %a vs %a",
                          (long long)s.N, (long long)s.K, (long long)s.M, kind, acc, nt, (long long)at,
                          ye[at], ym[at]);
                    if (native) {
                        float *yn = malloc((size_t)(s.N * s.M) * sizeof(float));
                        run_path(1, yn, a, b, bias, s, acc, nt, y0);
                        CHECK(same_bits(yn, ym, s.N * s.M, &at),
                              "native vs model, N=%lld K=%lld M=%lld kind %d acc %d nt %d: [%lld] %a vs %a",
                              (long long)s.N, (long long)s.K, (long long)s.M, kind, acc, nt,
                              (long long)at, yn[at], ym[at]);
                        free(yn);
                    }
                }
                /* the same product through the public entry point (default kernel) */
                if (acc == 0 && kind == 0) {
                    CHECK(sf_bf16_matmul(ye, x, w, bias, s.N, s.K, s.M, -1, 2) == SF_OK, "sf_bf16_matmul");
                    CHECK(same_bits(ye, ym, s.N * s.M, &at), "sf_bf16_matmul vs model at %lld", (long long)at);
                }
                /* each row alone gives the row's bits in the batch (cached decoding relies on it) */
                if (kind == 0 && s.N > 1) {
                    float *yr = malloc((size_t)s.M * sizeof(float));
                    memcpy(yr, y0 + (s.N - 1) * s.M, (size_t)s.M * sizeof(float));
                    sf_bf16_gemm(yr, s.M, a + (s.N - 1) * Kh, Kh, b, bias, 1, s.K, s.M, acc, 1);
                    CHECK(same_bits(yr, ym + (s.N - 1) * s.M, s.M, &at), "row alone differs at %lld", (long long)at);
                    free(yr);
                }
                /* the error bound against the exact product of the fp32 operands */
                if (kind == 0 && acc == 0) {
                    const double g = (double)(2 * Kh) * 0x1p-24 / (1.0 - (double)(2 * Kh) * 0x1p-24);
                    const double rel = 0x1p-7 + 0x1p-16 + g * (1.0 + 0x1p-7);
                    for (int64_t r = 0; r < s.N; r++)
                        for (int64_t j = 0; j < s.M; j++) {
                            double ex = bias[j], mag = 0.0;
                            for (int64_t k = 0; k < s.K; k++) {
                                ex += (double)x[r * s.K + k] * w[j * s.K + k];
                                mag += fabs((double)x[r * s.K + k] * w[j * s.K + k]);
                            }
                            double bound = mag * rel + g * fabs(bias[j]) + (double)s.K * 0x1p-126;
                            double err = fabs((double)ym[r * s.M + j] - ex);
                            CHECK(err <= bound, "bound: err %g > %g (N=%lld K=%lld M=%lld)", err, bound,
                                  (long long)s.N, (long long)s.K, (long long)s.M);
                        }
                }
                free(x); free(w); free(bias); free(y0); free(ym); free(ye); free(a); free(b);
            }
}

/* the hand-made chains at fp32's bottom through the emulated kernel (the FPU's own FTZ) */
static void test_kernel_bottom(void) {
    const float m = 0x1p-126f;
    struct { float a1, b1, a0, b0, c, want; } cs[] = {
        {-0x1.8p-76f, 0x1p-75f, 0.0f, 0.0f, m, 0.0f},      /* tiny after rounding: 0 */
        {-0x1p-76f, 0x1p-76f, 0.0f, 0.0f, m, m},            /* rounds up to FLT_MIN: kept */
        {0x1p-70f, 0x1p-60f, 0x1p-63f, 0x1p-63f, 0.0f, m},  /* 2^-130 -> 0, then + 2^-126 */
        {1.0f, 1.0f, 0.0f, 0.0f, 0x1p-140f, 1.0f},          /* denormal chain start: 0 */
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) {
        uint32_t a = sf_bf16_pair(cs[i].a0, cs[i].a1), b[16] = {0};
        b[0] = sf_bf16_pair(cs[i].b0, cs[i].b1);
        float ym[16], ye[16];
        for (int j = 0; j < 16; j++) ym[j] = ye[j] = cs[i].c;
        sf_bf16_gemm_path(2, ym, 16, &a, 1, b, NULL, 1, 2, 16, 1, 1);
        sf_bf16_gemm_path(0, ye, 16, &a, 1, b, NULL, 1, 2, 16, 1, 1);
        CHECK(u_of(ym[0]) == u_of(cs[i].want), "case %zu: model %a, expected %a", i, ym[0], cs[i].want);
        CHECK(u_of(ye[0]) == u_of(cs[i].want), "case %zu: emulated %a, expected %a", i, ye[0], cs[i].want);
        if (sf_bf16_native_usable()) {
            float yn[16];
            for (int j = 0; j < 16; j++) yn[j] = cs[i].c;
            sf_bf16_gemm_path(1, yn, 16, &a, 1, b, NULL, 1, 2, 16, 1, 1);
            CHECK(u_of(yn[0]) == u_of(cs[i].want), "case %zu: native %a, expected %a", i, yn[0], cs[i].want);
        }
    }
    /* the order within a pair: odd element first. 2^24 + 1 - 2^24 in that order is 0 then 1
     * ... (a1 b1 = 1, a0 b0 = 2^24 from c = -2^24): odd first: (-2^24 + 1) + 2^24 = 1;
     * even first: (-2^24 + 2^24) + 1 = 1 too; so use c = 2^24: odd first: 2^24 + 1 rounds to
     * 2^24 (tie to even), + (-2^24) = 0; even first: 2^24 - 2^24 = 0, + 1 = 1 */
    {
        uint32_t a = sf_bf16_pair(-0x1p24f, 1.0f), b[16] = {0};
        b[0] = sf_bf16_pair(1.0f, 1.0f);
        float y[16];
        for (int path = 0; path < 3; path++) {
            if (path == 1 && !sf_bf16_native_usable()) continue;
            for (int j = 0; j < 16; j++) y[j] = 0x1p24f;
            sf_bf16_gemm_path(path, y, 16, &a, 1, b, NULL, 1, 2, 16, 1, 1);
            CHECK(y[0] == 0.0f, "path %d: pair order (odd first) gives 0, got %a", path, y[0]);
        }
    }
}

static void test_names(void) {
    const char *k = sf_bf16_kernel();
    CHECK(sf_bf16_native() ? strcmp(k, "avx512_bf16") == 0 : strncmp(k, "emulated (", 10) == 0, "kernel name %s", k);
    CHECK(sf_bf16_gemm_bench(8, 16, 16, 2, 1) > 0.0, "bench runs");
    CHECK(sf_bf16_gemm_bench(0, 16, 16, 2, 1) < 0.0, "bench refuses N=0");
    float y[4], x[4] = {1, 2, 3, 4}, w[4] = {1, 1, 1, 1};
    CHECK(sf_bf16_matmul(y, x, w, NULL, 0, 2, 2, -1, 1) == SF_ERR_INVALID_ARG, "N=0 refused");
    if (!sf_bf16_native_usable())
        CHECK(sf_bf16_matmul(y, x, w, NULL, 2, 2, 2, 1, 1) == SF_ERR_INVALID_ARG, "native refused here");
}

/* the model in bf16 mode: cached decoding = the full pass (test_model.c's check), thread-count
 * bits, and the logits are the bf16 head product of the returned hidden states, bit for bit */
static void test_bf16_model(void) {
    const struct { const char *name; int act, pos, residual, moda, tie; } cs[] = {
        {"bf16 plain", SF_ACT_GELU, SF_POS_LEARNED, SF_RES_PLAIN, 0, 1},
        {"bf16 swiglu rope untied", SF_ACT_SWIGLU, SF_POS_ROPE, SF_RES_PLAIN, 0, 0},
        {"bf16 full attnres moda", SF_ACT_RELU, SF_POS_LEARNED, SF_RES_ATTNRES_FULL, 1, 1},
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) {
        sf_config c;
        sf_config_default(&c, 40, 32, 4, 2, 16);
        c.act = cs[i].act; c.pos = cs[i].pos; c.residual = cs[i].residual; c.moda = cs[i].moda;
        c.tie_embeddings = cs[i].tie;
        c.compute_dtype = SF_DTYPE_BFLOAT16;
        check_cache_config(&c, cs[i].name); /* cached decoding = the full pass, bit for bit */
        enum { B = 2, T = 9 };
        sf_model *m = make_model(&c, 1, cs[i].name);
        if (!m) continue;
        const int64_t V = c.vocab_size, d = c.d_model, NV = B * T * V;
        int32_t tok[B * T];
        random_tokens(tok, B * T, V);
        float *logits = falloc(NV), *logits2 = falloc(NV), *hidden = falloc(B * T * d), *want = falloc(NV);
        char err[256] = "";
        for (int nt = 1; nt <= 3; nt++) {
            sf_forward_args fa = {.tokens = tok, .B = B, .T = T, .n_threads = nt};
            sf_status st = sf_forward(m, &fa, nt == 1 ? logits : logits2, nt == 1 ? hidden : NULL, NULL, err, sizeof err);
            CHECK(st == SF_OK, "%s: sf_forward: %s", cs[i].name, err);
            if (nt > 1) CHECK_SAME("bf16 model: threads 1 vs 2, 3", logits, logits2, NV);
        }
        CHECK(all_finite(logits, NV), "%s: non-finite logits", cs[i].name);
        /* the head is the bf16 product of the final hidden states, exactly */
        int32_t hi = sf_model_find_tensor(m, c.tie_embeddings ? "tok_emb.weight" : "lm_head.weight");
        const float *head = sf_model_params(m) + sf_model_tensor(m, hi)->offset;
        CHECK(sf_bf16_matmul(want, hidden, head, NULL, B * T, d, V, 2, 1) == SF_OK, "bf16_matmul");
        CHECK_SAME("bf16 model: logits = bf16 head product of hidden", logits, want, NV);
        free(logits); free(logits2); free(hidden); free(want);
        sf_model_free(m);
    }
}

void test_bf16(void) {
    test_conversion();
    test_packing();
    test_model_step();
    test_kernels();
    test_kernel_bottom();
    test_names();
    test_bf16_model();
}
