"""Cutting the block list into contiguous pipeline stages.

`params`: balance the parameter count of the blocks (local heads included; the output layer
counts on the last stage). `auto`: profile each block's whole train step (forward, local losses,
backward, optimizer step) on the real device for a few batches, then minimise the slowest
stage. Explicit: block counts per stage, e.g. "3,3,2".
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from localloss_pp.config import Config
from localloss_pp.layout import balanced_split
from localloss_pp.models.losses import onehot
from localloss_pp.models import LocalModel, build_model
from localloss_pp.models.blocks import activation_dtype

__all__ = ["Partition", "balanced_split", "parse_counts", "choose_partition",
           "profile_unit_times", "profile_data_ms", "time_ms", "fold_output", "unit_step",
           "unit_input_shape"]


@dataclass
class Partition:
    counts: list[int]             # blocks per stage
    costs: list[float]            # per block (the output layer's cost added to the last block)
    how: str                      # "params", "auto" or "manual"
    unit: str                     # unit of the costs: "params" or "ms"
    names: list[str] = field(default_factory=list)
    data_ms: float = 0.0          # the first stage's data loading per batch (in costs[0], auto)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for c in self.counts:
            out.append((start, start + c))
            start += c
        return out

    def units_of(self, stage: int) -> set[int]:
        """Indices of the units a stage owns: its blocks, and the output layer on the last."""
        a, b = self.bounds[stage]
        return set(range(a, b)) | ({len(self.costs)} if stage == len(self.counts) - 1 else set())

    def stage_costs(self) -> list[float]:
        return [sum(self.costs[a:b]) for a, b in self.bounds]

    def describe(self) -> list[str]:
        lines = [f"partition ({self.how}): {','.join(map(str, self.counts))}"]
        total = sum(self.costs) or 1.0
        for k, ((a, b), cost) in enumerate(zip(self.bounds, self.stage_costs())):
            blocks = ", ".join(f"{i}:{self.names[i]}" for i in range(a, b)) if self.names else \
                f"{a}..{b - 1}"
            value = f"{cost:,.0f} params" if self.unit == "params" else f"{cost:.2f} ms/batch"
            tail = " + output layer" if k == len(self.counts) - 1 else ""
            if k == 0 and self.data_ms:
                tail += f" + data loading ({self.data_ms:.2f} ms)"
            lines.append(f"  stage {k + 1}: blocks {blocks}{tail} | {value} "
                         f"({100 * cost / total:.0f}%)")
        return lines

    def to_dict(self) -> dict:
        return {"how": self.how, "counts": self.counts, "unit": self.unit, "data_ms": self.data_ms,
                "block_costs": self.costs, "stage_costs": self.stage_costs(),
                "stages": [list(range(a, b)) for a, b in self.bounds], "names": self.names}


def parse_counts(spec: str, num_blocks: int, num_stages: int) -> list[int]:
    counts = [int(p) for p in spec.split(",")]
    if len(counts) != num_stages:
        raise ValueError(f"--partition {spec} has {len(counts)} stages, but the run has "
                         f"{num_stages} processes; give one block count per stage")
    if sum(counts) != num_blocks:
        raise ValueError(f"--partition {spec} covers {sum(counts)} blocks, but the model has "
                         f"{num_blocks}; the counts must add up to {num_blocks}")
    return counts


def time_ms(fn, steps: int, device, rounds: int = 3) -> float:
    """Median over `rounds` of the mean milliseconds of `steps` calls of `fn` (after two warm-up
    calls), synchronising CUDA around each round."""
    fn()
    fn()
    per_round = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_round.append(1000.0 * (time.perf_counter() - start) / steps)
    return statistics.median(per_round)


def fold_output(unit_costs: list[float]) -> list[float]:
    """Per-block costs from per-unit costs (blocks, then the output layer): the output layer
    runs on the last stage, so its cost goes to the last block."""
    costs = list(unit_costs[:-1])
    costs[-1] += unit_costs[-1]
    return costs


def unit_input_shape(model: LocalModel, unit) -> tuple[int, ...]:
    """The per-sample shape a unit receives (the output layer: the last block's output)."""
    return unit.in_shape if hasattr(unit, "in_shape") else model.blocks[-1].out_shape


def unit_step(unit, x, y, y1h, image=None):
    """A function running one local training step of `unit` on (x, y) (`image`: the network's
    input, for a unit whose objective reads it)."""
    inputs = {"image": image} if getattr(unit, "needs_input", False) else {}

    def step():
        if hasattr(unit, "train_forward"):
            _, ctx = unit.train_forward(x, **inputs)
            unit.train_update(ctx, y, y1h)
        else:
            unit.train_update(x, y)
    return step


def profile_unit_times(cfg: Config, input_shape, num_classes: int, device,
                       steps: int = 3) -> list[float]:
    """ms per train step of every unit (blocks, then output layer) at the configured batch size,
    measured on throw-away copies with synthetic inputs (the run's state is not touched), set up
    as the run sets up its own: precision, channels-last and compile. Each copy leaves the
    device once timed, and the device's cached blocks are freed at the end."""
    t = cfg.train
    net = build_model(cfg.model, cfg.loss, input_shape, num_classes, seed=t.seed + 7919)
    gen = torch.Generator().manual_seed(0)
    bs = cfg.data.batch_size
    y = torch.randint(num_classes, (bs,), generator=gen).to(device)
    y1h = onehot(y, num_classes)
    times = []
    for i, unit in enumerate(net.units()):
        unit.setup(device, cfg.optim, precision=t.precision, channels_last=t.channels_last,
                   compile=t.compile)
        unit.set_lr(1e-6)
        # the first block reads fp32 data; every later unit the previous unit's activations
        dtype = torch.float32 if i == 0 else activation_dtype(t.precision)
        x = torch.randn((bs, *unit_input_shape(net, unit)), generator=gen).to(device, dtype)
        image = torch.randn((bs, *input_shape), generator=gen).to(device)
        times.append(time_ms(unit_step(unit, x, y, y1h, image), steps, device))
        unit.to("cpu")
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times


def profile_data_ms(source, device, steps: int = 3) -> float:
    """ms the first stage spends producing one training batch from its source."""
    state = {"it": iter(source)}

    def one():
        try:
            next(state["it"])
        except StopIteration:
            state["it"] = iter(source)
            next(state["it"])
    return time_ms(one, steps, device)


def choose_partition(cfg: Config, model: LocalModel, num_stages: int, input_shape,
                     num_classes: int, device, names: list[str], source=None) -> Partition:
    """The partition that `cfg.train.partition` asks for, validated against the model. `auto`
    counts the first stage's data loading (timed on `source`) in the first stage's cost."""
    n = len(model.blocks)
    if num_stages > n:
        more = " (--num-layers N gives the mlp N blocks)" if cfg.model.name == "mlp" else ""
        raise ValueError(f"{num_stages} stages but {cfg.model.name} has only {n} blocks; "
                         f"launch at most {n} processes per pipeline, or give the model more "
                         f"blocks{more}")
    spec = cfg.train.partition
    param_costs = fold_output([float(sum(p.numel() for p in u.parameters()))
                               for u in model.units()])
    if spec == "params" or (spec == "auto" and num_stages == 1):  # nothing to balance
        return Partition(balanced_split(param_costs, num_stages), param_costs, "params",
                         "params", names)
    if spec == "auto":
        costs = fold_output(profile_unit_times(cfg, input_shape, num_classes, device))
        data_ms = profile_data_ms(source, device) if source is not None else 0.0
        costs[0] += data_ms
        return Partition(balanced_split(costs, num_stages), costs, "auto", "ms", names, data_ms)
    return Partition(parse_counts(spec, n, num_stages), param_costs, "manual", "params", names)
