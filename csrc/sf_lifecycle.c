#define _POSIX_C_SOURCE 200809L
/* A model's life: create (validate, lay out, init), views, accessors, free, and the
 * reader/writer guard. */
#include "sf_internal.h"
#include "sf_kernels.h"

#include <pthread.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <time.h>

/* Every live model, so a forked child can reset the guards its parent's threads held. Create
 * and free take the lock (never a hot path). */
static pthread_mutex_t g_reg_lock = PTHREAD_MUTEX_INITIALIZER;
static sf_model *g_reg_head;

void sf_models_registry_lock(void) { pthread_mutex_lock(&g_reg_lock); }
void sf_models_registry_unlock(void) { pthread_mutex_unlock(&g_reg_lock); }

void sf_models_after_fork(void) {
    /* the child: the lock was taken by the prepare handler in the forking thread, which is
     * this thread now; no other thread exists to race the walk */
    for (sf_model *m = g_reg_head; m; m = m->reg_next) {
        /* running forward calls (> 0) and a train step (-1 / pending) belonged to threads the
         * child does not have: nobody will release them. A step interrupted this way leaves
         * the child the weights as they were at the instant of fork. */
        atomic_store(&m->state, 0);
        if (atomic_load(&m->fwd_busy)) { /* taken by a vanished thread, maybe mid-resize: */
            m->fwd_mem = NULL;          /* leave it (a leak in the child), never reuse it */
            m->fwd_mem_bytes = 0;
            atomic_store(&m->fwd_busy, 0);
        }
    }
    pthread_mutex_unlock(&g_reg_lock);
}

static void registry_add(sf_model *m) {
    pthread_mutex_lock(&g_reg_lock);
    m->reg_next = g_reg_head;
    if (g_reg_head) g_reg_head->reg_prev = m;
    g_reg_head = m;
    pthread_mutex_unlock(&g_reg_lock);
}

static void registry_remove(sf_model *m) {
    pthread_mutex_lock(&g_reg_lock);
    if (m->reg_prev) m->reg_prev->reg_next = m->reg_next;
    else if (g_reg_head == m) g_reg_head = m->reg_next;
    if (m->reg_next) m->reg_next->reg_prev = m->reg_prev;
    m->reg_prev = m->reg_next = NULL;
    pthread_mutex_unlock(&g_reg_lock);
}

sf_status sf_model_create(const sf_config *cfg, uint64_t seed, sf_model **out, char *err,
                          size_t errlen) {
    if (!out) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "out is NULL");
    *out = NULL;
    sf_status st = sf_config_validate(cfg, err, errlen);
    if (st != SF_OK) return st;
    sf_table_builder tb = {0};
    sf_params_table(cfg, &tb);
    int64_t bytes;
    if (tb.overflow || sf_mul_ok(tb.total, (int64_t)sizeof(float), &bytes) || bytes > sf_memory_limit_bytes())
        return sf_fail(err, errlen, SF_ERR_NOMEM, "model would need %lld parameters: too large",
                       (long long)tb.total);
    sf_model *m = calloc(1, sizeof *m);
    if (!m) return sf_fail(err, errlen, SF_ERR_NOMEM, "cannot allocate model");
    m->cfg = *cfg;
    m->num_tensors = tb.n;
    m->num_params = tb.total;
    m->tensors = calloc((size_t)tb.n, sizeof *m->tensors);
    /* parameters, gradients and the two AdamW moments in one allocation: views of any of
     * them stay valid for the model's whole life */
    int64_t all;
    if (sf_mul_ok(tb.total, 4, &all) || all > sf_memory_limit_bytes() / (int64_t)sizeof(float)) {
        sf_model_free(m);
        return sf_fail(err, errlen, SF_ERR_NOMEM, "model would need %lld parameters: too large",
                       (long long)tb.total);
    }
    m->params = calloc((size_t)(all > 0 ? all : 1), sizeof(float));
    if (m->params) {
        m->grads = m->params + tb.total;
        m->adam_m = m->grads + tb.total;
        m->adam_v = m->adam_m + tb.total;
    }
    atomic_init(&m->state, 0);
    atomic_init(&m->fwd_busy, 0);
    m->layers = calloc((size_t)cfg->n_layers, sizeof *m->layers);
    if (!m->tensors || !m->params || !m->layers) {
        sf_model_free(m);
        return sf_fail(err, errlen, SF_ERR_NOMEM, "cannot allocate %lld parameters (%.1f MiB)",
                       (long long)tb.total, (double)bytes / 1048576.0);
    }
    size_t *views = calloc((size_t)tb.n, sizeof *views);
    if (!views) {
        sf_model_free(m);
        return sf_fail(err, errlen, SF_ERR_NOMEM, "cannot allocate the tensor table");
    }
    sf_table_builder fill = {m->tensors, 0, 0, 0, views};
    sf_params_table(cfg, &fill);
    /* every tensor's named view, as the table says (absent tensors leave theirs NULL) */
    for (int32_t t = 0; t < tb.n; t++) {
        if (!views[t]) continue;
        const sf_tensor_info *ti = &m->tensors[t];
        char *base = ti->layer < 0 ? (char *)m : (char *)&m->layers[ti->layer];
        float *p = m->params + ti->offset;
        memcpy(base + views[t] - 1, &p, sizeof p);
    }
    free(views);
    m->lm_head = cfg->tie_embeddings ? m->tok_emb : m->lm_head;
    sf_params_init(m, seed);
    registry_add(m);
    *out = m;
    return SF_OK;
}

sf_status sf_config_tensors(const sf_config *cfg, sf_tensor_info **out, int32_t *n, int64_t *num_params,
                            char *err, size_t errlen) {
    if (!cfg || !out || !n || !num_params) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "NULL argument");
    *out = NULL;
    sf_status st = sf_config_validate(cfg, err, errlen);
    if (st != SF_OK) return st;
    sf_table_builder tb = {0};
    sf_params_table(cfg, &tb);
    if (tb.overflow) return sf_fail(err, errlen, SF_ERR_OVERFLOW, "the parameter count overflows 64 bits");
    sf_tensor_info *t = calloc((size_t)(tb.n > 0 ? tb.n : 1), sizeof *t);
    if (!t) return sf_fail(err, errlen, SF_ERR_NOMEM, "cannot allocate the tensor table");
    sf_table_builder fill = {t, 0, 0, 0, NULL};
    sf_params_table(cfg, &fill);
    *out = t;
    *n = tb.n;
    *num_params = tb.total;
    return SF_OK;
}

void sf_model_free(sf_model *m) {
    if (!m) return;
    registry_remove(m);
    free(m->train_mem);
    free(m->fwd_mem);
    free(m->params);
    free(m->tensors);
    free(m->layers);
    free(m);
}

const sf_config *sf_model_config(const sf_model *m) { return &m->cfg; }
float *sf_model_params(sf_model *m) { return m->params; }
int64_t sf_model_num_params(const sf_model *m) { return m->num_params; }
int32_t sf_model_num_tensors(const sf_model *m) { return m->num_tensors; }
const sf_tensor_info *sf_model_tensor(const sf_model *m, int32_t i) {
    return (i >= 0 && i < m->num_tensors) ? &m->tensors[i] : NULL;
}
float *sf_model_grads(sf_model *m) { return m->grads; }
float *sf_model_adam_m(sf_model *m) { return m->adam_m; }
float *sf_model_adam_v(sf_model *m) { return m->adam_v; }
int64_t sf_model_step_count(const sf_model *m) { return m->step; }
void sf_model_set_step_count(sf_model *m, int64_t step) { m->step = step < 0 ? 0 : step; }

/* The guard word: >= 0 counts running forward calls; WRITE_PENDING is set by a train step that
 * waits for them to drain (new forward calls are refused meanwhile, so it cannot starve);
 * -1 while the step runs. Forward calls never wait: they fail fast with SF_ERR_BUSY. */
#define WRITE_PENDING (1 << 30)

int sf_model_acquire_read(sf_model *m) {
    int s = atomic_load(&m->state);
    do {
        if (s < 0 || (s & WRITE_PENDING)) return 0;
    } while (!atomic_compare_exchange_weak(&m->state, &s, s + 1));
    return 1;
}
void sf_model_release_read(sf_model *m) { atomic_fetch_sub(&m->state, 1); }
int sf_model_acquire_write(sf_model *m) {
    int s = atomic_load(&m->state);
    do {
        if (s < 0 || (s & WRITE_PENDING)) return 0; /* another train step holds or wants it */
    } while (!atomic_compare_exchange_weak(&m->state, &s, s | WRITE_PENDING));
    while (atomic_load(&m->state) != WRITE_PENDING) { /* in-flight forward calls finish */
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
    atomic_store(&m->state, -1);
    return 1;
}
void sf_model_release_write(sf_model *m) { atomic_store(&m->state, 0); }

/* Waiting forms for the calls that copy state in or out (state_dict, save, load_state_dict,
 * pickling): unlike forward calls and train steps, which fail fast, these wait their turn (a
 * snapshot waits for at most the running step; a restore for the running calls). They poll:
 * they are rare, and a condition variable would cost every forward call a lock. */
static void pause_briefly(void) {
    struct timespec ts = {0, 20000};
    nanosleep(&ts, NULL);
}
void sf_model_acquire_read_wait(sf_model *m) {
    while (!sf_model_acquire_read(m)) pause_briefly();
}
static void acquire_write_wait(sf_model *m) {
    while (!sf_model_acquire_write(m)) pause_briefly();
}

static void copy_or_skip(float *dst, const float *src, int64_t n) {
    if (dst) memcpy(dst, src, (size_t)n * sizeof(float));
}

void sf_model_snapshot(sf_model *m, float *params, float *grads, float *adam_m, float *adam_v,
                       int64_t *step) {
    sf_model_acquire_read_wait(m); /* no train step runs while any reader holds the guard */
    copy_or_skip(params, m->params, m->num_params);
    copy_or_skip(grads, m->grads, m->num_params);
    copy_or_skip(adam_m, m->adam_m, m->num_params);
    copy_or_skip(adam_v, m->adam_v, m->num_params);
    if (step) *step = m->step;
    sf_model_release_read(m);
}

sf_status sf_model_restore(sf_model *m, const float *params, const uint8_t *which,
                           const float *adam_m, const float *adam_v, const int64_t *step,
                           char *err, size_t errlen) {
    if (step && *step < 0) return sf_fail(err, errlen, SF_ERR_INVALID_ARG, "step must be >= 0");
    if (adam_v) /* a negative second moment makes sqrt(v) NaN at the next step, everywhere */
        for (int64_t i = 0; i < m->num_params; i++)
            if (!(adam_v[i] >= 0.0f) || adam_v[i] == INFINITY)
                return sf_fail(err, errlen, SF_ERR_INVALID_ARG,
                               "adam_v[%lld] = %g: the second moment must be finite and >= 0", (long long)i,
                               (double)adam_v[i]);
    acquire_write_wait(m);
    if (params) {
        for (int32_t t = 0; t < m->num_tensors; t++) {
            const sf_tensor_info *ti = &m->tensors[t];
            if (which && !which[t]) continue;
            memcpy(m->params + ti->offset, params + ti->offset, (size_t)ti->numel * sizeof(float));
        }
    }
    if (adam_m) memcpy(m->adam_m, adam_m, (size_t)m->num_params * sizeof(float));
    if (adam_v) memcpy(m->adam_v, adam_v, (size_t)m->num_params * sizeof(float));
    if (step) m->step = *step;
    sf_model_release_write(m);
    return SF_OK;
}

int32_t sf_model_find_tensor(const sf_model *m, const char *name) {
    /* linear scan: called at model build and by name lookups from Python, never in hot loops */
    for (int32_t i = 0; i < m->num_tensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0) return i;
    return -1;
}
