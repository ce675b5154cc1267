"""The inference library under evaluation (train's generation eval included), serve and the data stage's
tokenizer loading: which model to load (models), the prompt and generation types (prompt), the transformers and
vLLM generators (hf, vllm), data-parallel batched generation (generate), an OpenAI-compatible endpoint as a
generator (endpoint) and tokenizer loading and hashing (tokenizer)."""
