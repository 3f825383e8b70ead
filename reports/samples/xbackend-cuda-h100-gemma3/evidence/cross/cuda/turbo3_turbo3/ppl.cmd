TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /root/xbuild/cuda/bin/llama-perplexity -m /root/gemma.gguf -c 512 -t 16 -b 512 -ub 512 -ngl 99 -fa on -fit off -ctk turbo3 -ctv turbo3 --kl-divergence-base /root/xcache/base/0841fbb2cce0ea7cb1d62fec.kld --kl-divergence
# rc=0 after 2.2 s
