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
    /* the order within a pair, odd element first: from c = 2^24 with a1 b1 = 1 (odd) and
     * a0 b0 = -2^24 (even), odd first gives 2^24 + 1 -> 2^24 (tie to even), then 0; even
     * first would give 0, then 1 */
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
    const struct { const char *name; int act, pos, residual, moda, tie, depth_kv; } cs[] = {
        {"bf16 plain", SF_ACT_GELU, SF_POS_LEARNED, SF_RES_PLAIN, 0, 1, SF_DKV_ATTN_FFN},
        {"bf16 swiglu rope untied", SF_ACT_SWIGLU, SF_POS_ROPE, SF_RES_PLAIN, 0, 0, SF_DKV_ATTN_FFN},
        {"bf16 full attnres moda", SF_ACT_RELU, SF_POS_LEARNED, SF_RES_ATTNRES_FULL, 1, 1, SF_DKV_ATTN_FFN},
        {"bf16 moda extra kv", SF_ACT_GELU, SF_POS_ROPE, SF_RES_PLAIN, 1, 1, SF_DKV_EXTRA},
        {"bf16 moda attn kv", SF_ACT_GELU, SF_POS_LEARNED, SF_RES_PLAIN, 1, 0, SF_DKV_ATTN},
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) {
        sf_config c;
        sf_config_default(&c, 40, 32, 4, 2, 16);
        c.act = cs[i].act; c.pos = cs[i].pos; c.residual = cs[i].residual; c.moda = cs[i].moda;
        c.tie_embeddings = cs[i].tie;
        c.moda_depth_kv = cs[i].depth_kv;
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

/* ---- attention's bf16 products (sf_attention.c on sf_bf16_rows / dots / combine) ---- */
static float rnd(float x) { return sf_bf16_to_f32(sf_bf16_from_f32(x)); }

/* the chain from acc over n elements a[i*as] b[i*bs], pairs ascending, odd first, zero pad half */
static float chain_ref(float acc, const float *a, int64_t as, const float *b, int64_t bs, int64_t n) {
    for (int64_t i = 0; 2 * i < n; i++) {
        const int odd = 2 * i + 1 < n;
        acc = sf_bf16_fma_model(odd ? rnd(a[(2 * i + 1) * as]) : 0.0f, odd ? rnd(b[(2 * i + 1) * bs]) : 0.0f, acc);
        acc = sf_bf16_fma_model(rnd(a[2 * i * as]), rnd(b[2 * i * bs]), acc);
    }
    return acc;
}

static int paths_here(int *paths) {
    int n = 0;
    paths[n++] = 2;
    paths[n++] = 0;
    if (sf_bf16_native_usable()) paths[n++] = 1;
    return n;
}

/* sf_bf16_rows on pair prefixes of panels and offset rows, sf_bf16_dots / combine, against the
 * scalar chain, bit for bit, on every kernel */
static void test_rows_kernels(void) {
    int paths[3], np = paths_here(paths);
    const int64_t shapes[][3] = {{1, 1, 1}, {7, 9, 17}, {8, 64, 32}, {13, 33, 40}, {20, 96, 70}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const int64_t N = shapes[si][0], K = shapes[si][1], M = shapes[si][2], Kh = (K + 1) / 2;
        float *x = falloc(N * K), *w = falloc(K * M), *y0 = falloc(N * M), *y = falloc(N * M);
        fill(x, N * K, -2.0f, 2.0f);
        fill(w, K * M, -2.0f, 2.0f);
        fill(y0, N * M, -1.0f, 1.0f);
        uint32_t *a = xmalloc((size_t)(N * Kh) * sizeof(uint32_t));
        uint32_t *b = xmalloc((size_t)sf_bf16_pack_words(K, M) * sizeof(uint32_t));
        sf_bf16_pack_a(a, Kh, x, K, 1, N, K, 1);
        sf_bf16_pack_b(b, w, M, 1, K, M, 1); /* B (K x M) row-major */
        for (int acc = 0; acc < 2; acc++)
            for (int64_t i0 = 0; i0 <= Kh / 2; i0 += Kh / 2 > 0 ? Kh / 2 : 1) { /* a suffix of the pairs */
                const int64_t kh = Kh - i0;
                for (int pi = 0; pi < np; pi++) {
                    memcpy(y, y0, (size_t)(N * M) * sizeof(float));
                    sf_bf16_rows(paths[pi], y, M, a + i0, Kh, b + i0 * SF_BF16_NR, Kh * SF_BF16_NR, N, kh, M, acc);
                    int bad = 0;
                    for (int64_t r = 0; r < N && !bad; r++)
                        for (int64_t j = 0; j < M; j++) {
                            const int64_t k0 = 2 * i0, n = K - k0;
                            float want = chain_ref(acc ? y0[r * M + j] : 0.0f, x + r * K + k0, 1, w + k0 * M + j, M, n);
                            if (u_of(want) != u_of(y[r * M + j])) { bad = 1; break; }
                        }
                    CHECK(!bad, "sf_bf16_rows path %d N %lld K %lld M %lld from pair %lld acc %d: != scalar chain",
                          paths[pi], (long long)N, (long long)K, (long long)M, (long long)i0, acc);
                }
                if (i0 == 0 && Kh / 2 == 0) break;
            }
        /* decoding's unpacked chains: row r of x against rows of w^T / columns of w */
        float *wt = falloc(M * K), *o = falloc(M > N ? M : N);
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < M; j++) wt[j * K + k] = w[k * M + j];
        for (int pi = 0; pi < np; pi++) {
            int bad = 0;
            for (int64_t r = 0; r < N; r++) {
                sf_bf16_dots(paths[pi], o, x + r * K, wt, K, M, K);
                for (int64_t j = 0; j < M; j++) bad |= u_of(o[j]) != u_of(chain_ref(0.0f, x + r * K, 1, wt + j * K, 1, K));
                sf_bf16_combine(paths[pi], o, x + r * K, w, M, K, M);
                for (int64_t j = 0; j < M; j++) bad |= u_of(o[j]) != u_of(chain_ref(0.0f, x + r * K, 1, w + j, M, K));
            }
            CHECK(!bad, "sf_bf16_dots / combine path %d K %lld M %lld: != scalar chain", paths[pi], (long long)K, (long long)M);
        }
        free(wt); free(o);
        free(x); free(w); free(y0); free(y); free(a); free(b);
    }
}

/* The bf16 attention forward against a scalar model (products by chain_ref, softmax by the
 * library's fp32 pieces), bit for bit; every kernel and thread count the same bits, forward and
 * backward; the last rows decoded from a cache equal the full pass; and close to fp32. */
static void bf16_attention_case(int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t dh, int causal,
                                int padded, int64_t n_read) {
    const int64_t qd = H * dh, kvd = Hkv * dh, G = H / Hkv, rows = B * H * T, chunk = 1, ns = n_read > 0 ? n_read : 1;
    const int64_t W = T + n_read * chunk, arena = B * T * ns * kvd;
    float *q = falloc(B * T * qd), *k = falloc(B * T * kvd), *v = falloc(B * T * kvd);
    float *dkd = falloc(arena), *dvd = falloc(arena), *dout = falloc(B * T * qd);
    fill(q, B * T * qd, -2.0f, 2.0f);
    fill(k, B * T * kvd, -1.0f, 1.0f);
    fill(v, B * T * kvd, -1.0f, 1.0f);
    fill(dkd, arena, -1.0f, 1.0f);
    fill(dvd, arena, -1.0f, 1.0f);
    fill(dout, B * T * qd, -1.0f, 1.0f);
    uint8_t *mask = NULL;
    if (padded) {
        mask = xmalloc((size_t)(B * T));
        for (int64_t i = 0; i < B * T; i++) mask[i] = (i % 7) != 3;
    }
    sf_attn_args a = {.B = B, .Tq = T, .Tk = T, .H = H, .Hkv = Hkv, .dh = dh, .causal = causal,
                      .key_padding_mask = mask, .k = k, .v = v, .kv_bstride = T * kvd, .depth_k = dkd,
                      .depth_v = dvd, .depth_bstride = T * ns * kvd, .depth_len = T, .n_slots = ns,
                      .n_read = n_read, .chunk = chunk, .bf16 = 1};
    char what[160];
    snprintf(what, sizeof what, "bf16 attention B%lld T%lld H%lld/%lld dh%lld causal %d pad %d depth %lld",
             (long long)B, (long long)T, (long long)H, (long long)Hkv, (long long)dh, causal, padded, (long long)n_read);
    float *scratch = falloc(sf_attention_scratch_floats(&a, 2));
    float *out = falloc(B * T * qd), *out2 = falloc(B * T * qd), *lse = falloc(rows), *lse2 = falloc(rows);
    float *g[2][3], *gd[2][2];
    int paths[3], np = paths_here(paths);
    for (int r = 0; r < 2; r++) {
        for (int j = 0; j < 3; j++) g[r][j] = falloc(B * T * (j == 0 ? qd : kvd));
        for (int j = 0; j < 2; j++) gd[r][j] = falloc(arena);
    }
    int first = 1;
    for (int pi = 0; pi < np; pi++)
        for (int nt = 1; nt <= 2; nt++) {
            sf_bf16_force_path(paths[pi]);
            float *o = first ? out : out2, *l = first ? lse : lse2;
            float **gg = first ? g[0] : g[1], **ggd = first ? gd[0] : gd[1];
            sf_attention_forward(&a, q, o, l, NULL, NULL, scratch, nt);
            memset(ggd[0], 0, (size_t)arena * sizeof(float));
            memset(ggd[1], 0, (size_t)arena * sizeof(float));
            sf_attention_backward(&a, q, o, dout, l, gg[0], gg[1], gg[2], ggd[0], ggd[1], scratch, nt);
            if (!first) {
                CHECK(!memcmp(out, out2, (size_t)(B * T * qd) * sizeof(float)) && !memcmp(lse, lse2, (size_t)rows * sizeof(float)),
                      "%s: forward path %d threads %d != path %d threads 1", what, paths[pi], nt, paths[0]);
                int same = 1;
                for (int j = 0; j < 3; j++) same &= !memcmp(g[0][j], g[1][j], (size_t)(B * T * (j == 0 ? qd : kvd)) * sizeof(float));
                for (int j = 0; j < 2; j++) same &= !memcmp(gd[0][j], gd[1][j], (size_t)arena * sizeof(float));
                CHECK(same, "%s: backward path %d threads %d != path %d threads 1", what, paths[pi], nt, paths[0]);
            }
            first = 0;
        }
    sf_bf16_force_path(-1);
    /* the scalar model (sequence columns only: no depth slots) */
    if (n_read == 0) {
        const float scale = 1.0f / sqrtf((float)dh);
        float *e = falloc(T);
        int bad = 0;
        for (int64_t b = 0; b < B && !bad; b++)
            for (int64_t h = 0; h < H; h++)
                for (int64_t t = 0; t < T; t++) {
                    const int64_t n = causal ? t + 1 : T, gi = h / G;
                    const float *qt = q + (b * T + t) * qd + h * dh;
                    float mx = -INFINITY;
                    for (int64_t u = 0; u < n; u++) {
                        e[u] = chain_ref(0.0f, qt, 1, k + (b * T + u) * kvd + gi * dh, 1, dh);
                        if (mask && !mask[b * T + u]) e[u] = -INFINITY;
                        mx = e[u] > mx ? e[u] : mx;
                    }
                    const float *ot = out + (b * T + t) * qd + h * dh;
                    if (mx == -INFINITY) {
                        for (int64_t x = 0; x < dh; x++) bad |= u_of(ot[x]) != 0u;
                        continue;
                    }
                    sf_exp_row(e, n, scale, mx * scale);
                    float inv = 1.0f / sf_sum(e, n);
                    for (int64_t u = 0; u < n; u++) e[u] *= inv;
                    for (int64_t x = 0; x < dh; x++)
                        bad |= u_of(ot[x]) != u_of(chain_ref(0.0f, e, 1, v + b * T * kvd + gi * dh + x, kvd, n) + 0.0f);
                }
        CHECK(!bad, "%s: forward != the scalar model", what);
        free(e);
    }
    /* the last 2 query rows alone (the decode path), keys as in the full pass */
    if (causal) {
        sf_attn_args a2 = a;
        a2.Tq = 2;
        a2.q_pos0 = T - 2;
        float *q2 = falloc(B * 2 * qd), *o2 = falloc(B * 2 * qd), *sc2 = falloc(sf_attention_scratch_floats(&a2, 2));
        for (int64_t b = 0; b < B; b++) memcpy(q2 + b * 2 * qd, q + (b * T + T - 2) * qd, (size_t)(2 * qd) * sizeof(float));
        for (int pi = 0; pi < np; pi++) {
            sf_bf16_force_path(paths[pi]);
            sf_attention_forward(&a2, q2, o2, NULL, NULL, NULL, sc2, 2);
            int same = 1;
            for (int64_t b = 0; b < B; b++) same &= !memcmp(o2 + b * 2 * qd, out + (b * T + T - 2) * qd, (size_t)(2 * qd) * sizeof(float));
            CHECK(same, "%s: decoded rows (path %d) != the full pass", what, paths[pi]);
        }
        sf_bf16_force_path(-1);
        free(q2); free(o2); free(sc2);
    }
    /* close to fp32 (bf16 operands: ~2^-8 relative), and not equal */
    sf_attn_args a32 = a;
    a32.bf16 = 0;
    float *sc32 = falloc(sf_attention_scratch_floats(&a32, 2));
    sf_attention_forward(&a32, q, out2, lse2, NULL, NULL, sc32, 2);
    double md = 0.0;
    for (int64_t i = 0; i < B * T * qd; i++) md = fmax(md, fabs((double)out[i] - out2[i]));
    CHECK(md < 0.05 && md > 1e-5, "%s: |bf16 - fp32| max %g", what, md);
    memset(gd[1][0], 0, (size_t)arena * sizeof(float));
    memset(gd[1][1], 0, (size_t)arena * sizeof(float));
    sf_attention_backward(&a32, q, out2, dout, lse2, g[1][0], g[1][1], g[1][2], gd[1][0], gd[1][1], sc32, 2);
    for (int j = 0; j < 3; j++) {
        const int64_t n = B * T * (j == 0 ? qd : kvd);
        double num = 0.0, den = 0.0;
        for (int64_t i = 0; i < n; i++) {
            num += ((double)g[0][j][i] - g[1][j][i]) * ((double)g[0][j][i] - g[1][j][i]);
            den += (double)g[1][j][i] * g[1][j][i];
        }
        CHECK(sqrt(num) <= 0.03 * sqrt(den) && all_finite(g[0][j], n), "%s: gradient %d: |bf16 - fp32| / |fp32| = %g", what, j,
              sqrt(num / (den > 0 ? den : 1)));
    }
    free(sc32);
    for (int r = 0; r < 2; r++) {
        for (int j = 0; j < 3; j++) free(g[r][j]);
        for (int j = 0; j < 2; j++) free(gd[r][j]);
    }
    free(q); free(k); free(v); free(dkd); free(dvd); free(dout); free(mask);
    free(scratch); free(out); free(out2); free(lse); free(lse2);
}

static void test_bf16_attention(void) {
    bf16_attention_case(2, 100, 4, 2, 16, 1, 0, 0);  /* 3 query blocks, GQA */
    bf16_attention_case(1, 61, 2, 2, 13, 1, 1, 0);   /* odd d_head, padding */
    bf16_attention_case(2, 50, 2, 1, 32, 0, 0, 0);   /* encoder */
    bf16_attention_case(1, 70, 4, 2, 16, 1, 1, 3);   /* MoDA depth columns (fp32) */
    bf16_attention_case(1, 5, 2, 2, 8, 1, 0, 0);     /* shorter than a tile */
}

void test_bf16(void) {
    test_conversion();
    test_packing();
    test_model_step();
    test_kernels();
    test_kernel_bottom();
    test_names();
    test_bf16_model();
    test_rows_kernels();
    test_bf16_attention();
}
