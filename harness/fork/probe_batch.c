/*
 * turbo-harness native probe: batches, many independent ops in one graph on one device (one probe call), and the
 * single set_rows / flash-attention calls, each a batch of one (so a batched op and a single one build the same
 * nodes). See probe.c for the library's contract.
 */
#include "probe.h"

/* ---------- batches: many independent ops in one graph on one device ---------- */

/*
 * tp_batch_begin(dev, max_ops); then tp_batch_set_rows / tp_batch_flash_attn once per op (each returns the op's
 * slot, >= 0, or -1 when the batch is not open or full); tp_batch_run() allocates one buffer for every op the
 * device supports, uploads their inputs, computes one graph and reads each output back; tp_batch_end() frees the
 * batch. tp_batch_status(slot) says 0 (measured), 1 (the device does not support the op: tp_batch_error says
 * which) or -1 (not measured: the run failed or never ran). An op the device declines is left out of the graph;
 * any other failure fails the whole run (the caller then runs the ops one by one). Input and output pointers
 * must stay valid until tp_batch_run returns. A single op (tp_set_rows, tp_flash_attn) is a batch of one, so a
 * batched op and a single one build the same graph nodes.
 */
#define TP_MAX_INPUTS 4
#define TP_TENSORS_PER_OP 12  /* flash attention: q, k, v, mask, wht, fa, reshape, wht (set_rows: 4) */

typedef struct {
    int status;
    char err[512];
    struct ggml_tensor * out;       /* the op's result: computed */
    struct ggml_tensor * read;      /* read back into out_host (set_rows: the destination, out's view source) */
    void * out_host;
    size_t out_bytes;
    int n_in;
    struct ggml_tensor * in[TP_MAX_INPUTS];
    const void * in_host[TP_MAX_INPUTS]; /* fill 0: the caller's data */
    int fill[TP_MAX_INPUTS];        /* 0 = copy in_host, 1 = int64 0..n-1, 2 = zeros */
} tp_slot;

static struct {
    int open;
    tp_run r;
    tp_slot * slots;
    int n, cap;
} B;

static struct ggml_context * scratch_ctx(void) {
    struct ggml_init_params ip = { ggml_tensor_overhead() * 16 + 1024, NULL, true };
    return ggml_init(ip);
}

int tp_batch_begin(const char * dev, int64_t max_ops) {
    if (B.open) {
        tpi_set_err("a batch is already open");
        return -1;
    }
    if (max_ops < 1) max_ops = 1;
    if (tpi_run_begin(&B.r, dev, (size_t) max_ops * TP_TENSORS_PER_OP)) return -1;
    B.slots = (tp_slot *) calloc((size_t) max_ops, sizeof(tp_slot));
    B.cap = (int) max_ops;
    B.n = 0;
    B.open = 1;
    return 0;
}

void tp_batch_end(void) {
    if (!B.open) return;
    tpi_run_end(&B.r);
    free(B.slots);
    memset(&B, 0, sizeof(B));
}

static tp_slot * new_slot(int * id) {
    if (!B.open || B.n == B.cap) {
        tpi_set_err(B.open ? "batch is full" : "no batch is open");
        *id = -1;
        return NULL;
    }
    *id = B.n;
    tp_slot * s = &B.slots[B.n++];
    memset(s, 0, sizeof(*s));
    s->status = -1;
    return s;
}

static void add_input(tp_slot * s, struct ggml_tensor * t, const void * host, int fill) {
    s->in[s->n_in] = t;
    s->in_host[s->n_in] = host;
    s->fill[s->n_in] = fill;
    s->n_in++;
}

/* set_rows: dst (type t) <- rows of x at indices 0..nrows-1; returns the node, *dst the destination tensor. */
static struct ggml_tensor * build_set_rows(struct ggml_context * ctx, int t, int64_t nrows, int64_t ncols,
                                           struct ggml_tensor ** dst, struct ggml_tensor ** x, struct ggml_tensor ** idx) {
    *dst = ggml_new_tensor_2d(ctx, (enum ggml_type) t, ncols, nrows);
    *x   = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ncols, nrows);
    *idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, nrows);
    return ggml_set_rows(ctx, *dst, *x, *idx);
}

/* Quantise nrows x ncols floats through ggml_set_rows into a tensor of type t: a batch op. */
int tp_batch_set_rows(int t, const float * src, int64_t nrows, int64_t ncols, void * out) {
    int id;
    tp_slot * s = new_slot(&id);
    if (!s) return -1;
    struct ggml_tensor *dst, *x, *idx;
    struct ggml_context * sc = scratch_ctx();  /* the support question is asked on tensors outside the batch */
    struct ggml_tensor * probe_node = build_set_rows(sc, t, nrows, ncols, &dst, &x, &idx);
    int rc = tpi_supports(B.r.dev, probe_node, "set_rows", s->err, sizeof(s->err));
    ggml_free(sc);
    if (rc) {
        s->status = 1;
        return id;
    }
    struct ggml_tensor * res = build_set_rows(B.r.ctx, t, nrows, ncols, &dst, &x, &idx);
    add_input(s, x, src, 0);
    add_input(s, idx, NULL, 1);
    s->out = res;
    s->read = dst;
    s->out_host = out;
    s->out_bytes = ggml_nbytes(dst);
    return id;
}

typedef struct {
    int tk, tv;
    int64_t D, Dv, n_q, n_kv, n_head, n_head_kv;
    float scale;
    int rotate_q, inverse_out, wht_group, prec_f32;
} tp_fa_args;

/* The flash-attention nodes in ctx; checks each op on the device as it is made (rc 1 + err when declined). */
static int build_flash_attn(struct ggml_context * ctx, ggml_backend_dev_t dev, const tp_fa_args * a, struct ggml_tensor ** ins,
                            struct ggml_tensor ** res, char * err, size_t n) {
    ins[0] = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, a->D, a->n_q, a->n_head);
    ins[1] = ggml_new_tensor_3d(ctx, (enum ggml_type) a->tk, a->D, a->n_kv, a->n_head_kv);
    ins[2] = ggml_new_tensor_3d(ctx, (enum ggml_type) a->tv, a->Dv, a->n_kv, a->n_head_kv);
    ins[3] = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, a->n_kv, a->n_q);
    struct ggml_tensor * qin = ins[0];
    int rc;
#if TP_WHT_NARGS != 0
    if (a->rotate_q) {
        qin = TP_WHT(ctx, ins[0], 0, a->wht_group);
        if ((rc = tpi_supports(dev, qin, "turbo_wht on Q", err, n))) return rc;
    }
#endif
    struct ggml_tensor * fa = ggml_flash_attn_ext(ctx, qin, ins[1], ins[2], ins[3], a->scale, 0.0f, 0.0f);
    if (a->prec_f32) ggml_flash_attn_ext_set_prec(fa, GGML_PREC_F32);
    if ((rc = tpi_supports(dev, fa, "flash_attn_ext", err, n))) return rc;
    *res = fa;
#if TP_WHT_NARGS != 0
    if (a->inverse_out) {
        struct ggml_tensor * flat = ggml_reshape_2d(ctx, fa, a->Dv, a->n_head * a->n_q);
        *res = TP_WHT(ctx, flat, 1, a->wht_group);
        if ((rc = tpi_supports(dev, *res, "turbo_wht on output", err, n))) return rc;
    }
#endif
    return 0;
}

/*
 * Flash attention with raw K/V bytes: a batch op.
 *   q:     float [n_head][n_q][D]          (ggml q: ne = {D, n_q, n_head})
 *   kbytes: type tk rows [n_head_kv][n_kv] of D values each
 *   vbytes: type tv rows [n_head_kv][n_kv] of Dv values each
 *   out:   float [n_q][n_head][Dv]         (ggml result: ne = {Dv, n_head, n_q})
 * rotate_q applies ggml_turbo_wht forward to q first, inverse_out applies the inverse to the
 * output, as the fork's llama graph does for turbo K and turbo V respectively. wht_group is the
 * rotation group size given to both ops. prec_f32 asks for f32 accumulation.
 */
int tp_batch_flash_attn(int tk, const void * kbytes, int tv, const void * vbytes,
                        const float * q, int64_t D, int64_t Dv, int64_t n_q, int64_t n_kv,
                        int64_t n_head, int64_t n_head_kv, float scale,
                        int rotate_q, int inverse_out, int wht_group, int prec_f32, float * out) {
    int id;
    tp_slot * s = new_slot(&id);
    if (!s) return -1;
#if TP_WHT_NARGS == 0
    if (rotate_q || inverse_out) {
        snprintf(s->err, sizeof(s->err), "this fork build has no ggml_turbo_wht op");
        s->status = 1;
        return id;
    }
#endif
    tp_fa_args a = { tk, tv, D, Dv, n_q, n_kv, n_head, n_head_kv, scale, rotate_q, inverse_out, wht_group, prec_f32 };
    struct ggml_tensor * ins[4];
    struct ggml_tensor * res = NULL;
    struct ggml_context * sc = scratch_ctx();
    int rc = build_flash_attn(sc, B.r.dev, &a, ins, &res, s->err, sizeof(s->err));
    ggml_free(sc);
    if (rc) {
        s->status = 1;
        return id;
    }
    build_flash_attn(B.r.ctx, B.r.dev, &a, ins, &res, s->err, sizeof(s->err));
    add_input(s, ins[0], q, 0);
    add_input(s, ins[1], kbytes, 0);
    add_input(s, ins[2], vbytes, 0);
    add_input(s, ins[3], NULL, 2);
    s->out = res;
    s->read = res;
    s->out_host = out;
    s->out_bytes = sizeof(float) * (size_t) (Dv * n_head * n_q);
    return id;
}

int tp_batch_status(int id) { return (B.open && id >= 0 && id < B.n) ? B.slots[id].status : -1; }

const char * tp_batch_error(int id) { return (B.open && id >= 0 && id < B.n) ? B.slots[id].err : "no such batch op"; }

static int upload(tp_slot * s) {
    for (int i = 0; i < s->n_in; i++) {
        struct ggml_tensor * t = s->in[i];
        size_t nb = ggml_nbytes(t);
        if (s->fill[i] == 0) {
            ggml_backend_tensor_set(t, s->in_host[i], 0, nb);
            continue;
        }
        void * tmp = calloc(1, nb);  /* fill 2: zeros (an fp16 mask of +0.0) */
        if (!tmp) {
            tpi_set_err("out of host memory");
            return -1;
        }
        if (s->fill[i] == 1) {
            int64_t * ids = (int64_t *) tmp;
            for (int64_t k = 0; k < (int64_t) (nb / sizeof(int64_t)); k++) ids[k] = k;
        }
        ggml_backend_tensor_set(t, tmp, 0, nb);
        free(tmp);
    }
    return 0;
}

int tp_batch_run(void) {
    if (!B.open) {
        tpi_set_err("no batch is open");
        return -1;
    }
    int n_run = 0;
    for (int i = 0; i < B.n; i++) n_run += B.slots[i].out != NULL && B.slots[i].status != 1;
    if (n_run == 0) return 0;  /* every op declined: nothing to compute */
    if (tpi_run_alloc(&B.r)) return -1;
    ggml_backend_buffer_clear(B.r.buf, 0);
    struct ggml_tensor ** outs = (struct ggml_tensor **) malloc(sizeof(*outs) * (size_t) n_run);
    int k = 0;
    for (int i = 0; i < B.n; i++) {
        tp_slot * s = &B.slots[i];
        if (s->out == NULL || s->status == 1) continue;
        if (upload(s)) { free(outs); return -1; }
        outs[k++] = s->out;
    }
    int rc = tpi_run_compute_many(&B.r, outs, n_run);
    free(outs);
    if (rc) return -1;
    for (int i = 0; i < B.n; i++) {
        tp_slot * s = &B.slots[i];
        if (s->out == NULL || s->status == 1) continue;
        ggml_backend_tensor_get(s->read, s->out_host, 0, s->out_bytes);
        s->status = 0;
    }
    return 0;
}

/* A batch of one op: rc 0, 1 (declined, the reason in tp_last_error) or -1. */
static int batch_of_one(int id) {
    int rc = -1;
    if (id >= 0) {
        if (B.slots[id].status == 1) {
            tpi_set_err(B.slots[id].err);
            rc = 1;
        } else {
            rc = tp_batch_run();
        }
    }
    tp_batch_end();
    return rc;
}

/* ---------- attention ---------- */

/* Flash attention with raw K/V bytes on device dev (see tp_batch_flash_attn for the layout): a batch of one. */
int tp_flash_attn(const char * dev, int tk, const void * kbytes, int tv, const void * vbytes,
                  const float * q, int64_t D, int64_t Dv, int64_t n_q, int64_t n_kv,
                  int64_t n_head, int64_t n_head_kv, float scale,
                  int rotate_q, int inverse_out, int wht_group, int prec_f32, float * out) {
    if (tp_batch_begin(dev, 1)) return -1;
    return batch_of_one(tp_batch_flash_attn(tk, kbytes, tv, vbytes, q, D, Dv, n_q, n_kv, n_head, n_head_kv, scale,
                                            rotate_q, inverse_out, wht_group, prec_f32, out));
}

/* ---------- quantisation ---------- */

/* Quantise nrows x ncols floats through ggml_set_rows into a tensor of type t on device dev. */
int tp_set_rows(const char * dev, int t, const float * src, int64_t nrows, int64_t ncols, void * out) {
    if (tp_batch_begin(dev, 1)) return -1;
    return batch_of_one(tp_batch_set_rows(t, src, nrows, ncols, out));
}
