"""The inference library under train's generation eval, evaluation, serve and synth: which model to load (models),
the prompt and generation types (prompt), the transformers and vLLM generators (hf, vllm), data-parallel batched
generation (generate), an OpenAI-compatible endpoint as a generator (endpoint) and tokenizer loading (tokenizer)."""
