#!/usr/bin/env bash
# Run an S-stage localloss-pp pipeline on one machine: one process per stage.
#
#   launch/single_node.sh [NUM_STAGES] [localloss-pp train flags...]
#
# NUM_STAGES defaults to the number of visible GPUs (one stage per GPU, NCCL), or to 2 on a
# machine without GPUs (CPU processes over gloo, the cores shared between them). Every flag
# after NUM_STAGES goes to `localloss-pp train`, for example:
#
#   launch/single_node.sh 4 --config configs/recipes/cifar10_vgg8b_predsim.toml --data-dir data
#
# Environment: PYTHON (default: python3), and anything torchrun reads (e.g. OMP_NUM_THREADS;
# localloss-pp itself gives each process the cores divided among the stages unless
# --threads-per-rank is set).
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  stages=$1
  shift
else
  stages=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
if [[ $stages -lt 1 ]]; then
  echo "single_node.sh: NUM_STAGES must be >= 1, got $stages" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$stages" \
  -m localloss_pp train "$@"
