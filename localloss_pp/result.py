"""What a finished run gives back: `RunResult` (docs/python.md)."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from localloss_pp.observe.record import EpochRecord

__all__ = ["RunResult"]


@dataclass
class RunResult:
    """A finished run: its final errors (%), digest, run directory and epoch records.

    `records`: one `EpochRecord` per epoch (what metrics.jsonl holds: errors, losses, every
    block's numbers, times); `samples_per_s`: training samples per second, the median over the
    epochs. `RunResult.from_dir(path)` reads a finished run directory."""
    run_dir: Path
    digest: str
    test_error: float
    train_error: float
    epochs: int
    records: list[EpochRecord] = field(default_factory=list, repr=False)
    samples_per_s: float | None = None

    @classmethod
    def from_records(cls, run_dir, digest: str, epochs: int,
                     records: list[EpochRecord]) -> "RunResult":
        last = next((r for r in records if r.epoch == epochs), None)
        if last is None:
            raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} has no record of epoch "
                             f"{epochs}, the run's last")
        records = [r for r in records if r.epoch <= epochs]
        speeds = [r.train_samples_per_s for r in records if r.train_samples_per_s]
        return cls(Path(run_dir), digest, last.test.error, last.train.error, epochs, records,
                   statistics.median(speeds) if speeds else None)

    @classmethod
    def from_dir(cls, path) -> "RunResult":
        """The result of the finished run in `path` (its model.pt, verified, and its
        metrics.jsonl); a ValueError when the run has not finished or its files are damaged."""
        from localloss_pp.observe.metrics import read_jsonl
        from localloss_pp.run.checkpoint import read_model_file
        run_dir = Path(path)
        if not run_dir.is_dir():
            raise ValueError(f"run directory {run_dir} does not exist" if not run_dir.exists()
                             else f"{run_dir} is not a run directory (a folder)")
        if not (run_dir / "model.pt").exists():
            raise ValueError(f"run directory {run_dir} has no model.pt: the run has not "
                             "finished; continue it with --resume auto (resume=\"auto\")")
        state = read_model_file(run_dir / "model.pt")
        records = [EpochRecord.from_json(r) for r in read_jsonl(run_dir / "metrics.jsonl")]
        return cls.from_records(run_dir, state["digest"], int(state["epoch"]), records)
