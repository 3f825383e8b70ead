/* What the native probe's two files share (probe.c, probe_batch.c); see probe.c for the library's contract. */
#ifndef TP_PROBE_H
#define TP_PROBE_H

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

#if TP_WHT_NARGS == 5
#define TP_WHT(ctx, a, dir, gs) ggml_turbo_wht((ctx), (a), (dir), (gs), NULL)
#elif TP_WHT_NARGS == 4
#define TP_WHT(ctx, a, dir, gs) ggml_turbo_wht((ctx), (a), (dir), (gs))
#elif TP_WHT_NARGS == 3
#define TP_WHT(ctx, a, dir, gs) ggml_turbo_wht((ctx), (a), (dir))
#endif

extern char tp_err[1024];
void tpi_set_err(const char * msg);

/* One graph on one device: the kept backend, a no_alloc context for the tensors, their buffer. */
typedef struct {
    ggml_backend_t          backend;
    ggml_backend_dev_t      dev;
    struct ggml_context   * ctx;
    ggml_backend_buffer_t   buf;
    size_t                  graph_size;  /* nodes (and leafs) the context has room for */
    int owned;  /* 1: the backend is this run's own (a device whose backends are not kept), freed by tpi_run_end */
} tp_run;

int  tpi_run_begin(tp_run * r, const char * dev_name, size_t n_tensors);
void tpi_run_end(tp_run * r);
int  tpi_run_alloc(tp_run * r);
int  tpi_supports(ggml_backend_dev_t dev, struct ggml_tensor * node, const char * what, char * err, size_t n);
int  tpi_run_compute_many(tp_run * r, struct ggml_tensor ** outs, int n);

#endif
