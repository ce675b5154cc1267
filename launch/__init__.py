"""Launch: how a training run reaches machines (deepspeed launcher, Slurm, Ray), a library `cbt-llm launch` calls.

    render      the launcher scripts, every value taken from the typed config
    preflight   the checks run before a script starts or is submitted (shards, tokenizer, world size, run folder)
    submit      `cbt-llm launch`: render, check, then run or submit
    ray_job     the Ray cluster job (`cbt-llm launch ray --entrypoint`): Ray Train workers on the shards
    ray_read    the Ray Data read task of the train shards, in a module that imports pyarrow only
    examples/   the scripts render writes for common setups (refresh: python -m launch.render)

It reads the data stage's output through data_pipeline.shards only, and imports neither evaluation nor serve.
"""
