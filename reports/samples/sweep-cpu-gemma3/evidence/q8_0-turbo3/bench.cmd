TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/main/build/cpu/bin/llama-bench -m /work/main/.cache/models/gemma3-270m-q4_k_m.gguf -t 2 -b 256 -ub 256 -ngl 0 -fa 1 -ctk q8_0 -ctv turbo3 -p 64 -n 16 -d 0,256 -r 3 -o json -v --progress
# rc=0 after 4.5 s
