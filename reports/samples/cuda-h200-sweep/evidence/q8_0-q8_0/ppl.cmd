TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/main/build/cuda/bin/llama-perplexity -m .devcarry/model.gguf -c 512 -t 16 -b 512 -ub 512 -ngl 99 -fa on -fit off -ctk q8_0 -ctv q8_0 --kl-divergence-base /work/main/.cache/sweep/base/ebeef73fb0575dd25d27788b.kld --kl-divergence
# rc=0 after 2.7 s
