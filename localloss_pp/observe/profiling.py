"""Profiler traces of the pipeline (`--profile EPOCH:START:STEPS`) and their timeline picture.

Every stage records `torch.profiler` traces of training batches START .. START+STEPS-1
(counted from 0) of epoch EPOCH and writes RUN_DIR/profile/stage<k>.json (Chrome trace
format: chrome://tracing, Perfetto, TensorBoard's profiler). The stage's work is marked by
`record_function` ranges: localloss_pp.data (the first stage making a batch), .recv, .forward,
.send, .local_backward, .optimizer_step, .statistics and .sync (replicas' averaging), inside the
.compute sections of the stage clock. `localloss-pp timeline RUN_DIR` draws them, a row per
stage, on one time axis (the trace timestamps are the machine's clock, so the stages of one
machine line up).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from localloss_pp.observe.plots import pyplot

__all__ = ["TraceWindow", "PHASES", "read_phases", "plot_timeline", "plot_timelines"]

log = logging.getLogger(__name__)

# the ranges drawn by the timeline, in drawing order (the innermost last), with their colours;
# "backward" is the global backward of a GPipe/1F1B stage of the benchmark
PHASES = {"data": "#8c564b", "recv": "#d62728", "forward": "#1f77b4", "send": "#ff7f0e",
          "local_backward": "#2ca02c", "backward": "#17becf", "optimizer_step": "#9467bd",
          "statistics": "#7f7f7f", "sync": "#e377c2"}


def _phase(name: str) -> str | None:
    if name.startswith("localloss_pp."):
        phase = name.split(".", 1)[1]
        return phase if phase in PHASES else None
    # the benchmark's GPipe/1F1B stages (torch.distributed.pipelining) name their compute so;
    # the schedules' own "Forward i"/"Backward i" ranges also hold the waits for receives
    if name == "Forward (micro-batch)":
        return "forward"
    if name == "Backward (micro-batch)":
        return "backward"
    return None


class TraceWindow:
    """Starts the profiler before training batch START of epoch EPOCH and writes the trace
    after STEPS batches (or at the end of the epoch, if it is shorter).

    Every send and receive a stage issues inside the window must complete inside it: a
    communication op started while the profiler runs carries a profiler callback that runs
    when it completes, and completing after the profiler has stopped corrupted memory and
    crashed the process. The stage drains its links before the window ends
    (StageRunner.quiesce)."""

    def __init__(self, spec: tuple[int, int, int], path: Path, device: torch.device):
        self.epoch, self.start, self.steps = spec
        self.path, self.device = Path(path), device
        self._prof = None

    @property
    def active(self) -> bool:
        return self._prof is not None

    def stops_at(self, done: int) -> bool:
        """True when the window ends before the batch after `done` batches."""
        return self._prof is not None and done >= self.start + self.steps

    def before(self, epoch: int, done: int) -> None:
        """Called with the number of training batches of `epoch` done so far."""
        if self._prof is None and epoch == self.epoch and done == self.start:
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=acts)
            self._prof.__enter__()
        elif self._prof is not None and done >= self.start + self.steps:
            self.finish()

    def finish(self) -> None:
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
        log.info("profiler trace of epoch %d, batches %d-%d written to %s", self.epoch,
                 self.start, self.start + self.steps - 1, self.path)


def read_phases(trace_path: Path) -> list[tuple[str, float, float]]:
    """(phase, start us, duration us) of the ranges of one Chrome trace that the timeline
    draws (see PHASES)."""
    try:
        data = json.loads(Path(trace_path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{trace_path} is not a readable trace ({exc})") from None
    events = data["traceEvents"] if isinstance(data, dict) else data
    out = []
    for ev in events:
        phase = _phase(ev.get("name", "")) if ev.get("ph") == "X" else None
        if phase is not None:
            out.append((phase, float(ev["ts"]), float(ev.get("dur", 0.0))))
    return out


def _stage_traces(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("stage*.json"), key=lambda p: int(p.stem[len("stage"):]))


def _draw(ax, rows: list[list], title: str) -> set:
    """One timeline: a row per stage (stage 1 on top), over the time every stage was traced
    (each stage traces the same batches, later stages later), in ms from its start."""
    starts = [min(ts for _, ts, _ in row) for row in rows if row]
    ends = [max(ts + d for _, ts, d in row) for row in rows if row]
    t0, t1 = max(starts), min(ends)
    if t1 <= t0:  # the windows do not overlap: show them all
        t0, t1 = min(starts), max(ends)
    rows = [[(p, max(ts, t0), min(ts + d, t1) - max(ts, t0)) for p, ts, d in row
             if ts < t1 and ts + d > t0] for row in rows]
    for k, row in enumerate(rows):
        y = len(rows) - 1 - k
        for phase in PHASES:  # outer ranges first, nested ones drawn over them
            spans = [((ts - t0) / 1000.0, dur / 1000.0) for p, ts, dur in row if p == phase]
            if spans:
                ax.broken_barh(spans, (y - 0.38, 0.76), facecolors=PHASES[phase])
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"stage {len(rows) - y}" for y in range(len(rows))])
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlim(left=0)
    return {p for row in rows for p, _, _ in row}


def plot_timelines(groups: list[tuple[str, list[Path]]], out: Path) -> Path:
    """Several timelines (title, the stage traces) one above the other, on one time scale."""
    plt = pyplot("the timeline")
    from matplotlib.patches import Patch
    rows = [[read_phases(t) for t in traces] for _, traces in groups]
    for (title, traces), r in zip(groups, rows):
        if not traces or not any(r):
            raise ValueError(f"{title}: no stage trace with localloss_pp or pipelining ranges")
    height = sum(0.7 * len(r) + 0.6 for r in rows) + 0.8
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, height), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [len(r) for r in rows]})
    present = set()
    for ax, (title, _), r in zip(axes[:, 0], groups, rows):
        present |= _draw(ax, r, title)
    axes[-1, 0].set_xlabel("time (ms)")
    axes[-1, 0].legend(handles=[Patch(color=c, label=p.replace("_", " "))
                                for p, c in PHASES.items() if p in present],
                       loc="upper center", bbox_to_anchor=(0.5, -0.45 if len(groups) > 1
                                                           else -0.28),
                       ncol=len(present), fontsize=8, frameon=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def plot_timeline(run_dir: Path, out: Path | None = None, title: str | None = None) -> Path:
    """A PNG with a row per stage, coloured by phase, from RUN_DIR/profile/stage*.json."""
    run_dir = Path(run_dir)
    traces = _stage_traces(run_dir / "profile")
    if not traces:
        raise ValueError(f"{run_dir / 'profile'} holds no stage traces; train with --profile "
                         "EPOCH:START:STEPS first")
    return plot_timelines([(title or f"{run_dir.name}: pipeline timeline (profiled training "
                            "batches)", traces)], out or run_dir / "timeline.png")
