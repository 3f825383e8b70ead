/*
 * turbo-harness native probe.
 *
 * A small C library, built against the fork's ggml headers and shared libraries, that exposes
 * exactly the observations the harness needs and nothing else:
 *   - the backend devices ggml's registry knows (no backend is named in this file),
 *   - type facts looked up by name (ggml_type_name), never by enum number,
 *   - quantisation through ggml_set_rows on a named device (the KV-cache write path) and through
 *     ggml_quantize_chunk (the fork's C quantiser),
 *   - decoding raw bytes through the CPU type traits or a graph op on a device,
 *   - the ggml_turbo_wht op, forward and inverse,
 *   - ggml_flash_attn_ext with raw quantised K/V bytes,
 *   - remote devices of ggml's RPC backend (an rpc-server at HOST:PORT) added to the registry, found
 *     through the registry ("RPC") and its proc address "ggml_backend_rpc_add_server", so that this file
 *     neither includes ggml-rpc.h nor links the RPC code: a build without RPC says so at run time.
 *
 * Every entry point returns 0 on success, 1 when the device does not support the op (the message
 * says which op), and -1 on any other failure; the message goes to tp_last_error().
 * The Python side runs this library in a worker process, so a ggml abort kills the worker only.
 *
 * Compile-time knobs, set by harness/fork/probe.py after reading the fork's ggml.h:
 *   TP_WHT_NARGS   number of arguments of ggml_turbo_wht (0 = op absent, 3, 4 or 5)
 */
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef TP_WHT_NARGS
#define TP_WHT_NARGS 0
#endif

static char tp_err[1024];

static void set_err(const char * msg) {
    snprintf(tp_err, sizeof(tp_err), "%s", msg);
}

const char * tp_last_error(void) { return tp_err; }

int tp_wht_nargs(void) { return TP_WHT_NARGS; }

/* ---------- devices ---------- */

int tp_dev_count(void) { return (int) ggml_backend_dev_count(); }

const char * tp_dev_name(int i) { return ggml_backend_dev_name(ggml_backend_dev_get((size_t) i)); }

const char * tp_dev_description(int i) { return ggml_backend_dev_description(ggml_backend_dev_get((size_t) i)); }

const char * tp_dev_reg_name(int i) {
    return ggml_backend_reg_name(ggml_backend_dev_backend_reg(ggml_backend_dev_get((size_t) i)));
}

/* 0 = CPU, 1 = GPU, 2 = ACCEL, 3 = IGPU (ggml_backend_dev_type order) */
int tp_dev_type(int i) { return (int) ggml_backend_dev_type(ggml_backend_dev_get((size_t) i)); }

/* Total memory of device i in bytes (over RPC: asked from the server). */
int64_t tp_dev_memory_total(int i) {
    size_t free_b = 0, total_b = 0;
    ggml_backend_dev_memory(ggml_backend_dev_get((size_t) i), &free_b, &total_b);
    return (int64_t) total_b;
}

/* Add the devices of the rpc-server at endpoint ("host:port") to the registry, as llama.cpp's --rpc does.
   Returns the number of devices added (>= 1), or -1 with the reason in tp_last_error(). */
typedef ggml_backend_reg_t (*tp_rpc_add_server_fn)(const char * endpoint);

int tp_rpc_add(const char * endpoint) {
    ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
    if (!rpc) {
        set_err("this fork build has no RPC backend: rebuild it with `turbo-harness build --rpc` (make build RPC=1)");
        return -1;
    }
    tp_rpc_add_server_fn add = (tp_rpc_add_server_fn) ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server");
    if (!add) {
        set_err("the RPC backend of this build has no ggml_backend_rpc_add_server");
        return -1;
    }
    ggml_backend_reg_t reg = add(endpoint);
    if (!reg) {
        snprintf(tp_err, sizeof(tp_err), "could not connect to the rpc-server at %s (or it reported no device)", endpoint);
        return -1;
    }
    ggml_backend_register(reg);
    return (int) ggml_backend_reg_dev_count(reg);
}

/* Bytes the buffer type of device dev allocates for a (ne0 x ne1) tensor of type t. Over RPC a quantised
   type whose rows are not a multiple of 512 values is sized by the server, with the server's own type
   traits (ggml-rpc.cpp: get_alloc_size), so this tells the server's row size of a type. -1 on failure. */
int64_t tp_alloc_size(const char * dev_name, int t, int64_t ne0, int64_t ne1) {
    ggml_backend_dev_t dev = ggml_backend_dev_by_name(dev_name);
    if (!dev) {
        snprintf(tp_err, sizeof(tp_err), "no ggml device named '%s'", dev_name);
        return -1;
    }
    struct ggml_init_params ip = { ggml_tensor_overhead() * 2 + 1024, NULL, true };
    struct ggml_context * ctx = ggml_init(ip);
    struct ggml_tensor * x = ggml_new_tensor_2d(ctx, (enum ggml_type) t, ne0, ne1);
    int64_t n = (int64_t) ggml_backend_buft_get_alloc_size(ggml_backend_dev_buffer_type(dev), x);
    ggml_free(ctx);
    return n;
}

/* ---------- types ---------- */

int tp_type_by_name(const char * name) {
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char * n = ggml_type_name((enum ggml_type) t);
        if (n && strcmp(n, name) == 0) {
            return t;
        }
    }
    return -1;
}

int64_t tp_type_size(int t)  { return (int64_t) ggml_type_size((enum ggml_type) t); }
int64_t tp_blck_size(int t)  { return (int64_t) ggml_blck_size((enum ggml_type) t); }
int     tp_type_count(void)  { return GGML_TYPE_COUNT; }
const char * tp_type_name(int t) { return ggml_type_name((enum ggml_type) t); }

/* ---------- graph helper ---------- */

typedef struct {
    ggml_backend_t          backend;
    ggml_backend_dev_t      dev;
    struct ggml_context   * ctx;
    ggml_backend_buffer_t   buf;
} tp_run;

static int run_begin(tp_run * r, const char * dev_name, size_t n_tensors) {
    memset(r, 0, sizeof(*r));
    r->dev = ggml_backend_dev_by_name(dev_name);
    if (!r->dev) {
        snprintf(tp_err, sizeof(tp_err), "no ggml device named '%s'", dev_name);
        return -1;
    }
    r->backend = ggml_backend_dev_init(r->dev, NULL);
    if (!r->backend) {
        snprintf(tp_err, sizeof(tp_err), "could not initialise device '%s'", dev_name);
        return -1;
    }
    struct ggml_init_params ip = {
        /*.mem_size   =*/ ggml_tensor_overhead() * (n_tensors + 8) + ggml_graph_overhead() + 1024,
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ true,
    };
    r->ctx = ggml_init(ip);
    return 0;
}

static void run_end(tp_run * r) {
    if (r->buf) ggml_backend_buffer_free(r->buf);
    if (r->ctx) ggml_free(r->ctx);
    if (r->backend) ggml_backend_free(r->backend);
}

static int run_alloc(tp_run * r) {
    r->buf = ggml_backend_alloc_ctx_tensors(r->ctx, r->backend);
    if (!r->buf) {
        set_err("buffer allocation failed");
        return -1;
    }
    return 0;
}

static int run_supports(tp_run * r, struct ggml_tensor * node, const char * what) {
    if (!ggml_backend_dev_supports_op(r->dev, node)) {
        snprintf(tp_err, sizeof(tp_err), "device %s does not support %s (%s)",
                 ggml_backend_dev_name(r->dev), ggml_op_desc(node), what);
        return 1;
    }
    return 0;
}

static int run_compute(tp_run * r, struct ggml_tensor * out) {
    struct ggml_cgraph * gf = ggml_new_graph(r->ctx);
    ggml_build_forward_expand(gf, out);
    if (ggml_backend_is_cpu(r->backend)) {
        ggml_backend_cpu_set_n_threads(r->backend, 2);
    }
    enum ggml_status st = ggml_backend_graph_compute(r->backend, gf);
    if (st != GGML_STATUS_SUCCESS) {
        snprintf(tp_err, sizeof(tp_err), "graph compute failed with status %d", (int) st);
        return -1;
    }
    return 0;
}

/* ---------- quantisation ---------- */

/* Quantise nrows x ncols floats through ggml_set_rows into a tensor of type t on device dev. */
int tp_set_rows(const char * dev, int t, const float * src, int64_t nrows, int64_t ncols, void * out) {
    tp_run r;
    if (run_begin(&r, dev, 4)) return -1;
    struct ggml_tensor * dst = ggml_new_tensor_2d(r.ctx, (enum ggml_type) t, ncols, nrows);
    struct ggml_tensor * x   = ggml_new_tensor_2d(r.ctx, GGML_TYPE_F32, ncols, nrows);
    struct ggml_tensor * idx = ggml_new_tensor_1d(r.ctx, GGML_TYPE_I64, nrows);
    struct ggml_tensor * res = ggml_set_rows(r.ctx, dst, x, idx);
    int rc = run_supports(&r, res, "set_rows");
    if (rc) { run_end(&r); return rc; }
    if (run_alloc(&r)) { run_end(&r); return -1; }
    ggml_backend_buffer_clear(r.buf, 0);
    ggml_backend_tensor_set(x, src, 0, ggml_nbytes(x));
    int64_t * ids = (int64_t *) malloc(sizeof(int64_t) * nrows);
    for (int64_t i = 0; i < nrows; i++) ids[i] = i;
    ggml_backend_tensor_set(idx, ids, 0, sizeof(int64_t) * nrows);
    free(ids);
    if (run_compute(&r, res)) { run_end(&r); return -1; }
    ggml_backend_tensor_get(dst, out, 0, ggml_nbytes(dst));
    run_end(&r);
    return 0;
}

/* Quantise through the fork's C quantiser (ggml_quantize_chunk); no device involved. */
int tp_quantize_chunk(int t, const float * src, int64_t nrows, int64_t ncols, void * out) {
    size_t n = ggml_quantize_chunk((enum ggml_type) t, src, out, 0, nrows, ncols, NULL);
    if (n != (size_t) nrows * ggml_row_size((enum ggml_type) t, ncols)) {
        set_err("ggml_quantize_chunk wrote an unexpected number of bytes");
        return -1;
    }
    return 0;
}

/* ---------- decoding ---------- */

/* Decode n values with the CPU type traits' to_float. */
int tp_to_float(int t, const void * src, int64_t n, float * out) {
    const struct ggml_type_traits * tr = ggml_get_type_traits((enum ggml_type) t);
    if (!tr || !tr->to_float) {
        set_err("type has no to_float in its traits");
        return 1;
    }
    tr->to_float(src, out, n);
    return 0;
}

/* Decode raw bytes on a device. route 0 = ggml_get_rows, 1 = ggml_cpy to f32. */
int tp_decode(const char * dev, int t, const void * bytes, int64_t nrows, int64_t ncols, int route, float * out) {
    tp_run r;
    if (run_begin(&r, dev, 4)) return -1;
    struct ggml_tensor * src = ggml_new_tensor_2d(r.ctx, (enum ggml_type) t, ncols, nrows);
    struct ggml_tensor * res = NULL;
    struct ggml_tensor * idx = NULL;
    if (route == 0) {
        idx = ggml_new_tensor_1d(r.ctx, GGML_TYPE_I32, nrows);
        res = ggml_get_rows(r.ctx, src, idx);
    } else {
        struct ggml_tensor * f = ggml_new_tensor_2d(r.ctx, GGML_TYPE_F32, ncols, nrows);
        res = ggml_cpy(r.ctx, src, f);
    }
    int rc = run_supports(&r, res, route == 0 ? "get_rows decode" : "cpy decode");
    if (rc) { run_end(&r); return rc; }
    if (run_alloc(&r)) { run_end(&r); return -1; }
    ggml_backend_tensor_set(src, bytes, 0, ggml_nbytes(src));
    if (idx) {
        int32_t * ids = (int32_t *) malloc(sizeof(int32_t) * nrows);
        for (int64_t i = 0; i < nrows; i++) ids[i] = (int32_t) i;
        ggml_backend_tensor_set(idx, ids, 0, sizeof(int32_t) * nrows);
        free(ids);
    }
    if (run_compute(&r, res)) { run_end(&r); return -1; }
    ggml_backend_tensor_get(res, out, 0, sizeof(float) * nrows * ncols);
    run_end(&r);
    return 0;
}

/* ---------- rotation op ---------- */

#if TP_WHT_NARGS == 5
#define TP_WHT(ctx, a, dir, gs) ggml_turbo_wht((ctx), (a), (dir), (gs), NULL)
#elif TP_WHT_NARGS == 4
#define TP_WHT(ctx, a, dir, gs) ggml_turbo_wht((ctx), (a), (dir), (gs))
#elif TP_WHT_NARGS == 3
#define TP_WHT(ctx, a, dir, gs) ggml_turbo_wht((ctx), (a), (dir))
#endif

/* Apply ggml_turbo_wht (direction 0 forward, 1 inverse) to nrows x ncols floats. */
int tp_turbo_wht(const char * dev, const float * src, int64_t nrows, int64_t ncols, int direction, int group_size, float * out) {
#if TP_WHT_NARGS == 0
    (void) dev; (void) src; (void) nrows; (void) ncols; (void) direction; (void) group_size; (void) out;
    set_err("this fork build has no ggml_turbo_wht op");
    return 1;
#else
    tp_run r;
    if (run_begin(&r, dev, 4)) return -1;
    struct ggml_tensor * x = ggml_new_tensor_2d(r.ctx, GGML_TYPE_F32, ncols, nrows);
    struct ggml_tensor * res = TP_WHT(r.ctx, x, direction, group_size);
    (void) group_size;
    int rc = run_supports(&r, res, "turbo_wht");
    if (rc) { run_end(&r); return rc; }
    if (run_alloc(&r)) { run_end(&r); return -1; }
    ggml_backend_tensor_set(x, src, 0, ggml_nbytes(x));
    if (run_compute(&r, res)) { run_end(&r); return -1; }
    ggml_backend_tensor_get(res, out, 0, ggml_nbytes(res));
    run_end(&r);
    return 0;
#endif
}

/* ---------- attention ---------- */

/*
 * Flash attention with raw K/V bytes.
 *   q:     float [n_head][n_q][D]          (ggml q: ne = {D, n_q, n_head})
 *   kbytes: type tk rows [n_head_kv][n_kv] of D values each
 *   vbytes: type tv rows [n_head_kv][n_kv] of Dv values each
 *   out:   float [n_q][n_head][Dv]         (ggml result: ne = {Dv, n_head, n_q})
 * rotate_q applies ggml_turbo_wht forward to q first, inverse_out applies the inverse to the
 * output, as the fork's llama graph does for turbo K and turbo V respectively. wht_group is the
 * rotation group size given to both ops. prec_f32 asks for f32 accumulation.
 */
int tp_flash_attn(const char * dev, int tk, const void * kbytes, int tv, const void * vbytes,
                  const float * q, int64_t D, int64_t Dv, int64_t n_q, int64_t n_kv,
                  int64_t n_head, int64_t n_head_kv, float scale,
                  int rotate_q, int inverse_out, int wht_group, int prec_f32, float * out) {
#if TP_WHT_NARGS == 0
    if (rotate_q || inverse_out) {
        set_err("this fork build has no ggml_turbo_wht op");
        return 1;
    }
#endif
    tp_run r;
    if (run_begin(&r, dev, 12)) return -1;
    struct ggml_tensor * tq = ggml_new_tensor_3d(r.ctx, GGML_TYPE_F32, D, n_q, n_head);
    struct ggml_tensor * tkk = ggml_new_tensor_3d(r.ctx, (enum ggml_type) tk, D, n_kv, n_head_kv);
    struct ggml_tensor * tvv = ggml_new_tensor_3d(r.ctx, (enum ggml_type) tv, Dv, n_kv, n_head_kv);
    struct ggml_tensor * mask = ggml_new_tensor_2d(r.ctx, GGML_TYPE_F16, n_kv, n_q);
    struct ggml_tensor * qin = tq;
#if TP_WHT_NARGS != 0
    if (rotate_q) {
        qin = TP_WHT(r.ctx, tq, 0, wht_group);
        int rc = run_supports(&r, qin, "turbo_wht on Q");
        if (rc) { run_end(&r); return rc; }
    }
#endif
    struct ggml_tensor * fa = ggml_flash_attn_ext(r.ctx, qin, tkk, tvv, mask, scale, 0.0f, 0.0f);
    if (prec_f32) ggml_flash_attn_ext_set_prec(fa, GGML_PREC_F32);
    int rc = run_supports(&r, fa, "flash_attn_ext");
    if (rc) { run_end(&r); return rc; }
    struct ggml_tensor * res = fa;
#if TP_WHT_NARGS != 0
    if (inverse_out) {
        struct ggml_tensor * flat = ggml_reshape_2d(r.ctx, fa, Dv, n_head * n_q);
        res = TP_WHT(r.ctx, flat, 1, wht_group);
        rc = run_supports(&r, res, "turbo_wht on output");
        if (rc) { run_end(&r); return rc; }
    }
#endif
    (void) wht_group;
    if (run_alloc(&r)) { run_end(&r); return -1; }
    ggml_backend_tensor_set(tq, q, 0, ggml_nbytes(tq));
    ggml_backend_tensor_set(tkk, kbytes, 0, ggml_nbytes(tkk));
    ggml_backend_tensor_set(tvv, vbytes, 0, ggml_nbytes(tvv));
    {
        size_t nm = ggml_nelements(mask);
        uint16_t * z = (uint16_t *) calloc(nm, sizeof(uint16_t)); /* fp16 +0.0 */
        ggml_backend_tensor_set(mask, z, 0, ggml_nbytes(mask));
        free(z);
    }
    if (run_compute(&r, res)) { run_end(&r); return -1; }
    ggml_backend_tensor_get(res, out, 0, sizeof(float) * Dv * n_head * n_q);
    run_end(&r);
    return 0;
}
