LLAMA_ATTN_ROT_K_OVERRIDE=1 LLAMA_ATTN_ROT_V_OVERRIDE=1 TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /root/xbuild/cuda/bin/llama-perplexity -m /root/smol.gguf -c 512 -t 16 -b 512 -ub 512 -ngl 99 -fa on -fit off -ctk q4_0 -ctv q4_0 --kl-divergence-base /root/xcache/base/f859f4aa549a453ecb096c53.kld --kl-divergence
# rc=0 after 0.9 s
