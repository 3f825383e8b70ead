/*
 * turbo-decode: greedy decode through the fork's own llama.cpp API with a chosen K/V cache type pair.
 *
 * For each prompt (one per line of PROMPTS_FILE, UTF-8) the first N_PROMPT tokens (BOS included when the
 * model adds one) are evaluated in one batch (prefill), then N_GEN tokens are generated one at a time
 * (each a batch of one token: the decode path of the attention kernels), always taking the most likely
 * token (argmax of the logits; ties go to the lower id). The cache is cleared between prompts.
 *
 * stdout: one JSON object per prompt
 *   {"prompt": i, "n_prompt": n, "tokens": [id, ...], "gap": [top1 - top2 logit, ...], "text": "..."}
 * and a last line {"done": true, "n_prompts": P, "n_gen": N, "type_k": "...", "type_v": "..."}.
 * stderr: llama.cpp's own log (the KV-cache size line names the types really used) and a line
 *   "turbo-decode: phase <prefill|decode> prompt <i> [token <j>]" before each step, so a crash names its phase.
 *
 * usage: turbo-decode MODEL.gguf PROMPTS_FILE N_PROMPT N_GEN TYPE_K TYPE_V [N_THREADS [N_GPU_LAYERS [DEVICES [RPC]]]]
 * N_GPU_LAYERS (default 0) is llama.cpp's -ngl: the layers, and their K/V cache, on the build's GPU backend, so
 * that a GPU sweep's decode runs the GPU's decode kernels (with 0 every layer runs on the CPU).
 * DEVICES is llama.cpp's -dev: comma-separated ggml device names the layers may go to ('RPC0'; any number, each
 * resolved, and stderr says how many were given), 'none' for the CPU only, '-' (default) for every device; an empty
 * list or name ('', ',', 'CUDA0,,CUDA1') is bad input, never read as 'none'. RPC is llama.cpp's --rpc:
 * comma-separated HOST:PORT of rpc-servers whose devices join the registry first (RPC0, RPC1, ...), through the
 * registry's "ggml_backend_rpc_add_server" (no ggml-rpc.h needed: a build without RPC says so), '-' (default) for
 * none; an empty endpoint is bad input.
 * exit codes: 0 ok; 2 bad input (message on stderr); 3 the model or context could not be created (the
 * configuration was refused); 4 llama_decode failed after the context was created.
 */
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void log_to_stderr(enum ggml_log_level level, const char * text, void * ud) {
    (void) ud;
    if (level != GGML_LOG_LEVEL_DEBUG) {
        fputs(text, stderr);
    }
}

static int type_by_name(const char * name, enum ggml_type * out) {
    for (int i = 0; i < GGML_TYPE_COUNT; i++) {
        const char * n = ggml_type_name((enum ggml_type) i);
        if (n && strcmp(n, name) == 0) {
            *out = (enum ggml_type) i;
            return 1;
        }
    }
    return 0;
}

static void json_string(FILE * f, const char * s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char) s[i];
        if (c == '"' || c == '\\') {
            fprintf(f, "\\%c", c);
        } else if (c < 0x20) {
            fprintf(f, "\\u%04x", c);
        } else {
            fputc(c, f);
        }
    }
    fputc('"', f);
}

static char * read_file(const char * path, size_t * len) {
    FILE * f = fopen(path, "rb");
    if (!f) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char * buf = (char *) malloc((size_t) n + 1);
    size_t got = fread(buf, 1, (size_t) n, f);
    fclose(f);
    buf[got] = '\0';
    *len = got;
    return buf;
}

/* The next name of a comma-separated list, cut in place: *cur is where it starts (advanced past it and its comma;
   NULL after the last name). Empty names are returned as "" so that the caller can refuse them. */
static char * next_item(char ** cur) {
    char * item = *cur;
    char * end = strchr(item, ',');
    if (end) {
        *end = '\0';
        *cur = end + 1;
    } else {
        *cur = NULL;
    }
    return item;
}

/* Add the devices of each rpc-server of a comma-separated HOST:PORT list to the registry (as llama.cpp's --rpc).
   0 on success, else a message on stderr and 2 (the harness's setup: no RPC in the build, no server there, an empty
   endpoint such as ',' or 'a:1,,b:2'). Any number and length of endpoints. */
typedef ggml_backend_reg_t (*td_rpc_add_server_fn)(const char * endpoint);

static int add_rpc_servers(const char * list) {
    if (*list == '\0' || *list == ',' || list[strlen(list) - 1] == ',' || strstr(list, ",,")) {
        fprintf(stderr, "turbo-decode: RPC '%s' has an empty endpoint: give HOST:PORT[,HOST:PORT...] or '-' for none\n", list);
        return 2;
    }
    ggml_backend_reg_t rpc = ggml_backend_reg_by_name("RPC");
    td_rpc_add_server_fn add = rpc ? (td_rpc_add_server_fn) ggml_backend_reg_get_proc_address(rpc, "ggml_backend_rpc_add_server") : NULL;
    if (!add) {
        fprintf(stderr, "turbo-decode: this fork build has no RPC backend: rebuild it with `turbo-harness build --rpc`\n");
        return 2;
    }
    char * buf = strdup(list);
    if (!buf) {
        fprintf(stderr, "turbo-decode: out of memory reading the RPC list\n");
        return 2;
    }
    int rc = 0;
    for (char * cur = buf; cur && rc == 0;) {
        const char * ep = next_item(&cur);
        ggml_backend_reg_t reg = add(ep);
        if (!reg) {
            fprintf(stderr, "turbo-decode: Failed to connect to %s (no rpc-server there, or it reported no device)\n", ep);
            rc = 2;
            break;
        }
        ggml_backend_register(reg);
    }
    free(buf);
    return rc;
}

/* The NULL-terminated device list of a comma-separated list of ggml device names ('none': the CPU only, an empty
   list), as llama.cpp's -dev. Any number of names (the list is allocated to fit; it lives until the process ends),
   and stderr says how many and which were given. NULL and a message on stderr (bad input) for an empty list or
   name ('', ',', 'CUDA0,,CUDA1': never read as 'none') and for an unknown name. */
static ggml_backend_dev_t * parse_devices(const char * list) {
    size_t cap = 2;
    for (const char * c = list; *c; c++) {
        cap += *c == ',';
    }
    ggml_backend_dev_t * devs = (ggml_backend_dev_t *) calloc(cap, sizeof(ggml_backend_dev_t));
    char * buf = devs ? strdup(list) : NULL;
    if (!buf) {  /* never an empty list by accident: that would mean the CPU only */
        fprintf(stderr, "turbo-decode: out of memory reading the device list\n");
        free(devs);
        return NULL;
    }
    if (strcmp(list, "none") == 0) {
        free(buf);
        fprintf(stderr, "turbo-decode: DEVICES none: every layer on the CPU\n");
        return devs;
    }
    size_t n = 0;
    for (char * cur = buf; cur;) {
        const char * name = next_item(&cur);
        ggml_backend_dev_t dev = *name ? ggml_backend_dev_by_name(name) : NULL;
        if (!dev) {
            if (*name) {
                fprintf(stderr, "turbo-decode: unknown device: %s\n", name);
            } else {
                fprintf(stderr, "turbo-decode: DEVICES '%s' has an empty device name: name each device (comma-separated), "
                        "'none' for the CPU only, '-' for every device\n", list);
            }
            free(buf);
            free(devs);
            return NULL;
        }
        devs[n++] = dev;
    }
    devs[n] = NULL;
    free(buf);
    fprintf(stderr, "turbo-decode: DEVICES %s: %zu device%s\n", list, n, n == 1 ? "" : "s");
    return devs;
}

int main(int argc, char ** argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPTS_FILE N_PROMPT N_GEN TYPE_K TYPE_V [N_THREADS [N_GPU_LAYERS [DEVICES [RPC]]]]\n", argv[0]);
        return 2;
    }
    const char * model_path = argv[1];
    const int n_prompt = atoi(argv[3]);
    const int n_gen = atoi(argv[4]);
    const int n_threads = argc > 7 ? atoi(argv[7]) : 2;
    const int n_gpu_layers = argc > 8 ? atoi(argv[8]) : 0;
    enum ggml_type tk, tv;
    if (n_prompt < 1 || n_gen < 1 || n_threads < 1 || n_gpu_layers < 0) {
        fprintf(stderr, "turbo-decode: N_PROMPT, N_GEN and N_THREADS must be positive, N_GPU_LAYERS >= 0\n");
        return 2;
    }
    if (!type_by_name(argv[5], &tk) || !type_by_name(argv[6], &tv)) {
        fprintf(stderr, "turbo-decode: unknown cache type %s\n", type_by_name(argv[5], &tk) ? argv[6] : argv[5]);
        return 2;
    }
    size_t text_len = 0;
    char * text = read_file(argv[2], &text_len);
    if (!text) {
        fprintf(stderr, "turbo-decode: cannot read prompts file %s\n", argv[2]);
        return 2;
    }

    llama_log_set(log_to_stderr, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = n_gpu_layers;
    if (argc > 10 && strcmp(argv[10], "-") != 0) {
        int rc = add_rpc_servers(argv[10]);
        if (rc) {
            return rc;
        }
    }
    if (argc > 9 && strcmp(argv[9], "-") != 0) {
        mp.devices = parse_devices(argv[9]);
        if (!mp.devices) {
            return 2;
        }
    }
    struct llama_model * model = llama_model_load_from_file(model_path, mp);
    if (!model) {
        fprintf(stderr, "turbo-decode: could not load model %s\n", model_path);
        return 3;
    }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) (n_prompt + n_gen);
    cp.n_batch = (uint32_t) n_prompt;
    cp.n_ubatch = (uint32_t) n_prompt;
    cp.n_seq_max = 1;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    cp.type_k = tk;
    cp.type_v = tv;
    cp.no_perf = true;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "turbo-decode: could not create a context with K=%s V=%s\n", argv[5], argv[6]);
        return 3;
    }

    llama_token * toks = (llama_token *) malloc(sizeof(llama_token) * (size_t) (text_len + 16));
    int n_done = 0;
    char * save = NULL;
    for (char * line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        const int len = (int) strlen(line);
        if (len == 0) {
            continue;
        }
        int nt = llama_tokenize(vocab, line, len, toks, len + 16, true, false);
        if (nt < n_prompt) {
            fprintf(stderr, "turbo-decode: prompt %d has %d tokens, fewer than N_PROMPT %d\n", n_done, nt, n_prompt);
            return 2;
        }
        llama_memory_clear(llama_get_memory(ctx), true);
        fprintf(stderr, "turbo-decode: phase prefill prompt %d\n", n_done);
        fflush(stderr);
        if (llama_decode(ctx, llama_batch_get_one(toks, n_prompt)) != 0) {
            fprintf(stderr, "turbo-decode: llama_decode failed in prefill of prompt %d\n", n_done);
            return 4;
        }
        printf("{\"prompt\": %d, \"n_prompt\": %d, \"tokens\": [", n_done, n_prompt);
        char * gen_text = (char *) calloc((size_t) n_gen * 64 + 1, 1);
        size_t gen_len = 0;
        float * gaps = (float *) malloc(sizeof(float) * (size_t) n_gen);
        for (int j = 0; j < n_gen; j++) {
            const float * logits = llama_get_logits_ith(ctx, -1);
            int best = 0;
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int t = 0; t < n_vocab; t++) {
                if (logits[t] > b1) {
                    b2 = b1;
                    b1 = logits[t];
                    best = t;
                } else if (logits[t] > b2) {
                    b2 = logits[t];
                }
            }
            gaps[j] = b1 - b2;
            printf("%s%d", j ? ", " : "", best);
            char piece[64];
            int np = llama_token_to_piece(vocab, best, piece, sizeof(piece), 0, false);
            if (np > 0) {
                memcpy(gen_text + gen_len, piece, (size_t) np);
                gen_len += (size_t) np;
            }
            if (j + 1 == n_gen) {
                break;
            }
            llama_token next = best;
            fprintf(stderr, "turbo-decode: phase decode prompt %d token %d\n", n_done, j + 1);
            fflush(stderr);
            if (llama_decode(ctx, llama_batch_get_one(&next, 1)) != 0) {
                fprintf(stderr, "turbo-decode: llama_decode failed in decode of prompt %d token %d\n", n_done, j + 1);
                return 4;
            }
        }
        printf("], \"gap\": [");
        for (int j = 0; j < n_gen; j++) {
            printf("%s%.4f", j ? ", " : "", gaps[j]);
        }
        printf("], \"text\": ");
        json_string(stdout, gen_text, gen_len);
        printf("}\n");
        fflush(stdout);
        free(gen_text);
        free(gaps);
        n_done++;
    }
    if (n_done == 0) {
        fprintf(stderr, "turbo-decode: no prompt in %s\n", argv[2]);
        return 2;
    }
    printf("{\"done\": true, \"n_prompts\": %d, \"n_gen\": %d, \"type_k\": \"%s\", \"type_v\": \"%s\"}\n", n_done, n_gen,
           argv[5], argv[6]);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(toks);
    free(text);
    return 0;
}
