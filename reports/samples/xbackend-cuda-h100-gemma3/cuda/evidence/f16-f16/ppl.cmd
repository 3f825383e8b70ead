TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /root/xbuild/cuda/bin/llama-perplexity -m /root/gemma.gguf -c 512 -t 16 -b 512 -ub 512 -ngl 99 -fa on -fit off -ctk f16 -ctv f16 --kl-divergence-base /root/xcache/base/1e621929aa23160c1445e918.kld --kl-divergence
# rc=0 after 1.8 s
