#!/usr/bin/env bash
# Ray cluster job for run 'qwen2.5-7b-lora', rendered by `cbt-llm launch` from the typed config; re-render, don't edit.
# world size 8 = 1 node(s) x 8 process(es); run folder runs/qwen2.5-7b-lora/train
# trains: cbt-llm train --config configs/train/qwen2.5-7b-lora.yaml launch.gpus_per_node=8 launch.ray.storage_path=/shared/ray-results
set -euo pipefail
export RAY_ADDRESS="${RAY_ADDRESS:?set RAY_ADDRESS to the cluster, e.g. http://head:8265}"
# the entrypoint runs on the head node in this folder (a shared file system, as for Slurm);
# every checkpoint is reported to /shared/ray-results and restored workers load from there;
# the job's exit code is the trainer's: non-zero when training failed after launch.ray.max_failures restarts
exec ray job submit --submission-id "cbt-llm-qwen2.5-7b-lora-$(date +%s)" -- \
  bash -c "cd $PWD && python -m cbt_llm.cli launch ray --entrypoint --config configs/train/qwen2.5-7b-lora.yaml launch.gpus_per_node=8 launch.ray.storage_path=/shared/ray-results"
