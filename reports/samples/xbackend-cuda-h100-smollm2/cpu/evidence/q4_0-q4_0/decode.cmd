CUDA_VISIBLE_DEVICES='' GGML_VK_VISIBLE_DEVICES='' HIP_VISIBLE_DEVICES='' ROCR_VISIBLE_DEVICES='' TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /root/xbuild/cuda/turbo-probe/turbo-decode /root/smol.gguf /root/xcache/decode/prompts-cdd04edf5bd57414.txt 64 32 q4_0 q4_0 16 0 none -
# rc=0 after 0.7 s
