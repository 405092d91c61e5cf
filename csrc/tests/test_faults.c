#define _POSIX_C_SOURCE 200809L
/* Faults (issue #24): the cancel flag, snapshot/restore and their checks, the tensor table
 * without a model, the cache's busy flag, workspace sizes that would wrap, mask values, the
 * memory limit (cgroup files) and the one-total memory check of a forward. */
#include "check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

/* a fake cgroup tree: v2 limits on the process's group and its ancestors, v1's file */
static void test_cgroup_limits(void) {
    char root[] = "/tmp/sf-cgroup-XXXXXX", p[512];
    if (!mkdtemp(root)) { CHECK(0, "mkdtemp failed"); return; }
    snprintf(p, sizeof p, "%s/self", root);
    write_text(p, "0::/a/b\n");
    char self[512];
    snprintf(self, sizeof self, "%s/self", root);
    CHECK(sf_cgroup_limit_bytes(root, self) == -1, "no limit files: -1");
    snprintf(p, sizeof p, "%s/a", root); mkdir(p, 0700);
    snprintf(p, sizeof p, "%s/a/b", root); mkdir(p, 0700);
    snprintf(p, sizeof p, "%s/a/b/memory.max", root); write_text(p, "max\n");
    CHECK(sf_cgroup_limit_bytes(root, self) == -1, "'max' is no limit");
    snprintf(p, sizeof p, "%s/a/memory.max", root); write_text(p, "1000000\n");
    CHECK(sf_cgroup_limit_bytes(root, self) == 1000000, "an ancestor's limit caps the group: %lld",
          (long long)sf_cgroup_limit_bytes(root, self));
    snprintf(p, sizeof p, "%s/memory.max", root); write_text(p, "2000000\n");
    CHECK(sf_cgroup_limit_bytes(root, self) == 1000000, "the lowest of the chain");
    snprintf(p, sizeof p, "%s/a/b/memory.max", root); write_text(p, "300000\n");
    CHECK(sf_cgroup_limit_bytes(root, self) == 300000, "the group's own limit");
    snprintf(p, sizeof p, "%s/memory", root); mkdir(p, 0700);
    snprintf(p, sizeof p, "%s/memory/memory.limit_in_bytes", root); write_text(p, "5000\n");
    CHECK(sf_cgroup_limit_bytes(root, self) == 5000, "cgroup v1's limit");
    const char *files[] = {"memory/memory.limit_in_bytes", "memory.max", "a/b/memory.max", "a/memory.max", "self"};
    for (int i = 0; i < 5; i++) { snprintf(p, sizeof p, "%s/%s", root, files[i]); unlink(p); }
    const char *dirs[] = {"memory", "a/b", "a", ""};
    for (int i = 0; i < 4; i++) { snprintf(p, sizeof p, "%s/%s", root, dirs[i]); rmdir(p); }
}

/* a forward whose outputs and workspace each fit under the limit but not together is refused,
 * naming both parts, before anything is allocated */
static void test_forward_memory_total(void) {
    sf_config c;
    sf_config_default(&c, 37, 32, 4, 2, 12);
    sf_model *m = NULL;
    char err[512] = "";
    if (sf_model_create(&c, 1, &m, err, sizeof err) != SF_OK) { CHECK(0, "create: %s", err); return; }
    int32_t tok[2 * 12] = {0};
    sf_forward_args a = {.tokens = tok, .B = 2, .T = 12, .attnres_two_phase = 1, .n_threads = 1};
    CHECK(sf_forward_memory_check(m, &a, 0, 0, 1000, err, sizeof err) == SF_OK, "a small call passes: %s", err);
    sf_status st = sf_forward_memory_check(m, &a, 0, 0, sf_memory_limit_bytes(), err, sizeof err);
    CHECK(st == SF_ERR_NOMEM && strstr(err, "workspace") && strstr(err, "outputs"),
          "outputs at the limit plus any workspace: %s '%s'", sf_status_name(st), err);
    CHECK(sf_forward_memory_check(m, &a, 0, 0, -1, err, sizeof err) == SF_ERR_INVALID_ARG, "negative bytes refused");
    sf_model_free(m);
}

void test_faults(void) {
    test_cgroup_limits();
    test_forward_memory_total();
    char err[256];
    sf_config c;
    sf_config_default(&c, 37, 32, 4, 2, 12);
    sf_model *m = NULL;
    CHECK(sf_model_create(&c, 3, &m, err, sizeof err) == SF_OK, "create: %s", err);
    const int64_t B = 2, T = 6, P = sf_model_num_params(m);
    int32_t tok[12];
    for (int i = 0; i < 12; i++) tok[i] = (i * 7) % 37;
    float *logits = malloc(sizeof(float) * B * T * 37), *ref = malloc(sizeof(float) * B * T * 37);
    sf_forward_args fa = {tok, NULL, NULL, B, T, 1, 1, NULL, NULL};
    CHECK(sf_forward(m, &fa, ref, NULL, NULL, err, sizeof err) == SF_OK, "forward: %s", err);

    /* a raised cancel flag stops the call; a cache keeps its length; nothing else changes */
    volatile int stop = 1;
    fa.cancel = &stop;
    CHECK(sf_forward(m, &fa, logits, NULL, NULL, err, sizeof err) == SF_ERR_INTERRUPTED, "cancelled forward");
    sf_cache *cache = NULL;
    CHECK(sf_cache_create(m, B, T, &cache, err, sizeof err) == SF_OK, "cache: %s", err);
    fa.cache = cache;
    CHECK(sf_forward(m, &fa, logits, NULL, NULL, err, sizeof err) == SF_ERR_INTERRUPTED, "cancelled cached forward");
    CHECK(sf_cache_len(cache) == 0, "cache length %lld after a cancelled call", (long long)sf_cache_len(cache));
    stop = 0;
    CHECK(sf_forward(m, &fa, logits, NULL, NULL, err, sizeof err) == SF_OK, "cached forward: %s", err);
    CHECK_SAME("cached after a cancelled call = uncached", logits, ref, B * T * 37);
    CHECK(sf_cache_reset(cache) == SF_OK && sf_cache_len(cache) == 0, "cache reset");
    sf_cache_free(cache);
    int32_t tgt[12];
    for (int i = 0; i < 12; i++) tgt[i] = tok[(i + 1) % 12];
    sf_train_args ta = {tok, NULL, NULL, tgt, B, T, -100, 0, 1, 0, &stop};
    double loss;
    int64_t cnt;
    stop = 1;
    CHECK(sf_forward_backward(m, &ta, &loss, &cnt, err, sizeof err) == SF_ERR_INTERRUPTED, "cancelled backward");
    stop = 0;
    CHECK(sf_forward_backward(m, &ta, &loss, &cnt, err, sizeof err) == SF_OK, "backward: %s", err);

    /* mask values other than 0 / 1 are refused by both calls */
    uint8_t mask[12];
    memset(mask, 1, sizeof mask);
    mask[4] = 2;
    sf_forward_args fm = {tok, NULL, mask, B, T, 1, 1, NULL, NULL};
    CHECK(sf_forward(m, &fm, logits, NULL, NULL, err, sizeof err) == SF_ERR_INVALID_ARG, "mask value 2 in forward");
    ta.key_padding_mask = mask;
    CHECK(sf_forward_backward(m, &ta, &loss, &cnt, err, sizeof err) == SF_ERR_INVALID_ARG, "mask value 2 in backward");
    ta.key_padding_mask = NULL;

    /* snapshot = the buffers; restore checks adam_v before writing anything */
    float *snap = malloc(sizeof(float) * P), *v = malloc(sizeof(float) * P);
    int64_t step = -1;
    sf_model_snapshot(m, snap, NULL, NULL, v, &step);
    CHECK_SAME("snapshot params", snap, sf_model_params(m), P);
    CHECK(step == sf_model_step_count(m), "snapshot step");
    float keep = sf_model_adam_v(m)[5];
    v[5] = -1.0f;
    CHECK(sf_model_restore(m, NULL, NULL, NULL, v, NULL, err, sizeof err) == SF_ERR_INVALID_ARG, "negative adam_v refused");
    CHECK(sf_model_adam_v(m)[5] == keep, "adam_v untouched after a refused restore");
    for (int64_t i = 0; i < P; i++) snap[i] = 0.5f;
    uint8_t *which = calloc((size_t)sf_model_num_tensors(m), 1);
    which[1] = 1;
    const sf_tensor_info *t0 = sf_model_tensor(m, 0), *t1 = sf_model_tensor(m, 1);
    float before0 = sf_model_params(m)[t0->offset];
    CHECK(sf_model_restore(m, snap, which, NULL, NULL, NULL, err, sizeof err) == SF_OK, "restore: %s", err);
    CHECK(sf_model_params(m)[t1->offset] == 0.5f && sf_model_params(m)[t0->offset] == before0, "restore writes only the selected tensors");

    /* the table without a model */
    sf_tensor_info *tab = NULL;
    int32_t n = 0;
    int64_t total = 0;
    CHECK(sf_config_tensors(&c, &tab, &n, &total, err, sizeof err) == SF_OK, "config_tensors: %s", err);
    CHECK(n == sf_model_num_tensors(m) && total == P, "table: %d tensors, %lld floats", (int)n, (long long)total);
    for (int32_t i = 0; tab && i < n; i++)
        CHECK(strcmp(tab[i].name, sf_model_tensor(m, i)->name) == 0 && tab[i].offset == sf_model_tensor(m, i)->offset,
              "table entry %d", (int)i);
    free(tab);
    sf_config bad = c;
    bad.n_heads = 5;
    CHECK(sf_config_tensors(&bad, &tab, &n, &total, err, sizeof err) == SF_ERR_INVALID_CONFIG, "invalid config refused");

    /* workspace sizes that would wrap */
    CHECK(sf_train_workspace_bytes(&c, (int64_t)1 << 62, (int64_t)1 << 62, 0) == -1, "B*T wraps: -1");
    CHECK(sf_train_workspace_bytes(&c, 2, 6, 0) > 0, "a small workspace");

    free(which); free(snap); free(v); free(logits); free(ref);
    sf_model_free(m);
}
