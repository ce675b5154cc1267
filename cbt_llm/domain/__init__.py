"""The CBT domain, as data and pure functions, importing no stage: the five parts and the distortions (cbt), the
crisis policy with its hotlines, detection and output check (crisis), the sentence-level rules by which an answer
gives crisis support or recommends professional help (answer_support), the guard around every model reply (guard),
the corpus record schema (record), the chat format (chat_format), every prompt (prompts), the judge's rubrics
(rubrics) and the offline structure scorer (structure)."""
