"""Logging, per-epoch statistics, a stage's clock and its steady-state checks (non-finite
losses, host synchronisation), JSONL metrics and the progress bar."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import record_function

from localloss_pp.durable import append_line
from localloss_pp.errors import first_line
from localloss_pp.models.objectives import PAPER_STAT_FIELDS
from localloss_pp.observe.record import BlockRecord, EpochRecord, SplitTotals

__all__ = ["setup_logging", "EpochStats", "StageClock", "StageTimes", "FiniteWatch", "SyncDebug",
           "append_jsonl", "read_jsonl", "read_records", "progress", "NonFiniteLossError",
           "merge_stage_summaries", "stage_summary", "log_blocks", "log_epoch", "block_terms"]

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A local or global loss became NaN or infinite; names the block and the step."""


class _StagePrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        record.stage = self.prefix
        return True


def setup_logging(stage_index: int = 0, num_stages: int = 1, level=logging.INFO,
                  replica: int = 0, num_replicas: int = 1) -> None:
    """Send this package's log lines to stderr, each prefixed with `[stage k/S]` (1-based),
    `[stage k/S, replica r/R]` in a data-parallel run."""
    logger = logging.getLogger("localloss_pp")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    rep = f", replica {replica + 1}/{num_replicas}" if num_replicas > 1 else ""
    handler.addFilter(_StagePrefix(f"[stage {stage_index + 1}/{num_stages}{rep}]"))
    handler.setFormatter(logging.Formatter("%(stage)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class EpochStats:
    """Sums over one epoch (train or test) of the per-block and global statistics.

    `fields` name what a block's statistics vector holds: the total local loss first, then the
    objective's terms, then the count of correct guesses last (models/objectives.py). Block
    sums stay on the device (no synchronisation per batch) until `summary`.
    """

    def __init__(self, block_indices: list[int], device, fields=PAPER_STAT_FIELDS):
        self.block_indices = list(block_indices)
        self.fields = tuple(fields)
        assert self.fields[0] == "loss" and self.fields[-1] == "correct", self.fields
        self.blocks = torch.zeros(len(block_indices), len(self.fields), dtype=torch.float64,
                                  device=device)
        self.glob = torch.zeros(2, dtype=torch.float64, device=device)  # loss*B, correct
        self.count = 0

    def load(self, state: dict) -> None:
        self.blocks.copy_(state["blocks"])
        self.glob.copy_(state["glob"])
        self.count = int(state["count"])

    def add_blocks(self, stats: list[torch.Tensor], batch_size: int) -> None:
        """Add a batch's per-block stats (losses are batch means, `correct` a count). Device
        ops with a Python scalar only: no host-to-device copy, no synchronisation."""
        s = torch.stack(stats).to(torch.float64)
        self.blocks[:, :-1] += s[:, :-1] * batch_size
        self.blocks[:, -1] += s[:, -1]

    def add_global(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        correct = (logits.argmax(1) == y).sum()
        self.glob += torch.stack([loss.to(torch.float64) * y.size(0), correct.to(torch.float64)])

    def add_count(self, batch_size: int) -> None:
        self.count += batch_size

    def summary(self, has_decoder: list[bool]) -> tuple[dict, list[dict]]:
        """(global numbers, per-block numbers) averaged over the examples seen."""
        n = max(self.count, 1)
        blocks = self.blocks.cpu().tolist()
        g = self.glob.cpu().tolist()
        glob = {"loss_local": sum(b[0] for b in blocks) / n, "loss_global": g[0] / n,
                "error": 100.0 - 100.0 * g[1] / n, "num_examples": self.count}
        per_block = []
        for idx, b, dec in zip(self.block_indices, blocks, has_decoder):
            rec = {"index": idx}
            rec.update((name, value / n) for name, value in zip(self.fields[:-1], b))
            rec["error"] = (100.0 - 100.0 * b[-1] / n) if dec else None
            per_block.append(rec)
        return glob, per_block

    def terms(self) -> tuple[str, ...]:
        """The objective's loss terms: the fields between the total and the correct count."""
        return self.fields[1:-1]


# --- a stage's clock and its checks of the steady state ---------------------------------------
class StageClock:
    """The one clock of a stage. `section(name)` times a part of the work (data, recv,
    compute, send, sync) and opens a `record_function` range of the same name for the
    profiler. Sections nest: an inner section's time is not counted in the outer one.

    What the figures mean is the same on CPU and GPU (docs/usage.md, "Stage times"):
    - compute (busy): the stage is occupied by its own batches' work. On the CPU the host time
      of the compute sections; on CUDA the GPU time between events recorded at the start and
      end of each compute section, less the sync windows inside it. Timing never stalls the
      CPU's run-ahead of the GPU: the events are read once per epoch (`read`).
    - sync: waiting for the replicas' gradient averages. On the CPU the host's wait; on CUDA the
      GPU time between events around the wait, which with NCCL only makes the compute stream
      wait for the all-reduce: the time the stream stood still for it.
    - data, recv, send: the host blocked on loading a batch, on the previous stage's message
      (its header), on back-pressure from the next stage. Host time on both.
    """

    GPU_TIMED = ("compute", "sync")

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []
        self._events: list = []  # (name, enclosing GPU-timed name or None, begin, end)
        self._gpu: dict[str, float] = defaultdict(float)

    def _event(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    @contextmanager
    def section(self, name: str):
        now = time.perf_counter()
        if self._stack:  # pause the enclosing section
            outer = self._stack[-1]
            self.seconds[outer[0]] += now - outer[1]
        timed = self.cuda and name in self.GPU_TIMED
        parent = next((e[0] for e in reversed(self._stack) if e[0] in self.GPU_TIMED), None)
        entry = [name, now]
        self._stack.append(entry)
        begin = self._event() if timed else None
        try:
            with record_function(f"localloss_pp.{name}"):
                yield
        finally:
            end = time.perf_counter()
            self._stack.pop()
            self.seconds[name] += end - entry[1]
            if self._stack:
                self._stack[-1][1] = end
            if begin is not None:
                self._events.append((name, parent, begin, self._event()))
                if len(self._events) >= 256:
                    self._fold()

    def _add(self, name: str, parent: str | None, seconds: float) -> None:
        self._gpu[name] += seconds
        if parent is not None and parent != name:
            self._gpu[parent] -= seconds  # nested: not the outer section's own time

    def _fold(self) -> None:
        """Add up the event pairs the GPU has passed already (a query, no waiting), so that a
        long epoch does not hold thousands of events."""
        while self._events and self._events[0][3].query():
            name, parent, a, b = self._events.pop(0)
            self._add(name, parent, a.elapsed_time(b) / 1000.0)

    def read(self) -> dict[str, float]:
        """Seconds per section since the last read (compute and sync: GPU time on CUDA)."""
        out = dict(self.seconds)
        if self.cuda:
            for name, parent, a, b in self._events:
                b.synchronize()  # once per epoch, after the stream
                self._add(name, parent, a.elapsed_time(b) / 1000.0)
            for name in self.GPU_TIMED:
                out[name] = max(0.0, self._gpu.get(name, 0.0))
            self._gpu.clear()
        self.seconds.clear()
        self._events.clear()
        return out


class FiniteWatch:
    """The non-finite-loss check without a host synchronisation per batch.

    Per batch the losses' finiteness is folded into a flag per unit on the device. On the CPU
    the flags are read every `every` batches (1: the exact step is named). On CUDA they are
    copied to pinned host memory asynchronously every `every` batches and read once that copy
    has completed (an event query, no waiting); `finish` reads them for sure at the end of the
    stream."""

    def __init__(self, names: list[str], device, every: int, where: str, start: int = 0):
        self.names, self.where, self.every = names, where, max(1, every)
        self.cuda = device.type == "cuda"
        self.bad = torch.zeros(len(names), dtype=torch.bool, device=device)
        self._host = torch.zeros(len(names), dtype=torch.bool, pin_memory=self.cuda)
        self._pending = None  # (event, first step, last step) of the copy in flight
        self._since = start  # the first step not yet checked

    def add(self, losses: list[torch.Tensor], epoch: int, seq: int) -> None:
        """`losses`: one scalar per name, in the order of the names."""
        if not losses:
            return
        assert len(losses) == len(self.names), (len(losses), self.names)
        self.bad |= ~torch.isfinite(torch.stack([t.reshape(()).float() for t in losses]))
        due = seq - self._since + 1 >= self.every
        if not self.cuda:
            if due:
                self._raise_if_bad(self.bad.tolist(), self._when(self._since, seq, epoch))
                self._since = seq + 1
            return
        if self._pending is not None and self._pending[0].query():
            self._read()
        if self._pending is None and due:
            self._host.copy_(self.bad, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (done, self._since, seq, epoch)
            self._since = seq + 1

    @staticmethod
    def _when(first: int, last: int, epoch: int) -> str:
        steps = f"step {last}" if first >= last else f"steps {first} to {last}"
        return f"at {steps} of epoch {epoch}"

    def _read(self) -> None:
        _, first, last, epoch = self._pending
        self._pending = None
        self._raise_if_bad(self._host.tolist(), self._when(first, last, epoch))

    def finish(self, epoch: int, seq: int) -> None:
        """At the end of a stream: every batch checked."""
        if self._pending is not None:
            self._pending[0].synchronize()
            self._read()
        self._raise_if_bad(self.bad.tolist(), self._when(self._since, seq, epoch))

    def _raise_if_bad(self, flags: list[bool], when: str) -> None:
        if any(flags):
            which = ", ".join(n for n, f in zip(self.names, flags) if f)
            raise NonFiniteLossError(f"non-finite loss in {which} on {self.where} {when}; "
                                     "lower --lr or check the input data")


class SyncDebug:
    """Steady-state batches under `torch.cuda.set_sync_debug_mode` when LOCALLOSS_PP_SYNC_DEBUG
    is "warn" or "error": then any host synchronisation inside a batch (an `.item()`, a
    pageable copy, a stream synchronisation) warns or fails the run. The first `warmup`
    batches of a stream (allocations, autotuning, compilation), checkpoints and the end of a
    stream run without it. A no-op on the CPU."""

    MODES = ("", "warn", "error")

    def __init__(self, device, warmup: int = 2):
        self.mode = os.environ.get("LOCALLOSS_PP_SYNC_DEBUG", "").strip().lower()
        if self.mode not in self.MODES:
            raise ValueError(f"LOCALLOSS_PP_SYNC_DEBUG={self.mode!r}: use 'warn' or 'error' "
                             "(or leave it unset)")
        self.active = bool(self.mode) and device.type == "cuda"
        self.warmup = warmup

    def after_batch(self, batches_done: int) -> None:
        if self.active and batches_done == self.warmup:
            torch.cuda.set_sync_debug_mode(self.mode)

    def off(self) -> None:
        if self.active:
            torch.cuda.set_sync_debug_mode(0)

    @contextmanager
    def paused(self):
        """Work that may synchronise on purpose (a checkpoint's copies to the host)."""
        mode = torch.cuda.get_sync_debug_mode() if self.active else 0
        if mode:
            torch.cuda.set_sync_debug_mode(0)
        try:
            yield
        finally:
            if mode:
                torch.cuda.set_sync_debug_mode(mode)


@dataclass
class StageTimes:
    wall_s: float = 0.0
    busy_s: float = 0.0
    data_s: float = 0.0
    wait_recv_s: float = 0.0
    wait_send_s: float = 0.0
    wait_sync_s: float = 0.0  # waiting for the replicas' gradient averaging
    batches: int = 0
    samples: int = 0
    bytes_sent: int = 0

    def take(self, seconds: dict[str, float]) -> None:
        """The clock's sections: compute -> busy, data, recv, send, sync -> waits."""
        self.busy_s = seconds.get("compute", 0.0)
        self.data_s = seconds.get("data", 0.0)
        self.wait_recv_s = seconds.get("recv", 0.0)
        self.wait_send_s = seconds.get("send", 0.0)
        self.wait_sync_s = seconds.get("sync", 0.0)

    def as_dict(self) -> dict:
        wall = self.wall_s or float("nan")
        # idle: neither its own compute nor the replicas' averaging (waiting for data, the
        # neighbours or the host): busy + sync + idle = wall on CPU and GPU alike
        idle = max(0.0, self.wall_s - self.busy_s - self.wait_sync_s)
        return {"wall_s": self.wall_s, "busy_s": self.busy_s, "busy_fraction": self.busy_s / wall,
                "idle_s": idle, "idle_fraction": idle / wall,
                "data_s": self.data_s, "data_fraction": self.data_s / wall,
                "wait_recv_s": self.wait_recv_s, "wait_send_s": self.wait_send_s,
                "wait_sync_s": self.wait_sync_s, "batches": self.batches,
                "samples_per_s": self.samples / wall, "bytes_sent": self.bytes_sent}


def append_jsonl(path: Path, record: dict) -> None:
    """Append `record` as one JSON line, durably (fsynced before this returns)."""
    append_line(path, json.dumps(record, sort_keys=True))


def read_records(path: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """(the intact records of a metrics.jsonl, [(line number, what is wrong)] of the damaged
    lines): a line that is not a JSON object with an integer "epoch" (a run killed while
    appending leaves half a line; a disk error, bytes that are not UTF-8)."""
    records, damaged = [], []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
                if not isinstance(rec, dict) or not isinstance(rec.get("epoch"), int):
                    raise ValueError("not a record of an epoch")
            except (UnicodeDecodeError, ValueError) as exc:
                damaged.append((n, first_line(exc)))
                continue
            records.append(rec)
    return records, damaged


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a ValueError naming the file and the first damaged
    line."""
    records, damaged = read_records(path)
    if damaged:
        line, why = damaged[0]
        raise ValueError(f"{path} line {line} is damaged ({why}); repair or delete that line "
                         "(a run resumed with --resume auto drops damaged lines after its "
                         "newest checkpoint and recomputes those epochs)")
    return records


def progress(iterable, *, total: int, enabled: bool, desc: str):
    """A tqdm bar on a terminal (when enabled), the plain iterable otherwise."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


# --- the per-epoch record of metrics.jsonl and its log lines ---------------------------------
def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _fmt_err(x) -> str:
    return "-" if x is None else f"{x:.2f}%"


def merge_stage_summaries(epoch: int, lr: float, summaries: list[dict], epoch_s: float,
                          num_replicas: int = 1) -> EpochRecord:
    """The epoch's record (a line of metrics.jsonl) from the per-stage summaries (in stage
    order)."""
    last = summaries[-1]
    blocks = [BlockRecord(**b) for s in summaries for b in s["blocks"]]
    totals = {}
    for split in ("train", "test"):
        g = dict(last[split])
        g["loss_local"] = sum(getattr(b, split)["loss"] for b in blocks)
        totals[split] = SplitTotals(**g)
    train_s = last["train_times"]["wall_s"]
    return EpochRecord(
        epoch=epoch, lr=lr, train=totals["train"], test=totals["test"], blocks=blocks,
        num_replicas=num_replicas, replicas_identical=True if num_replicas > 1 else None,
        train_time_s=train_s, epoch_time_s=epoch_s,
        train_samples_per_s=totals["train"].num_examples / train_s if train_s else None,
        stages=[{"stage": s["stage"], "blocks": [b["index"] for b in s["blocks"]],
                 "train": s["train_times"], "test": s["test_times"]} for s in summaries])


def stage_summary(k, names, has_decoder, tr, te, with_test_blocks, backprop=False) -> dict:
    tr_glob, tr_blocks = tr.stats.summary(has_decoder)
    te_glob, te_blocks = te.stats.summary(has_decoder)
    blocks = []
    if not backprop:
        for i, b in enumerate(tr_blocks):
            rec = {"index": b["index"], "name": names[i], "train": b}
            rec["test"] = te_blocks[i] if with_test_blocks else dict(
                {"loss": 0.0}, **dict.fromkeys(tr.stats.terms()), error=None)
            blocks.append(rec)
    return {"stage": k, "train": tr_glob, "test": te_glob, "blocks": blocks,
            "train_times": tr.times.as_dict(), "test_times": te.times.as_dict()}


def block_terms(block: dict) -> list[str]:
    """The loss terms a block's record holds, by name (the objective's terms: loss_sim and
    loss_pred for the paper's losses), in their order."""
    return [k for k in block if k.startswith("loss_")]


def log_blocks(summary: dict) -> None:
    """One line per block of the stage: each loss term by name (without its "loss_"), the
    error of its classifier, on train and test."""
    def part(rec: dict) -> str:
        terms = " ".join(f"{k[len('loss_'):]} {_fmt(rec.get(k))}" for k in block_terms(rec))
        return f"{terms} error {_fmt_err(rec['error'])}"
    for b in summary["blocks"]:
        log.info("  block %d %s: train %s | test %s", b["index"], b["name"], part(b["train"]),
                 part(b["test"]))


def log_epoch(rec: EpochRecord, epochs: int, num_stages: int) -> None:
    tr, te = rec.train, rec.test
    log.info("epoch %d/%d lr %.2e | train loss_local %.4f loss_global %.4f error %.2f%% | "
             "test loss_global %.4f error %.2f%% | %.1fs", rec.epoch, epochs, rec.lr,
             tr.loss_local, tr.loss_global, tr.error, te.loss_global, te.error,
             rec.epoch_time_s)
    parts = []
    for s in rec.stages:
        t = s["train"]
        part = f"{s['stage'] + 1}: busy {100 * t['busy_fraction']:.0f}%"
        if s["stage"] == 0:  # the first stage's share of time producing batches
            part += f" data {100 * t['data_s'] / t['wall_s']:.1f}%" if t["wall_s"] else ""
        if num_stages > 1:
            part += f" recv-wait {t['wait_recv_s']:.1f}s send-wait {t['wait_send_s']:.1f}s"
        parts.append(part)
    log.info("  stages (train) %s | %.0f samples/s", "; ".join(parts),
             rec.train_samples_per_s or 0)
