"""cbt-llm: build CBT-LLM style models end to end.

This package is two layers, one on each side of the stages (data_pipeline -> train -> launch):

- the top, `cbt_llm.cli`: the `cbt-llm` command, which imports every stage (lazily, one per subcommand);
  nothing in the product imports it back;
- the bottom, everything else here (`cbt_llm.config`, the typed config tree, and `cbt_llm.report`): what every
  stage imports; it imports no stage.

tests/test_layers.py holds these rules with the stages' own (data flows one way, never back upstream).
"""

__version__ = "0.1.0"
