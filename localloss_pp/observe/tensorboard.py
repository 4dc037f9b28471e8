"""TensorBoard event files of a run (`--tensorboard [DIR]`, default RUN_DIR/tb).

Every stage (of replica 1) writes its own run, DIR/stage<k>: its blocks' local losses and
decoder errors (train and test) and its own busy fraction, waits, samples/s and bytes sent;
the last stage also writes the global loss and error and the learning rate. No numbers are
gathered for it. Epoch scalars have the epoch as step; with `--log-every N` the running means
of the epoch so far go to DIR/stage<k>/batches every N training batches, with the global batch
number as step (read from the device accumulators only at those batches). A resumed run opens
its writers with `purge_step` at the resume point, so TensorBoard hides what the killed run
wrote past it: the curves continue without duplicate steps.
"""
from __future__ import annotations

from pathlib import Path

from localloss_pp.observe.metrics import block_terms
from localloss_pp.observe.record import EpochRecord

__all__ = ["TensorBoardLog", "check_tensorboard", "tensorboard_dir"]

_TIMES = ("busy_fraction", "wait_recv_s", "wait_send_s", "wait_sync_s", "samples_per_s",
          "bytes_sent", "data_s")


def check_tensorboard(spec: str = "auto") -> None:
    """A one-line error before anything starts when the tensorboard package is missing, or
    when `--tensorboard FOLDER` names something that is not a folder."""
    if spec != "auto":
        folder = Path(spec)
        bad = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()),
                   None)
        if bad is not None:
            raise ValueError(f"--tensorboard {spec}: {bad} is a file, not a folder; give a "
                             "folder for the event files (or --tensorboard alone for "
                             "RUN_DIR/tb)")
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or pip install 'localloss-pp[tensorboard]')") from None


def tensorboard_dir(spec: str, run_dir: Path) -> Path | None:
    """The event-file folder of `--tensorboard SPEC` ("auto": RUN_DIR/tb), None when off."""
    if not spec:
        return None
    return Path(run_dir) / "tb" if spec == "auto" else Path(spec)


class TensorBoardLog:
    """One stage's writers (see the module docstring)."""

    def __init__(self, log_dir: Path, stage_index: int, *, writes_global: bool,
                 batches_per_epoch: int, start: tuple[int, int] = (1, 0),
                 per_batch: bool = False):
        from torch.utils.tensorboard import SummaryWriter
        self.stage_index, self.writes_global = stage_index, writes_global
        self.batches_per_epoch = batches_per_epoch
        first_epoch, done = start
        folder = Path(log_dir) / f"stage{stage_index + 1}"
        # always a purge step: also a run started again from scratch in its own run directory
        # hides what the killed attempt wrote
        self.epochs = SummaryWriter(str(folder), purge_step=first_epoch)
        self.batches = None
        if per_batch:
            self.batches = SummaryWriter(str(folder / "batches"),
                                         purge_step=self.global_step(first_epoch, done) + 1)

    def global_step(self, epoch: int, done: int) -> int:
        """The global batch number after `done` batches of `epoch`."""
        return (epoch - 1) * self.batches_per_epoch + done

    def epoch(self, epoch: int, lr: float, summary: dict, record: EpochRecord | None) -> None:
        """The scalars of an epoch: this stage's blocks and times; the global ones from
        `record` (the metrics record, on the last stage)."""
        w = self.epochs
        for block in summary["blocks"]:
            for split in ("train", "test"):
                for key in ("loss", *block_terms(block[split]), "error"):
                    value = block[split].get(key)
                    if value is not None:
                        w.add_scalar(f"block{block['index']:02d}/{split}/{key}", value, epoch)
        for split in ("train", "test"):
            times = summary[f"{split}_times"]
            for key in _TIMES:
                if times.get(key) is not None:
                    w.add_scalar(f"stage{self.stage_index + 1}/{split}/{key}", times[key], epoch)
        if self.writes_global and record is not None:
            w.add_scalar("global/lr", lr, epoch)
            for split in ("train", "test"):
                for key in ("loss_global", "loss_local", "error"):
                    w.add_scalar(f"global/{split}/{key}", getattr(getattr(record, split), key),
                                 epoch)
            if record.train_samples_per_s:
                w.add_scalar("global/train/samples_per_s", record.train_samples_per_s, epoch)
        w.flush()

    def batch(self, epoch: int, done: int, glob: dict, blocks: list[dict]) -> None:
        """Running means of the epoch so far, after `done` training batches."""
        if self.batches is None:
            return
        step, w = self.global_step(epoch, done), self.batches
        for block in blocks:
            for key in ("loss", "error"):
                if block.get(key) is not None:
                    w.add_scalar(f"block{block['index']:02d}/train/{key}", block[key], step)
        if self.writes_global:
            w.add_scalar("global/train/loss_global", glob["loss_global"], step)
            w.add_scalar("global/train/error", glob["error"], step)

    def close(self) -> None:
        self.epochs.close()
        if self.batches is not None:
            self.batches.close()
