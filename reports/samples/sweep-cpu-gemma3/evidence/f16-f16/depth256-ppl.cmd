TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/main/build/cpu/bin/llama-perplexity -m /work/main/.cache/models/gemma3-270m-q4_k_m.gguf -c 256 -t 2 -b 256 -ub 256 -ngl 0 -fa on -fit off -ctk f16 -ctv f16 --kl-divergence-base /work/main/.cache/sweep/base/fe61dbab015ac72aa73bd098.kld --kl-divergence
# rc=0 after 7.1 s
