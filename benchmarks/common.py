"""What every benchmark shares: the repository root, the synthetic batches' shape, a description
of the machine, the launcher of child processes, and pyplot without a display.

Every other module of benchmarks/ may import this one; it imports none of them.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INPUT_SHAPE, NUM_CLASSES = (1, 28, 28), 10  # the synthetic in-memory batches: MNIST-sized


def environment() -> dict:
    """The machine, the software and the git revision a benchmark ran on (for its JSON)."""
    import torch  # here, so that `python -m benchmarks.tta --help` does not wait for torch
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        rev = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "cuda": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "git_revision": rev}


def python_module(module: str, *args: str, ranks: int = 1) -> list[str]:
    """The command line of `python -m module args`: in this interpreter, or under torchrun
    (--standalone, one process per rank) for several ranks."""
    if ranks > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(ranks), "-m", module, *args]
    return [sys.executable, "-m", module, *args]


def launch(cmd: list[str], what: str, timeout: float, threads: int | None = None) -> None:
    """Run `cmd` from the repository root with the tree first on PYTHONPATH (and
    OMP_NUM_THREADS=`threads` when given). RuntimeError "`what` failed (exit N)" with the tail
    of its stderr when it fails; subprocess.TimeoutExpired after `timeout` seconds."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def pyplot():
    """matplotlib.pyplot drawing to files only (the Agg backend: no display needed). Every
    plot of benchmarks/ gets pyplot here."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
