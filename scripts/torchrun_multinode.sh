#!/usr/bin/env bash
# Multi-node training with torchrun: run this script once on every node.
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/torchrun_multinode.sh CONFIG.yaml [KEY=VALUE ...]
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 scripts/torchrun_multinode.sh CONFIG.yaml [KEY=VALUE ...]
#
# Everything after the script name goes to `moe-recipes train` (the config and dotted overrides,
# e.g. train.iters=1000 optim.lr=1e-5, or --resume).
#
# Environment:
#   NNODES         number of nodes (default 1)
#   NODE_RANK      this node's index, 0 .. NNODES-1 (default 0)
#   MASTER_ADDR    host name or IP of node 0, reachable from every node (default 127.0.0.1, one node only)
#   MASTER_PORT    free TCP port on node 0 (default 29500)
#   GPUS_PER_NODE  processes per node (default: the number of GPUs nvidia-smi lists, else 1)
#   DRY_RUN=1      print the command instead of running it
# With several network interfaces, pin the one to use: NCCL_SOCKET_IFNAME=ib0 (GPU) / GLOO_SOCKET_IFNAME=eth0.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: [NNODES=N NODE_RANK=I MASTER_ADDR=HOST] $0 CONFIG.yaml [KEY=VALUE ...]" >&2
  exit 2
fi

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [[ "$GPUS_PER_NODE" -gt 0 ]] || GPUS_PER_NODE=1
fi
if [[ "$NNODES" -gt 1 && "$MASTER_ADDR" == "127.0.0.1" ]]; then
  echo "$0: NNODES=$NNODES needs MASTER_ADDR set to node 0's address" >&2
  exit 2
fi

# --no-python: torchrun starts the `moe-recipes` executable itself (one per GPU), with RANK, LOCAL_RANK,
# WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; the trainer reads them (moe_recipes.distributed.env).
cmd=(torchrun
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE"
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT"
  --no-python moe-recipes train "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "${cmd[*]}"
else
  exec "${cmd[@]}"
fi
