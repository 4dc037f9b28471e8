"""One pipeline stage's loop: receive -> forwards -> send -> local updates -> statistics.

A stage owns a contiguous run of blocks (the last stage also the output layer). For every
batch it runs all forwards of its blocks, hands the (detached) output to the next stage right
away, and only then computes the local losses, backward passes and optimizer steps, so the next
stage starts one backward earlier. The numbers equal the reference order, where each block
updates before the next block runs: a block's output never depends on its own update.

The first stage reads the data; the others receive activations and labels. A one-stage run is
the same loop with no links. All communication goes through transport.py.

No host synchronisation in a batch: statistics stay on the device, the non-finite check reads a
device flag through an asynchronous copy (metrics.FiniteWatch), busy time on a GPU comes from
CUDA events read once per epoch (metrics.StageClock).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from localloss_pp.faults import armed, fault_point
from localloss_pp.models.losses import onehot
from localloss_pp.observe.metrics import (EpochStats, FiniteWatch, NonFiniteLossError, StageClock,
                                          StageTimes, SyncDebug, progress)
from localloss_pp.pipeline.transport import (END_EVAL, END_TRAIN, EVAL, KIND_NAMES, STOP, TRAIN,
                                             Kind, PeerLostError, Receiver, Sender,
                                             ShapeMismatchError)

__all__ = ["StageRunner", "StageFailure", "forwards", "local_updates"]

log = logging.getLogger(__name__)


class StageFailure(RuntimeError):
    """An error inside a stage, re-raised with the stage index, epoch and batch number."""


def forwards(blocks, x):
    """Every block's training forward: (output for the next stage, contexts of the updates)."""
    ctxs = []
    with record_function("localloss_pp.forward"):
        for block in blocks:
            x, ctx = block.train_forward(x)
            ctxs.append(ctx)
    return x, ctxs


def local_updates(blocks, ctxs, x, y, y1h, output=None, sync=None):
    """Every block's local loss, backward and step (and the output layer's on `x`).

    With `sync` (data-parallel replicas) every unit's gradients are averaged across the replicas
    before its step: each unit's all-reduce is launched right after its backward and waited for
    only after the backward passes of the units after it. The order of the backward passes and
    steps does not change the numbers: every forward has run already and every unit's loss
    depends only on its own weights.

    Returns (list of per-block stats tensors, (logits, loss) of the output layer or None)."""
    if sync is None:
        stats, out = [], None
        for block, ctx in zip(blocks, ctxs):
            with record_function("localloss_pp.local_backward"):
                stats.append(block.local_backward(ctx, y, y1h))
            with record_function("localloss_pp.optimizer_step"):
                block.step()
        if output is not None:
            with record_function("localloss_pp.local_backward"):
                out = output.train_backward(x, y)
            with record_function("localloss_pp.optimizer_step"):
                output.step()
        return stats, out
    stats, pending = [], []
    for block, ctx in zip(blocks, ctxs):
        with record_function("localloss_pp.local_backward"):
            stats.append(block.local_backward(ctx, y, y1h))
        pending.append(sync.start(block, y.size(0)))
    out = None
    if output is not None:
        with record_function("localloss_pp.local_backward"):
            out = output.train_backward(x, y)
        pending.append(sync.start(output, y.size(0)))
    units = list(blocks) + ([output] if output is not None else [])
    for unit, work in zip(units, pending):
        sync.finish(work)
        with record_function("localloss_pp.optimizer_step"):
            unit.step()
    return stats, out


@dataclass
class StageEpoch:
    stats: EpochStats
    times: StageTimes = field(default_factory=StageTimes)


class StageRunner:
    """Runs the train and eval streams of one stage (see the module docstring)."""

    def __init__(self, *, blocks, output, stage_index: int, num_stages: int, device,
                 num_classes: int, sender: Sender | None, receiver: Receiver | None,
                 with_stats: bool, show_progress: bool = False, check_every: int = 1,
                 on_batch=None, sync=None, log_every: int = 0, on_log=None, trace=None):
        self.blocks = list(blocks)
        self.output = output
        self.stage_index, self.num_stages = stage_index, num_stages
        self.device, self.num_classes = device, num_classes
        self.sender, self.receiver = sender, receiver
        self.with_stats = with_stats
        self.show_progress = show_progress and output is not None
        self.check_every = check_every
        self.clock = StageClock(device)
        self.on_batch = on_batch  # called with the sequence number after every batch
        # every `log_every` training batches on_log(epoch, batches done, the epoch's stats)
        self.log_every, self.on_log = log_every, on_log
        self.trace = trace  # a profiling.TraceWindow over some training batches, or None
        self.replica_sync = sync  # averaging among this stage's data-parallel replicas
        if sync is not None:
            sync.clock = self.clock

    @property
    def units(self):
        return self.blocks + ([self.output] if self.output is not None else [])

    def set_lr(self, lr: float) -> None:
        for unit in self.units:
            unit.set_lr(lr)

    def _name(self) -> str:
        return f"stage {self.stage_index + 1}/{self.num_stages}"

    def loss_names(self) -> list[str]:
        """What the losses checked per batch belong to (the order of `_statistics`)."""
        names = [f"block {b.index} ({b.describe()})" for b in self.blocks]
        if self.output is not None:
            names.append("the output layer")
        return names

    def _watch(self, start: int) -> FiniteWatch:
        return FiniteWatch(self.loss_names(), self.device, self.check_every, self._name(), start)

    # --- the message stream ------------------------------------------------------------------
    def _batches(self, source, kind: Kind, epoch: int, start_seq: int = 0, hold_after=None):
        """(seq, x, y, y on the host) of this stage's input stream, until the end-of-stream
        marker. The host copy of the labels goes into the next message's header."""
        if self.receiver is None:  # the first stage: batches from its source (batches.py)
            it = iter(source)
            seq = start_seq
            while True:
                with self.clock.section("data"):
                    batch = next(it, None)
                if batch is None:
                    return
                x, y, y_host = batch
                yield seq, x, y, y_host
                seq += 1
        end = END_TRAIN if kind == TRAIN else END_EVAL
        while True:
            with self.clock.section("recv"):
                msg = self.receiver.recv(hold_after)
            if msg.kind == end:
                return
            if msg.kind != kind or msg.epoch != epoch:
                raise StageFailure(f"{self._name()} expected a {KIND_NAMES[kind]} of epoch "
                                   f"{epoch}, got a {KIND_NAMES[msg.kind]} of epoch {msg.epoch}")
            yield msg.seq, msg.activation, msg.labels_device, msg.labels

    def _quiesce(self) -> None:
        """No send or receive of this stage left in flight (the end of a profiling window)."""
        if self.sender is not None:
            with self.clock.section("send"):
                self.sender.drain()
        if self.receiver is not None:
            with self.clock.section("recv"):
                self.receiver.settle()

    def _send(self, kind: Kind, epoch: int, seq: int, x=None, y_host=None) -> None:
        if self.sender is not None:
            with self.clock.section("send"):
                self.sender.send(kind, epoch, seq, x, y_host)

    def _stream(self, source, kind: Kind, epoch: int, total: int | None, step_fn,
                start_seq: int = 0, initial: dict | None = None, checkpoint_every: int = 0,
                on_checkpoint=None) -> StageEpoch:
        result = StageEpoch(EpochStats([b.index for b in self.blocks], self.device))
        if initial is not None:
            result.stats.load(initial)
        times = result.times
        self.clock.read()  # start from zero
        start = time.perf_counter()
        bytes_before = self.sender.bytes if self.sender is not None else 0
        watch = self._watch(start_seq)
        bar = progress(None, total=total or 0, enabled=self.show_progress,
                       desc=f"{'train' if kind == TRAIN else 'test'} {epoch}")
        seq = -1
        sync_debug = SyncDebug(self.device)
        point = ("mid-epoch" if kind == TRAIN else "during-eval") if armed() else None
        trace = self.trace if kind == TRAIN else None
        if trace is not None:
            trace.before(epoch, start_seq)
        try:
            # no receive stays posted across a checkpoint (its collectives and file writes)
            hold = (lambda n: (n + 1) % checkpoint_every == 0) if checkpoint_every else None
            for seq, x, y, y_host in self._batches(source, kind, epoch, start_seq, hold):
                step_fn(result.stats, watch, epoch, seq, x, y, y_host)
                if self.on_batch is not None:
                    self.on_batch(seq)
                done = seq + 1
                if point is not None:
                    fault_point(point, epoch, done)
                if checkpoint_every and done % checkpoint_every == 0 and done < (total or 0):
                    with sync_debug.paused():
                        on_checkpoint(epoch, done, result.stats)
                if kind == TRAIN and self.log_every and done % self.log_every == 0:
                    with sync_debug.paused():  # reads the device sums: only every N batches
                        self.on_log(epoch, done, result.stats)
                if trace is not None:
                    if trace.stops_at(done):
                        self._quiesce()
                    trace.before(epoch, done)  # starts before batch `done`, stops after it
                times.batches += 1
                times.samples += y_host.size(0)
                if bar is not None:
                    bar.update(1)
                sync_debug.after_batch(times.batches)
            sync_debug.off()
            watch.finish(epoch, seq)
            self._send(END_TRAIN if kind == TRAIN else END_EVAL, epoch, max(seq + 1, start_seq))
            if trace is not None and trace.active:  # the window outlasts the epoch
                self._quiesce()
                trace.finish()
        except (StageFailure, NonFiniteLossError, PeerLostError, ShapeMismatchError):
            raise
        except Exception as exc:
            raise StageFailure(f"{self._name()} failed at {KIND_NAMES[kind]} {seq + 1} of epoch "
                               f"{epoch}: {type(exc).__name__}: {exc}") from exc
        finally:
            sync_debug.off()
            if bar is not None:
                bar.close()
            if trace is not None:
                trace.finish()
        times.take(self.clock.read())
        times.wall_s = time.perf_counter() - start
        if self.sender is not None:
            times.bytes_sent = self.sender.bytes - bytes_before
        return result

    # --- one batch ---------------------------------------------------------------------------
    def forwards(self, x):
        """(output to send, contexts of the updates) of this stage's blocks."""
        return forwards(self.blocks, x)

    def updates(self, ctxs, x, y, y1h):
        """(per-block stats, (logits, loss) or None): the local updates of this stage."""
        return local_updates(self.blocks, ctxs, x, y, y1h, self.output, self.replica_sync)

    @staticmethod
    def _statistics(stats: EpochStats, block_stats, out, y) -> list:
        """Add a batch's numbers to the epoch's sums (on the device); returns the losses in the
        order of `loss_names`."""
        losses = [s[0] for s in block_stats]
        if out is not None:
            logits, gloss = out
            stats.add_global(gloss, logits, y)
            losses.append(gloss)
        if block_stats:
            stats.add_blocks(block_stats, y.size(0))
        stats.add_count(y.size(0))
        return losses

    def _train_step(self, stats, watch, epoch, seq, x, y, y_host) -> None:
        with self.clock.section("compute"):
            y1h = onehot(y, self.num_classes)
            h, ctxs = self.forwards(x)
        self._send(TRAIN, epoch, seq, h, y_host)
        with self.clock.section("compute"):
            block_stats, out = self.updates(ctxs, h, y, y1h)
            with record_function("localloss_pp.statistics"):
                watch.add(self._statistics(stats, block_stats, out, y), epoch, seq)

    @torch.no_grad()
    def _eval_step(self, stats, watch, epoch, seq, x, y, y_host) -> None:
        with self.clock.section("compute"):
            y1h = onehot(y, self.num_classes)
            block_stats = []
            for block in self.blocks:
                x, s = block.evaluate(x, y, y1h, self.with_stats)
                if s is not None:
                    block_stats.append(s)
            out = self.output.predict(x, y) if self.output is not None else None
            self._statistics(stats, block_stats, out, y)
        self._send(EVAL, epoch, seq, x, y_host)

    # --- train and eval ----------------------------------------------------------------------
    def train_epoch(self, epoch: int, source=None, total: int | None = None, *,
                    start_seq: int = 0, initial: dict | None = None, checkpoint_every: int = 0,
                    on_checkpoint=None) -> StageEpoch:
        """Train on one epoch's stream. A resumed epoch starts at batch `start_seq` with the
        statistics `initial`; every `checkpoint_every` batches `on_checkpoint(epoch, batches
        done, stats)` runs right after this stage's update of that batch."""
        for unit in self.units:
            unit.train()
        return self._stream(source, TRAIN, epoch, total, self._train_step, start_seq, initial,
                            checkpoint_every, on_checkpoint)

    def eval_epoch(self, epoch: int, source=None, total: int | None = None) -> StageEpoch:
        for unit in self.units:
            unit.eval()
        result = self._stream(source, EVAL, epoch, total, self._eval_step)
        if self.sender is not None:
            with self.clock.section("send"):
                self.sender.drain()  # nothing in flight before the epoch's collectives
            result.times.wait_send_s += self.clock.read().get("send", 0.0)
        return result

    def stop(self) -> None:
        """End of the run: the first stage sends STOP; the others wait for it and pass it on."""
        if self.receiver is not None:
            msg = self.receiver.recv()
            if msg.kind != STOP:
                raise StageFailure(f"{self._name()} expected the stop message, got a "
                                   f"{KIND_NAMES[msg.kind]} of epoch {msg.epoch}")
        if self.sender is not None:
            self.sender.send(STOP, 0, 0)
            self.sender.drain()
