"""The variants of the throughput benchmark, one row each in SCHEDULES: its name (--variants),
its label in the tables, whether the default suite runs it, which worker function runs it and,
for the backprop pipeline schedules, the class of torch.distributed.pipelining and the
placement of its stages. Every list of variant names in benchmarks/ is derived from this table.

Placement: "none" is one stage per rank (GPipe, 1F1B: V = 1), "looped" puts V = 2 contiguous
chunks of units ("virtual stages") on every rank (rank k holds k and k + S), "v" puts them
V-shaped (rank k holds k and 2S - 1 - k). The local pipeline, the one-process variants and DDP
are not pipeline schedules: their placement is "none".
"""
from __future__ import annotations

from dataclasses import dataclass

VIRTUAL_STAGES = 2  # virtual stages per rank of the looped and V-shaped schedules


@dataclass(frozen=True)
class Schedule:
    """One variant of the benchmark."""

    name: str  # as given to --variants
    letter: str  # its row's letter in the tables: (a), (b), ...
    title: str  # what it is, in words
    runner: str  # the worker's function that runs it: local, backprop1, ddp or pipelining
    torch_class: str | None = None  # the schedule class of torch.distributed.pipelining
    placement: str = "none"  # none, looped or v (see the module docstring)
    default: bool = False  # in the default suite (and in --quick)
    one_process: bool = False  # one process on every core, whatever --stages
    ideal_bubble: bool = False  # the schedule's ideal bubble is (S - 1) / (V M + S - 1)

    @property
    def label(self) -> str:
        """Its row label in the tables, e.g. "(e) backprop GPipe"."""
        return f"({self.letter}) {self.title}"

    @property
    def virtual(self) -> int:
        """V: the stages (chunks of units) every rank holds."""
        return 1 if self.placement == "none" else VIRTUAL_STAGES

    @property
    def local(self) -> bool:
        """Trains with the local losses (the local pipeline or the same algorithm in one
        process); every other variant is global backprop, which ignores the local loss."""
        return self.runner == "local"

    @property
    def pipeline(self) -> bool:
        """A backprop pipeline schedule of torch.distributed.pipelining."""
        return self.torch_class is not None

    @property
    def multi_rank(self) -> bool:
        """Needs 2 or more ranks (DDP and every pipeline schedule)."""
        return self.runner in ("ddp", "pipelining")


SCHEDULES = {s.name: s for s in (
    Schedule("local", "a", "local pipeline", "local", default=True),
    Schedule("local1", "b", "local, 1 process", "local", default=True, one_process=True),
    Schedule("backprop1", "c", "backprop, 1 process", "backprop1", default=True,
             one_process=True),
    Schedule("ddp", "d", "backprop DDP", "ddp", default=True),
    Schedule("gpipe", "e", "backprop GPipe", "pipelining", "ScheduleGPipe", default=True,
             ideal_bubble=True),
    Schedule("1f1b", "f", "backprop 1F1B", "pipelining", "Schedule1F1B", default=True,
             ideal_bubble=True),
    Schedule("i1f1b", "g", "backprop Interleaved1F1B", "pipelining", "ScheduleInterleaved1F1B",
             "looped", default=True, ideal_bubble=True),
    Schedule("loopedbfs", "h", "backprop LoopedBFS", "pipelining", "ScheduleLoopedBFS",
             "looped", ideal_bubble=True),
    Schedule("zb1p", "i", "backprop ZB1P", "pipelining", "ScheduleInterleavedZeroBubble",
             "looped", default=True),
    Schedule("zbv", "j", "backprop ZBV", "pipelining", "ScheduleZBVZeroBubble", "v"),
    Schedule("dualpipev", "k", "backprop DualPipeV", "pipelining", "ScheduleDualPipeV", "v"),
)}

VARIANTS = list(SCHEDULES)
DEFAULT_VARIANTS = [name for name, s in SCHEDULES.items() if s.default]
PIPELINES = tuple(name for name, s in SCHEDULES.items() if s.pipeline)
VIRTUAL_VARIANTS = tuple(name for name, s in SCHEDULES.items() if s.virtual > 1)
LABELS = {name: s.label for name, s in SCHEDULES.items()}
