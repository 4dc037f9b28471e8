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
from typing import NamedTuple

import torch
from torch.profiler import record_function

from localloss_pp.faults import armed, fault_point
from localloss_pp.models.losses import onehot
from localloss_pp.models.objectives import stat_fields_of
from localloss_pp.observe.metrics import (EpochStats, FiniteWatch, NonFiniteLossError, StageClock,
                                          StageTimes, SyncDebug, progress)
from localloss_pp.pipeline.transport import (END_EVAL, END_TRAIN, EVAL, KIND_NAMES, STOP, TRAIN,
                                             Kind, PeerLostError, Receiver, Sender,
                                             ShapeMismatchError)

__all__ = ["StageRunner", "StageFailure", "StageEpoch", "Batch", "AfterBatch", "forwards",
           "local_updates"]

log = logging.getLogger(__name__)


class StageFailure(RuntimeError):
    """An error inside a stage, re-raised with the stage index, epoch and batch number."""


def _inputs(block, image) -> dict:
    """What a unit gets besides its input: the network's input if its objective reads it."""
    return {"image": image} if getattr(block, "needs_input", False) else {}


def forwards(blocks, x, image=None):
    """Every block's training forward: (output for the next stage, contexts of the updates).
    `image`: the network's input batch, for the units whose objective reads it."""
    ctxs = []
    with record_function("localloss_pp.forward"):
        for block in blocks:
            x, ctx = block.train_forward(x, **_inputs(block, image))
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


class Batch(NamedTuple):
    """One batch of a stage's input stream."""
    seq: int                # its number in the epoch (0-based)
    x: torch.Tensor         # the input: images on the first stage, activations after it
    y: torch.Tensor         # the labels on this stage's device
    y_host: torch.Tensor    # the labels on the host: they go into the next message's header
    last: bool | None = None  # the last batch of its stream (None: not known)
    image: torch.Tensor | None = None  # the network's input, where a unit's objective reads it


@dataclass
class StageEpoch:
    stats: EpochStats
    times: StageTimes = field(default_factory=StageTimes)


class AfterBatch:
    """What a stage does after each batch's step, besides the step itself, in this order: the
    `on_batch` callback, the fault point, a mid-epoch checkpoint, the TensorBoard scalars, the
    profiling window, the batch and sample counts, the progress bar and the sync-debug mode.
    One object per stream; `close()` on every path."""

    def __init__(self, runner: "StageRunner", kind: Kind, epoch: int, total: int | None,
                 result: StageEpoch, checkpoint_every: int = 0, on_checkpoint=None):
        self.runner, self.kind, self.epoch, self.total = runner, kind, epoch, total or 0
        self.result = result
        self.checkpoint_every, self.on_checkpoint = checkpoint_every, on_checkpoint
        self.point = ("mid-epoch" if kind == TRAIN else "during-eval") if armed() else None
        self.trace = runner.trace if kind == TRAIN else None
        self.sync_debug = SyncDebug(runner.device)
        self.bar = progress(None, total=self.total, enabled=runner.show_progress,
                            desc=f"{'train' if kind == TRAIN else 'test'} {epoch}")

    def hold(self):
        """`hold_after(seq)` for the receiver: no receive stays posted across a checkpoint (its
        collectives and file writes)."""
        every = self.checkpoint_every
        return (lambda n: (n + 1) % every == 0) if every else None

    def start(self, start_seq: int) -> None:
        if self.trace is not None:
            self.trace.before(self.epoch, start_seq)

    def __call__(self, batch: Batch) -> None:
        runner, epoch, stats = self.runner, self.epoch, self.result.stats
        if runner.on_batch is not None:
            runner.on_batch(batch.seq)
        done = batch.seq + 1
        if self.point is not None:
            fault_point(self.point, epoch, done)
        if self.checkpoint_every and done % self.checkpoint_every == 0 and done < self.total:
            with self.sync_debug.paused():
                self.on_checkpoint(epoch, done, stats)
        if self.kind == TRAIN and runner.log_every and done % runner.log_every == 0:
            with self.sync_debug.paused():  # reads the device sums: only every N batches
                runner.on_log(epoch, done, stats)
        if self.trace is not None:
            if self.trace.stops_at(done):
                runner.quiesce()
            self.trace.before(epoch, done)  # starts before batch `done`, stops after it
        times = self.result.times
        times.batches += 1
        times.samples += batch.y_host.size(0)
        if self.bar is not None:
            self.bar.update(1)
        self.sync_debug.after_batch(times.batches)

    def end_of_stream(self) -> None:
        """After the end marker is sent: a profiling window that outlasts the epoch ends."""
        if self.trace is not None and self.trace.active:
            self.runner.quiesce()
            self.trace.finish()

    def close(self) -> None:
        self.sync_debug.off()
        if self.bar is not None:
            self.bar.close()
        if self.trace is not None:
            self.trace.finish()


class StageRunner:
    """Runs the train and eval streams of one stage (see the module docstring).

    The loop, `run_stream`, reads: for every batch of the input stream (received, or read from
    the data on the first stage), `step`, then the after-batch hooks (`AfterBatch`). The train
    step is `train_step`: forwards -> send -> local updates -> statistics."""

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
    def stat_fields(self) -> tuple[str, ...]:
        """What each block's statistics vector holds (the same for every unit of a model)."""
        return stat_fields_of(self.blocks)

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

    # --- the message stream ------------------------------------------------------------------
    def batches(self, source, kind: Kind, epoch: int, start_seq: int = 0, hold_after=None,
                total: int | None = None):
        """The `Batch`es of this stage's input stream, until the end-of-stream marker: read from
        `source` on the first stage (`total` batches in all, if known), received from the
        previous stage on the others."""
        if self.receiver is None:  # the first stage: batches from its source (data/batches.py)
            it = iter(source)
            seq = start_seq
            while True:
                with self.clock.section("data"):
                    batch = next(it, None)
                if batch is None:
                    return
                yield Batch(seq, *batch, last=seq == total - 1 if total else None,
                            image=batch[0])
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
            yield Batch(msg.seq, msg.activation, msg.labels_device, msg.labels, msg.last,
                        msg.side)

    def quiesce(self) -> None:
        """No send or receive of this stage left in flight (the end of a profiling window)."""
        if self.sender is not None:
            with self.clock.section("send"):
                self.sender.drain()
        if self.receiver is not None:
            with self.clock.section("recv"):
                self.receiver.settle()

    def _send(self, kind: Kind, epoch: int, seq: int, x=None, y_host=None, last=None,
              image=None) -> None:
        if self.sender is not None:
            # the network's input goes along only where a later unit reads it
            side = {"side": image} if getattr(self.sender, "side_shape", None) else {}
            with self.clock.section("send"):
                self.sender.send(kind, epoch, seq, x, y_host, last, **side)

    def run_stream(self, source, kind: Kind, epoch: int, total: int | None, step,
                   start_seq: int = 0, initial: dict | None = None, checkpoint_every: int = 0,
                   on_checkpoint=None) -> StageEpoch:
        """One epoch's train or eval stream: for every batch, `step(stats, watch, epoch, batch)`
        then the after-batch hooks; then the end marker to the next stage."""
        result = StageEpoch(EpochStats([b.index for b in self.blocks], self.device,
                                       self.stat_fields))
        if initial is not None:
            result.stats.load(initial)
        self.clock.read()  # start from zero
        start = time.perf_counter()
        bytes_before = self.sender.bytes if self.sender is not None else 0
        watch = FiniteWatch(self.loss_names(), self.device, self.check_every, self._name(),
                            start_seq)
        after_batch = AfterBatch(self, kind, epoch, total, result, checkpoint_every,
                                 on_checkpoint)
        seq = -1
        after_batch.start(start_seq)
        try:
            for batch in self.batches(source, kind, epoch, start_seq, after_batch.hold(), total):
                seq = batch.seq
                step(result.stats, watch, epoch, batch)
                after_batch(batch)
            after_batch.sync_debug.off()
            watch.finish(epoch, seq)
            self._send(END_TRAIN if kind == TRAIN else END_EVAL, epoch, max(seq + 1, start_seq))
            after_batch.end_of_stream()
        except (StageFailure, NonFiniteLossError, PeerLostError, ShapeMismatchError):
            raise
        except Exception as exc:
            raise StageFailure(f"{self._name()} failed at {KIND_NAMES[kind]} {seq + 1} of epoch "
                               f"{epoch}: {type(exc).__name__}: {exc}") from exc
        finally:
            after_batch.close()
        times = result.times
        times.take(self.clock.read())
        times.wall_s = time.perf_counter() - start
        if self.sender is not None:
            times.bytes_sent = self.sender.bytes - bytes_before
        return result

    # --- one batch ---------------------------------------------------------------------------
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

    def train_step(self, stats: EpochStats, watch: FiniteWatch, epoch: int, b: Batch) -> None:
        """The hot loop's body (the batch was received by `batches`): forwards -> send ->
        local updates -> statistics, all on the device."""
        with self.clock.section("compute"):
            y1h = onehot(b.y, self.num_classes)
            h, ctxs = forwards(self.blocks, b.x, b.image)
        self._send(TRAIN, epoch, b.seq, h, b.y_host, b.last, b.image)  # the next stage starts
        with self.clock.section("compute"):
            block_stats, out = local_updates(self.blocks, ctxs, h, b.y, y1h, self.output,
                                             self.replica_sync)
            with record_function("localloss_pp.statistics"):
                watch.add(self._statistics(stats, block_stats, out, b.y), epoch, b.seq)

    @torch.no_grad()
    def eval_step(self, stats: EpochStats, watch: FiniteWatch, epoch: int, b: Batch) -> None:
        with self.clock.section("compute"):
            x, y1h, block_stats = b.x, onehot(b.y, self.num_classes), []
            for block in self.blocks:
                x, s = block.evaluate(x, b.y, y1h, self.with_stats, **_inputs(block, b.image))
                if s is not None:
                    block_stats.append(s)
            out = self.output.predict(x, b.y) if self.output is not None else None
            self._statistics(stats, block_stats, out, b.y)
        self._send(EVAL, epoch, b.seq, x, b.y_host, b.last, b.image)

    # --- train and eval ----------------------------------------------------------------------
    def train_epoch(self, epoch: int, source=None, total: int | None = None, *,
                    start_seq: int = 0, initial: dict | None = None, checkpoint_every: int = 0,
                    on_checkpoint=None) -> StageEpoch:
        """Train on one epoch's stream. A resumed epoch starts at batch `start_seq` with the
        statistics `initial`; every `checkpoint_every` batches `on_checkpoint(epoch, batches
        done, stats)` runs right after this stage's update of that batch."""
        for unit in self.units:
            unit.train()
        return self.run_stream(source, TRAIN, epoch, total, self.train_step, start_seq,
                               initial, checkpoint_every, on_checkpoint)

    def eval_epoch(self, epoch: int, source=None, total: int | None = None) -> StageEpoch:
        for unit in self.units:
            unit.eval()
        result = self.run_stream(source, EVAL, epoch, total, self.eval_step)
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
