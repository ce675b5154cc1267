"""The inference library under evaluation (train's generation eval included), serve and the data stage's
tokenizer loading: which model to load (models), the prompt and generation types (prompt), the transformers and
vLLM generators (hf, vllm: greedy, or sampled with a seed per prompt), data-parallel batched generation (generate),
an answer's log-probability as prepare encodes it (logprobs), an OpenAI-compatible endpoint as a generator (endpoint)
and tokenizer loading and hashing (tokenizer)."""
