"""`localloss-pp compare RUN_A RUN_B [...]`: runs side by side.

A table of the epochs, final and best test error, wall time, training samples/s and
model-digest of every run (with whether the digests are identical), then the config keys whose
values differ; `--plot` overlays the test-error curves per epoch and on a wall-clock axis
(time to accuracy).
"""
from __future__ import annotations

import tomllib
from pathlib import Path

import torch

from localloss_pp.errors import first_line
from localloss_pp.models.model import verified_digest
from localloss_pp.observe.metrics import read_jsonl
from localloss_pp.observe.plots import pyplot
from localloss_pp.observe.record import EpochRecord

__all__ = ["load_run", "compare_table", "plot_compare"]

# keys that name where a run is, not what it computes
_WHERE = {"train.run_dir", "train.save_dir", "train.resume", "data.data_dir"}


def load_run(run_dir: str | Path) -> dict:
    """What `compare` needs of one run directory; a ValueError naming what is missing."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ValueError(f"{run_dir} holds no metrics.jsonl; pass the --run-dir of a training "
                         "run")
    records = [EpochRecord.from_json(r) for r in read_jsonl(run_dir / "metrics.jsonl")]
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} is empty: the run has not finished an "
                         "epoch yet")
    config = {}
    if (run_dir / "config.toml").is_file():
        raw = tomllib.loads((run_dir / "config.toml").read_text())
        config = {f"{section}.{key}": value for section, values in raw.items()
                  for key, value in values.items()}
    digest = _model_digest(run_dir / "model.pt")
    return {"dir": run_dir, "records": records, "config": config, "digest": digest}


def _model_digest(path: Path) -> str | None:
    """The digest computed from the weights in model.pt (None without one); a ValueError when
    the file is unreadable or damaged (models.verified_digest)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or foreign
        raise ValueError(f"{path} is not a readable localloss-pp model file "
                         f"({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a localloss-pp model file")
    return verified_digest(state, path)


def _summary(run: dict) -> dict:
    recs = run["records"]
    errors = [r.test.error for r in recs]
    best = min(range(len(errors)), key=errors.__getitem__)
    speeds = [r.train_samples_per_s for r in recs if r.train_samples_per_s]
    return {"epochs": recs[-1].epoch, "final": errors[-1], "best": errors[best],
            "best_epoch": recs[best].epoch,
            "wall_s": sum(r.epoch_time_s or 0.0 for r in recs),
            "samples_per_s": sum(speeds) / len(speeds) if speeds else None}


def compare_table(runs: list[dict]) -> list[str]:
    """The lines `compare` prints."""
    names = [str(r["dir"]) for r in runs]
    digests = [r["digest"] for r in runs]
    same = len(set(digests)) == 1 and digests[0] is not None
    lines = ["| run | epochs | final test error | best test error (epoch) | wall time | "
             "train samples/s | model-digest |", "|---|---|---|---|---|---|---|"]
    for name, run in zip(names, runs):
        s = _summary(run)
        speed = f"{s['samples_per_s']:.0f}" if s["samples_per_s"] else "-"
        d = run["digest"][:16] if run["digest"] else "- (no model.pt)"
        lines.append(f"| {name} | {s['epochs']} | {s['final']:.2f}% | {s['best']:.2f}% "
                     f"({s['best_epoch']}) | {s['wall_s']:.1f} s | {speed} | {d} |")
    lines.append("")
    lines.append("model-digests: " + ("identical" if same else "differ" if all(digests)
                                      else "not all runs have a model.pt"))
    keys = sorted(set().union(*(r["config"] for r in runs)) - _WHERE)
    differ = [k for k in keys if len({repr(r["config"].get(k)) for r in runs}) > 1]
    if differ:
        lines.append("")
        lines.append("| config key | " + " | ".join(f"run {i + 1}" for i in range(len(runs)))
                     + " |")
        lines.append("|---|" + "---|" * len(runs))
        for k in differ:
            lines.append(f"| {k} | " + " | ".join(repr(r["config"].get(k)) for r in runs) + " |")
    else:
        lines.append("config: the same (where the runs are aside)")
    return lines


def plot_compare(runs: list[dict], out: Path) -> Path:
    """Test error per epoch and per wall-clock second, every run overlaid."""
    plt = pyplot("--plot")
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for run in runs:
        recs = run["records"]
        label = Path(run["dir"]).name
        errors = [r.test.error for r in recs]
        elapsed, total = [], 0.0
        for r in recs:
            total += r.epoch_time_s or 0.0
            elapsed.append(total)
        by_epoch.plot([r.epoch for r in recs], errors, "o-", ms=3, label=label)
        by_time.plot(elapsed, errors, "o-", ms=3, label=label)
    by_epoch.set_xlabel("epoch")
    by_epoch.set_ylabel("test error (%)")
    by_epoch.set_title("test error per epoch")
    by_time.set_xlabel("wall time (s, sum of epoch times)")
    by_time.set_title("time to accuracy")
    for ax in (by_epoch, by_time):
        ax.grid(alpha=0.3)
    by_epoch.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
