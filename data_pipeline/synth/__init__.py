"""Building the corpus.

template      the offline generator of single-turn records (millions, deterministic, sharded)
sessions      the offline generator of multi-turn counselling sessions
banks/        the phrase tables both compose from, and the structure scorer's seed exemplars
draws         the per-record BLAKE2b draws the template generators share
flaws         flawed answers: template pairs' rejected side and synth.flawed_fraction's records
pairs         `synth template --pairs`: offline preference pairs
client        the OpenAI-compatible client every API job shares (retries, backoff, the request pool, resume)
api           `synth api`: the paper's method, one CBT prompt per question
api_sessions  `synth api --sessions`: a counsellor and a client simulator talk
agents        `synth api --agents`: draft -> critique on the judge's rubric -> revise
model_pairs   `cbt-llm pairs`: n sampled answers per question from a model, ranked, best against worst
pair_judge    the LLM judge `cbt-llm pairs` scores sampled answers with (pairs.judge)
scorer        training the offline structure scorer on a frozen template corpus and the seed banks
"""
