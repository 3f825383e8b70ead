TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/main/build/cpu/bin/llama-perplexity -m /work/main/.cache/models/gemma3-270m-q4_k_m.gguf -c 512 -t 2 -b 512 -ub 512 -ngl 0 -fa on -fit off -ctk q8_0 -ctv q8_0 --kl-divergence-base /work/main/.cache/sweep/base/51991abea01c46cbf3fa9ced.kld --kl-divergence
# rc=0 after 16.8 s
