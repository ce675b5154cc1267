#!/usr/bin/env bash
# deepspeed launcher for run 'qwen2.5-7b-lora', rendered by `cbt-llm launch` from the typed config; re-render, don't edit.
# world size 16 = 2 node(s) x 8 process(es); run folder runs/qwen2.5-7b-lora/train
# trains: cbt-llm train --config configs/train/qwen2.5-7b-lora.yaml launch.nodes=2 launch.gpus_per_node=8 launch.master_addr=10.0.0.1
set -euo pipefail
# no ssh: run this same script on each of the 2 nodes, NODE_RANK=0 on 10.0.0.1
NODE_RANK="${NODE_RANK:?set NODE_RANK to the index of this node, 0..1}"
HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/cbt-llm-hostfile.XXXXXX")
for h in node0 node1; do echo "$h slots=8"; done > "$HOSTFILE"
exec deepspeed \
  --no_ssh \
  --hostfile "$HOSTFILE" \
  --num_nodes 2 \
  --node_rank "$NODE_RANK" \
  --num_gpus 8 \
  --master_addr 10.0.0.1 \
  --master_port 29500 \
  --no_local_rank \
  "$(command -v cbt-llm)" \
  train \
  --config configs/train/qwen2.5-7b-lora.yaml launch.nodes=2 launch.gpus_per_node=8 launch.master_addr=10.0.0.1
