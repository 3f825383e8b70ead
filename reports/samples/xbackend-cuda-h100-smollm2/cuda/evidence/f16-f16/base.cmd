TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /root/xbuild/cuda/bin/llama-perplexity -m /root/smol.gguf -f .devcarry/c1/wiki.test.raw -c 512 --chunks 4 -t 16 -b 512 -ub 512 -ngl 99 -fa on -fit off -ctk f16 -ctv f16 --kl-divergence-base /root/xcache/base/f859f4aa549a453ecb096c53.partial
# rc=0 after 2.1 s
