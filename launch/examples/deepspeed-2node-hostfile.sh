#!/usr/bin/env bash
# deepspeed launcher for run 'qwen2.5-7b-full', rendered by `cbt-llm launch` from the typed config; re-render, don't edit.
# world size 16 = 2 node(s) x 8 process(es); run folder runs/qwen2.5-7b-full/train
# trains: cbt-llm train --config configs/train/qwen2.5-7b-full.yaml launch.nodes=2 launch.gpus_per_node=8 launch.master_addr=node001 launch.hostfile=hostfile
set -euo pipefail
# node 0 starts all 2 nodes over ssh (pdsh); every host in the hostfile needs the same paths
exec deepspeed \
  --hostfile hostfile \
  --num_nodes 2 \
  --num_gpus 8 \
  --master_addr node001 \
  --master_port 29500 \
  --no_local_rank \
  "$(command -v cbt-llm)" \
  train \
  --config configs/train/qwen2.5-7b-full.yaml launch.nodes=2 launch.gpus_per_node=8 launch.master_addr=node001 launch.hostfile=hostfile
