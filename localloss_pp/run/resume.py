"""Where a run starts: fresh, a checkpoint, or a model file; what it checks before it trusts
them, and the metrics records a resumed run keeps. (A stage's part of each checkpoint is written
and read back by run/stage_checkpoint.py.)

Checkpoints live in RUN_DIR/checkpoints/e<epoch>-end (after an epoch: its training,
evaluation and metrics record) or e<epoch>-s<batches> (within an epoch, every
--checkpoint-every batches). Every stage writes the state of its own units there, stage 0 also
the data position, the last stage also the output layer's running statistics; the last stage
writes the manifest when every part is there. A checkpoint without its manifest does not count.
Units are stored by their global index, so a run can resume with another number of stages.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from localloss_pp.config import Config, build_config, load_toml
from localloss_pp.errors import first_line
from localloss_pp.observe.metrics import read_records
from localloss_pp.run.checkpoint import (MANIFEST, CheckpointError, atomic_write_bytes,
                                         latest_checkpoint, list_checkpoints, read_manifest,
                                         semantic_config)

__all__ = ["ResumePlan", "plan_resume", "records_start", "kept_metrics", "reconcile_metrics"]

log = logging.getLogger(__name__)


@dataclass
class ResumePlan:
    kind: str = "fresh"          # "fresh", "checkpoint" or "model" (a model.pt, reference style)
    path: str = ""
    manifest: dict = field(default_factory=dict)

    @property
    def start(self) -> tuple[int, int]:
        """(first epoch to run, batches of it already done)."""
        if self.kind != "checkpoint":
            return 1, 0
        m = self.manifest
        return (m["epoch"] + 1, 0) if m["step"] is None else (m["epoch"], m["step"])


def _holds_run(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").exists() or (run_dir / "model.pt").exists()


def _config_diffs(saved: dict, cfg, label: str = "checkpoint") -> list[str]:
    """What differs between a saved semantic config and `cfg`'s. A key the saved one lacks was
    written by a version before that option existed, which behaved as its default does."""
    now = semantic_config(cfg)
    defaults = semantic_config(Config())
    diffs = []
    for s in now:
        for k, v in now[s].items():
            old = saved.get(s, {}).get(k, defaults[s][k])
            if old != v:
                diffs.append(f"{s}.{k}: {label} {old!r}, now {v!r}")
    return diffs


def _other_run(run_dir: Path, cfg) -> str | None:
    """None when the run in `run_dir` was started with this config (the parts that change the
    numbers); otherwise what differs."""
    path = run_dir / "config.toml"
    try:
        saved = semantic_config(build_config(load_toml(path)))
    except (OSError, ValueError) as exc:
        return f"its config.toml cannot be read: {first_line(exc)}"
    diffs = _config_diffs(saved, cfg, "there")
    return "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "") if diffs else None


def _check_config(manifest: dict, cfg, where) -> None:
    diffs = _config_diffs(manifest["config"], cfg)
    if diffs:
        raise CheckpointError(f"{where} was written with another config ({'; '.join(diffs[:4])}"
                              f"{'; ...' if len(diffs) > 4 else ''}); resume with the same "
                              "model, loss, data, optimizer and seed settings")


def plan_resume(cfg, run_dir: Path, restarted: bool) -> ResumePlan:
    """Decide where the run starts; raise a clear error when the request cannot be honoured."""
    spec = cfg.train.resume or ("auto" if restarted else "")
    found = latest_checkpoint(run_dir, log) if restarted or spec == "auto" else None
    if restarted and found is not None:
        spec = "auto"  # a restarted attempt continues this run, not the original --resume source
    if not spec:
        if _holds_run(run_dir):
            raise ValueError(f"run directory {run_dir} already holds a run; choose another "
                             "--run-dir or continue it with --resume auto (nothing is deleted)")
        return ResumePlan()
    if spec == "auto":
        if found is None:
            if _holds_run(run_dir):
                # killed before its first checkpoint was complete: the same run starts again
                other = _other_run(run_dir, cfg)
                if other is None and not (run_dir / "model.pt").exists():
                    log.warning("run directory %s holds the start of this run but no complete "
                                "checkpoint yet: training again from epoch 1", run_dir)
                    return ResumePlan()
                raise CheckpointError(
                    f"run directory {run_dir} holds " + (
                        f"another run ({other})" if other else "a finished run (model.pt)") +
                    " and no complete, intact checkpoint to resume from; choose another "
                    "--run-dir")
            return ResumePlan()  # nothing to resume yet: start from scratch
        folder, manifest = found
    else:
        path = Path(spec)
        if not path.exists():
            raise CheckpointError(f"--resume {spec} does not exist (nothing was started); pass a "
                                  "run directory, a checkpoint folder, or a model.pt")
        if path.is_file() and path.suffix == ".pt":
            if _holds_run(run_dir):
                raise ValueError(f"run directory {run_dir} already holds a run; choose another "
                                 "--run-dir for the continued run")
            return ResumePlan("model", str(path))
        if path.is_file() and path.name == MANIFEST:
            path = path.parent
        if (path / MANIFEST).exists():
            folder, manifest = path, read_manifest(path)
        else:
            found = latest_checkpoint(path, log)
            if found is None:
                raise CheckpointError(f"--resume {spec}: no complete, intact checkpoint there")
            folder, manifest = found
        if folder.parent.parent.resolve() != run_dir.resolve() and _holds_run(run_dir):
            raise ValueError(f"run directory {run_dir} already holds a run; choose another "
                             "--run-dir for the continued run")
    _check_config(manifest, cfg, folder)
    in_place = folder.parent.parent.resolve() == run_dir.resolve()
    if in_place and manifest["complete_epochs"] == cfg.train.epochs and manifest["step"] is None:
        # the run was killed after its final checkpoint: only the end is left to do
        log.info("checkpoint %s holds all %d epochs: finishing the run from it", folder.name,
                 cfg.train.epochs)
        return ResumePlan("checkpoint", str(folder), manifest)
    if manifest["complete_epochs"] >= cfg.train.epochs:
        raise ValueError(f"{folder} already completed {manifest['complete_epochs']} epochs and "
                         f"--epochs is {cfg.train.epochs}; raise --epochs to train further")
    return ResumePlan("checkpoint", str(folder), manifest)


def records_start(plan: ResumePlan, run_dir: Path, first_epoch: int) -> int | None:
    """The first epoch whose record this run directory holds: 1 for a run started here, the
    resumed epoch for a run continued from another directory or a model.pt (the earlier
    records stay with their own run), and what the checkpoint says for a run resumed in place.
    None for a checkpoint written before 0.3.0, which does not say."""
    if plan.kind == "checkpoint" and \
            Path(plan.path).parent.parent.resolve() == Path(run_dir).resolve():
        return plan.manifest.get("records_from")
    return first_epoch


def kept_metrics(run_dir: Path, first_epoch: int,
                 records_from: int | None = 1) -> tuple[list[dict] | None, int]:
    """(the records of metrics.jsonl that a run starting at `first_epoch` keeps, the first
    epoch of the directory's records). Kept are those of the epochs before `first_epoch` (the
    later ones are recomputed identically), and they must cover every epoch from
    `records_from` on: a run never finishes with a gap in its records. A damaged line is
    dropped with a warning when the kept records are complete without it; a missing record is
    a clear error (file, epoch, what to do) and nothing is changed. `records_from` None (an
    older checkpoint): from the first record there is. Records None if there is no file."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None, records_from or first_epoch
    records, damaged = read_records(path)
    keep = [r for r in records if r["epoch"] < first_epoch]
    if records_from is None:
        records_from = min((r["epoch"] for r in keep), default=first_epoch)
    missing = sorted(set(range(records_from, first_epoch)) - {r["epoch"] for r in keep})
    if missing:
        gap = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        what = (f"{path} line {damaged[0][0]} is damaged ({damaged[0][1]}), and it has no "
                "record" if damaged else f"{path} has no record")
        covered = [f for f in _intact_checkpoints(run_dir)
                   if int(f.name[1:6]) - (not f.name.endswith("-end")) < missing[0]]
        fix = (f"resume from a checkpoint they cover (--resume {covered[-1]}), whose later "
               "epochs are recomputed identically" if covered else
               "start again in a new --run-dir")
        raise CheckpointError(
            f"{what} of epoch {gap}, which the run resumed at epoch {first_epoch} must keep "
            f"(nothing was changed); put the line back, or {fix}")
    for line, why in damaged:
        log.warning("%s line %d is damaged (%s): dropped; the epochs from %d on are recomputed",
                    path, line, why, first_epoch)
    return keep, records_from


def _intact_checkpoints(run_dir: Path) -> list[Path]:
    out = []
    for folder in list_checkpoints(run_dir):
        try:
            read_manifest(folder)
            out.append(folder)
        except CheckpointError:
            pass
    return out


def reconcile_metrics(run_dir: Path, first_epoch: int, keep: list[dict] | None = None) -> None:
    """Keep only the records of epochs before `first_epoch` (see kept_metrics)."""
    if keep is None:
        keep, _ = kept_metrics(run_dir, first_epoch)
        if keep is None:
            return
    atomic_write_bytes(run_dir / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n"
                                                          for r in keep).encode())
