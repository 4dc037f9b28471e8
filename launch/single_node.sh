#!/usr/bin/env bash
# Run localloss-pp on one machine: one process per stage (per stage and replica with --replicas).
#
#   launch/single_node.sh [NUM_PROCS] [localloss-pp train flags...]
#
# NUM_PROCS = stages x replicas. It defaults to the number of visible GPUs (one process per
# GPU, NCCL), or to 2 on a machine without GPUs (CPU processes over gloo, the cores shared
# between them). Every flag after NUM_PROCS goes to `localloss-pp train`, for example:
#
#   launch/single_node.sh 4 --config configs/recipes/cifar10_vgg8b_predsim.toml --data-dir data
#   launch/single_node.sh 8 --replicas 2 ...        # 4 stages x 2 replicas
#
# Environment: PYTHON (default: python3), and anything torchrun reads (e.g. OMP_NUM_THREADS;
# localloss-pp itself gives each process the cores divided among the processes unless
# --threads-per-rank is set).
# Security: torchrun's store for --standalone listens on every interface of this machine on a
# free port (torch binds it so; torchrun offers no other address); on a machine that others
# can reach, a firewall should keep that range private (docs/scaling.md, "What to protect").
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  procs=$1
  shift
else
  procs=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
if [[ $procs -lt 1 ]]; then
  echo "single_node.sh: NUM_PROCS must be >= 1, got $procs" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$procs" \
  -m localloss_pp train "$@"
