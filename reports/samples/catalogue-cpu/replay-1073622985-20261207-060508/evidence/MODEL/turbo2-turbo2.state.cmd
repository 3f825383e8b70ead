GGML_NO_BACKTRACE=1 TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/wt/replay/.cache/cold/replay/1073622985bb68075472474b4b0fdfcdabcfc9d0/build/bin/llama-save-load-state -m /work/wt/replay/.cache/models/gemma3-270m-q4_k_m.gguf -ctk turbo2 -ctv turbo2 -fa off -c 128 -t 2 -n 8 --seed 1234
# rc=0 after 21.3 s
