"""One pipeline stage's loop: receive -> forward -> send -> local update; eval; statistics.

A stage owns a contiguous run of blocks (the last stage also the output layer). For every
batch it runs all forwards of its blocks, hands the (detached) output to the next stage right
away, and only then computes the local losses, backward passes and optimizer steps, so the next
stage starts one backward earlier. The numbers equal the reference order, where each block
updates before the next block runs: a block's output never depends on its own update.

The first stage reads the data; the others receive activations and labels. A one-stage run is
the same loop with no links. All communication goes through transport.py.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .losses import onehot
from .metrics import EpochStats, NonFiniteLossError, check_finite, progress
from .transport import (END_EVAL, END_TRAIN, EVAL, KIND_NAMES, STOP, TRAIN, PeerLostError,
                        Receiver, Sender, ShapeMismatchError)

__all__ = ["StageRunner", "StageTimes", "StageFailure", "local_forward_update"]

log = logging.getLogger(__name__)


class StageFailure(RuntimeError):
    """An error inside a stage, re-raised with the stage index, epoch and batch number."""


def local_forward_update(blocks, x, y, y1h, on_output=None, output=None, sync=None):
    """Local-mode step of a run of blocks (and the output layer, if given): all forwards, the
    hand-off of the output, the updates.

    With `sync` (data-parallel replicas) every unit's gradients are averaged across the replicas
    before its step: each unit's all-reduce is launched right after its backward and waited for
    only after the backward passes of the units after it. The order of the backward passes and
    steps does not change the numbers: every forward has run already and every unit's loss
    depends only on its own weights.

    Returns (output of the last block, list of per-block stats tensors, (logits, loss) of the
    output layer or None)."""
    ctxs = []
    for block in blocks:
        x, ctx = block.train_forward(x)
        ctxs.append(ctx)
    if on_output is not None:
        on_output(x)
    if sync is None:
        stats = [block.train_update(ctx, y, y1h) for block, ctx in zip(blocks, ctxs)]
        return x, stats, (output.train_update(x, y) if output is not None else None)
    stats, pending = [], []
    for block, ctx in zip(blocks, ctxs):
        stats.append(block.local_backward(ctx, y, y1h))
        pending.append(sync.start(block, y.size(0)))
    out = None
    if output is not None:
        out = output.train_backward(x, y)
        pending.append(sync.start(output, y.size(0)))
    units = list(blocks) + ([output] if output is not None else [])
    for unit, work in zip(units, pending):
        sync.finish(work)
        unit.step()
    return x, stats, out


class _BusyClock:
    """Busy time of a stage. On the CPU the wall time of compute sections; on CUDA the GPU time
    between events recorded around them, read once per epoch, so that timing never stalls the
    CPU's run-ahead of the GPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self._pairs = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, token, times: "StageTimes") -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._pairs.append((token, ev))
        else:
            times.busy_s += time.perf_counter() - token

    def flush(self, times: "StageTimes") -> None:
        for a, b in self._pairs:
            b.synchronize()
            times.busy_s += a.elapsed_time(b) / 1000.0
        self._pairs.clear()


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

    def as_dict(self) -> dict:
        wall = self.wall_s or float("nan")
        return {"wall_s": self.wall_s, "busy_s": self.busy_s, "busy_fraction": self.busy_s / wall,
                "data_s": self.data_s, "wait_recv_s": self.wait_recv_s,
                "wait_send_s": self.wait_send_s, "wait_sync_s": self.wait_sync_s,
                "batches": self.batches,
                "samples_per_s": self.samples / wall, "bytes_sent": self.bytes_sent}


@dataclass
class StageEpoch:
    stats: EpochStats
    times: StageTimes = field(default_factory=StageTimes)


class StageRunner:
    """Runs the train and eval streams of one stage (see the module docstring)."""

    def __init__(self, *, blocks, output, stage_index: int, num_stages: int, device,
                 num_classes: int, sender: Sender | None, receiver: Receiver | None,
                 with_stats: bool, show_progress: bool = False, check_every: int = 1,
                 on_batch=None, sync=None):
        self.blocks = list(blocks)
        self.output = output
        self.stage_index, self.num_stages = stage_index, num_stages
        self.device, self.num_classes = device, num_classes
        self.sender, self.receiver = sender, receiver
        self.with_stats = with_stats
        self.show_progress = show_progress and output is not None
        self.check_every = check_every
        self.clock = _BusyClock(device)
        self.on_batch = on_batch  # called with the sequence number after every batch
        self.replica_sync = sync  # averaging among this stage's data-parallel replicas

    @property
    def units(self):
        return self.blocks + ([self.output] if self.output is not None else [])

    def set_lr(self, lr: float) -> None:
        for unit in self.units:
            unit.set_lr(lr)

    def _name(self) -> str:
        return f"stage {self.stage_index + 1}/{self.num_stages}"

    # --- the message stream ------------------------------------------------------------------
    def _batches(self, loader, kind: int, epoch: int, times: StageTimes, start_seq: int = 0):
        """(seq, x, y, y on the host) of this stage's input stream, until the end-of-stream
        marker. The host copy of the labels goes into the next message's header without a
        device-to-host synchronisation."""
        if self.receiver is None:
            it = iter(loader)
            seq = start_seq
            while True:
                start = time.perf_counter()
                try:
                    x, y_host = next(it)
                except StopIteration:
                    return
                x = x.to(self.device, non_blocking=True)
                y = y_host.to(self.device, non_blocking=True)
                times.data_s += time.perf_counter() - start
                yield seq, x, y, y_host
                seq += 1
        end = END_TRAIN if kind == TRAIN else END_EVAL
        while self.receiver is not None:
            before = self.receiver.wait_s
            msg = self.receiver.recv()
            times.wait_recv_s += self.receiver.wait_s - before
            if msg.kind == end:
                return
            if msg.kind != kind or msg.epoch != epoch:
                raise StageFailure(f"{self._name()} expected a {KIND_NAMES[kind]} of epoch "
                                   f"{epoch}, got a {KIND_NAMES[msg.kind]} of epoch {msg.epoch}")
            yield (msg.seq, msg.activation, msg.labels.to(self.device, non_blocking=True),
                   msg.labels)

    def _send(self, times: StageTimes, kind: int, epoch: int, seq: int, x=None, y=None) -> None:
        if self.sender is None:
            return
        before = self.sender.wait_s
        self.sender.send(kind, epoch, seq, x, y)
        times.wait_send_s += self.sender.wait_s - before

    def _check(self, stats, gloss, epoch, seq) -> None:
        for block, s in zip(self.blocks, stats):
            check_finite(s, f"block {block.index} ({block.describe()}) on {self._name()}",
                         f"{seq} of epoch {epoch}")
        if gloss is not None and not bool(torch.isfinite(gloss)):
            raise NonFiniteLossError(f"non-finite loss in the output layer on {self._name()} at "
                                     f"step {seq} of epoch {epoch}; lower --lr or check the data")

    def _stream(self, loader, kind: int, epoch: int, total: int | None, step_fn,
                start_seq: int = 0, initial: dict | None = None, checkpoint_every: int = 0,
                on_checkpoint=None) -> StageEpoch:
        result = StageEpoch(EpochStats([b.index for b in self.blocks], self.device))
        if initial is not None:
            result.stats.load(initial)
        times = result.times
        start = time.perf_counter()
        bytes_before = self.sender.bytes if self.sender is not None else 0
        # a tqdm bar on a terminal, else None
        bar = progress(None, total=total or 0, enabled=self.show_progress,
                       desc=f"{'train' if kind == TRAIN else 'test'} {epoch}")
        seq = -1
        try:
            for seq, x, y, y_host in self._batches(loader, kind, epoch, times, start_seq):
                step_fn(result, times, epoch, seq, x, y, y_host)
                if self.on_batch is not None:
                    self.on_batch(seq)
                done = seq + 1
                if checkpoint_every and done % checkpoint_every == 0 and done < (total or 0):
                    on_checkpoint(epoch, done, result.stats)
                times.batches += 1
                times.samples += y.size(0)
                if bar is not None:
                    bar.update(1)
            self._send(times, END_TRAIN if kind == TRAIN else END_EVAL, epoch, max(seq + 1, start_seq))
        except (StageFailure, NonFiniteLossError, PeerLostError, ShapeMismatchError):
            raise
        except Exception as exc:
            raise StageFailure(f"{self._name()} failed at {KIND_NAMES[kind]} {seq + 1} of epoch "
                               f"{epoch}: {type(exc).__name__}: {exc}") from exc
        finally:
            if bar is not None:
                bar.close()
        self.clock.flush(times)
        times.wall_s = time.perf_counter() - start
        if self.sender is not None:
            times.bytes_sent = self.sender.bytes - bytes_before
        return result

    # --- train and eval ----------------------------------------------------------------------
    def _update(self, x, y, y1h, hand_off):
        """This stage's update on a batch; `hand_off(output)` passes the output on between the
        forwards and the updates. Returns (per-block stats, (logits, loss) or None)."""
        _, stats, out = local_forward_update(self.blocks, x, y, y1h,
                                             hand_off if self.sender is not None else None,
                                             self.output, self.replica_sync)
        return stats, out

    def _train_step(self, result, times, epoch, seq, x, y, y_host) -> None:
        mark = [self.clock.start()]
        y1h = onehot(y, self.num_classes)

        def hand_off(h):  # runs between the forwards and the updates
            self.clock.stop(mark[0], times)
            self._send(times, TRAIN, epoch, seq, h, y_host)
            mark[0] = self.clock.start()

        sync = self.replica_sync
        if sync is not None:
            before = sync.wait_s
        stats, out = self._update(x, y, y1h, hand_off)
        gloss = None
        if out is not None:
            logits, gloss = out
            result.stats.add_global(gloss, logits, y)
        if stats:
            result.stats.add_blocks(stats, y.size(0))
        result.stats.add_count(y.size(0))
        if seq % self.check_every == 0:
            self._check(stats, gloss, epoch, seq)
        self.clock.stop(mark[0], times)
        if sync is not None:
            waited = sync.wait_s - before
            times.wait_sync_s += waited
            if not self.clock.cuda:
                times.busy_s -= waited

    @torch.no_grad()
    def _eval_step(self, result, times, epoch, seq, x, y, y_host) -> None:
        t0 = self.clock.start()
        y1h = onehot(y, self.num_classes)
        stats = []
        for block in self.blocks:
            x, s = block.evaluate(x, y, y1h, self.with_stats)
            if s is not None:
                stats.append(s)
        if self.output is not None:
            logits, loss = self.output.predict(x, y)
            result.stats.add_global(loss, logits, y)
        if stats:
            result.stats.add_blocks(stats, y.size(0))
        result.stats.add_count(y.size(0))
        self.clock.stop(t0, times)
        self._send(times, EVAL, epoch, seq, x, y_host)

    def train_epoch(self, epoch: int, loader=None, total: int | None = None, *,
                    start_seq: int = 0, initial: dict | None = None, checkpoint_every: int = 0,
                    on_checkpoint=None) -> StageEpoch:
        """Train on one epoch's stream. A resumed epoch starts at batch `start_seq` with the
        statistics `initial`; every `checkpoint_every` batches `on_checkpoint(epoch, batches
        done, stats)` runs right after this stage's update of that batch."""
        for unit in self.units:
            unit.train()
        return self._stream(loader, TRAIN, epoch, total, self._train_step, start_seq, initial,
                            checkpoint_every, on_checkpoint)

    def eval_epoch(self, epoch: int, loader=None, total: int | None = None) -> StageEpoch:
        for unit in self.units:
            unit.eval()
        result = self._stream(loader, EVAL, epoch, total, self._eval_step)
        if self.sender is not None:
            before = self.sender.wait_s
            self.sender.drain()  # nothing in flight before the epoch's collectives
            result.times.wait_send_s += self.sender.wait_s - before
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
