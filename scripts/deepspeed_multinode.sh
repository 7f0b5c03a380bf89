#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher: run this script once, on the first host of the hostfile.
# The launcher reaches the other hosts over passwordless ssh (pdsh by default) and starts one process per
# slot there, in the same directory, so the code and the Python environment must be at the same path on
# every host.
#
#   HOSTFILE=hostfile scripts/deepspeed_multinode.sh CONFIG.yaml [KEY=VALUE ...]
#
# hostfile, one line per host ("slots" = processes, normally GPUs, on that host):
#   node0 slots=8
#   node1 slots=8
#
# Environment:
#   HOSTFILE      the hostfile (default ./hostfile)
#   MASTER_ADDR   address of the first host as the others see it (default: the launcher asks that host
#                 for `hostname -I` over ssh)
#   MASTER_PORT   free TCP port on that host (default 29500)
#   LAUNCHER      how DeepSpeed reaches the hosts: pdsh (default), openmpi, mvapich, slurm, ...
#   DRY_RUN=1     print the command instead of running it
# Variables that the remote processes need (NCCL_*, PYTHONPATH, HF_HOME, ...) are forwarded when they are
# listed in a `.deepspeed_env` file (NAME=VALUE per line) in this directory or in your home directory.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: [HOSTFILE=hostfile] $0 CONFIG.yaml [KEY=VALUE ...]" >&2
  exit 2
fi

HOSTFILE=${HOSTFILE:-hostfile}
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER=${LAUNCHER:-pdsh}
if [[ ! -f "$HOSTFILE" ]]; then
  echo "$0: hostfile '$HOSTFILE' not found (set HOSTFILE)" >&2
  exit 2
fi

addr_args=()
if [[ -n "${MASTER_ADDR:-}" ]]; then
  addr_args=(--master_addr="$MASTER_ADDR")
fi

# --module runs `python -m moe_recipes.cli` (the `moe-recipes` command); --no_local_rank keeps the
# launcher from inserting --local_rank=N before `train` (each process gets LOCAL_RANK in its environment).
cmd=(deepspeed
  --hostfile="$HOSTFILE" --launcher="$LAUNCHER" ${addr_args[@]+"${addr_args[@]}"} --master_port="$MASTER_PORT"
  --no_local_rank --module moe_recipes.cli train "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "${cmd[*]}"
else
  exec "${cmd[@]}"
fi
