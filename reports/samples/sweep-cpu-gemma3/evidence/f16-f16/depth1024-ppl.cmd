TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/main/build/cpu/bin/llama-perplexity -m /work/main/.cache/models/gemma3-270m-q4_k_m.gguf -c 1024 -t 2 -b 1024 -ub 512 -ngl 0 -fa on -fit off -ctk f16 -ctv f16 --kl-divergence-base /work/main/.cache/sweep/base/333fc9f3b5dd578e2f76463d.kld --kl-divergence
# rc=0 after 7.7 s
