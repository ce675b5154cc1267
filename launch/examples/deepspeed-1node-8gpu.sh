#!/usr/bin/env bash
# deepspeed launcher for run 'qwen2.5-7b-lora', rendered by `cbt-llm launch` from the typed config; re-render, don't edit.
# world size 8 = 1 node(s) x 8 process(es); run folder runs/qwen2.5-7b-lora/train
# trains: cbt-llm train --config configs/train/qwen2.5-7b-lora.yaml launch.gpus_per_node=8
set -euo pipefail
exec deepspeed \
  --num_gpus 8 \
  --master_port 29500 \
  --no_local_rank \
  "$(command -v cbt-llm)" \
  train \
  --config configs/train/qwen2.5-7b-lora.yaml launch.gpus_per_node=8
