"""Weight snapshots within an epoch, for time to accuracy at sub-epoch resolution.

`train --snapshot-every N`: after every N-th training batch of an epoch (and after its last
batch) every stage keeps a copy of its units' weights on the host, stamped with the stage's
training time so far: the time inside its training streams, without the evaluation, the
epoch-end statistics and checkpoints, and without the snapshot copies themselves. At the end of
every epoch the stage writes that epoch's copies to RUN_DIR/snapshots/stage<k>-e<epoch>.pt.

`evaluate_run(RUN_DIR)` then rebuilds the whole model in one process for every snapshot point
and measures its test error, so the evaluation costs the run nothing. A point's time is the
latest of the stages' stamps for that batch (the last stage finishes a batch last): the time
the pipeline needed to train the model up to that batch.

On a GPU a snapshot synchronises the device (its copy to the host waits for the batch), so the
stamp includes all the work queued up to that batch; the copy's own time is left out of the
stamps. Only replica 1 of each stage writes (the replicas hold the same weights). A resumed run
keeps the files of its finished epochs and continues their clock; the snapshots of an epoch
that was interrupted are taken again from the batch it resumes at.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from localloss_pp.run.checkpoint import atomic_torch_save

__all__ = ["SnapshotRecorder", "evaluate_run", "read_points", "SNAPSHOT_DIR"]

SNAPSHOT_DIR = "snapshots"
_FILE = re.compile(r"stage(\d+)-e(\d+)\.pt$")


class SnapshotRecorder:
    """One stage's snapshots: `begin(epoch, total)` before the epoch's training stream,
    `after_batch(seq)` after each of its batches (the runner's `on_batch`), `end()` after the
    stream, `flush()` once the epoch is checkpointed."""

    def __init__(self, run_dir: Path, stage_index: int, units, every: int, device,
                 batches_per_epoch: int):
        self.folder = Path(run_dir) / SNAPSHOT_DIR
        self.stage_index, self.units, self.every = stage_index, list(units), every
        self.device, self.batches_per_epoch = device, batches_per_epoch
        self.offset_s = 0.0     # training time of the epochs before this one
        self.copy_s = 0.0       # time of this epoch's copies (left out of the stamps)
        self.epoch, self.total, self.start = 0, 0, 0.0
        self.active = False     # within a training stream (the runner's eval streams call too)
        self.points: list[dict] = []

    def resume_from(self, epoch: int) -> None:
        """Continue the clock of the finished epochs before `epoch` (from their files)."""
        prev = self.folder / f"stage{self.stage_index + 1}-e{epoch - 1:05d}.pt"
        if epoch > 1 and prev.is_file():
            self.offset_s = torch.load(prev, map_location="cpu", weights_only=True)["train_s"]

    def begin(self, epoch: int, total: int) -> None:
        self.epoch, self.total, self.copy_s, self.points = epoch, total, 0.0, []
        self.active = True
        self.start = time.perf_counter()

    def after_batch(self, seq: int) -> None:
        done = seq + 1
        if not self.active or (done % self.every and done != self.total):
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        states = [{k: v.detach().to("cpu", copy=True) for k, v in u.state_dict().items()}
                  for u in self.units]
        self.points.append({"epoch": self.epoch, "batch": done,
                            "step": (self.epoch - 1) * self.batches_per_epoch + done,
                            "train_s": self.offset_s + now - self.start - self.copy_s,
                            "units": [u.index for u in self.units], "states": states})
        self.copy_s += time.perf_counter() - now

    def end(self) -> None:
        """After the training stream: the epoch's training time joins the offset."""
        self.offset_s += time.perf_counter() - self.start - self.copy_s
        self.active = False

    def flush(self) -> None:
        """Write this epoch's snapshots (atomically: a kill leaves the previous files whole)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"stage": self.stage_index, "epoch": self.epoch,
                           "train_s": self.offset_s, "copy_s": self.copy_s,
                           "points": self.points},
                          self.folder / f"stage{self.stage_index + 1}-e{self.epoch:05d}.pt")
        self.points = []


def read_points(run_dir: Path) -> list[dict]:
    """Every snapshot point of a run, the stages' parts joined: [{epoch, batch, step, train_s
    (the latest stage's stamp), stage_s (every stage's stamp), states {unit index: state}}],
    in training order. A point some stage lacks (an interrupted epoch) is left out."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    by_step: dict[int, dict] = {}
    stages = set()
    for path in sorted(folder.glob("stage*-e*.pt")):
        m = _FILE.search(path.name)
        if m is None:
            continue
        stage = int(m.group(1))
        stages.add(stage)
        for p in torch.load(path, map_location="cpu", weights_only=True)["points"]:
            point = by_step.setdefault(p["step"], {"epoch": p["epoch"], "batch": p["batch"],
                                                   "step": p["step"], "stage_s": {},
                                                   "states": {}})
            point["stage_s"][stage] = p["train_s"]
            point["states"].update(zip(p["units"], p["states"]))
    if not stages:
        raise FileNotFoundError(f"{folder} holds no snapshots: train with --snapshot-every N")
    out = []
    for step in sorted(by_step):
        point = by_step[step]
        if set(point["stage_s"]) == stages:
            point["train_s"] = max(point["stage_s"].values())
            out.append(point)
    return out


@torch.no_grad()
def evaluate_run(run_dir: Path, device: str = "cpu", data_dir: str | None = None,
                 progress=None) -> list[dict]:
    """Test error and loss of every snapshot point of `run_dir` (its config.toml rebuilds the
    model and the test data; `data_dir` overrides where the data is). Returns
    [{epoch, batch, step, train_s, test_error, test_loss}] (the loss as the run's
    records give it: the output layer's loss)."""
    from localloss_pp.config import build_config, load_toml
    from localloss_pp.data.datasets import build_sources
    from localloss_pp.models import build_model
    from localloss_pp.models.losses import onehot

    run_dir = Path(run_dir)
    cfg = build_config(load_toml(run_dir / "config.toml"))
    if data_dir is not None:
        cfg.data.data_dir = data_dir
    dev = torch.device(device)
    recorded = run_dir / "dataset.json"
    if recorded.is_file():  # the run's normalisation, not one measured on the data as it is now
        saved = json.loads(recorded.read_text())
        cfg.data.mean, cfg.data.std = list(saved["mean"]), list(saved["std"])
    _, test, info = build_sources(cfg.data, cfg.train.seed, dev, cache_dir=run_dir / "data-cache")
    model = build_model(cfg.model, cfg.loss, info.input_shape, info.num_classes, cfg.train.seed,
                        input_norm=(info.mean, info.std))
    model.setup_units({u.index for u in model.units()}, dev, cfg.optim,
                      precision=cfg.train.precision)
    model.eval()
    test.set_epoch(1)
    batches = list(test)
    out = []
    for point in read_points(run_dir):
        for unit in model.units():
            unit.load_state_dict(point["states"][unit.index])
        wrong, loss_sum, n = 0, 0.0, 0
        for x, y, _ in batches:
            for block in model.blocks:
                x, _ = block.evaluate(x, y, onehot(y, info.num_classes), with_stats=False)
            logits, loss = model.output.predict(x, y)
            loss_sum += float(loss) * y.size(0)
            wrong += int((logits.argmax(1) != y).sum())
            n += y.size(0)
        out.append({"epoch": point["epoch"], "batch": point["batch"], "step": point["step"],
                    "train_s": point["train_s"], "test_error": 100.0 * wrong / n,
                    "test_loss": loss_sum / n})
        if progress is not None:
            progress(out[-1])
    return out
