"""cbt-llm: build CBT-LLM style models end to end.

This package holds the layers around the stages (data_pipeline, train, then launch, evaluation and serve): the
command above them all and three libraries below them all, one sub-package each, top to bottom:

- `cbt_llm.cli` (top): the `cbt-llm` command, one module per subcommand, each importing its stage lazily;
  nothing in the product imports it.
- `cbt_llm.inference`: model loading and generation (transformers, vLLM, an OpenAI-compatible endpoint), under
  the stages that generate or tokenize.
- `cbt_llm.domain`: CBT knowledge as data and pure functions: the five parts, crisis policy, guard, record
  schema, chat format, prompts, rubrics and the structure scorer.
- `cbt_llm.core` (bottom): the typed config tree, the user-facing error, report tables and file helpers; it
  imports no other layer. `cbt_llm.config` is the config tree's compatibility name.

Each layer imports only itself and the layers below it; tests/test_layers.py holds the rule for every layer,
stages included (data flows one way, never back upstream).
"""

__version__ = "0.1.0"
