"""Named fault points: every phase boundary of a run is a place where a test can kill a process.

    LOCALLOSS_PP_FAULT=POINT[:epoch=E][:step=N][:rank=R][:attempt=A][,POINT...]

makes the process of global rank R (any rank when not given) that reaches POINT (in epoch E,
at batch N, where the point has those) kill itself with SIGKILL: exactly what an out-of-memory
kill, a node failure or `kill -9` does to it, with no clean-up of any kind. `attempt` is
torchrun's restart count (TORCHELASTIC_RESTART_COUNT) and defaults to 0, so a fault fires in the
first attempt only and the restarted run goes through: "armed once".

The table below is the list of points; a new phase of a run gets a new row, and
tests/dist/test_faults.py kills a 2-stage run at every row and checks that nothing is lost.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass

__all__ = ["POINTS", "ENV", "Fault", "parse_faults", "armed", "fault_point"]

log = logging.getLogger(__name__)

ENV = "LOCALLOSS_PP_FAULT"

# name -> (phase, where exactly the process dies, the values the point knows)
POINTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "setup": ("set-up collectives", "the run directory is locked, the resume state loaded and "
              "the writer's files (config.toml, partition.json, trimmed metrics.jsonl) written; "
              "the next set-up collective not yet entered", ()),
    "after-links": ("links", "every point-to-point link is connected; no batch yet", ()),
    "mid-epoch": ("epochs", "training, right after batch `step` (default 1) of an epoch has been "
                  "sent on and its local updates made", ("epoch", "step")),
    "during-eval": ("epochs", "evaluation, after the first test batch", ("epoch",)),
    "after-metrics-record": ("epochs", "the writer has appended the epoch's record to "
                             "metrics.jsonl; the epoch's checkpoint is not written", ("epoch",)),
    "inside-stage-checkpoint": ("epochs", "a stage's checkpoint file is written under its "
                                "temporary name, not yet renamed", ("epoch", "step")),
    "before-manifest": ("epochs", "every stage's part of a checkpoint is written, its manifest "
                        "is not", ("epoch", "step")),
    "after-manifest": ("epochs", "a checkpoint is complete (manifest written); older "
                       "checkpoints not yet pruned", ("epoch", "step")),
    "during-pruning": ("epochs", "pruning: an old checkpoint's manifest is deleted, its stage "
                       "files are not", ("epoch", "step")),
    "before-model": ("finish", "the final checkpoint is complete; model.pt not yet written", ()),
    "after-model": ("finish", "model.pt written; the final line not yet printed", ()),
}


@dataclass(frozen=True)
class Fault:
    point: str
    epoch: int | None = None
    step: int | None = None
    rank: int | None = None
    attempt: int = 0

    def matches(self, point: str, rank: int, attempt: int, epoch, step) -> bool:
        if point != self.point or attempt != self.attempt:
            return False
        if self.rank is not None and rank != self.rank:
            return False
        if self.epoch is not None and epoch != self.epoch:
            return False
        if point == "mid-epoch":  # a batch number is needed: the first batch by default
            return step == (self.step if self.step is not None else 1)
        return self.step is None or step == self.step


def parse_faults(text: str) -> list[Fault]:
    """The faults of a LOCALLOSS_PP_FAULT value; a ValueError that says what is wrong."""
    faults = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        name, *conds = spec.split(":")
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown fault point {name!r}; the points are: "
                             f"{', '.join(POINTS)}")
        values = {}
        for cond in conds:
            key, sep, value = cond.partition("=")
            allowed = POINTS[name][2] + ("rank", "attempt")
            if not sep or key not in allowed:
                raise ValueError(f"{ENV}: {cond!r} in {spec!r} is not one of "
                                 f"{', '.join(k + '=N' for k in allowed)}")
            try:
                values[key] = int(value)
            except ValueError:
                raise ValueError(f"{ENV}: {key} must be an integer in {spec!r}, got "
                                 f"{value!r}") from None
        faults.append(Fault(name, **values))
    return faults


_cache: tuple[str, list[Fault]] | None = None


def armed() -> list[Fault]:
    """The faults armed in this process's environment (parsed once; validated by the CLI)."""
    global _cache
    text = os.environ.get(ENV, "")
    if _cache is None or _cache[0] != text:
        _cache = (text, parse_faults(text))
    return _cache[1]


def fault_point(point: str, epoch: int | None = None, step: int | None = None) -> None:
    """Die here, as if SIGKILLed, when a fault is armed for this point (a no-op otherwise)."""
    faults = armed() if os.environ.get(ENV) else ()
    if not faults:
        return
    assert point in POINTS, point
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if any(f.matches(point, rank, attempt, epoch, step) for f in faults):
        where = "".join(f" {k} {v}" for k, v in (("epoch", epoch), ("step", step)) if v)
        log.warning("fault point %s reached (rank %d%s): killing this process (%s)", point,
                    rank, where, ENV)
        for handler in logging.getLogger("localloss_pp").handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
