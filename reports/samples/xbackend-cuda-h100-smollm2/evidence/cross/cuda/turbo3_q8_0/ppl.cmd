TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /root/xbuild/cuda/bin/llama-perplexity -m /root/smol.gguf -c 512 -t 16 -b 512 -ub 512 -ngl 99 -fa on -fit off -ctk turbo3 -ctv q8_0 --kl-divergence-base /root/xcache/base/8511f510df6263647185bbae.kld --kl-divergence
# rc=0 after 9.4 s
