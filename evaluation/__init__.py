"""Evaluation: how good a model's answers are. `cbt-llm eval` (run.py) ties these modules together.

    run.py          `cbt-llm eval`: check, load questions, answer with every model, score, write the reports
    questions.py    the question sets (prepare's heldout.jsonl, PsyQA JSON, our JSONL), the refusal of a set that
                    overlaps the train split (check_no_train_overlap), and `--predictions` files
    reference.py    reference metrics against the reference answer: BLEU, ROUGE, METEOR, distinct-n, length
    bertscore.py    BERTScore F1 with a local encoder
    safety.py       the safety metrics of every answer, by the corpus's crisis policy (cbt_llm/domain/crisis.py)
    probes.py       the crisis probes (probes/crisis_probe.jsonl) every model answers unguarded, and their rates
    preference.py   pref-accuracy: how often a model gives a held-out pair's chosen answer the higher mean
                    log-probability per token (cbt_llm/inference/logprobs.py)
    judge.py        the LLM judge on a rubric (cbt_llm/domain/rubrics.py), cached and resumable
    sessions.py     `cbt-llm eval --sessions`: multi-turn sessions with a client simulator, judged on CTRS items
    scoring.py      one model's answers scored: reference, BERTScore, structure, safety, judge, with intervals
    stats.py        bootstrap intervals for every mean and rate
    outputs.py      the report files: results.json, report.md, scores.png, the terminal table and W&B
    intrain.py      the generation eval during training, scored as `cbt-llm eval` scores a checkpoint
    scorer_eval.py  how well the structure scorer labels hand-written answers it never trained on

Generation is cbt_llm.inference.generate's and the CBT-structure scorer is cbt_llm/domain/structure.py (prepare's
quality gate scores the corpus with it too). Evaluation shares a tier with launch and serve and imports neither:
it may import train, data_pipeline and the cbt_llm libraries; only the CLI, bench/ and tests/ import it
(tests/test_layers.py).
"""
