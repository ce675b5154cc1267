"""Evaluation: how good are a model's answers (issue 10's `cbt-llm eval` builds on these modules).

    generate.py    the answers: greedy generation batched by a token budget, data parallel over ranks, with
                   transformers in-process or vLLM (when installed, on CUDA); models from `cbt-llm export`
    questions.py   the question sets: prepare's heldout.jsonl, and the refusal of a set that overlaps the train
                   split (check_no_train_overlap)
    safety.py      the safety metrics of every answer, by the crisis policy the corpus follows (cbt_llm/crisis.py)
    (the CBT-structure scorer is data_pipeline/structure.py: prepare's quality gate scores the corpus with it too)

A layer of its own: it may import data_pipeline, train and the shared cbt_llm modules; only the CLI, bench/ and
tests/ import it (tests/test_layers.py).
"""
