"""What one rank of every benchmark variant runs with (benchmarks/worker.py and
benchmarks/pipelining.py): the configuration of a spec, the synthetic batches, the end-of-batch
stamps, the profiler window, and the memory entries of the rank's JSON.
"""
from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path

import torch

from localloss_pp.config import (Config, DataConfig, LossConfig, ModelConfig, OptimConfig,
                                 TrainConfig)

from .common import INPUT_SHAPE, NUM_CLASSES
from .memory import SavedActivationMeter

# the memory entries of a rank's JSON (see the worker's docstring)
MEMORY_KEYS = ("saved_activation_bytes", "buffer_bytes", "buffer_parts", "buffers_measured")


def config_of(spec: dict) -> Config:
    """The localloss_pp configuration of a spec (model, loss, batch, device, threads,
    precision)."""
    return Config(model=ModelConfig(**spec["model"]), loss=LossConfig(**spec["loss"]),
                  data=DataConfig(dataset="MNIST", batch_size=spec["batch_size"]),
                  optim=OptimConfig(lr=1e-4, lr_decay_milestones=[]),
                  train=TrainConfig(device=spec.get("device", "cpu"),
                                    threads_per_rank=spec.get("threads", 0),
                                    precision=spec.get("precision", "fp32")))


def amp(spec: dict, device):
    """The global-backprop baselines under bf16: the whole step under torch.autocast, the
    usual mixed precision of end-to-end training (the local blocks autocast each block)."""
    if spec.get("precision", "fp32") == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def act_size(spec: dict) -> int:
    """Bytes of one element of the activations between pipeline stages (analytic figures)."""
    return 2 if spec.get("precision", "fp32") == "bf16" else 4


def synthetic_batches(spec: dict, n: int, device, batch_size=None) -> list:
    """`n` (input, label) batches on `device`, cycling through 4 fixed random ones (the same for
    every variant)."""
    gen = torch.Generator().manual_seed(1234)
    bs = batch_size or spec["batch_size"]
    pool = [(torch.randn((bs, *INPUT_SHAPE), generator=gen),
             torch.randint(NUM_CLASSES, (bs,), generator=gen)) for _ in range(4)]
    return [(x.to(device), y.to(device)) for x, y in (pool[i % 4] for i in range(n))]


def peak_memory(device) -> int:
    """The process's peak memory: CUDA's peak allocation, or the peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def weights(model) -> list:
    """The model's parameters and buffers: never counted as saved activations."""
    return list(model.parameters()) + list(model.buffers())


def data_tensors(batches) -> list:
    """The tensors of the input batches: data that the caller holds for the step whatever the
    variant, never counted as saved activations (a micro-batch is a view of the global batch,
    so counting its storage would count the whole global batch)."""
    return [t for batch in (batches or []) for t in batch]


def memory_entries(meter: SavedActivationMeter, measured: bool, **parts: int) -> dict:
    """The memory entries of a rank's JSON (MEMORY_KEYS); `parts`: the buffer bytes by kind
    (recv, send, buckets)."""
    return {"saved_activation_bytes": int(meter.peak),
            "buffer_bytes": int(sum(parts.values())),
            "buffer_parts": {k: int(v) for k, v in parts.items()},
            "buffers_measured": bool(measured)}


class Stamps:
    """End-of-batch times of the measured batches, taken the same way for every variant: on
    CUDA an event recorded on the stream after each batch's work and read once after the run
    (no synchronisation inside the measured window), on the CPU the wall clock."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self, *_) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def clear(self) -> None:
        self.marks.clear()

    def seconds(self) -> list[float]:
        """The marks as seconds (from the first mark on CUDA)."""
        if not self.cuda:
            return list(self.marks)
        if not self.marks:
            return []
        self.marks[-1].synchronize()
        first = self.marks[0]
        return [first.elapsed_time(e) / 1000.0 for e in self.marks]


def trace_window(spec: dict, env):
    """A profiler window over measured batches START .. START+STEPS-1 (the `trace` entry of
    the spec: {"dir", "start", "steps"}), written to DIR/stage<k>.json; None without it."""
    t = spec.get("trace")
    if not t:
        return None
    from localloss_pp.observe.profiling import TraceWindow
    return TraceWindow((2, t["start"], t["steps"]), Path(t["dir"]) / f"stage{env.rank + 1}.json",
                       env.device)
