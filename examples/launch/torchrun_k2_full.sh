#!/usr/bin/env bash
# The full K2 recipe (examples/configs/k2_full.yaml: PP16 x virtual stages, EP16, ZeRO-1) with torchrun, one
# command per node. Run it on every node with NODE_RANK set (0..NNODES-1) and MASTER_ADDR the first node:
#   NNODES=32 NODE_RANK=0 MASTER_ADDR=node0 examples/launch/torchrun_k2_full.sh [section.key=value ...]
# 32 nodes x 8 GPUs = 256 ranks (the smallest world the report trains on); any multiple of 32 nodes works.
# Check the per-rank memory first:  python examples/pretrain_k2.py --config examples/configs/k2_full.yaml --dry-run
set -euo pipefail
NNODES=${NNODES:?set NNODES (a multiple of 32)}
NODE_RANK=${NODE_RANK:?set NODE_RANK}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron: ordered kernel launches for comm/compute overlap
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    "$HERE/../pretrain_k2.py" --config "$HERE/../configs/k2_full.yaml" "$@"
