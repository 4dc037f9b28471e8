"""One rank of a global-backprop pipeline schedule of torch.distributed.pipelining (the variants
with `runner` "pipelining" in benchmarks/schedules.py), for every schedule alike.

The units (blocks, then the output layer) are split into S x V contiguous virtual stages and
placed as the schedule requires (`Placement`): V = 1 for GPipe and 1F1B, whose stages are the
benchmark's S-stage split (`spec["counts"]`, the output layer on the last stage); V = 2 for the
looped and V-shaped schedules, whose chunks are `spec["vcounts"]`. Every schedule trains the
same micro-batches of the same global batch in one loop (`ScheduleRank.train`), which measures
the saved activations, the receive buffers and held outputs, the busy time (CPU) and the
end-of-batch stamps.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from localloss_pp.config import LossConfig
from localloss_pp.models import build_model

from .common import INPUT_SHAPE, NUM_CLASSES
from .harness import (Stamps, act_size, amp, config_of, data_tensors, memory_entries,
                      synthetic_batches, trace_window, weights)
from .memory import (ChunkOutputWatch, SavedActivationMeter, analytic_stage_buffer_bytes,
                     stage_recv_buffers, unique_bytes)
from .schedules import SCHEDULES, Schedule


class _ContiguousFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _Contiguous(nn.Module):
    """torch.distributed.pipelining sends a stage's input gradient back as autograd makes it,
    and the backends send contiguous tensors only: a ViT's token gradients can come out of a
    transpose. An identity at a stage's input whose backward makes the gradient contiguous.
    (Not at the output: every unit returns a fresh contiguous tensor, and the zero-bubble
    schedules detach a stage's output in place, which a view returned here would forbid.)"""

    def forward(self, x):
        return _ContiguousFn.apply(x)


class StageBusy:
    """Busy time of a rank running torch.distributed.pipelining schedules, on the CPU: the wall
    time inside its stages' compute calls (forward, backward, the split weight backward of the
    zero-bubble schedules; nested calls counted once) and its optimizer steps, over the measured
    batches. busy / wall is the rank's busy fraction; 1 - the mean over ranks is the measured
    bubble, defined as the local pipeline's idle share is. On a GPU the host's time inside a
    call is not the device's, so nothing is reported there (None)."""

    METHODS = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")

    def __init__(self, stages, device):
        self.cpu = device.type == "cpu"
        self.busy, self._depth, self.on = 0.0, 0, False
        if not self.cpu:
            return
        for stage in stages:
            for name in self.METHODS:
                real = getattr(stage, name, None)
                if real is not None:
                    setattr(stage, name, self._timed(real))

    def _timed(self, fn):
        def timed(*a, **kw):
            with self.section():
                return fn(*a, **kw)
        return timed

    @contextlib.contextmanager
    def section(self):
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self.on:
                self.busy += time.perf_counter() - start

    def start(self) -> None:
        """From here on (the first measured batch), count."""
        self.on, self.busy, self.wall_start = True, 0.0, time.perf_counter()

    def result(self) -> dict:
        if not self.cpu or not self.on:
            return {"busy_s": None, "wall_s": None}
        return {"busy_s": self.busy, "wall_s": time.perf_counter() - self.wall_start}


def chunks_of_rank(rank: int, ranks: int, virtual: int, placement: str) -> list[int]:
    """The virtual stages (chunks) a rank holds: one (V = 1: rank k holds k), looped (rank k:
    k, k + S, k + 2S, ...) or V-shaped (rank k: k and 2S - 1 - k; V = 2), in ascending order."""
    if placement == "v":
        return sorted({rank, 2 * ranks - 1 - rank})
    return [rank + v * ranks for v in range(virtual)]


def unit_counts(spec: dict, schedule: Schedule) -> list[int]:
    """Units per virtual stage: with one stage per rank the benchmark's split of the blocks
    with the output layer on the last stage, else the spec's S x V chunks."""
    if schedule.virtual == 1:
        return [*spec["counts"][:-1], spec["counts"][-1] + 1]
    return list(spec["vcounts"])


class Placement:
    """The units in S x V contiguous virtual stages of `counts` units each, and the virtual
    stages rank `rank` holds (`mine`, ascending)."""

    def __init__(self, units: list, counts: list[int], rank: int, ranks: int,
                 schedule: Schedule):
        n = ranks * schedule.virtual
        if len(counts) != n or sum(counts) != len(units) or min(counts) < 1:
            raise ValueError(f"{n} virtual stages need at least {n} units; the model has "
                             f"{len(units)} (blocks and output layer)")
        self.every, self.counts, self.n = units, counts, n
        self.starts = [sum(counts[:c]) for c in range(n)]
        self.mine = chunks_of_rank(rank, ranks, schedule.virtual, schedule.placement)
        self.first, self.last = 0 in self.mine, n - 1 in self.mine
        # links to another rank (a V-shaped placement passes between its own two chunks directly)
        self.remote_prev = [c > 0 and c - 1 not in self.mine for c in self.mine]
        self.remote_next = [c < n - 1 and c + 1 not in self.mine for c in self.mine]

    def units(self, c: int) -> list:
        """The units of virtual stage `c`."""
        return self.every[self.starts[c]:self.starts[c] + self.counts[c]]

    def boundary_elements(self) -> int:
        """Elements of one sample's activation summed over every virtual-stage boundary (each
        carries it forward and its gradient backward)."""
        return sum(torch.Size(self.every[self.starts[c] - 1].out_shape).numel()
                   for c in range(1, self.n))

    def analytic_recv_bytes(self, micro_bytes: int, microbatches: int) -> int:
        """The receive buffers of this rank's stages computed from their shapes
        (`micro_bytes`: samples of a micro-batch x bytes of an element)."""
        ins = [micro_bytes * math.prod(self.every[self.starts[c] - 1].out_shape) if p else 0
               for c, p in zip(self.mine, self.remote_prev)]
        outs = [micro_bytes * math.prod(self.units(c)[-1].out_shape) if n else 0
                for c, n in zip(self.mine, self.remote_next)]
        return analytic_stage_buffer_bytes(ins, outs, microbatches)


def _loss(out, target):
    return F.cross_entropy(out, target)


def _name_microbatches(stage) -> None:
    """Name every micro-batch's forward and backward for the timeline."""
    for method, label in (("forward_one_chunk", "Forward"), ("backward_one_chunk", "Backward")):
        def ranged(*a, _fn=getattr(stage, method), _label=label, **kw):
            with record_function(f"{_label} (micro-batch)"):
                return _fn(*a, **kw)
        setattr(stage, method, ranged)


class ScheduleRank:
    """This rank's part of a schedule: its units and stages, the schedule over them, the
    batches, and what measures them."""

    def __init__(self, spec: dict, env):
        import torch.distributed.pipelining as pp  # only in the processes that run a schedule
        self.spec, self.env = spec, env
        schedule = SCHEDULES[spec["variant"]]
        cfg = config_of(spec)
        model = build_model(cfg.model, LossConfig(backprop=True), INPUT_SHAPE, NUM_CLASSES,
                            seed=1, materialize=())
        self.place = Placement(list(model.blocks) + [model.output], unit_counts(spec, schedule),
                               env.rank, env.world_size, schedule)
        self.units = [u for c in self.place.mine for u in self.place.units(c)]
        model.setup_units({u.index for u in self.units}, env.device, cfg.optim)
        for unit in self.units:
            unit.set_lr(1e-4)
        self.stages = [pp.PipelineStage(nn.Sequential(_Contiguous(), *self.place.units(c)), c,
                                        self.place.n, env.device) for c in self.place.mine]
        if spec.get("trace"):
            for stage in self.stages:
                _name_microbatches(stage)
        cls = getattr(pp, schedule.torch_class)
        self.torch_schedule = cls(self.stages[0] if schedule.virtual == 1 else self.stages,
                                  n_microbatches=spec["microbatches"], loss_fn=_loss)
        self.batches = synthetic_batches(spec, spec["warmup"] + spec["batches"], env.device)
        self.meter = SavedActivationMeter(weights(model) + data_tensors(self.batches))
        self.clock = StageBusy(self.stages, env.device)
        self.held = ChunkOutputWatch(self.stages, self.meter)
        self.stamps, self.recv = Stamps(env.device), None

    def _step(self, x, y) -> None:
        """One global batch in M micro-batches: the first stage feeds inputs, the last
        computes the loss."""
        args = (x,) if self.place.first else ()
        kw = dict(target=y, losses=[]) if self.place.last else {}
        with self.meter, amp(self.spec, self.env.device):
            self.torch_schedule.step(*args, **kw)

    def train(self) -> None:
        """The warm-up and measured batches; the measurement starts after the warm-up."""
        warmup, trace = self.spec["warmup"], trace_window(self.spec, self.env)
        for i, (x, y) in enumerate(self.batches):
            if trace is not None:
                trace.before(2, i - warmup)
            if i == warmup:
                self.meter.reset_peak()
                self.held.reset()
                self.clock.start()
            self._step(x, y)
            if i == 0:  # the first step allocated the receive buffers: counted as buffers
                self.recv = stage_recv_buffers(self.stages, self.place.remote_prev,
                                               self.place.remote_next)
                if self.recv is not None:
                    self.meter.exclude(self.recv)
            with record_function("localloss_pp.optimizer_step"), self.clock.section():
                for unit in self.units:
                    unit.step()
            if i >= warmup:
                self.stamps.mark()
        if trace is not None:
            trace.finish()

    def result(self) -> dict:
        """The rank's JSON: memory, busy time, and on rank 0 the stamps and the bytes per
        batch (analytic: fp32 activations forward and gradients backward at every
        boundary)."""
        spec, first = self.spec, self.env.rank == 0
        if self.recv is not None:
            recv_bytes = unique_bytes(self.recv)
        else:
            recv_bytes = self.place.analytic_recv_bytes(
                spec["batch_size"] // spec["microbatches"] * act_size(spec), spec["microbatches"])
        act = 4 * self.place.boundary_elements()
        return {**memory_entries(self.meter, self.recv is not None and self.held.measured,
                                 recv=recv_bytes, send=self.held.peak), **self.clock.result(),
                "timestamps": self.stamps.seconds() if first else None, "report": first,
                "bytes_per_batch": 2 * act * spec["batch_size"] if first else 0}


def run_schedule(spec: dict, env) -> dict:
    """One rank of the spec's pipeline schedule: train, then its JSON."""
    rank = ScheduleRank(spec, env)
    rank.train()
    return rank.result()
