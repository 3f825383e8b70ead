TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/main/build/cpu/turbo-probe/turbo-decode /work/main/.cache/models/gemma3-270m-q4_k_m.gguf /work/main/.cache/sweep/decode/prompts-cdd04edf5bd57414.txt 64 32 q8_0 q8_0 2 0 - -
# rc=0 after 2.8 s
