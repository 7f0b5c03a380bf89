#!/usr/bin/env bash
# Multi-node training started by Open MPI's mpirun: run this script once, on any host of the hostfile.
# mpirun only starts the processes; they then meet over TCP (NCCL on GPUs, gloo on CPUs) at MASTER_ADDR.
# Each process maps OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE to its rank (no mpi4py needed).
#
#   HOSTFILE=hostfile NNODES=2 GPUS_PER_NODE=8 scripts/mpirun_multinode.sh CONFIG.yaml [KEY=VALUE ...]
#
# hostfile (Open MPI format), one line per host:
#   node0 slots=8
#   node1 slots=8
#
# Environment:
#   HOSTFILE       the hostfile (default ./hostfile)
#   NNODES         hosts to use (default: all hosts in the hostfile)
#   GPUS_PER_NODE  processes per host (default 8)
#   MASTER_ADDR    address of the host that runs rank 0 (default: the first host of the hostfile, which is
#                  where rank 0 lands with --npernode placement)
#   MASTER_PORT    free TCP port on that host (default 29500)
#   MPIRUN_ARGS    extra mpirun options, e.g. "--allow-run-as-root" or "--mca btl_tcp_if_include eth0"
#   DRY_RUN=1      print the command instead of running it
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: [HOSTFILE=hostfile NNODES=N GPUS_PER_NODE=G] $0 CONFIG.yaml [KEY=VALUE ...]" >&2
  exit 2
fi

HOSTFILE=${HOSTFILE:-hostfile}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ ! -f "$HOSTFILE" ]]; then
  echo "$0: hostfile '$HOSTFILE' not found (set HOSTFILE)" >&2
  exit 2
fi
# Host names: first field of every line that is not blank or a comment.
mapfile -t hosts < <(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$HOSTFILE")
NNODES=${NNODES:-${#hosts[@]}}
MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
export MASTER_ADDR MASTER_PORT
NP=$((NNODES * GPUS_PER_NODE))

# -x exports a variable to the remote processes (local ones inherit everything). Add your own (HF_HOME,
# NCCL_SOCKET_IFNAME, ...) to MPIRUN_ARGS as "-x NAME".
exports=(-x MASTER_ADDR -x MASTER_PORT -x PATH)
for name in LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV OMP_NUM_THREADS; do
  if [[ -n "${!name:-}" ]]; then exports+=(-x "$name"); fi
done

# --bind-to none: the default core binding would squeeze each process's threads (data loading, CPU
# kernels) onto one core.
# shellcheck disable=SC2086  # MPIRUN_ARGS is deliberately split into words
cmd=(mpirun -np "$NP" --npernode "$GPUS_PER_NODE" --hostfile "$HOSTFILE" --bind-to none
  "${exports[@]}" ${MPIRUN_ARGS:-}
  moe-recipes train "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT ${cmd[*]}"
else
  exec "${cmd[@]}"
fi
