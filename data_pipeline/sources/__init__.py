"""Where records come from: PsyQA's own format (psyqa) and the formats prepare reads (formats: our corpus, PsyQA,
Alpaca, ShareGPT and OpenAI messages), each turned into the examples prepare tokenizes."""
