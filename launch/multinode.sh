#!/usr/bin/env bash
# Run localloss-pp across several machines with torchrun's c10d rendezvous.
#
#   launch/multinode.sh NUM_NODES PROCS_PER_NODE HOST:PORT [localloss-pp train flags...]
#
# Start the same command on every node, in any order. HOST:PORT is an address of one of the
# nodes that the others can reach (the rendezvous; that node hosts it on PORT). The run has
# NUM_NODES x PROCS_PER_NODE processes = stages x replicas (--replicas R, default 1).
# torchrun numbers ranks node by node and rank r runs stage r % S of replica r // S, so a
# replica's pipeline stays on one node when PROCS_PER_NODE is a multiple of the stage count,
# and a pipeline longer than a node crosses the fewest node boundaries. Example, two nodes
# with 8 GPUs each, 8 stages x 2 replicas (one replica per node):
#
#   launch/multinode.sh 2 8 node01:29500 --replicas 2 --config my.toml --data-dir /data
#
# Checkpoints are written into --run-dir by the stages of the first replica and completed by
# its last stage: when those stages are on several nodes (a pipeline longer than a node), or
# with restarts (a restarted run resumes from its newest checkpoint), --run-dir must be on a
# file system every node sees; a run whose first replica spans nodes checks this at start.
#
# Environment: PYTHON (python3), RDZV_ID (job id shared by the nodes; default localloss-pp),
# MAX_RESTARTS (0), OMP_NUM_THREADS (1). Networks with several interfaces: set
# NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME to the interface the nodes share.
# Security: the rendezvous store on HOST:PORT is unauthenticated and torch binds it to every
# interface of that node (torchrun offers no way to bind it to one); keep the nodes on a private
# network or firewall PORT to the job's nodes (docs/scaling.md, "What to protect").
set -euo pipefail
PYTHON=${PYTHON:-python3}
usage="usage: launch/multinode.sh NUM_NODES PROCS_PER_NODE HOST:PORT [train flags...]"
if [[ $# -lt 3 ]]; then
  echo "$usage" >&2
  exit 2
fi
nnodes=$1 nproc=$2 endpoint=$3
shift 3
if ! [[ $nnodes =~ ^[1-9][0-9]*$ && $nproc =~ ^[1-9][0-9]*$ ]]; then
  echo "multinode.sh: NUM_NODES and PROCS_PER_NODE must be positive integers, got" \
    "'$nnodes' and '$nproc'; $usage" >&2
  exit 2
fi
if ! [[ $endpoint =~ ^[^:]+:[0-9]+$ ]]; then
  echo "multinode.sh: HOST:PORT must look like node01:29500, got '$endpoint'; $usage" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$nproc" \
  --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "${RDZV_ID:-localloss-pp}" \
  --max-restarts "${MAX_RESTARTS:-0}" -m localloss_pp train "$@"
