"""nectar_models: lean PyTorch decoders (LLaMA/SmolLM2, Qwen2/3, Gemma 3) with a split
context/local KV cache whose attention is merged by log-sum-exp: the seam where Nectar plugs in."""
