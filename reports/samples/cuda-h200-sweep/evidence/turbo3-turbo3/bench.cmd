TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/main/build/cuda/bin/llama-bench -m .devcarry/model.gguf -t 16 -b 512 -ub 512 -ngl 99 -fa 1 -ctk turbo3 -ctv turbo3 -p 512 -n 128 -d 0,2048 -r 5 -o json -v --progress
# rc=0 after 3.8 s
