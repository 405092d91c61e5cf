/* stackformer._core — the thin CPython/NumPy binding over the C core (csrc/sf.h).
 *
 * It parses arguments, checks them, allocates the NumPy arrays results land in, releases the
 * GIL, calls C and wraps the results. No math lives here. Parameter arrays are views of the
 * model's C-owned buffer whose base object is the model, so the buffer outlives every view.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "sf.h"

#define ERRLEN 512

typedef struct {
    PyObject_HEAD
    sf_model *model;
} CModel;

/* A decoding cache; holds a reference to its model so the model outlives it. */
typedef struct {
    PyObject_HEAD
    sf_cache *cache;
    PyObject *owner;
} CCache;

static PyTypeObject CCacheType;

/* ---- Ctrl-C during a long call ------------------------------------------------------------
 * Python runs its SIGINT handler only between bytecodes, so a call in C (minutes for a large
 * forward) would finish before KeyboardInterrupt. For the call's duration, a long call from
 * the main thread puts a wrapper in front of whatever C-level SIGINT handler is installed
 * (Python's own): it raises the call's cancel flag, which C reads between blocks, and then
 * runs that handler, so Python still sees the signal. The previous handler is put back when
 * the call returns; then PyErr_CheckSignals runs the Python-level handler (KeyboardInterrupt
 * by default). Short calls (and other threads) skip this: three sigaction calls cost ~1 us. */
#include <signal.h>
static volatile int g_cancel;
static struct sigaction g_prev_sigint;
static unsigned long g_main_ident;

static void sigint_wrapper(int sig, siginfo_t *info, void *ctx) {
    g_cancel = 1;
    if (g_prev_sigint.sa_flags & SA_SIGINFO) {
        if (g_prev_sigint.sa_sigaction) g_prev_sigint.sa_sigaction(sig, info, ctx);
    } else if (g_prev_sigint.sa_handler != SIG_DFL && g_prev_sigint.sa_handler != SIG_IGN) {
        g_prev_sigint.sa_handler(sig);
    }
}

/* with the GIL; returns the cancel flag to pass to C (NULL: not interruptible) */
static const volatile int *interrupt_begin(double work) {
    if (work < 16777216.0 || PyThread_get_thread_ident() != g_main_ident) return NULL;
    struct sigaction cur, w;
    if (sigaction(SIGINT, NULL, &cur) != 0) return NULL;
    int sinfo = (cur.sa_flags & SA_SIGINFO) != 0;
    if (!sinfo && (cur.sa_handler == SIG_DFL || cur.sa_handler == SIG_IGN)) return NULL;
    g_prev_sigint = cur;
    g_cancel = 0;
    w = cur;
    w.sa_sigaction = sigint_wrapper;
    w.sa_flags = cur.sa_flags | SA_SIGINFO;
    if (sigaction(SIGINT, &w, NULL) != 0) return NULL;
    return &g_cancel;
}

/* with the GIL, after the call: the handler back; an interrupted call raises (-1) */
static int interrupt_end(const volatile int *cancel, sf_status st) {
    if (!cancel) return 0;
    sigaction(SIGINT, &g_prev_sigint, NULL);
    if (st != SF_ERR_INTERRUPTED) return 0;
    if (PyErr_CheckSignals() < 0) return -1;          /* the Python handler raised */
    PyErr_SetNone(PyExc_KeyboardInterrupt);           /* it only took note: stop anyway */
    return -1;
}

static PyObject *status_error(sf_status st, const char *msg) {
    PyObject *exc = PyExc_ValueError;
    if (st == SF_ERR_NOMEM) exc = PyExc_MemoryError;
    else if (st == SF_ERR_OVERFLOW) exc = PyExc_OverflowError;
    else if (st == SF_ERR_TOKEN_RANGE) exc = PyExc_IndexError;
    else if (st == SF_ERR_BUSY) exc = PyExc_RuntimeError;
    PyErr_SetString(exc, msg && msg[0] ? msg : sf_status_name(st));
    return NULL;
}

/* ---- construction --------------------------------------------------------------------- */

/* sf_config from keyword arguments named as in the field table (sf_config_fields.h, Python
 * names, enums as their integer values): every field required, nothing else accepted. The
 * values' ranges are C's to check (sf_config_validate); this only converts. `skip` names one
 * extra key the caller handles (or NULL). */
static int config_from_kwargs(PyObject *kw, sf_config *c, const char *skip) {
    sf_config_default(c, 1, 1, 1, 1, 1);
    Py_ssize_t used = 0;
    for (int32_t i = 0; i < sf_config_num_fields(); i++) {
        const sf_config_field *f = sf_config_field_at(i);
        PyObject *v = kw ? PyDict_GetItemString(kw, f->name) : NULL; /* borrowed */
        if (!v) { PyErr_Format(PyExc_TypeError, "config field %s is missing", f->name); return -1; }
        used++;
        char *dst = (char *)c + f->offset;
        if (f->kind == SF_FIELD_REAL || f->kind == SF_FIELD_PROB) {
            double x = PyFloat_AsDouble(v);
            if (x == -1.0 && PyErr_Occurred()) {
                if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return -1;
                PyErr_Clear(); /* an int beyond double's range: out of range like any other */
                PyErr_Format(PyExc_ValueError, "%s is out of range, got %R", f->name, v);
                return -1;
            }
            float xf = (float)x; /* out-of-range doubles become inf and fail validation */
            memcpy(dst, &xf, sizeof xf);
        } else {
            int overflow = 0;
            long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
            if (x == -1 && PyErr_Occurred()) return -1;
            if (overflow || (f->kind != SF_FIELD_INT && (x < INT32_MIN || x > INT32_MAX))) {
                PyErr_Format(PyExc_ValueError, "%s is out of range, got %R", f->name, v);
                return -1;
            }
            if (f->kind == SF_FIELD_INT) { int64_t x64 = (int64_t)x; memcpy(dst, &x64, sizeof x64); }
            else { int32_t x32 = (int32_t)x; memcpy(dst, &x32, sizeof x32); }
        }
    }
    if (skip && kw && PyDict_GetItemString(kw, skip)) used++;
    if (kw && PyDict_Size(kw) != used) {
        PyObject *key, *val;
        Py_ssize_t pos = 0;
        while (PyDict_Next(kw, &pos, &key, &val)) {
            const char *k = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
            int known = k && skip && strcmp(k, skip) == 0;
            for (int32_t i = 0; k && !known && i < sf_config_num_fields(); i++)
                known = strcmp(k, sf_config_field_at(i)->name) == 0;
            if (!known) { PyErr_Format(PyExc_TypeError, "unknown config field %R", key); return -1; }
        }
    }
    return 0;
}

/* CModel(**config, seed=0): config keyword arguments as in config_from_kwargs */
static int CModel_init(CModel *self, PyObject *args, PyObject *kw) {
    if (self->model) { /* views of the old buffer may be alive: never swap it out */
        PyErr_SetString(PyExc_RuntimeError, "CModel is already initialized");
        return -1;
    }
    if (args && PyTuple_GET_SIZE(args)) { PyErr_SetString(PyExc_TypeError, "CModel takes keyword arguments only"); return -1; }
    sf_config c;
    if (config_from_kwargs(kw, &c, "seed") < 0) return -1;
    unsigned long long seed = 0;
    PyObject *s = kw ? PyDict_GetItemString(kw, "seed") : NULL;
    if (s) {
        seed = PyLong_AsUnsignedLongLong(s);
        if (seed == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    }
    char err[ERRLEN] = {0};
    sf_model *m = NULL;
    sf_status st = sf_model_create(&c, (uint64_t)seed, &m, err, sizeof err);
    if (st != SF_OK) { status_error(st, err); return -1; }
    self->model = m;
    return 0;
}

static void CModel_dealloc(CModel *self) {
    sf_model_free(self->model);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ready(CModel *self) {
    if (!self->model) { PyErr_SetString(PyExc_RuntimeError, "model is not initialized"); return 0; }
    return 1;
}

/* ---- parameters ------------------------------------------------------------------------ */

static PyObject *CModel_params(CModel *self, void *closure) {
    if (!ready(self)) return NULL;
    npy_intp n = (npy_intp)sf_model_num_params(self->model);
    PyObject *arr = PyArray_SimpleNewFromData(1, &n, NPY_FLOAT32, sf_model_params(self->model));
    if (!arr) return NULL;
    Py_INCREF(self);
    if (PyArray_SetBaseObject((PyArrayObject *)arr, (PyObject *)self) < 0) { Py_DECREF(arr); return NULL; }
    return arr;
}

static PyObject *CModel_tensors(CModel *self, PyObject *unused) {
    if (!ready(self)) return NULL;
    int32_t n = sf_model_num_tensors(self->model);
    PyObject *out = PyList_New(n);
    if (!out) return NULL;
    for (int32_t i = 0; i < n; i++) {
        const sf_tensor_info *t = sf_model_tensor(self->model, i);
        PyObject *shape = t->ndim == 2 ? Py_BuildValue("(LL)", (long long)t->shape[0], (long long)t->shape[1])
                                       : Py_BuildValue("(L)", (long long)t->shape[0]);
        PyObject *item = shape ? Py_BuildValue("(sLNii)", t->name, (long long)t->offset, shape,
                                               (int)t->layer, (int)t->no_decay) : NULL;
        if (!item) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

/* ---- forward --------------------------------------------------------------------------- */

enum { TR_ATTENTION = 1, TR_HIDDEN = 2, TR_SUBLAYER = 4, TR_ALPHA = 8, TR_DEPTH = 16, TR_RMS = 32,
       TR_ACTIVATIONS = 64 /* embed, MLP inputs, q/k/v/z, MLP activation (issue 23) */ };

/* A list of `n` float32 arrays (or None where not selected), with their data pointers in ptrs. */
static PyObject *alloc_list(int64_t n, const char *sel, int64_t sel_len, int (*shape_of)(const sf_config *, int64_t, npy_intp *, int64_t, int64_t),
                            const sf_config *c, int64_t B, int64_t T, float **ptrs, int sel_div) {
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list) return NULL;
    for (int64_t i = 0; i < n; i++) {
        int64_t li = i / sel_div;
        ptrs[i] = NULL;
        if (li < sel_len && sel[li]) {
            npy_intp dims[4];
            int nd = shape_of(c, i, dims, B, T);
            PyObject *a = PyArray_ZEROS(nd, dims, NPY_FLOAT32, 0);
            if (!a) { Py_DECREF(list); return NULL; }
            ptrs[i] = (float *)PyArray_DATA((PyArrayObject *)a);
            PyList_SET_ITEM(list, (Py_ssize_t)i, a);
        } else {
            Py_INCREF(Py_None);
            PyList_SET_ITEM(list, (Py_ssize_t)i, Py_None);
        }
    }
    return list;
}

static int shape_attention(const sf_config *c, int64_t i, npy_intp *d, int64_t B, int64_t T) {
    d[0] = B; d[1] = c->n_heads; d[2] = T; d[3] = T + sf_depth_cols(c, i); return 4;
}
static int shape_btd(const sf_config *c, int64_t i, npy_intp *d, int64_t B, int64_t T) {
    d[0] = B; d[1] = T; d[2] = c->d_model; return 3;
}
static int shape_alpha(const sf_config *c, int64_t k, npy_intp *d, int64_t B, int64_t T) {
    d[0] = B; d[1] = T;
    if (c->attnres_heads > 1) { d[2] = c->attnres_heads; d[3] = sf_attnres_num_sources(c, k); return 4; }
    d[2] = sf_attnres_num_sources(c, k); return 3;
}
static int shape_bht(const sf_config *c, int64_t i, npy_intp *d, int64_t B, int64_t T) {
    d[0] = B; d[1] = c->n_heads; d[2] = T; return 3;
}
static int shape_q(const sf_config *c, int64_t i, npy_intp *d, int64_t B, int64_t T) {
    d[0] = B; d[1] = T; d[2] = c->n_heads; d[3] = c->d_model / c->n_heads; return 4;
}
static int shape_kv(const sf_config *c, int64_t i, npy_intp *d, int64_t B, int64_t T) {
    d[0] = B; d[1] = T; d[2] = c->n_kv_heads; d[3] = c->d_model / c->n_heads; return 4;
}
static int shape_btf(const sf_config *c, int64_t i, npy_intp *d, int64_t B, int64_t T) {
    d[0] = B; d[1] = T; d[2] = c->d_ff; return 3;
}

/* ---- the one input parser of forward and forward_backward ------------------------------
 * It only converts: arrays to the C types, refusing values the conversion would change (an
 * int64 token of 2**32 + 5 must not become 5, a mask value of 256 must not become 0, a uint64
 * near 2**64 must not become -100 = ignore_index) and shapes that do not line up. Everything C
 * checks (token and target ranges, B, T, max_seq_len, non-finite embeddings after the float32
 * conversion, mask values) it leaves to C. */
typedef struct {
    PyArrayObject *tok, *emb, *mask, *tgt;
    int64_t B, T;
} batch;

static void batch_clear(batch *b) {
    Py_XDECREF(b->tok); Py_XDECREF(b->emb); Py_XDECREF(b->mask); Py_XDECREF(b->tgt);
    memset(b, 0, sizeof *b);
}

/* An integer (or bool) array as a C-contiguous array of `type` (NPY_INT32 or NPY_UINT8); NULL
 * with an exception set when a value falls outside [lo, hi] (the message names `what`, the
 * value and its index; IndexError for ids, ValueError otherwise) */
static PyArrayObject *narrow_ints(PyArrayObject *in, int type, int64_t lo, int64_t hi, const char *what,
                                  const char *range, PyObject *exc) {
    int is_u64 = PyArray_TYPE(in) == NPY_UINT64 || PyArray_TYPE(in) == NPY_ULONGLONG || PyArray_TYPE(in) == NPY_ULONG;
    PyArrayObject *a64 = (PyArrayObject *)PyArray_FROMANY((PyObject *)in, NPY_INT64, 0, 0,
                                                         NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST);
    if (!a64) return NULL;
    const int64_t *v = (const int64_t *)PyArray_DATA(a64);
    for (npy_intp r = 0, n = PyArray_SIZE(a64); r < n; r++) {
        if (v[r] >= lo && v[r] <= hi && !(is_u64 && v[r] < 0)) continue;
        if (is_u64) PyErr_Format(exc, "%s %llu at flat index %lld is outside %s", what, (unsigned long long)v[r], (long long)r, range);
        else PyErr_Format(exc, "%s %lld at flat index %lld is outside %s", what, (long long)v[r], (long long)r, range);
        Py_DECREF(a64);
        return NULL;
    }
    PyArrayObject *out = (PyArrayObject *)PyArray_FROMANY((PyObject *)a64, type, 0, 0,
                                                         NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST);
    Py_DECREF(a64);
    return out;
}

/* (B, T) of an array that must be (B, T), or (T,) for B == 1 */
static int bt_matches(PyArrayObject *a, int64_t B, int64_t T) {
    int nd = PyArray_NDIM(a);
    if (nd == 1) return B == 1 && PyArray_DIM(a, 0) == T;
    return nd == 2 && PyArray_DIM(a, 0) == B && PyArray_DIM(a, 1) == T;
}

/* input: integer ids (T,) / (B, T) or float embeddings (B, T, d_model); mask_obj: None or
 * (B, T) bool/int of 0/1; targets_obj: NULL (forward) or integer ids shaped like the batch */
static int parse_batch(const sf_config *c, const char *name, PyObject *input, PyObject *mask_obj, PyObject *targets_obj, batch *b) {
    memset(b, 0, sizeof *b);
    char vocab[64];
    PyOS_snprintf(vocab, sizeof vocab, "[0, vocab_size=%lld)", (long long)c->vocab_size);
    if (!PyArray_Check(input)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy array of token ids or embeddings, got %.200s", name, Py_TYPE(input)->tp_name);
        return -1;
    }
    PyArrayObject *in = (PyArrayObject *)input;
    int kind = PyArray_DESCR(in)->kind, nd = PyArray_NDIM(in);
    if (kind == 'i' || kind == 'u') {
        if (nd != 1 && nd != 2) {
            PyErr_Format(PyExc_ValueError, "tokens must have shape (T,) or (B, T), got %d dimensions", nd);
            return -1;
        }
        /* ids beyond int32 are refused here (they would wrap); C checks [0, vocab_size) */
        if (!(b->tok = narrow_ints(in, NPY_INT32, INT32_MIN, INT32_MAX, "token id", vocab, PyExc_IndexError))) return -1;
        b->B = nd == 2 ? PyArray_DIM(in, 0) : 1;
        b->T = PyArray_DIM(in, nd - 1);
    } else if (kind == 'f') {
        if (nd != 3 || PyArray_DIM(in, 2) != c->d_model) {
            PyErr_Format(PyExc_ValueError, "float %s must be embeddings of shape (B, T, d_model=%lld); token ids must be an integer array",
                         name, (long long)c->d_model);
            return -1;
        }
        /* to float32 first: C checks finiteness of what it computes with (1e39 becomes inf) */
        if (!(b->emb = (PyArrayObject *)PyArray_FROMANY(input, NPY_FLOAT32, 3, 3, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST))) return -1;
        b->B = PyArray_DIM(in, 0);
        b->T = PyArray_DIM(in, 1);
    } else {
        PyErr_Format(PyExc_TypeError, "%s must be integer token ids or float embeddings, got dtype %R", name, (PyObject *)PyArray_DESCR(in));
        return -1;
    }
    if (mask_obj != Py_None) {
        if (!PyArray_Check(mask_obj)) { PyErr_SetString(PyExc_TypeError, "key_padding_mask must be a numpy array of shape (B, T)"); goto fail; }
        PyArrayObject *mo = (PyArrayObject *)mask_obj;
        int mk = PyArray_DESCR(mo)->kind;
        if (mk != 'b' && mk != 'i' && mk != 'u') { PyErr_SetString(PyExc_TypeError, "key_padding_mask must be bool or integer (1 = real token, 0 = padding)"); goto fail; }
        if (!bt_matches(mo, b->B, b->T)) { PyErr_Format(PyExc_ValueError, "key_padding_mask must have shape (B=%lld, T=%lld)", (long long)b->B, (long long)b->T); goto fail; }
        /* 0..255 survive the uint8 conversion unchanged; C refuses anything but 0 and 1 */
        if (!(b->mask = narrow_ints(mo, NPY_UINT8, 0, 255, "key_padding_mask value", "{0, 1} (1 = real token, 0 = padding)", PyExc_ValueError))) goto fail;
    }
    if (targets_obj) {
        if (!PyArray_Check(targets_obj)) { PyErr_SetString(PyExc_TypeError, "targets must be a numpy array of token ids"); goto fail; }
        PyArrayObject *to = (PyArrayObject *)targets_obj;
        int tk = PyArray_DESCR(to)->kind;
        if (tk != 'i' && tk != 'u') { PyErr_SetString(PyExc_TypeError, "targets must be an integer array"); goto fail; }
        if (!bt_matches(to, b->B, b->T)) {
            PyErr_Format(PyExc_ValueError, "targets must have shape (B=%lld, T=%lld) like the inputs", (long long)b->B, (long long)b->T);
            goto fail;
        }
        /* int32 both ways (ignore_index may be negative); C checks [0, vocab_size) */
        if (!(b->tgt = narrow_ints(to, NPY_INT32, INT32_MIN, INT32_MAX, "target", vocab, PyExc_IndexError))) goto fail;
    }
    return 0;
fail:
    batch_clear(b);
    return -1;
}

/* ---- interventions: the patch dict into an sf_patch ------------------------------------
 * {"embed": a, "resid_pre"|"resid_mid"|"attn_out"|"mlp_out": {i: a}, "alpha": {k: a},
 *  "ablate": {k: mask}}; stackformer.Model builds it from hook names. Arrays must already be
 * float32 (masks uint8), C-contiguous, of the exact shape of the trace at that point: this
 * only checks and points (the values' checks are C's, sf_forward_check). */
typedef struct { sf_patch p; const float **lists, **slots; const uint8_t **masks, **dmasks; } patch_buf;

static const void *patch_array(PyObject *a, int type, int nd, const npy_intp *dims, const char *what) {
    if (!PyArray_Check(a) || PyArray_TYPE((PyArrayObject *)a) != type || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)a)) {
        PyErr_Format(PyExc_TypeError, "patch %s must be a C-contiguous %s array", what, type == NPY_FLOAT32 ? "float32" : "uint8");
        return NULL;
    }
    PyArrayObject *x = (PyArrayObject *)a;
    int ok = PyArray_NDIM(x) == nd;
    for (int j = 0; ok && j < nd; j++) ok = PyArray_DIM(x, j) == dims[j];
    if (!ok) {
        char want[96] = "(", got[96] = "(";
        for (int j = 0; j < nd; j++) snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", j ? ", " : "", (long long)dims[j]);
        for (int j = 0; j < PyArray_NDIM(x) && j < 8; j++) snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", j ? ", " : "", (long long)PyArray_DIM(x, j));
        PyErr_Format(PyExc_ValueError, "patch %s must have shape %s), got %s)", what, want, got);
        return NULL;
    }
    return PyArray_DATA(x);
}

static int parse_patch(const sf_config *c, PyObject *obj, int64_t B, int64_t T, patch_buf *pb) {
    const int64_t n = c->n_layers, L = 2 * n;
    memset(pb, 0, sizeof *pb);
    if (!PyDict_Check(obj)) { PyErr_SetString(PyExc_TypeError, "patch must be a dict"); return -1; }
    pb->lists = PyMem_Calloc((size_t)(4 * n + L + 1), sizeof(float *));
    pb->masks = PyMem_Calloc((size_t)(L + 1), sizeof(uint8_t *));
    pb->dmasks = PyMem_Calloc((size_t)n, sizeof(uint8_t *));
    const int64_t nslots = c->moda ? (c->moda_depth_kv == SF_DKV_ATTN ? 1 : 2) * (n - 1) : 0;
    pb->slots = PyMem_Calloc((size_t)(2 * nslots + 1), sizeof(float *));
    if (!pb->lists || !pb->masks || !pb->dmasks || !pb->slots) { PyErr_NoMemory(); return -1; }
    npy_intp btkv[4] = {(npy_intp)B, (npy_intp)T, (npy_intp)c->n_kv_heads, (npy_intp)(c->d_model / c->n_heads)};
    npy_intp btd[3] = {(npy_intp)B, (npy_intp)T, (npy_intp)c->d_model};
    PyObject *key, *val;
    Py_ssize_t pos = 0;
    static const char *kinds[] = {"resid_pre", "resid_mid", "attn_out", "mlp_out"};
    while (PyDict_Next(obj, &pos, &key, &val)) {
        const char *k = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
        if (!k) { if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "patch keys must be strings"); return -1; }
        if (!strcmp(k, "embed")) {
            if (!(pb->p.embed = patch_array(val, NPY_FLOAT32, 3, btd, "hook_embed"))) return -1;
            continue;
        }
        int kind = -1;
        for (int j = 0; j < 4; j++) if (!strcmp(k, kinds[j])) kind = j;
        const int is_alpha = !strcmp(k, "alpha"), is_ablate = !strcmp(k, "ablate"), is_depth = !strcmp(k, "depth_ablate");
        const int is_dk = !strcmp(k, "depth_k"), is_dv = !strcmp(k, "depth_v");
        if (kind < 0 && !is_alpha && !is_ablate && !is_depth && !is_dk && !is_dv) { PyErr_Format(PyExc_KeyError, "unknown patch kind %R", key); return -1; }
        if (!PyDict_Check(val)) { PyErr_Format(PyExc_TypeError, "patch[%R] must be a dict of index -> array", key); return -1; }
        const int64_t count = is_dk || is_dv ? nslots : kind >= 0 || is_depth ? n : L + 1;
        PyObject *ik, *iv;
        Py_ssize_t ip = 0;
        while (PyDict_Next(val, &ip, &ik, &iv)) {
            long long i = PyLong_AsLongLong(ik);
            if (i == -1 && PyErr_Occurred()) return -1;
            if (i < 0 || i >= count) { PyErr_Format(PyExc_IndexError, "patch[%R] index %lld is outside [0, %lld)", key, i, (long long)count); return -1; }
            char what[64];
            snprintf(what, sizeof what, "%s[%lld]", k, i);
            if (kind >= 0) {
                const float *a = patch_array(iv, NPY_FLOAT32, 3, btd, what);
                if (!a) return -1;
                pb->lists[kind * n + i] = a;
            } else if (is_dk || is_dv) {
                const float *a = patch_array(iv, NPY_FLOAT32, 4, btkv, what);
                if (!a) return -1;
                pb->slots[(is_dv ? nslots : 0) + i] = a;
            } else if (is_alpha) {
                npy_intp dims[4];
                int nd = shape_alpha(c, i, dims, B, T);
                const float *a = patch_array(iv, NPY_FLOAT32, nd, dims, what);
                if (!a) return -1;
                pb->lists[4 * n + i] = a;
            } else if (is_depth) {
                npy_intp dims[1] = {(npy_intp)(sf_depth_cols(c, i) / c->moda_chunk)};
                const uint8_t *m = patch_array(iv, NPY_UINT8, 1, dims, what);
                if (!m) return -1;
                pb->dmasks[i] = m;
            } else {
                npy_intp dims[1] = {(npy_intp)sf_attnres_num_sources(c, i)};
                const uint8_t *m = patch_array(iv, NPY_UINT8, 1, dims, what);
                if (!m) return -1;
                pb->masks[i] = m;
            }
        }
        if (kind == 0) pb->p.resid_pre = pb->lists;
        else if (kind == 1) pb->p.resid_mid = pb->lists + n;
        else if (kind == 2) pb->p.attn_out = pb->lists + 2 * n;
        else if (kind == 3) pb->p.mlp_out = pb->lists + 3 * n;
        else if (is_alpha) pb->p.alpha = pb->lists + 4 * n;
        else if (is_depth) pb->p.depth_ablate = pb->dmasks;
        else if (is_dk) pb->p.depth_k = pb->slots;
        else if (is_dv) pb->p.depth_v = pb->slots + nslots;
        else pb->p.ablate = pb->masks;
    }
    return 0;
}

static void patch_clear(patch_buf *pb) {
    PyMem_Free(pb->lists);
    PyMem_Free(pb->masks);
    PyMem_Free(pb->dmasks);
    PyMem_Free(pb->slots);
    pb->slots = NULL;
    pb->lists = NULL;
    pb->masks = NULL;
    pb->dmasks = NULL;
}

static PyObject *CModel_forward(CModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"input", "key_padding_mask", "logits", "hidden", "trace",
                             "trace_layers", "two_phase", "n_threads", "cache", "patch", NULL};
    PyObject *input = NULL, *mask_obj = Py_None, *layers_obj = Py_None, *cache_obj = Py_None, *patch_obj = Py_None;
    int want_logits = 1, want_hidden = 0, flags = 0, two_phase = 1, n_threads = 0;
    if (!ready(self)) return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|OppiOpiOO", kwlist, &input, &mask_obj,
                                     &want_logits, &want_hidden, &flags, &layers_obj, &two_phase,
                                     &n_threads, &cache_obj, &patch_obj))
        return NULL;
    sf_cache *cache = NULL;
    if (cache_obj != Py_None) {
        if (!PyObject_TypeCheck(cache_obj, &CCacheType) || ((CCache *)cache_obj)->owner != (PyObject *)self) {
            PyErr_SetString(PyExc_TypeError, "cache must be a cache created by this model");
            return NULL;
        }
        cache = ((CCache *)cache_obj)->cache;
    }
    const sf_config *c = sf_model_config(self->model);
    if (n_threads < 0 || n_threads > 1024) {
        PyErr_Format(PyExc_ValueError, "n_threads must be in [0, 1024], got %d", n_threads);
        return NULL;
    }
    batch in;
    PyObject *logits = NULL, *hidden = NULL, *tdict = NULL;
    float **ptrs = NULL;
    sf_trace tr = {0};
    patch_buf pb = {0};
    if (parse_batch(c, "input", input, mask_obj, NULL, &in) < 0) return NULL;
    const int64_t B = in.B, T = in.T;
    sf_forward_args fa = {in.tok ? (const int32_t *)PyArray_DATA(in.tok) : NULL,
                          in.emb ? (const float *)PyArray_DATA(in.emb) : NULL,
                          in.mask ? (const uint8_t *)PyArray_DATA(in.mask) : NULL, B, T, two_phase, n_threads, cache};
    if (patch_obj != Py_None) { /* the dict (and so its arrays) outlives the call: the caller holds it */
        if (parse_patch(c, patch_obj, B, T, &pb) < 0) goto fail;
        fa.patch = &pb.p;
    }
    char err[ERRLEN] = {0};
    sf_status st = sf_forward_check(self->model, &fa, flags != 0, err, sizeof err); /* before allocating outputs */
    if (st != SF_OK) { status_error(st, err); goto fail; }
    /* layer selection for traces: indices in [0, n_layers]; n_layers = the output end */
    int64_t n = c->n_layers, L = 2 * n;
    char *sel = PyMem_Calloc((size_t)(n + 1), 1);
    if (!sel) { PyErr_NoMemory(); goto fail; }
    if (layers_obj == Py_None) memset(sel, 1, (size_t)(n + 1));
    else {
        PyObject *seq = PySequence_Fast(layers_obj, "trace_layers must be a sequence of layer indices");
        if (!seq) { PyMem_Free(sel); goto fail; }
        for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(seq); j++) {
            long long li = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, j));
            if (li == -1 && PyErr_Occurred()) { Py_DECREF(seq); PyMem_Free(sel); goto fail; }
            if (li < 0 || li > n) { PyErr_Format(PyExc_IndexError, "trace layer %lld is outside [0, n_layers=%lld]", li, (long long)n); Py_DECREF(seq); PyMem_Free(sel); goto fail; }
            sel[li] = 1;
        }
        Py_DECREF(seq);
    }
    {   /* outputs and traces this call allocates, then C checks them with its workspace as one
         * total before either exists */
        double bt = (double)B * (double)T, est = 4.0 * bt * ((want_logits ? c->vocab_size : 0) + (want_hidden ? c->d_model : 0));
        double nsel = 0;
        for (int64_t j = 0; j <= n; j++) nsel += sel[j];
        if (flags & TR_ATTENTION) est += 4.0 * nsel * bt * c->n_heads * ((double)T + sf_depth_cols(c, n));
        if (flags & (TR_HIDDEN | TR_SUBLAYER)) est += 4.0 * 3.0 * nsel * bt * c->d_model;
        if (flags & TR_ALPHA) est += 4.0 * 2.0 * nsel * bt * (2.0 * n + 2) * (double)c->attnres_heads;
        if (flags & TR_ACTIVATIONS) {
            double dh = (double)(c->d_model / c->n_heads);
            est += 4.0 * bt * c->d_model + 4.0 * nsel * bt * (c->d_model + 2.0 * c->n_heads * dh
                                                               + 2.0 * c->n_kv_heads * dh + c->d_ff);
        }
        st = sf_forward_memory_check(self->model, &fa, (flags & TR_RMS) != 0, (flags & TR_ALPHA) != 0,
                                     est < 9.0e18 ? (int64_t)est : INT64_MAX / 2, err, sizeof err);
        if (st != SF_OK) { status_error(st, err); PyMem_Free(sel); goto fail; }
    }
    tdict = PyDict_New();
    ptrs = PyMem_Calloc((size_t)(14 * (L + 2)), sizeof(float *));
    if (!tdict || !ptrs) { PyMem_Free(sel); if (!ptrs) PyErr_NoMemory(); goto fail; }
    const int64_t spl = c->moda_depth_kv == SF_DKV_ATTN ? 1 : 2; /* depth slots a block writes */
    struct { int flag; const char *name; int64_t count; int (*shape)(const sf_config *, int64_t, npy_intp *, int64_t, int64_t); float ***dst; int div; int ok; } items[] = {
        {TR_ATTENTION, "attention", n, shape_attention, &tr.attention, 1, 1},
        {TR_HIDDEN, "hidden", n + 1, shape_btd, &tr.hidden, 1, 1},
        {TR_SUBLAYER, "attn_out", n, shape_btd, &tr.attn_out, 1, 1},
        {TR_SUBLAYER, "mlp_out", n, shape_btd, &tr.mlp_out, 1, 1},
        {TR_ALPHA, "alpha", L + 1, shape_alpha, &tr.alpha, 2, c->residual != SF_RES_PLAIN},
        {TR_DEPTH, "depth_mass", n, shape_bht, &tr.depth_mass, 1, c->moda},
        {TR_ACTIVATIONS, "hidden_mid", n, shape_btd, &tr.hidden_mid, 1, 1},
        {TR_ACTIVATIONS, "q", n, shape_q, &tr.q, 1, 1},
        {TR_ACTIVATIONS, "k", n, shape_kv, &tr.k, 1, 1},
        {TR_ACTIVATIONS, "v", n, shape_kv, &tr.v, 1, 1},
        {TR_ACTIVATIONS, "z", n, shape_q, &tr.z, 1, 1},
        {TR_ACTIVATIONS, "mlp_post", n, shape_btf, &tr.mlp_post, 1, 1},
        /* MoDA: depth slot s (spl per block, block s / spl wrote it) as stored */
        {TR_ACTIVATIONS, "depth_k", spl * (n - 1), shape_kv, &tr.depth_k, (int)spl, c->moda},
        {TR_ACTIVATIONS, "depth_v", spl * (n - 1), shape_kv, &tr.depth_v, (int)spl, c->moda},
    };
    enum { N_ITEMS = sizeof items / sizeof items[0] };
    for (int j = 0; j < N_ITEMS; j++) {
        if (!(flags & items[j].flag) || !items[j].ok) continue;
        float **p = ptrs + j * (L + 2);
        PyObject *lst = alloc_list(items[j].count, sel, n + 1, items[j].shape, c, B, T, p, items[j].div);
        if (!lst || PyDict_SetItemString(tdict, items[j].name, lst) < 0) { Py_XDECREF(lst); PyMem_Free(sel); goto fail; }
        Py_DECREF(lst);
        *items[j].dst = p;
    }
    PyMem_Free(sel);
    if (flags & TR_ACTIVATIONS) {
        npy_intp edims[3] = {(npy_intp)B, (npy_intp)T, (npy_intp)c->d_model};
        PyObject *e = PyArray_ZEROS(3, edims, NPY_FLOAT32, 0);
        if (!e || PyDict_SetItemString(tdict, "embed", e) < 0) { Py_XDECREF(e); goto fail; }
        tr.embed = (float *)PyArray_DATA((PyArrayObject *)e);
        Py_DECREF(e);
    }
    if (flags & TR_RMS) {
        npy_intp dims[2] = {(npy_intp)(L + 1), SF_RMS_COLS};
        PyObject *r = PyArray_ZEROS(2, dims, NPY_FLOAT32, 0);
        if (!r || PyDict_SetItemString(tdict, "rms", r) < 0) { Py_XDECREF(r); goto fail; }
        tr.rms = (float *)PyArray_DATA((PyArrayObject *)r);
        Py_DECREF(r);
        if (c->residual == SF_RES_HYPER_CONNECTIONS || c->residual == SF_RES_MHC) {
            npy_intp cdims[2] = {(npy_intp)(L + 1), (npy_intp)c->hc_expansion};
            PyObject *cr = PyArray_ZEROS(2, cdims, NPY_FLOAT32, 0);
            if (!cr || PyDict_SetItemString(tdict, "copy_rms", cr) < 0) { Py_XDECREF(cr); goto fail; }
            tr.copy_rms = (float *)PyArray_DATA((PyArrayObject *)cr);
            Py_DECREF(cr);
        }
    }
    npy_intp odims[3] = {(npy_intp)B, (npy_intp)T, (npy_intp)c->vocab_size};
    if (want_logits && !(logits = PyArray_EMPTY(3, odims, NPY_FLOAT32, 0))) goto fail;
    odims[2] = (npy_intp)c->d_model;
    if (want_hidden && !(hidden = PyArray_EMPTY(3, odims, NPY_FLOAT32, 0))) goto fail;
    fa.cancel = interrupt_begin((double)B * (double)T * (double)c->d_model * (double)c->n_layers);
    Py_BEGIN_ALLOW_THREADS
    st = sf_forward(self->model, &fa,
                    logits ? (float *)PyArray_DATA((PyArrayObject *)logits) : NULL,
                    hidden ? (float *)PyArray_DATA((PyArrayObject *)hidden) : NULL,
                    flags ? &tr : NULL, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (interrupt_end(fa.cancel, st) < 0) goto fail;
    if (st != SF_OK) { status_error(st, err); goto fail; }
    batch_clear(&in);
    patch_clear(&pb);
    PyMem_Free(ptrs);
    return Py_BuildValue("(NNN)", logits ? logits : (Py_INCREF(Py_None), Py_None),
                         hidden ? hidden : (Py_INCREF(Py_None), Py_None), tdict);
fail:
    batch_clear(&in);
    patch_clear(&pb);
    Py_XDECREF(logits); Py_XDECREF(hidden); Py_XDECREF(tdict);
    PyMem_Free(ptrs);
    return NULL;
}

/* ---- training ------------------------------------------------------------------------- */

static PyObject *flat_view(CModel *self, float *ptr) {
    npy_intp n = (npy_intp)sf_model_num_params(self->model);
    PyObject *arr = PyArray_SimpleNewFromData(1, &n, NPY_FLOAT32, ptr);
    if (!arr) return NULL;
    Py_INCREF(self);
    if (PyArray_SetBaseObject((PyArrayObject *)arr, (PyObject *)self) < 0) { Py_DECREF(arr); return NULL; }
    return arr;
}

static PyObject *CModel_grads(CModel *self, void *c) { return ready(self) ? flat_view(self, sf_model_grads(self->model)) : NULL; }
static PyObject *CModel_adam_m(CModel *self, void *c) { return ready(self) ? flat_view(self, sf_model_adam_m(self->model)) : NULL; }
static PyObject *CModel_adam_v(CModel *self, void *c) { return ready(self) ? flat_view(self, sf_model_adam_v(self->model)) : NULL; }

static PyObject *CModel_get_step(CModel *self, void *c) {
    if (!ready(self)) return NULL;
    return PyLong_FromLongLong((long long)sf_model_step_count(self->model));
}
static int CModel_set_step(CModel *self, PyObject *v, void *c) {
    if (!ready(self)) return -1;
    if (!v) { PyErr_SetString(PyExc_TypeError, "cannot delete step"); return -1; }
    long long s = PyLong_AsLongLong(v);
    if (s == -1 && PyErr_Occurred()) return -1;
    if (s < 0) { PyErr_SetString(PyExc_ValueError, "step must be >= 0"); return -1; }
    sf_model_set_step_count(self->model, (int64_t)s);
    return 0;
}

static PyObject *CModel_forward_backward(CModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"input", "targets", "key_padding_mask", "ignore_index", "checkpoint", "n_threads", "dropout_seed", NULL};
    PyObject *input, *targets_obj, *mask_obj = Py_None;
    int ignore_index = -100, checkpoint = 0, n_threads = 0;
    unsigned long long dropout_seed = 0;
    if (!ready(self)) return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OipiK", kwlist, &input, &targets_obj, &mask_obj,
                                     &ignore_index, &checkpoint, &n_threads, &dropout_seed))
        return NULL;
    const sf_config *c = sf_model_config(self->model);
    if (n_threads < 0 || n_threads > 1024) { PyErr_Format(PyExc_ValueError, "n_threads must be in [0, 1024], got %d", n_threads); return NULL; }
    batch in;
    PyObject *result = NULL;
    if (parse_batch(c, "inputs", input, mask_obj, targets_obj, &in) < 0) return NULL;
    {
        sf_train_args ta = {in.tok ? (const int32_t *)PyArray_DATA(in.tok) : NULL,
                            in.emb ? (const float *)PyArray_DATA(in.emb) : NULL,
                            in.mask ? (const uint8_t *)PyArray_DATA(in.mask) : NULL,
                            (const int32_t *)PyArray_DATA(in.tgt), in.B, in.T, ignore_index, checkpoint, n_threads,
                            (uint64_t)dropout_seed};
        char err[ERRLEN] = {0};
        double loss = 0.0;
        int64_t count = 0;
        sf_status st;
        ta.cancel = interrupt_begin((double)in.B * (double)in.T * (double)c->d_model * (double)c->n_layers);
        Py_BEGIN_ALLOW_THREADS
        st = sf_forward_backward(self->model, &ta, &loss, &count, err, sizeof err);
        Py_END_ALLOW_THREADS
        if (interrupt_end(ta.cancel, st) < 0) goto done;
        if (st == SF_ERR_NONFINITE && !in.emb) { PyErr_SetString(PyExc_FloatingPointError, err); goto done; }
        if (st != SF_OK) { status_error(st, err); goto done; }
        result = Py_BuildValue("(dL)", loss, (long long)count);
    }
done:
    batch_clear(&in);
    return result;
}

static PyObject *CModel_adamw_step(CModel *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"lr", "beta1", "beta2", "eps", "weight_decay", "clip_norm", NULL};
    sf_adamw o = {0.0f, 0.9f, 0.95f, 1e-8f, 0.0f, 0.0f};
    if (!ready(self)) return NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "f|fffff", kwlist, &o.lr, &o.beta1, &o.beta2, &o.eps, &o.weight_decay, &o.clip_norm))
        return NULL;
    char err[ERRLEN] = {0};
    float norm = 0.0f;
    sf_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sf_adamw_step(self->model, &o, &norm, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (st == SF_ERR_BUSY) { PyErr_SetString(PyExc_RuntimeError, err); return NULL; }
    if (st == SF_ERR_NONFINITE) { PyErr_SetString(PyExc_FloatingPointError, err); return NULL; }
    if (st != SF_OK) return status_error(st, err);
    return PyFloat_FromDouble((double)norm);
}

static PyObject *CModel_train_workspace_bytes(CModel *self, PyObject *args) {
    long long B, T;
    int ck = 0;
    if (!ready(self) || !PyArg_ParseTuple(args, "LL|p", &B, &T, &ck)) return NULL;
    if (B < 1 || T < 1) { PyErr_SetString(PyExc_ValueError, "B and T must be >= 1"); return NULL; }
    int64_t bytes = sf_train_workspace_bytes(sf_model_config(self->model), B, T, ck);
    if (bytes < 0) { PyErr_Format(PyExc_OverflowError, "the workspace size for B=%lld, T=%lld overflows 64 bits", B, T); return NULL; }
    return PyLong_FromLongLong((long long)bytes);
}

static PyObject *CModel_release_workspace(CModel *self, PyObject *unused) {
    if (!ready(self)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    sf_model_release_workspace(self->model);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* snapshot(params, grads, adam) -> (params | None, grads | None, adam_m | None, adam_v | None,
 * step): fresh float32 copies taken as one consistent state (sf_model_snapshot) */
static PyObject *CModel_snapshot(CModel *self, PyObject *args) {
    int want[3] = {0, 0, 0};
    if (!ready(self) || !PyArg_ParseTuple(args, "ppp", &want[0], &want[1], &want[2])) return NULL;
    npy_intp n = (npy_intp)sf_model_num_params(self->model);
    PyObject *arr[4] = {NULL, NULL, NULL, NULL};
    float *ptr[4] = {NULL, NULL, NULL, NULL};
    for (int i = 0; i < 4; i++) {
        if (!want[i < 2 ? i : 2]) continue;
        arr[i] = PyArray_SimpleNew(1, &n, NPY_FLOAT32);
        if (!arr[i]) { for (int j = 0; j < i; j++) Py_XDECREF(arr[j]); return NULL; }
        ptr[i] = (float *)PyArray_DATA((PyArrayObject *)arr[i]);
    }
    int64_t step = 0;
    Py_BEGIN_ALLOW_THREADS
    sf_model_snapshot(self->model, ptr[0], ptr[1], ptr[2], ptr[3], &step);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < 4; i++) if (!arr[i]) { Py_INCREF(Py_None); arr[i] = Py_None; }
    return Py_BuildValue("NNNNL", arr[0], arr[1], arr[2], arr[3], (long long)step);
}

/* a C-contiguous float32 array of num_params floats, or None (-> NULL) */
static int flat_arg(CModel *self, PyObject *o, const char *name, PyArrayObject **out) {
    *out = NULL;
    if (o == Py_None) return 0;
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(o, NPY_FLOAT32, 1, 1, NPY_ARRAY_IN_ARRAY);
    if (!a) return -1;
    if (PyArray_SIZE(a) != (npy_intp)sf_model_num_params(self->model)) {
        PyErr_Format(PyExc_ValueError, "%s must hold num_params=%lld floats", name, (long long)sf_model_num_params(self->model));
        Py_DECREF(a);
        return -1;
    }
    *out = a;
    return 0;
}

/* restore(params | None, which | None, adam_m | None, adam_v | None, step | None):
 * sf_model_restore; which is a bytes-like of num_tensors flags */
static PyObject *CModel_restore(CModel *self, PyObject *args) {
    PyObject *po, *wo, *mo, *vo, *so;
    if (!ready(self) || !PyArg_ParseTuple(args, "OOOOO", &po, &wo, &mo, &vo, &so)) return NULL;
    PyArrayObject *p = NULL, *am = NULL, *av = NULL;
    PyObject *res = NULL;
    Py_buffer wb = {0};
    int64_t step = 0;
    if (flat_arg(self, po, "params", &p) < 0 || flat_arg(self, mo, "adam_m", &am) < 0 || flat_arg(self, vo, "adam_v", &av) < 0) goto done;
    if (so != Py_None) {
        long long v = PyLong_AsLongLong(so);
        if (v == -1 && PyErr_Occurred()) goto done;
        step = (int64_t)v;
    }
    if (wo != Py_None) {
        if (PyObject_GetBuffer(wo, &wb, PyBUF_SIMPLE) < 0) goto done;
        if (wb.len != (Py_ssize_t)sf_model_num_tensors(self->model)) {
            PyErr_SetString(PyExc_ValueError, "which must hold one flag per tensor");
            goto done;
        }
    }
    char err[ERRLEN] = {0};
    sf_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sf_model_restore(self->model, p ? PyArray_DATA(p) : NULL, wb.buf, am ? PyArray_DATA(am) : NULL,
                          av ? PyArray_DATA(av) : NULL, so != Py_None ? &step : NULL, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (st != SF_OK) { status_error(st, err); goto done; }
    Py_INCREF(Py_None);
    res = Py_None;
done:
    if (wb.obj) PyBuffer_Release(&wb);
    Py_XDECREF(p);
    Py_XDECREF(am);
    Py_XDECREF(av);
    return res;
}

static PyObject *CModel_new_cache(CModel *self, PyObject *args) {
    long long B, max_len;
    if (!ready(self) || !PyArg_ParseTuple(args, "LL", &B, &max_len)) return NULL;
    char err[ERRLEN] = {0};
    sf_cache *c = NULL;
    sf_status st = sf_cache_create(self->model, B, max_len, &c, err, sizeof err);
    if (st != SF_OK) return status_error(st, err);
    CCache *obj = PyObject_New(CCache, &CCacheType);
    if (!obj) { sf_cache_free(c); return NULL; }
    obj->cache = c;
    Py_INCREF(self);
    obj->owner = (PyObject *)self;
    return (PyObject *)obj;
}

static void CCache_dealloc(CCache *self) {
    sf_cache_free(self->cache);
    Py_XDECREF(self->owner);
    PyObject_Free(self);
}
static PyObject *CCache_len(CCache *self, void *c) { return PyLong_FromLongLong((long long)sf_cache_len(self->cache)); }
static PyObject *CCache_reset(CCache *self, PyObject *unused) {
    if (sf_cache_reset(self->cache) != SF_OK) { PyErr_SetString(PyExc_RuntimeError, "the cache is in use by another call"); return NULL; }
    Py_RETURN_NONE;
}
static PyGetSetDef CCache_getset[] = {{"length", (getter)CCache_len, NULL, "positions held", NULL}, {NULL}};
static PyMethodDef CCache_methods[] = {{"reset", (PyCFunction)CCache_reset, METH_NOARGS, "forget all positions"}, {NULL}};
static PyTypeObject CCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stackformer._core.CCache",
    .tp_basicsize = sizeof(CCache),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "key/value cache for incremental decoding (use Model.generate)",
    .tp_dealloc = (destructor)CCache_dealloc,
    .tp_getset = CCache_getset,
    .tp_methods = CCache_methods,
};

static PyObject *CModel_num_params(CModel *self, void *closure) {
    if (!ready(self)) return NULL;
    return PyLong_FromLongLong((long long)sf_model_num_params(self->model));
}

static PyObject *CModel_depth_cols(CModel *self, PyObject *arg) {
    if (!ready(self)) return NULL;
    long long l = PyLong_AsLongLong(arg);
    if (l == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong((long long)sf_depth_cols(sf_model_config(self->model), l));
}

static PyObject *CModel_num_sources(CModel *self, PyObject *arg) {
    if (!ready(self)) return NULL;
    long long k = PyLong_AsLongLong(arg);
    if (k == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong((long long)sf_attnres_num_sources(sf_model_config(self->model), k));
}

static PyMethodDef CModel_methods[] = {
    {"tensors", (PyCFunction)CModel_tensors, METH_NOARGS, "[(name, offset, shape, layer, no_decay)] in buffer order"},
    {"forward", (PyCFunction)(void (*)(void))CModel_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(input, key_padding_mask=None, logits=True, hidden=False, trace=0, trace_layers=None, two_phase=True, n_threads=0) -> (logits, hidden, trace dict)"},
    {"depth_cols", (PyCFunction)CModel_depth_cols, METH_O, "depth columns of layer l in the attention trace"},
    {"num_sources", (PyCFunction)CModel_num_sources, METH_O, "AttnRes sources seen by sublayer k"},
    {"forward_backward", (PyCFunction)(void (*)(void))CModel_forward_backward, METH_VARARGS | METH_KEYWORDS,
     "forward_backward(input, targets, key_padding_mask=None, ignore_index=-100, checkpoint=False, n_threads=0) -> (mean loss, count)"},
    {"adamw_step", (PyCFunction)(void (*)(void))CModel_adamw_step, METH_VARARGS | METH_KEYWORDS,
     "adamw_step(lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0, clip_norm=0) -> grad norm"},
    {"train_workspace_bytes", (PyCFunction)CModel_train_workspace_bytes, METH_VARARGS, "train_workspace_bytes(B, T, checkpoint=False)"},
    {"new_cache", (PyCFunction)CModel_new_cache, METH_VARARGS, "new_cache(B, max_len) -> CCache"},
    {"release_workspace", (PyCFunction)CModel_release_workspace, METH_NOARGS, "free the cached training and forward workspaces"},
    {"snapshot", (PyCFunction)CModel_snapshot, METH_VARARGS, "snapshot(params, grads, adam) -> (params, grads, adam_m, adam_v, step) copies, consistent under the guard"},
    {"restore", (PyCFunction)CModel_restore, METH_VARARGS, "restore(params, which, adam_m, adam_v, step) under the write guard"},
    {NULL}};

static PyGetSetDef CModel_getset[] = {
    {"params", (getter)CModel_params, NULL, "flat float32 view of all parameters (writable)", NULL},
    {"num_params", (getter)CModel_num_params, NULL, "number of parameters", NULL},
    {"grads", (getter)CModel_grads, NULL, "flat float32 view of the gradients", NULL},
    {"adam_m", (getter)CModel_adam_m, NULL, "flat float32 view of AdamW's first moments", NULL},
    {"adam_v", (getter)CModel_adam_v, NULL, "flat float32 view of AdamW's second moments", NULL},
    {"step", (getter)CModel_get_step, (setter)CModel_set_step, "optimizer step count", NULL},
    {NULL}};

static PyTypeObject CModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "stackformer._core.CModel",
    .tp_basicsize = sizeof(CModel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "C-owned model: parameters and forward pass (use stackformer.Model instead)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CModel_init,
    .tp_dealloc = (destructor)CModel_dealloc,
    .tp_methods = CModel_methods,
    .tp_getset = CModel_getset,
};

static PyObject *core_set_num_threads(PyObject *m, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0 || n > 1024) { PyErr_Format(PyExc_ValueError, "threads must be in [0, 1024], got %ld", n); return NULL; }
    sf_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *core_get_num_threads(PyObject *m, PyObject *unused) {
    return PyLong_FromLong(sf_get_num_threads());
}

static PyObject *core_threads_capped(PyObject *m, PyObject *unused) {
    const char *why = sf_threads_capped();
    if (!why) Py_RETURN_NONE;
    return PyUnicode_FromString(why);
}

static PyObject *core_matmul_kernel(PyObject *m, PyObject *unused) {
    return PyUnicode_FromString(sf_matmul_kernel());
}

static PyObject *core_bf16_kernel(PyObject *m, PyObject *unused) {
    return PyUnicode_FromString(sf_bf16_kernel());
}

/* bf16_matmul(x (N,K), w (M,K), bias (M,) or None, path=-1, threads=0): y = bf16(x) bf16(w)^T
 * + bias with fp32 accumulation (the bf16 mode's product; tests and benchmarks) */
static PyObject *core_bf16_matmul(PyObject *m, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "w", "bias", "path", "threads", NULL};
    PyObject *xo, *wo, *bo = Py_None;
    int path = -1, threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|Oii:bf16_matmul", kwlist, &xo, &wo, &bo, &path, &threads)) return NULL;
    if (path < -1 || path > 2) { PyErr_Format(PyExc_ValueError, "path must be -1, 0, 1 or 2, got %d", path); return NULL; }
    if (path == 1 && !sf_bf16_native_usable()) { PyErr_SetString(PyExc_ValueError, "path=1 (native) needs a CPU with AVX512_BF16 whose results pass the bit-for-bit probe"); return NULL; }
    PyArrayObject *x = (PyArrayObject *)PyArray_FROM_OTF(xo, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
    PyArrayObject *w = x ? (PyArrayObject *)PyArray_FROM_OTF(wo, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY) : NULL;
    PyArrayObject *b = NULL, *y = NULL;
    if (!w) goto done;
    if (PyArray_NDIM(x) != 2 || PyArray_NDIM(w) != 2 || PyArray_DIM(x, 1) != PyArray_DIM(w, 1) ||
        PyArray_DIM(x, 0) < 1 || PyArray_DIM(w, 0) < 1 || PyArray_DIM(x, 1) < 1) {
        PyErr_SetString(PyExc_ValueError, "bf16_matmul: x must be (N, K) and w (M, K), all sizes >= 1");
        goto done;
    }
    npy_intp N = PyArray_DIM(x, 0), K = PyArray_DIM(x, 1), M = PyArray_DIM(w, 0);
    if (bo != Py_None) {
        b = (PyArrayObject *)PyArray_FROM_OTF(bo, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY);
        if (!b) goto done;
        if (PyArray_NDIM(b) != 1 || PyArray_DIM(b, 0) != M) { PyErr_SetString(PyExc_ValueError, "bf16_matmul: bias must be (M,)"); goto done; }
    }
    npy_intp dims[2] = {N, M};
    y = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    if (!y) goto done;
    sf_status st;
    Py_BEGIN_ALLOW_THREADS
    st = sf_bf16_matmul((float *)PyArray_DATA(y), (const float *)PyArray_DATA(x), (const float *)PyArray_DATA(w),
                        b ? (const float *)PyArray_DATA(b) : NULL, N, K, M, path, threads);
    Py_END_ALLOW_THREADS
    if (st != SF_OK) { Py_CLEAR(y); PyErr_NoMemory(); }
done:
    Py_XDECREF(x); Py_XDECREF(w); Py_XDECREF(b);
    return (PyObject *)y;
}

/* bf16_gemm_bench(N, K, M, reps=5, threads=0): seconds of the fastest of reps bf16 products
 * (N,K).(K,M) on packed operands (2 N K M flops; packing not timed) */
static PyObject *core_bf16_gemm_bench(PyObject *m, PyObject *args) {
    long long N, K, M;
    int reps = 5, threads = 0;
    if (!PyArg_ParseTuple(args, "LLL|ii:bf16_gemm_bench", &N, &K, &M, &reps, &threads)) return NULL;
    if (N < 1 || K < 1 || M < 1 || reps < 1 || N > (1LL << 24) || K > (1LL << 24) || M > (1LL << 24)) {
        PyErr_SetString(PyExc_ValueError, "bf16_gemm_bench: N, K, M must be in [1, 2^24] and reps >= 1");
        return NULL;
    }
    double t;
    Py_BEGIN_ALLOW_THREADS
    t = sf_bf16_gemm_bench(N, K, M, reps, threads);
    Py_END_ALLOW_THREADS
    if (t < 0) return PyErr_NoMemory();
    return PyFloat_FromDouble(t);
}

/* set_blas_sgemm(address, ilp64): address of a cblas_sgemm the caller loaded (0 = back to the
 * tiles). Only stackformer.blas calls this, after checking the library's integer width; the C
 * core probes the function on three small products before using it. */
static PyObject *core_set_blas_sgemm(PyObject *m, PyObject *args) {
    unsigned long long addr;
    int ilp64;
    if (!PyArg_ParseTuple(args, "Kp:set_blas_sgemm", &addr, &ilp64)) return NULL;
    char err[256] = "";
    if (sf_set_blas_sgemm((void *)(uintptr_t)addr, ilp64, err, sizeof err) != SF_OK) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* config_fields(): the field table as a list of (name, c_name, kind, default, lo, hi,
 * choices, doc) with kind one of "int", "bool", "enum", "real", "prob" and choices a tuple of
 * names (enums) or () */
static PyObject *core_config_fields(PyObject *m, PyObject *unused) {
    static const char *kinds[] = {"int", "bool", "enum", "real", "prob"};
    int32_t n = sf_config_num_fields();
    PyObject *out = PyList_New(n);
    if (!out) return NULL;
    for (int32_t i = 0; i < n; i++) {
        const sf_config_field *f = sf_config_field_at(i);
        PyObject *choices = PyUnicode_FromString(f->choices), *tup = NULL;
        if (choices && PyUnicode_GET_LENGTH(choices)) {
            PyObject *sep = PyUnicode_FromString("|");
            PyObject *lst = sep ? PyUnicode_Split(choices, sep, -1) : NULL;
            Py_XDECREF(sep);
            tup = lst ? PyList_AsTuple(lst) : NULL;
            Py_XDECREF(lst);
        } else if (choices) {
            tup = PyTuple_New(0);
        }
        Py_XDECREF(choices);
        PyObject *item = tup ? Py_BuildValue("(sssdddNs)", f->name, f->c_name, kinds[f->kind], f->def,
                                             f->lo, f->hi, tup, f->doc) : NULL;
        if (!item) { Py_DECREF(out); return NULL; }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

/* config_validate(**config): None, or ValueError/OverflowError with C's message */
static PyObject *core_config_validate(PyObject *m, PyObject *args, PyObject *kw) {
    if (args && PyTuple_GET_SIZE(args)) { PyErr_SetString(PyExc_TypeError, "config_validate takes keyword arguments only"); return NULL; }
    sf_config c;
    if (config_from_kwargs(kw, &c, NULL) < 0) return NULL;
    char err[ERRLEN] = {0};
    sf_status st = sf_config_validate(&c, err, sizeof err);
    if (st != SF_OK) return status_error(st, err);
    Py_RETURN_NONE;
}

/* config_tensors(**config) -> ([(name, shape)], num_params) of the model cfg describes, built
 * from C's table without allocating the model */
static PyObject *core_config_tensors(PyObject *m, PyObject *args, PyObject *kw) {
    if (args && PyTuple_GET_SIZE(args)) { PyErr_SetString(PyExc_TypeError, "config_tensors takes keyword arguments only"); return NULL; }
    sf_config c;
    if (config_from_kwargs(kw, &c, NULL) < 0) return NULL;
    char err[ERRLEN] = {0};
    sf_tensor_info *t = NULL;
    int32_t n = 0;
    int64_t total = 0;
    sf_status st = sf_config_tensors(&c, &t, &n, &total, err, sizeof err);
    if (st != SF_OK) return status_error(st, err);
    PyObject *list = PyList_New(n);
    for (int32_t i = 0; list && i < n; i++) {
        PyObject *item = t[i].ndim == 2 ? Py_BuildValue("(s(LL))", t[i].name, (long long)t[i].shape[0], (long long)t[i].shape[1])
                                        : Py_BuildValue("(s(L))", t[i].name, (long long)t[i].shape[0]);
        if (!item) { Py_CLEAR(list); break; }
        PyList_SET_ITEM(list, i, item);
    }
    free(t);
    return list ? Py_BuildValue("(NL)", list, (long long)total) : NULL;
}

static PyMethodDef core_methods[] = {
    {"config_tensors", (PyCFunction)(void (*)(void))core_config_tensors, METH_VARARGS | METH_KEYWORDS,
     "config_tensors(**fields) -> ([(name, shape)], num_params): the tensor table, nothing allocated"},
    {"config_fields", core_config_fields, METH_NOARGS, "the config field table (csrc/sf_config_fields.h)"},
    {"config_validate", (PyCFunction)(void (*)(void))core_config_validate, METH_VARARGS | METH_KEYWORDS,
     "config_validate(**fields): raise ValueError naming the first bad field (C's rules)"},
    {"set_num_threads", core_set_num_threads, METH_O, "set the default thread count (0 = all cores)"},
    {"get_num_threads", core_get_num_threads, METH_NOARGS, "default thread count"},
    {"threads_capped", core_threads_capped, METH_NOARGS, "None, or why teams run on fewer threads than asked (threads that could not start)"},
    {"matmul_kernel", core_matmul_kernel, METH_NOARGS,
     "what the Linear products run on: the register tile for this CPU, 'avx512', 'avx2' or 'generic' "
     "(all give the same bits), or 'blas' after stackformer.use_blas()"},
    {"bf16_kernel", core_bf16_kernel, METH_NOARGS,
     "what compute_dtype='bfloat16' products run on: 'avx512_bf16' (vdpbf16ps) or the emulated kernel (same bits)"},
    {"bf16_matmul", (PyCFunction)(void (*)(void))core_bf16_matmul, METH_VARARGS | METH_KEYWORDS,
     "bf16_matmul(x, w, bias=None, path=-1, threads=0): bf16(x) bf16(w)^T + bias, fp32 accumulation"},
    {"bf16_gemm_bench", core_bf16_gemm_bench, METH_VARARGS,
     "bf16_gemm_bench(N, K, M, reps=5, threads=0): seconds of the fastest bf16 product on packed operands"},
    {"set_blas_sgemm", core_set_blas_sgemm, METH_VARARGS,
     "set_blas_sgemm(address, ilp64): route sf_gemm to a cblas_sgemm (0: the built-in tiles); use stackformer.use_blas"},
    {NULL}};

static struct PyModuleDef core_module = {PyModuleDef_HEAD_INIT, "_core", "stackformer C core binding", -1, core_methods};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();
    {   /* the main thread: only its calls are interruptible (Python delivers signals there) */
        PyObject *th = PyImport_ImportModule("threading");
        PyObject *mt = th ? PyObject_CallMethod(th, "main_thread", NULL) : NULL;
        PyObject *id = mt ? PyObject_GetAttrString(mt, "ident") : NULL;
        g_main_ident = id ? PyLong_AsUnsignedLong(id) : 0;
        Py_XDECREF(id); Py_XDECREF(mt); Py_XDECREF(th);
        if (PyErr_Occurred()) return NULL;
    }
    if (PyType_Ready(&CModelType) < 0 || PyType_Ready(&CCacheType) < 0) return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (!m) return NULL;
    Py_INCREF(&CModelType);
    if (PyModule_AddObject(m, "CModel", (PyObject *)&CModelType) < 0) { Py_DECREF(&CModelType); Py_DECREF(m); return NULL; }
    PyModule_AddIntConstant(m, "TRACE_ATTENTION", TR_ATTENTION);
    PyModule_AddIntConstant(m, "TRACE_HIDDEN", TR_HIDDEN);
    PyModule_AddIntConstant(m, "TRACE_SUBLAYER", TR_SUBLAYER);
    PyModule_AddIntConstant(m, "TRACE_ALPHA", TR_ALPHA);
    PyModule_AddIntConstant(m, "TRACE_DEPTH", TR_DEPTH);
    PyModule_AddIntConstant(m, "TRACE_RMS", TR_RMS);
    PyModule_AddIntConstant(m, "TRACE_ACTIVATIONS", TR_ACTIVATIONS);
    return m;
}
