"""The command lines of the small runs the tests start: one helper instead of a copy per file."""
from __future__ import annotations


def mlp_args(layers: int = 2, hidden: int = 32, *extra: str, quiet: bool = True,
             one_thread: bool = False) -> list[str]:
    """`train` flags of an mlp of `layers` x `hidden` on the embedded dataset (4000 training
    images), then `extra`. quiet: no progress bar, no per-block table; one_thread: one thread
    per process (the bit-identity tests compare runs at equal threads)."""
    args = ["--model", "mlp", "--dataset", "mnist5k", "--num-layers", str(layers),
            "--num-hidden", str(hidden)]
    if quiet:
        args += ["--no-progress", "--no-print-stats"]
    if one_thread:
        args += ["--threads-per-rank", "1"]
    return args + list(extra)
