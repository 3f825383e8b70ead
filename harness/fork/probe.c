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
 * Every probe call runs its ops as one graph on a ggml backend kept for its device across calls (created on first
 * use, freed by tp_release): a batch of many independent ops is one call (probe_batch.c), and a single op is a batch
 * of one, so both build the same nodes.
 *
 * Every entry point returns 0 on success, 1 when the device does not support the op (the message
 * says which op), and -1 on any other failure; the message goes to tp_last_error().
 * The Python side runs this library in a worker process, so a ggml abort kills the worker only.
 *
 * Compile-time knobs, set by harness/fork/probe.py after reading the fork's ggml.h:
 *   TP_WHT_NARGS   number of arguments of ggml_turbo_wht (0 = op absent, 3, 4 or 5)
 * Files: probe.h (what probe.c and probe_batch.c share), probe.c (devices, types, kept backends, the graph helper,
 * decode and rotation calls), probe_batch.c (batches; set_rows and flash attention).
 */
#include "probe.h"

char tp_err[1024];

void tpi_set_err(const char * msg) {
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
        tpi_set_err("this fork build has no RPC backend: rebuild it with `turbo-harness build --rpc` (make build RPC=1)");
        return -1;
    }
    tp_rpc_add_server_fn add = (tp_rpc_add_server_fn) ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server");
    if (!add) {
        tpi_set_err("the RPC backend of this build has no ggml_backend_rpc_add_server");
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

/* ---------- backends kept across calls ---------- */

/* One ggml_backend_t per device, created on first use and kept until tp_release() (or the worker's exit): creating
   a backend per call is what costs on a GPU (context, streams, memory pool), not the data (issue 23). */
#define TP_MAX_BACKENDS 64
static struct { ggml_backend_dev_t dev; ggml_backend_t backend; } tp_backends[TP_MAX_BACKENDS];
static int tp_n_backends;
static int64_t tp_n_inits, tp_n_computes;

/* Backends are kept only on the devices where a kept backend was checked against one per call, cell for cell: the
   CPU and ggml's RPC client (issue 23). On Vulkan (lavapipe) a kept backend corrupted the heap in the flash-attention
   call (glibc abort, 2026-12-07), and CUDA was never checked: there each call gets its own backend, as before. */
static int keep_backend(ggml_backend_dev_t dev) {
    const char * k = getenv("TURBO_PROBE_KEEP_BACKENDS");  /* "1": keep on every device; "0": on none */
    if (k && *k) return k[0] == '1';
    const char * name = ggml_backend_dev_name(dev);
    return ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU || (name && strncmp(name, "RPC", 3) == 0);
}

static ggml_backend_t backend_for(ggml_backend_dev_t dev, int * owned) {
    *owned = 0;
    if (!keep_backend(dev)) {
        ggml_backend_t b = ggml_backend_dev_init(dev, NULL);
        if (!b) {
            snprintf(tp_err, sizeof(tp_err), "could not initialise device '%s'", ggml_backend_dev_name(dev));
            return NULL;
        }
        tp_n_inits++;
        *owned = 1;
        return b;
    }
    for (int i = 0; i < tp_n_backends; i++) {
        if (tp_backends[i].dev == dev) return tp_backends[i].backend;
    }
    if (tp_n_backends == TP_MAX_BACKENDS) {
        snprintf(tp_err, sizeof(tp_err), "more than %d devices used in one worker", TP_MAX_BACKENDS);
        return NULL;
    }
    ggml_backend_t b = ggml_backend_dev_init(dev, NULL);
    if (!b) {
        snprintf(tp_err, sizeof(tp_err), "could not initialise device '%s'", ggml_backend_dev_name(dev));
        return NULL;
    }
    tp_n_inits++;
    tp_backends[tp_n_backends].dev = dev;
    tp_backends[tp_n_backends].backend = b;
    tp_n_backends++;
    return b;
}

/* Free every kept backend (the next call on a device initialises it again). */
void tp_release(void) {
    for (int i = 0; i < tp_n_backends; i++) ggml_backend_free(tp_backends[i].backend);
    tp_n_backends = 0;
}

/* Counters for tests and benchmarks: 0 = backends initialised, 1 = graphs computed, 2 = backends kept now. */
int64_t tp_stat(int which) {
    return which == 0 ? tp_n_inits : which == 1 ? tp_n_computes : which == 2 ? (int64_t) tp_n_backends : -1;
}

/* ---------- graph helper ---------- */

int tpi_run_begin(tp_run * r, const char * dev_name, size_t n_tensors) {
    memset(r, 0, sizeof(*r));
    r->dev = ggml_backend_dev_by_name(dev_name);
    if (!r->dev) {
        snprintf(tp_err, sizeof(tp_err), "no ggml device named '%s'", dev_name);
        return -1;
    }
    r->backend = backend_for(r->dev, &r->owned);
    if (!r->backend) return -1;
    r->graph_size = n_tensors + GGML_DEFAULT_GRAPH_SIZE;
    struct ggml_init_params ip = {
        /*.mem_size   =*/ ggml_tensor_overhead() * (n_tensors + 8) + ggml_graph_overhead_custom(r->graph_size, false) + 1024,
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ true,
    };
    r->ctx = ggml_init(ip);
    return 0;
}

void tpi_run_end(tp_run * r) {  /* a kept backend stays (backend_for); a run's own is freed */
    if (r->buf) ggml_backend_buffer_free(r->buf);
    if (r->ctx) ggml_free(r->ctx);
    if (r->owned && r->backend) ggml_backend_free(r->backend);
    r->backend = NULL;
    r->owned = 0;
}

int tpi_run_alloc(tp_run * r) {
    r->buf = ggml_backend_alloc_ctx_tensors(r->ctx, r->backend);
    if (!r->buf) {
        tpi_set_err("buffer allocation failed");
        return -1;
    }
    return 0;
}

int tpi_supports(ggml_backend_dev_t dev, struct ggml_tensor * node, const char * what, char * err, size_t n) {
    if (!ggml_backend_dev_supports_op(dev, node)) {
        snprintf(err, n, "device %s does not support %s (%s)", ggml_backend_dev_name(dev), ggml_op_desc(node), what);
        return 1;
    }
    return 0;
}

static int run_supports(tp_run * r, struct ggml_tensor * node, const char * what) {
    return tpi_supports(r->dev, node, what, tp_err, sizeof(tp_err));
}

/* Compute the graph of every output in outs[0..n). Each node gets a name unique to this compute: ggml's RPC client
   keeps the last graph and, when a new graph's nodes are byte-identical to it, only asks the server to recompute
   the old one; with a backend kept across calls, a new graph of another type in reused memory must never match. */
int tpi_run_compute_many(tp_run * r, struct ggml_tensor ** outs, int n) {
    struct ggml_cgraph * gf = ggml_new_graph_custom(r->ctx, r->graph_size, false);
    for (int i = 0; i < n; i++) ggml_build_forward_expand(gf, outs[i]);
    tp_n_computes++;
    for (int i = 0; i < ggml_graph_n_nodes(gf); i++) {
        ggml_format_name(ggml_graph_node(gf, i), "tp%lld.%d", (long long) tp_n_computes, i);
    }
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

static int run_compute(tp_run * r, struct ggml_tensor * out) {
    return tpi_run_compute_many(r, &out, 1);
}

/* ---------- quantisation ---------- */

/* Quantise through the fork's C quantiser (ggml_quantize_chunk); no device involved. */
int tp_quantize_chunk(int t, const float * src, int64_t nrows, int64_t ncols, void * out) {
    size_t n = ggml_quantize_chunk((enum ggml_type) t, src, out, 0, nrows, ncols, NULL);
    if (n != (size_t) nrows * ggml_row_size((enum ggml_type) t, ncols)) {
        tpi_set_err("ggml_quantize_chunk wrote an unexpected number of bytes");
        return -1;
    }
    return 0;
}

/* ---------- decoding ---------- */

/* Decode n values with the CPU type traits' to_float. */
int tp_to_float(int t, const void * src, int64_t n, float * out) {
    const struct ggml_type_traits * tr = ggml_get_type_traits((enum ggml_type) t);
    if (!tr || !tr->to_float) {
        tpi_set_err("type has no to_float in its traits");
        return 1;
    }
    tr->to_float(src, out, n);
    return 0;
}

/* Decode raw bytes on a device. route 0 = ggml_get_rows, 1 = ggml_cpy to f32. */
int tp_decode(const char * dev, int t, const void * bytes, int64_t nrows, int64_t ncols, int route, float * out) {
    tp_run r;
    if (tpi_run_begin(&r, dev, 4)) return -1;
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
    if (rc) { tpi_run_end(&r); return rc; }
    if (tpi_run_alloc(&r)) { tpi_run_end(&r); return -1; }
    ggml_backend_tensor_set(src, bytes, 0, ggml_nbytes(src));
    if (idx) {
        int32_t * ids = (int32_t *) malloc(sizeof(int32_t) * nrows);
        for (int64_t i = 0; i < nrows; i++) ids[i] = (int32_t) i;
        ggml_backend_tensor_set(idx, ids, 0, sizeof(int32_t) * nrows);
        free(ids);
    }
    if (run_compute(&r, res)) { tpi_run_end(&r); return -1; }
    ggml_backend_tensor_get(res, out, 0, sizeof(float) * nrows * ncols);
    tpi_run_end(&r);
    return 0;
}

/* ---------- rotation op ---------- */

/* Apply ggml_turbo_wht (direction 0 forward, 1 inverse) to nrows x ncols floats. */
int tp_turbo_wht(const char * dev, const float * src, int64_t nrows, int64_t ncols, int direction, int group_size, float * out) {
#if TP_WHT_NARGS == 0
    (void) dev; (void) src; (void) nrows; (void) ncols; (void) direction; (void) group_size; (void) out;
    tpi_set_err("this fork build has no ggml_turbo_wht op");
    return 1;
#else
    tp_run r;
    if (tpi_run_begin(&r, dev, 4)) return -1;
    struct ggml_tensor * x = ggml_new_tensor_2d(r.ctx, GGML_TYPE_F32, ncols, nrows);
    struct ggml_tensor * res = TP_WHT(r.ctx, x, direction, group_size);
    (void) group_size;
    int rc = run_supports(&r, res, "turbo_wht");
    if (rc) { tpi_run_end(&r); return rc; }
    if (tpi_run_alloc(&r)) { tpi_run_end(&r); return -1; }
    ggml_backend_tensor_set(x, src, 0, ggml_nbytes(x));
    if (run_compute(&r, res)) { tpi_run_end(&r); return -1; }
    ggml_backend_tensor_get(res, out, 0, ggml_nbytes(res));
    tpi_run_end(&r);
    return 0;
#endif
}

