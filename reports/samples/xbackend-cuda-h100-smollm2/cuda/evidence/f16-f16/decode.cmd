TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /root/xbuild/cuda/turbo-probe/turbo-decode /root/smol.gguf /root/xcache/decode/prompts-cdd04edf5bd57414.txt 64 32 f16 f16 16 99 - -
# rc=0 after 1.0 s
