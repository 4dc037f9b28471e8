"""One benchmark variant in one process (or one rank of it, under torchrun).

    python -m benchmarks.worker SPEC.json OUT_DIR

Variants (benchmarks/schedules.py; `runner` names the function that runs each):
  local       the local-loss pipeline of localloss_pp (StageRunner over P2P links), S ranks
  local1      the same local algorithm in one process (every core)
  backprop1   global backprop in one process (every core)
  ddp         global backprop, DistributedDataParallel on S ranks (global batch split)
  gpipe, 1f1b global backprop pipelined with torch.distributed.pipelining over the same split
  i1f1b, loopedbfs, zb1p, zbv, dualpipev   the same with 2 virtual stages per rank
                                           (benchmarks/pipelining.py runs every schedule)

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

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from localloss_pp.config import LossConfig
from localloss_pp.models import build_model
from localloss_pp.models.losses import onehot
from localloss_pp.pipeline.build import build_stage
from localloss_pp.pipeline.distributed import import_before_process_group, init_distributed, \
    shutdown
from localloss_pp.pipeline.partition import Partition
from localloss_pp.pipeline.transport import config_fingerprint

from .common import INPUT_SHAPE, NUM_CLASSES
from .harness import (MEMORY_KEYS, Stamps, amp, config_of, data_tensors, memory_entries,
                      peak_memory, synthetic_batches, trace_window, weights)
from .memory import (SavedActivationMeter, SendWatch, analytic_receiver_bytes, ddp_bucket_bytes,
                     receiver_buffers, unique_bytes)
from .pipelining import run_schedule
from .schedules import SCHEDULES


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def run_local(spec: dict, env) -> dict:
    """The local pipeline on S ranks (S = 1: the local algorithm in one process)."""
    cfg = config_of(spec)
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
                         on_batch=stamps.mark, trace=trace_window(spec, env))
    runner.set_lr(1e-4)
    # the first stage's batches: input and labels on the device, labels also on the host (they
    # go into the message headers), as the data sources of localloss_pp deliver them
    loader_w = [(x, y, y.cpu()) for x, y in synthetic_batches(spec, spec["warmup"], env.device)] \
        if k == 0 else None
    loader_m = [(x, y, y.cpu()) for x, y in synthetic_batches(spec, spec["batches"], env.device)] \
        if k == 0 else None
    meter = SavedActivationMeter(weights(model) + data_tensors(loader_w) + data_tensors(loader_m))
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
    return {**memory_entries(meter, recv is not None and sends.measured, recv=recv_bytes,
                             send=sends.peak),
            "timestamps": stamps.seconds() if k == S - 1 else None,
            "times": measured.times.as_dict(),
            # the measured epoch's traffic (its end-of-epoch marker included) per batch
            "bytes_per_batch": measured.times.bytes_sent / max(measured.times.batches, 1),
            "link_bytes_per_s": link,
            "report": k == S - 1}


def _backprop_model(cfg, env):
    """The whole model for global backprop, every unit set up on this rank."""
    model = build_model(cfg.model, LossConfig(backprop=True), INPUT_SHAPE, NUM_CLASSES, seed=1)
    for unit in model.units():
        unit.setup(env.device, cfg.optim)
        unit.set_lr(1e-4)
    return model


def run_backprop1(spec: dict, env) -> dict:
    """Global backprop in one process."""
    from localloss_pp.pipeline.globalmode import global_step
    model = _backprop_model(config_of(spec), env)
    model.train()
    stamps = Stamps(env.device)
    batches = synthetic_batches(spec, spec["warmup"] + spec["batches"], env.device)
    meter = SavedActivationMeter(weights(model) + data_tensors(batches))
    for i, (x, y) in enumerate(batches):
        if i == spec["warmup"]:
            meter.reset_peak()
        with meter, amp(spec, env.device):
            global_step(model.blocks, model.output, x, y, onehot(y, NUM_CLASSES), "backprop")
        if i >= spec["warmup"]:
            stamps.mark()
    return {**memory_entries(meter, True), "timestamps": stamps.seconds(), "report": True}


def run_ddp(spec: dict, env) -> dict:
    """Global backprop with DistributedDataParallel, the global batch split over the ranks."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    S = env.world_size
    model = _backprop_model(config_of(spec), env)
    ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    stamps = Stamps(env.device)
    batches = synthetic_batches(spec, spec["warmup"] + spec["batches"], env.device,
                                batch_size=spec["batch_size"] // S)
    meter = SavedActivationMeter(weights(model) + data_tensors(batches))
    for i, (x, y) in enumerate(batches):
        if i == spec["warmup"]:
            meter.reset_peak()
        with meter:
            with amp(spec, env.device):
                loss = F.cross_entropy(ddp(x), y)
            loss.backward()
        for unit in model.units():
            unit.step()
        if i >= spec["warmup"]:
            stamps.mark()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buckets, buckets_measured = ddp_bucket_bytes(ddp)  # DDP's communication buffers
    # ring all-reduce: each rank sends 2 (S-1)/S of the gradient bytes per step
    return {**memory_entries(meter, buckets_measured, buckets=buckets),
            "timestamps": stamps.seconds() if env.rank == 0 else None,
            "report": env.rank == 0, "bytes_per_batch": 2 * (S - 1) / S * params}


# a schedule's `runner` (benchmarks/schedules.py) -> the function that runs it
RUNNERS = {"local": run_local, "backprop1": run_backprop1, "ddp": run_ddp,
           "pipelining": run_schedule}


def run(spec: dict, env) -> dict:
    """One run of the spec's variant in this process (one rank of it)."""
    schedule = SCHEDULES.get(spec["variant"])
    if schedule is None:
        raise ValueError(f"unknown variant {spec['variant']!r}")
    return RUNNERS[schedule.runner](spec, env)


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
    cfg = config_of(spec)
    import_before_process_group()
    env = init_distributed(cfg.train)
    if spec.get("points"):
        result = {"points": run_points(spec, env), "report": env.rank == 0}
    else:
        result = run(spec, env)
    result.update(rank=env.rank, world_size=env.world_size, variant=spec["variant"],
                  threads=env.threads, peak_memory_bytes=peak_memory(env.device),
                  device=str(env.device))
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(result))
    shutdown(env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
