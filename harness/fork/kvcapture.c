/*
 * turbo-kvcapture: run a GGUF model through the fork's own llama.cpp API on a stretch of text and
 * save, per layer, the Q, K and V tensors the graph computes after RoPE (the vectors written to the
 * KV cache), through the scheduler's eval callback (llama_context_params.cb_eval).
 *
 * The graph names them "Qcur-<il>", "Kcur-<il>", "Vcur-<il>" (llm_graph_context::cb, after
 * ggml_rope_ext in src/models/<arch>.cpp). Each one seen is written as a float32 .npy file
 * <out>/<Qcur|Kcur|Vcur>-<il>.npy with shape (ne2, ne1, ne0) = (tokens, heads, head_dim) (ne3 = 1),
 * made contiguous from the tensor's strides. f32 and f16 tensors are supported. The graph gives the
 * same name to several nodes (the projection, its reshape, the RoPE output); they run in graph order,
 * so the file keeps the last one, and the summary records that node's op (ROPE for Q and K).
 *
 * The text is decoded in one batch (n_ctx = n_batch = n_ubatch = n_tokens) with an f16 cache, so each
 * tensor is seen exactly once and holds every token. A JSON summary goes to stdout; llama's own log
 * goes to stderr only with -v.
 *
 * usage: turbo-kvcapture MODEL.gguf TEXT_FILE N_TOKENS OUT_DIR [N_THREADS] [-v]
 * exit codes: 0 ok, 2 bad input (message on stderr), 3 model/context/decode failure.
 */
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const char * out_dir;
    int n_saved;
    int n_layer_max;
    char names[4096][32];   /* distinct tensor names saved, in first-seen order */
    char ops[4096][32];     /* the op of the last tensor saved under that name */
    int  n_names;
} cap_state;

static int verbose = 0;

static void quiet_log(enum ggml_log_level level, const char * text, void * ud) {
    (void) ud;
    if (verbose || level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static int wanted(const char * name, char * kind, int * il) {
    static const char * kinds[] = {"Qcur", "Kcur", "Vcur"};
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(kinds[i]);
        if (strncmp(name, kinds[i], n) == 0 && name[n] == '-') {
            char * end = NULL;
            long v = strtol(name + n + 1, &end, 10);
            if (end && *end == '\0' && end != name + n + 1) {
                memcpy(kind, kinds[i], n + 1);
                *il = (int) v;
                return 1;
            }
        }
    }
    return 0;
}

static int write_npy(const char * path, const float * data, int64_t d0, int64_t d1, int64_t d2) {
    FILE * f = fopen(path, "wb");
    if (!f) {
        return -1;
    }
    char hdr[256];
    int n = snprintf(hdr, sizeof(hdr), "{'descr': '<f4', 'fortran_order': False, 'shape': (%lld, %lld, %lld), }",
                     (long long) d0, (long long) d1, (long long) d2);
    int total = 10 + n + 1;
    int pad = (64 - total % 64) % 64;
    unsigned char magic[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 0, 0};
    uint16_t hl = (uint16_t) (n + pad + 1);
    magic[8] = (unsigned char) (hl & 0xff);
    magic[9] = (unsigned char) (hl >> 8);
    fwrite(magic, 1, 10, f);
    fwrite(hdr, 1, (size_t) n, f);
    for (int i = 0; i < pad; i++) {
        fputc(' ', f);
    }
    fputc('\n', f);
    size_t cnt = (size_t) (d0 * d1 * d2);
    size_t w = fwrite(data, sizeof(float), cnt, f);
    fclose(f);
    return w == cnt ? 0 : -1;
}

static bool eval_cb(struct ggml_tensor * t, bool ask, void * ud) {
    cap_state * st = (cap_state *) ud;
    char kind[8];
    int il;
    if (!wanted(ggml_get_name(t), kind, &il)) {
        return ask ? false : true;
    }
    if (ask) {
        return true;
    }
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16) {
        fprintf(stderr, "kvcapture: %s has type %s (only f32/f16 supported)\n", ggml_get_name(t), ggml_type_name(t->type));
        return true;
    }
    const size_t nbytes = ggml_nbytes(t);
    uint8_t * raw = (uint8_t *) malloc(nbytes);
    if (!raw) {
        return false;
    }
    const bool host = t->buffer == NULL || ggml_backend_buffer_is_host(t->buffer);
    if (host) {
        memcpy(raw, t->data, nbytes);
    } else {
        ggml_backend_tensor_get(t, raw, 0, nbytes);
    }
    const int64_t n0 = t->ne[0], n1 = t->ne[1], n2 = t->ne[2] * t->ne[3];
    float * out = (float *) malloc(sizeof(float) * (size_t) (n0 * n1 * n2));
    if (!out) {
        free(raw);
        return false;
    }
    size_t k = 0;
    for (int64_t i3 = 0; i3 < t->ne[3]; i3++) {
        for (int64_t i2 = 0; i2 < t->ne[2]; i2++) {
            for (int64_t i1 = 0; i1 < n1; i1++) {
                for (int64_t i0 = 0; i0 < n0; i0++) {
                    const size_t off = (size_t) (i0 * t->nb[0] + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3]);
                    out[k++] = t->type == GGML_TYPE_F32 ? *(const float *) (raw + off)
                                                        : ggml_fp16_to_fp32(*(const ggml_fp16_t *) (raw + off));
                }
            }
        }
    }
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s-%d.npy", st->out_dir, kind, il);
    if (write_npy(path, out, n2, n1, n0) == 0) {
        st->n_saved++;
        if (il > st->n_layer_max) {
            st->n_layer_max = il;
        }
        char nm[32];
        snprintf(nm, sizeof(nm), "%s-%d", kind, il);
        int j = 0;
        while (j < st->n_names && strcmp(st->names[j], nm) != 0) {
            j++;
        }
        if (j < 4096) {
            if (j == st->n_names) {
                snprintf(st->names[st->n_names++], 32, "%s", nm);
            }
            snprintf(st->ops[j], 32, "%s", ggml_op_name(t->op));
        }
    } else {
        fprintf(stderr, "kvcapture: cannot write %s\n", path);
    }
    free(out);
    free(raw);
    return true;
}

static char * read_text(const char * path, long max_bytes, long * len) {
    FILE * f = fopen(path, "rb");
    if (!f) {
        return NULL;
    }
    char * buf = (char *) malloc((size_t) max_bytes + 1);
    *len = (long) fread(buf, 1, (size_t) max_bytes, f);
    buf[*len] = '\0';
    fclose(f);
    return buf;
}

int main(int argc, char ** argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MODEL.gguf TEXT_FILE N_TOKENS OUT_DIR [N_THREADS] [-v]\n", argv[0]);
        return 2;
    }
    const char * model_path = argv[1];
    const char * text_path = argv[2];
    const int n_tokens = atoi(argv[3]);
    const char * out_dir = argv[4];
    int n_threads = argc > 5 && argv[5][0] != '-' ? atoi(argv[5]) : 2;
    for (int i = 5; i < argc; i++) {
        if (strcmp(argv[i], "-v") == 0) {
            verbose = 1;
        }
    }
    if (n_tokens < 2 || n_tokens > 65536) {
        fprintf(stderr, "kvcapture: N_TOKENS must be in [2, 65536], got %s\n", argv[3]);
        return 2;
    }
    llama_log_set(quiet_log, NULL);
    llama_backend_init();

    long text_len = 0;
    char * text = read_text(text_path, (long) n_tokens * 16 + 4096, &text_len);
    if (!text || text_len == 0) {
        fprintf(stderr, "kvcapture: cannot read text from %s\n", text_path);
        return 2;
    }

    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model * model = llama_model_load_from_file(model_path, mp);
    if (!model) {
        fprintf(stderr, "kvcapture: cannot load model %s\n", model_path);
        return 3;
    }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    llama_token * toks = (llama_token *) malloc(sizeof(llama_token) * (size_t) (text_len + 16));
    int nt = llama_tokenize(vocab, text, (int32_t) text_len, toks, (int32_t) (text_len + 16), true, false);
    if (nt < n_tokens) {
        fprintf(stderr, "kvcapture: the text gives only %d tokens, %d asked\n", nt, n_tokens);
        return 2;
    }

    cap_state * st = (cap_state *) calloc(1, sizeof(cap_state));
    st->out_dir = out_dir;
    st->n_layer_max = -1;

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) n_tokens;
    cp.n_batch = (uint32_t) n_tokens;
    cp.n_ubatch = (uint32_t) n_tokens;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.type_k = GGML_TYPE_F16;
    cp.type_v = GGML_TYPE_F16;
    cp.cb_eval = eval_cb;
    cp.cb_eval_user_data = st;
    cp.no_perf = true;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "kvcapture: cannot create a context of %d tokens\n", n_tokens);
        return 3;
    }
    struct llama_batch batch = llama_batch_get_one(toks, n_tokens);
    int rc = llama_decode(ctx, batch);
    if (rc != 0) {
        fprintf(stderr, "kvcapture: llama_decode failed (%d)\n", rc);
        return 3;
    }

    char arch[128] = "", key[256], val[64];
    llama_model_meta_val_str(model, "general.architecture", arch, sizeof(arch));
    snprintf(key, sizeof(key), "%s.attention.key_length", arch);
    int hk = llama_model_meta_val_str(model, key, val, sizeof(val)) > 0 ? atoi(val) : 0;
    snprintf(key, sizeof(key), "%s.attention.value_length", arch);
    int hv = llama_model_meta_val_str(model, key, val, sizeof(val)) > 0 ? atoi(val) : 0;
    snprintf(key, sizeof(key), "%s.attention.sliding_window", arch);
    int swa = llama_model_meta_val_str(model, key, val, sizeof(val)) > 0 ? atoi(val) : 0;
    printf("{\"arch\": \"%s\", \"sliding_window\": %d, \"n_layer\": %d, \"n_head\": %d, \"n_head_kv\": %d, \"n_embd\": %d, "
           "\"key_length\": %d, \"value_length\": %d, \"n_tokens\": %d, \"n_saved\": %d, \"tokens\": [",
           arch, swa, llama_model_n_layer(model), llama_model_n_head(model), llama_model_n_head_kv(model),
           llama_model_n_embd(model), hk, hv, n_tokens, st->n_saved);
    for (int i = 0; i < n_tokens; i++) {
        printf("%s%d", i ? ", " : "", toks[i]);
    }
    printf("], \"tensors\": {");
    for (int i = 0; i < st->n_names; i++) {
        printf("%s\"%s\": \"%s\"", i ? ", " : "", st->names[i], st->ops[i]);
    }
    printf("}}\n");
    fflush(stdout);

    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(toks);
    free(text);
    free(st);
    return 0;
}
