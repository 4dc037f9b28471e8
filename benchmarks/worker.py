"""One benchmark variant in one process (or one rank of it, under torchrun).

    python -m benchmarks.worker SPEC.json OUT_DIR

Variants:
  local       the local-loss pipeline of localloss_pp (StageRunner over P2P links), S ranks
  local1      the same local algorithm in one process (every core)
  backprop1   global backprop in one process (every core)
  ddp         global backprop, DistributedDataParallel on S ranks (global batch split)
  gpipe, 1f1b global backprop pipelined with torch.distributed.pipelining over the same split
  i1f1b, loopedbfs, zb1p, zbv, dualpipev   the same with 2 virtual stages per rank

Every variant trains on the same in-memory synthetic batches (MNIST-sized), so data loading is
excluded. It runs `warmup` batches, then `batches` measured ones; the reporting rank records the
time at which every measured batch finished. Each rank writes OUT_DIR/rank<k>.json.

Every rank also reports its activation memory over the measured batches (benchmarks/memory.py):
`saved_activation_bytes`, the peak of the bytes autograd holds saved for backward (parameters,
input batches and receive buffers excluded; the peak is reset after the warm-up batches, so
with `warmup` 0 the first batch, which allocates a pipeline stage's receive buffers, also
counts the stage inputs in them as saved), and `buffer_bytes`, what the rank holds to talk to
its neighbours (`buffer_parts`: "recv" buffers and "send" tensors in flight, or DDP's gradient
"buckets"; `buffers_measured`: read from the objects, or false where computed from the
shapes).

With a `points` list in the spec (the memory sweep of benchmarks.throughput) the variant runs
once per point, each a dict of spec entries that replace the spec's (microbatches, batch_size),
in the same processes; a point whose set-up raises ValueError (a schedule's constraint on M)
gets {"error": ...} and the next one runs. The rank's JSON then holds {"points": [...]}.
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from localloss_pp.config import (Config, DataConfig, LossConfig, ModelConfig, OptimConfig,
                                 TrainConfig)
from localloss_pp.pipeline.distributed import import_before_process_group, init_distributed, \
    shutdown
from localloss_pp.models.losses import onehot
from localloss_pp.models import build_model
from localloss_pp.pipeline.build import build_stage
from localloss_pp.pipeline.partition import Partition
from localloss_pp.pipeline.transport import config_fingerprint

from benchmarks.memory import (ChunkOutputWatch, SavedActivationMeter, SendWatch,
                               analytic_receiver_bytes, analytic_stage_buffer_bytes,
                               ddp_bucket_bytes, receiver_buffers, stage_recv_buffers,
                               unique_bytes)

INPUT_SHAPE, NUM_CLASSES = (1, 28, 28), 10


def _config(spec: dict) -> Config:
    return Config(model=ModelConfig(**spec["model"]), loss=LossConfig(**spec["loss"]),
                  data=DataConfig(dataset="MNIST", batch_size=spec["batch_size"]),
                  optim=OptimConfig(lr=1e-4, lr_decay_milestones=[]),
                  train=TrainConfig(device=spec.get("device", "cpu"),
                                    threads_per_rank=spec.get("threads", 0),
                                    precision=spec.get("precision", "fp32")))


def _amp(spec: dict, device):
    """The global-backprop baselines under bf16: the whole step under torch.autocast, the
    usual mixed precision of end-to-end training (the local blocks autocast each block)."""
    if spec.get("precision", "fp32") == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(spec: dict, n: int, device, batch_size=None):
    gen = torch.Generator().manual_seed(1234)
    bs = batch_size or spec["batch_size"]
    pool = [(torch.randn((bs, *INPUT_SHAPE), generator=gen),
             torch.randint(NUM_CLASSES, (bs,), generator=gen)) for _ in range(4)]
    return [(x.to(device), y.to(device)) for x, y in (pool[i % 4] for i in range(n))]


def _peak_memory(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _weights(model) -> list:
    """The model's parameters and buffers: never counted as saved activations."""
    return list(model.parameters()) + list(model.buffers())


def _data(batches) -> list:
    """The tensors of the input batches: data that the caller holds for the step whatever the
    variant, never counted as saved activations (a micro-batch is a view of the global batch,
    so counting its storage would count the whole global batch)."""
    return [t for batch in (batches or []) for t in batch]


def _memory(meter: SavedActivationMeter, measured: bool, **parts: int) -> dict:
    """The memory entries of a rank's JSON (see the module docstring); `parts`: the buffer
    bytes by kind (recv, send, buckets)."""
    return {"saved_activation_bytes": int(meter.peak),
            "buffer_bytes": int(sum(parts.values())),
            "buffer_parts": {k: int(v) for k, v in parts.items()},
            "buffers_measured": bool(measured)}


def _act_size(spec: dict) -> int:
    """Bytes of one element of the activations between pipeline stages (analytic figures)."""
    return 2 if spec.get("precision", "fp32") == "bf16" else 4


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _measure_link(env, sample_shape, bs, repeats=10) -> float | None:
    """Bytes/s of one activation message from rank 0 to rank 1 (blocking send/recv)."""
    if env.world_size < 2 or env.rank > 1:
        return None
    t = torch.zeros((bs, *sample_shape), device="cpu" if env.staging else env.device)
    start = None
    for i in range(repeats + 1):
        if i == 1:
            _sync(env.device)
            start = time.perf_counter()
        if env.rank == 0:
            dist.send(t, 1)
        else:
            dist.recv(t, 0)
    _sync(env.device)
    return t.numel() * t.element_size() * repeats / (time.perf_counter() - start)


def _trace_window(spec: dict, env):
    """A profiler window over measured batches START .. START+STEPS-1 (the `trace` entry of
    the spec: {"dir", "start", "steps"}), written to DIR/stage<k>.json; None without it."""
    t = spec.get("trace")
    if not t:
        return None
    from localloss_pp.observe.profiling import TraceWindow
    return TraceWindow((2, t["start"], t["steps"]), Path(t["dir"]) / f"stage{env.rank + 1}.json",
                       env.device)


def run_local(spec: dict, env) -> dict:
    cfg = _config(spec)
    S, k = env.world_size, env.rank
    model = build_model(cfg.model, cfg.loss, INPUT_SHAPE, NUM_CLASSES, seed=1, materialize=())
    counts = spec["counts"] if S > 1 else [len(model.blocks)]
    if len(counts) != S or sum(counts) != len(model.blocks):
        raise ValueError(f"partition {counts} does not fit {S} stages x {len(model.blocks)} blocks")
    part = Partition(counts, [0.0] * len(model.blocks), "manual", "params")
    model.setup_units(part.units_of(k), env.device, cfg.optim, precision=cfg.train.precision)
    link = None
    if S > 1:
        dist.barrier(group=env.meta_group)  # gloo: no extra world-wide NCCL communicator
        link = _measure_link(env, model.blocks[part.bounds[0][1] - 1].out_shape,
                             cfg.data.batch_size)
    stamps = Stamps(env.device)
    runner = build_stage(cfg, env, model, part, k, fingerprint=config_fingerprint("bench"),
                         num_classes=NUM_CLASSES, with_stats=False, check_every=10 ** 9,
                         on_batch=stamps.mark, trace=_trace_window(spec, env))
    runner.set_lr(1e-4)
    # the first stage's batches: input and labels on the device, labels also on the host (they
    # go into the message headers), as the data sources of localloss_pp deliver them
    loader_w = [(x, y, y.cpu()) for x, y in _batches(spec, spec["warmup"], env.device)] \
        if k == 0 else None
    loader_m = [(x, y, y.cpu()) for x, y in _batches(spec, spec["batches"], env.device)] \
        if k == 0 else None
    meter = SavedActivationMeter(_weights(model) + _data(loader_w) + _data(loader_m))
    recv = receiver_buffers(runner.receiver)  # the stage input is received into these
    if recv is not None:
        meter.exclude(recv)
    sends = SendWatch(runner.sender, meter)
    with meter:
        runner.train_epoch(1, loader_w, spec["warmup"])
        meter.reset_peak()
        sends.reset()
        stamps.clear()
        measured = runner.train_epoch(2, loader_m, spec["batches"])
    runner.stop()
    recv_bytes = unique_bytes(recv) if recv is not None else \
        analytic_receiver_bytes(runner.receiver)
    return {**_memory(meter, recv is not None and sends.measured, recv=recv_bytes,
                       send=sends.peak),
            "timestamps": stamps.seconds() if k == S - 1 else None,
            "times": measured.times.as_dict(),
            # the measured epoch's traffic (its end-of-epoch marker included) per batch
            "bytes_per_batch": measured.times.bytes_sent / max(measured.times.batches, 1),
            "link_bytes_per_s": link,
            "report": k == S - 1}


def run_backprop1(spec: dict, env) -> dict:
    from localloss_pp.pipeline.globalmode import global_step
    cfg = _config(spec)
    model = build_model(cfg.model, LossConfig(backprop=True), INPUT_SHAPE, NUM_CLASSES, seed=1)
    for unit in model.units():
        unit.setup(env.device, cfg.optim)
        unit.set_lr(1e-4)
    model.train()
    stamps = Stamps(env.device)
    batches = _batches(spec, spec["warmup"] + spec["batches"], env.device)
    meter = SavedActivationMeter(_weights(model) + _data(batches))
    for i, (x, y) in enumerate(batches):
        if i == spec["warmup"]:
            meter.reset_peak()
        with meter, _amp(spec, env.device):
            global_step(model.blocks, model.output, x, y, onehot(y, NUM_CLASSES), "backprop")
        if i >= spec["warmup"]:
            stamps.mark()
    return {**_memory(meter, True), "timestamps": stamps.seconds(), "report": True}


def run_ddp(spec: dict, env) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP
    cfg = _config(spec)
    S = env.world_size
    model = build_model(cfg.model, LossConfig(backprop=True), INPUT_SHAPE, NUM_CLASSES, seed=1)
    for unit in model.units():
        unit.setup(env.device, cfg.optim)
        unit.set_lr(1e-4)
    ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    local_bs = spec["batch_size"] // S
    stamps = Stamps(env.device)
    batches = _batches(spec, spec["warmup"] + spec["batches"], env.device, batch_size=local_bs)
    meter = SavedActivationMeter(_weights(model) + _data(batches))
    for i, (x, y) in enumerate(batches):
        if i == spec["warmup"]:
            meter.reset_peak()
        with meter:
            with _amp(spec, env.device):
                loss = F.cross_entropy(ddp(x), y)
            loss.backward()
        for unit in model.units():
            unit.step()
        if i >= spec["warmup"]:
            stamps.mark()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buckets, buckets_measured = ddp_bucket_bytes(ddp)  # DDP's communication buffers
    # ring all-reduce: each rank sends 2 (S-1)/S of the gradient bytes per step
    return {**_memory(meter, buckets_measured, buckets=buckets),
            "timestamps": stamps.seconds() if env.rank == 0 else None,
            "report": env.rank == 0, "bytes_per_batch": 2 * (S - 1) / S * params}


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


def run_pipelining(spec: dict, env, schedule: str) -> dict:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    cfg = _config(spec)
    S, k = env.world_size, env.rank
    model = build_model(cfg.model, LossConfig(backprop=True), INPUT_SHAPE, NUM_CLASSES, seed=1,
                        materialize=())
    part = Partition(spec["counts"], [0.0] * len(model.blocks), "manual", "params")
    a, b = part.bounds[k]
    model.setup_units(part.units_of(k), env.device, cfg.optim)
    units = list(model.blocks[a:b]) + ([model.output] if k == S - 1 else [])
    for unit in units:
        unit.set_lr(1e-4)
    stage = PipelineStage(nn.Sequential(_Contiguous(), *units), k, S, env.device)
    if spec.get("trace"):  # name every micro-batch's forward and backward for the timeline
        for method, label in (("forward_one_chunk", "Forward"),
                              ("backward_one_chunk", "Backward")):
            def ranged(*a, _fn=getattr(stage, method), _label=label, **kw):
                with record_function(f"{_label} (micro-batch)"):
                    return _fn(*a, **kw)
            setattr(stage, method, ranged)
    cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    sched = cls(stage, n_microbatches=spec["microbatches"],
                loss_fn=lambda out, target: F.cross_entropy(out, target))
    stamps = Stamps(env.device)
    trace = _trace_window(spec, env)  # counted over the measured batches, as for `local`
    batches = _batches(spec, spec["warmup"] + spec["batches"], env.device)
    meter = SavedActivationMeter(_weights(model) + _data(batches))
    clock = StageBusy([stage], env.device)
    held = ChunkOutputWatch([stage], meter)
    prev, nxt = [k > 0], [k < S - 1]
    recv = None
    for i, (x, y) in enumerate(batches):
        if trace is not None:
            trace.before(2, i - spec["warmup"])
        if i == spec["warmup"]:
            meter.reset_peak()
            held.reset()
            clock.start()
        with meter, _amp(spec, env.device):
            if k == 0:
                sched.step(x)
            elif k == S - 1:
                sched.step(target=y, losses=[])
            else:
                sched.step()
        if i == 0:  # the first step allocated the receive buffers: counted as buffers
            recv = stage_recv_buffers([stage], prev, nxt)
            if recv is not None:
                meter.exclude(recv)
        with record_function("localloss_pp.optimizer_step"), clock.section():
            for unit in units:
                unit.step()
        if i >= spec["warmup"]:
            stamps.mark()
    if trace is not None:
        trace.finish()
    # every boundary carries each sample's activation forward and its gradient backward
    act = sum(4 * torch.Size(model.blocks[bnd - 1].out_shape).numel()
              for _, bnd in part.bounds[:-1])
    if recv is not None:
        recv_bytes = unique_bytes(recv)
    else:
        mb = spec["batch_size"] // spec["microbatches"] * _act_size(spec)
        recv_bytes = analytic_stage_buffer_bytes(
            [mb * math.prod(model.blocks[a].in_shape)] if k > 0 else [0],
            [mb * math.prod(model.blocks[b - 1].out_shape)] if k < S - 1 else [0],
            spec["microbatches"])
    return {**_memory(meter, recv is not None and held.measured, recv=recv_bytes,
                       send=held.peak), **clock.result(),
            "timestamps": stamps.seconds() if k == 0 else None, "report": k == 0,
            "bytes_per_batch": 2 * act * spec["batch_size"] if k == 0 else 0}


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


# virtual-stage schedules of torch.distributed.pipelining: V chunks per rank
VIRTUAL = {"i1f1b": ("ScheduleInterleaved1F1B", "looped"),
           "loopedbfs": ("ScheduleLoopedBFS", "looped"),
           "zb1p": ("ScheduleInterleavedZeroBubble", "looped"),
           "zbv": ("ScheduleZBVZeroBubble", "v"),
           "dualpipev": ("ScheduleDualPipeV", "v")}


def chunks_of_rank(rank: int, ranks: int, virtual: int, placement: str) -> list[int]:
    """The virtual stages (chunks) a rank holds: looped (rank k: k, k + S, k + 2S, ...) or
    V-shaped (rank k: k and 2S - 1 - k; V = 2), in ascending order."""
    if placement == "v":
        return sorted({rank, 2 * ranks - 1 - rank})
    return [rank + v * ranks for v in range(virtual)]


def run_virtual(spec: dict, env, schedule: str) -> dict:
    """A backprop schedule with V virtual stages per rank: the units (blocks, then the output
    layer) split into S x V contiguous chunks of `spec["vcounts"]` units, placed looped or
    V-shaped as the schedule requires; the same micro-batches and global batch as GPipe/1F1B."""
    import torch.distributed.pipelining as pp
    cfg = _config(spec)
    S, k = env.world_size, env.rank
    cls_name, placement = VIRTUAL[schedule]
    V = 2 if placement == "v" else spec.get("virtual", 2)
    model = build_model(cfg.model, LossConfig(backprop=True), INPUT_SHAPE, NUM_CLASSES, seed=1,
                        materialize=())
    every = list(model.blocks) + [model.output]
    counts = spec["vcounts"]
    if len(counts) != S * V or sum(counts) != len(every) or min(counts) < 1:
        raise ValueError(f"{S * V} virtual stages need at least {S * V} units; the model has "
                         f"{len(every)} (blocks and output layer)")
    starts = [sum(counts[:c]) for c in range(S * V)]
    mine = chunks_of_rank(k, S, V, placement)
    owned = [every[starts[c]:starts[c] + counts[c]] for c in mine]
    model.setup_units({u.index for units in owned for u in units}, env.device, cfg.optim)
    units = [u for chunk in owned for u in chunk]
    for unit in units:
        unit.set_lr(1e-4)
    stages = [pp.PipelineStage(nn.Sequential(_Contiguous(), *chunk), c, S * V,
                               env.device) for c, chunk in zip(mine, owned)]
    sched = getattr(pp, cls_name)(stages, n_microbatches=spec["microbatches"],
                                  loss_fn=lambda out, target: F.cross_entropy(out, target))
    first, last = 0 in mine, S * V - 1 in mine
    stamps = Stamps(env.device)
    batches = _batches(spec, spec["warmup"] + spec["batches"], env.device)
    meter = SavedActivationMeter(_weights(model) + _data(batches))
    clock = StageBusy(stages, env.device)
    held = ChunkOutputWatch(stages, meter)
    # links to another rank (a V-shaped placement passes between its own two chunks directly)
    prev = [c > 0 and c - 1 not in mine for c in mine]
    nxt = [c < S * V - 1 and c + 1 not in mine for c in mine]
    recv = None
    for i, (x, y) in enumerate(batches):
        args = (x,) if first else ()
        kw = dict(target=y, losses=[]) if last else {}
        if i == spec["warmup"]:
            meter.reset_peak()
            held.reset()
            clock.start()
        with meter, _amp(spec, env.device):
            sched.step(*args, **kw)
        if i == 0:  # the first step allocated the receive buffers: counted as buffers
            recv = stage_recv_buffers(stages, prev, nxt)
            if recv is not None:
                meter.exclude(recv)
        with record_function("localloss_pp.optimizer_step"), clock.section():
            for unit in units:
                unit.step()
        if i >= spec["warmup"]:
            stamps.mark()
    # every chunk boundary carries each sample's activation forward and its gradient backward
    act = sum(4 * torch.Size(every[starts[c] - 1].out_shape).numel() for c in range(1, S * V))
    if recv is not None:
        recv_bytes = unique_bytes(recv)
    else:
        mb = spec["batch_size"] // spec["microbatches"] * _act_size(spec)
        recv_bytes = analytic_stage_buffer_bytes(
            [mb * math.prod(every[starts[c] - 1].out_shape) if p else 0
             for c, p in zip(mine, prev)],
            [mb * math.prod(every[starts[c] + counts[c] - 1].out_shape) if n else 0
             for c, n in zip(mine, nxt)], spec["microbatches"])
    return {**_memory(meter, recv is not None and held.measured, recv=recv_bytes,
                       send=held.peak), **clock.result(),
            "timestamps": stamps.seconds() if k == 0 else None, "report": k == 0,
            "bytes_per_batch": 2 * act * spec["batch_size"] if k == 0 else 0}


MEMORY_KEYS = ("saved_activation_bytes", "buffer_bytes", "buffer_parts", "buffers_measured")


def run(spec: dict, env) -> dict:
    """One run of the spec's variant in this process (one rank of it)."""
    variant = spec["variant"]
    if variant in ("local", "local1"):
        return run_local(spec, env)
    if variant == "backprop1":
        return run_backprop1(spec, env)
    if variant == "ddp":
        return run_ddp(spec, env)
    if variant in ("gpipe", "1f1b"):
        return run_pipelining(spec, env, variant)
    if variant in VIRTUAL:
        return run_virtual(spec, env, variant)
    raise ValueError(f"unknown variant {variant!r}")


def run_points(spec: dict, env) -> list[dict]:
    """The variant once per entry of spec["points"] (see the module docstring): the memory
    entries of each run, or {"error": "ValueError: ..."} for a point the variant cannot run
    (a schedule's constraint, raised on every rank before any communication)."""
    out = []
    for point in spec["points"]:
        try:
            result = run(dict(spec, **point), env)
            out.append(dict(point, **{key: result[key] for key in MEMORY_KEYS}))
        except ValueError as exc:
            out.append(dict(point, error=f"ValueError: {str(exc).splitlines()[0][:160]}"))
        if env.world_size > 1:
            dist.barrier(group=env.meta_group)
    return out


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(argv[0]).read_text())
    out_dir = Path(argv[1])
    cfg = _config(spec)
    import_before_process_group()
    env = init_distributed(cfg.train)
    variant = spec["variant"]
    if spec.get("points"):
        result = {"points": run_points(spec, env), "report": env.rank == 0}
    else:
        result = run(spec, env)
    result.update(rank=env.rank, world_size=env.world_size, variant=variant,
                  threads=env.threads, peak_memory_bytes=_peak_memory(env.device),
                  device=str(env.device))
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(result))
    shutdown(env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
