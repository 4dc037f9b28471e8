"""Throughput of the local-loss pipeline against global backprop, on this machine, in one run.

    python -m benchmarks.throughput [--quick] [--models mlp,vgg8b,resnet18] [--stages S]
                                    [--microbatches M] [--precision fp32,bf16] [--json PATH]
                                    [--plot PATH] [--memory-sweep 1,2,4,8 [--memory-plot PNG]
                                     [--memory-only]]
    python -m benchmarks.throughput --timeline PNG [--models mlp] [--timeline-batches 4]

For each model (mlp 3x1024, vgg8b and resnet18 at MNIST size, and the CIFAR resnet32 on
--models resnet32; --feat-mult, --resnet-feat-mult and --resnet32-feat-mult shrink the conv
nets; --models picks) and local objective (--objectives, default predsim,pred: any registered
one, dgl and infopro included; --local-modules K groups the units of the local variants into
K modules, the backprop variants keep theirs) it runs, with the same global batch and the
same synthetic in-memory batches:
(a) local pipeline on S stages, (b) the local algorithm in one process on every core, (c) global
backprop in one process, (d) global backprop with DDP on S ranks, (e) GPipe and (f) 1F1B from
torch.distributed.pipelining over the same S-stage split with M micro-batches, and the schedules
with 2 virtual stages per rank: (g) Interleaved1F1B, (h) LoopedBFS, (i) ZB1P (interleaved zero
bubble), (j) ZBV (zero bubble, V-shaped placement) and (k) DualPipeV; the default runs (a)-(g)
and (i), --variants picks; a schedule that cannot run in a configuration gets a row that says
why. Every multi-rank
variant is a real torchrun launch. Speed is the median samples/s over windows of the measured
batches (warm-up excluded); ratios are between numbers measured in this run only.

--precision fp32,bf16 measures every variant in each precision (bf16: the local blocks under
--precision bf16, the backprop baselines under torch.autocast). MFU is measured against the
peak of the arithmetic that runs, measured in this run: fp32, TF32 (fp32 on CUDA where torch
allows TF32 for the layers carrying the FLOPs: convolutions by default) or bf16.

Activation memory per rank (benchmarks/memory.py), measured the same way for every variant:
the peak bytes autograd holds saved for backward over the measured batches (parameters
excluded) plus the bytes of the buffers the rank talks to its neighbours with (receive buffers,
sends in flight, DDP's gradient buckets). --memory-sweep M1,M2,... measures it for the pipelines
at M micro-batches of a fixed micro-batch size (--memory-microbatch-size, default
--batch-size / --microbatches): the backprop schedules on a global batch of M x m, the local
pipeline (no micro-batches) on batches of m at every M.

--timeline PNG instead profiles a few batches of the local pipeline, GPipe and 1F1B on the first
model and draws their timelines one above the other. Time to accuracy on real data is another
command: python -m benchmarks.tta.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import NamedTuple

import torch

from localloss_pp.config import LossConfig, ModelConfig
from localloss_pp.pipeline.partition import balanced_split, fold_output

from .common import INPUT_SHAPE, NUM_CLASSES, environment
from .costmodel import arithmetic_of, count_flops, matmul_peak_flops, predict, profile_blocks, \
    project
from .options import loss_spec, models, parse_args
from .report import plot, report
from .runs import base_spec, combine, first_error, not_run, num_blocks, run_variant, \
    summarise, virtual_counts
from .schedules import LABELS, SCHEDULES, VIRTUAL_STAGES
from .sweep import memory_sweep, print_sweep, sweep_plot
from .timeline import timelines


class Job(NamedTuple):
    """One run of one variant of one model (repeated --repeats times)."""
    precision: str
    loss: str
    variant: str
    ranks: int
    spec: dict


def main(argv=None) -> int:
    args = parse_args(argv, description=__doc__)
    cores = os.cpu_count() or 1
    if args.timeline:
        return timelines(args, cores)
    env_info = environment()
    print("# localloss-pp throughput benchmark")
    print(json.dumps({"environment": env_info, "config": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}, indent=1))
    torch.set_num_threads(1)  # per-block costs and the matmul peaks at one thread
    peaks = _matmul_peaks(args)
    out = {"results": [], "costmodel": [], "projection": [], "sweep_rows": []}
    for model_name, mcfg in models(args):
        counts = None
        if not args.memory_only:
            rows, checks, pj = run_model(args, model_name, mcfg, cores, peaks)
            out["results"] += rows
            out["costmodel"] += checks
            if pj is not None:
                out["projection"].append(pj)
            counts = rows[0]["counts"]  # the sweep uses the same split
        if args.sweep:
            out["sweep_rows"] += memory_sweep(args, model_name, mcfg, counts, cores)
    if out["results"]:
        report(out["results"], out["costmodel"], out["projection"], peaks, args.device)
    sweep = print_sweep(args, out["sweep_rows"]) if args.sweep else None
    _write(args, env_info, peaks, out, sweep)
    return 0


def _matmul_peaks(args) -> dict:
    """The matmul peak (FLOP/s of one thread or one GPU) of every arithmetic the runs use."""
    needed = sorted({arithmetic_of(p, m["name"], args.device) for p in args.precisions
                     for _, m in models(args)}) if not args.memory_only else []
    peaks = {name: matmul_peak_flops(torch.device(args.device), arithmetic=name)
             for name in needed}
    for name, flops in peaks.items():
        print(f"{name} matmul peak: {flops / 1e9:.1f} GFLOP/s per "
              f"{'GPU' if args.device == 'cuda' else 'thread'}", flush=True)
    return peaks


def _write(args, env_info: dict, peaks: dict, out: dict, sweep: dict | None) -> None:
    """--json, --plot and --memory-plot."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env_info, "config": vars(args) | {
            "json": str(args.json), "plot": str(args.plot)}, "results": out["results"],
            "matmul_peak_flops": peaks, "costmodel": out["costmodel"],
            "projection": out["projection"], "memory_sweep": sweep}, indent=1, default=str))
        print(f"\nwrote {args.json}")
    if args.plot and out["results"]:
        plot(out["results"], args.plot)
        print(f"wrote {args.plot}")
    if args.memory_plot and out["sweep_rows"]:
        sweep_plot(out["sweep_rows"], args.sweep, args.memory_plot)
        print(f"wrote {args.memory_plot}")


def run_model(args, model_name: str, mcfg: dict, cores: int, peaks: dict) -> tuple:
    """Every variant of one model: (result rows, cost-model rows, projection or None)."""
    mcfg = dict(mcfg, dropout=0.0)
    costs = None if args.no_costmodel else profile_blocks(
        ModelConfig(**mcfg), LossConfig(), INPUT_SHAPE, NUM_CLASSES, args.batch_size,
        torch.device(args.device))
    counts = balanced_split(fold_output([c.local_ms for c in costs]), args.stages) if costs \
        else balanced_split([1.0] * num_blocks(mcfg), args.stages)
    local_counts = {loss: module_counts(args, mcfg, loss) for loss in args.losses.split(",")} \
        if args.local_modules else {}
    jobs = jobs_of(args, mcfg, counts, cores, local_counts)
    rows = _rows(args, model_name, mcfg, counts, _measure(args, model_name, jobs), cores, peaks,
                 local_counts)
    if costs is None:
        return rows, [], None
    if args.local_modules:  # the cost model predicts the per-unit split only
        print(f"- {model_name}: no cost-model check with --local-modules (the model predicts "
              "the per-unit local pipeline)", flush=True)
        return rows, [], _projection(args, model_name, costs)
    # the local pipeline's runs above, by (loss, split, threads): the cost-model check of the
    # same configuration reuses them instead of launching it again
    measured = {(r["loss"], tuple(r["counts"]), r["threads_per_rank"]): r for r in rows
                if r["variant"] == "local" and r["precision"] == "fp32" and "error" not in r}
    checks = validate(model_name, args.losses.split(",")[0], mcfg, costs,
                      base_spec(args, mcfg), args, cores, measured)
    return rows, checks, _projection(args, model_name, costs)


def module_counts(args, mcfg: dict, objective: str) -> list[int]:
    """Local modules per stage of the local pipeline trained by `objective` under
    --local-modules: balanced by each module's measured train-step time (heads included) as
    `train --partition auto` balances them, or by parameters with --no-costmodel."""
    from localloss_pp.models import build_model
    from localloss_pp.pipeline.partition import profile_unit_times
    from .harness import config_of
    loss = LossConfig(**loss_spec(args, objective))
    if args.no_costmodel:
        net = build_model(ModelConfig(**mcfg), loss, INPUT_SHAPE, NUM_CLASSES, 0,
                          materialize=())
        costs = [float(sum(p.numel() for p in u.parameters())) for u in net.units()]
    else:
        cfg = config_of(dict(base_spec(args, mcfg), loss=loss_spec(args, objective),
                             threads=1))
        costs = profile_unit_times(cfg, INPUT_SHAPE, NUM_CLASSES, torch.device(args.device))
    return balanced_split(fold_output(costs), args.stages)


def jobs_of(args, mcfg: dict, counts: list[int], cores: int,
            local_counts: dict | None = None) -> list[Job]:
    """Every run of one model: each precision, loss and variant chosen, except the ones that
    cannot run here (they get a 'not run' row) and global backprop with any loss but the
    first (it does not use the local loss: measured once). `local_counts`: objective -> the
    local pipeline's split into modules (--local-modules); else every variant splits `counts`."""
    local_counts = local_counts or {}
    base = base_spec(args, mcfg)
    S, jobs = args.stages, []
    vcounts = virtual_counts(num_blocks(mcfg) + 1, S * VIRTUAL_STAGES)
    for precision in args.precisions:
        for i, loss in enumerate(args.losses.split(",")):
            for variant in args.variant_list:
                schedule = SCHEDULES[variant]
                if variant in args.unrunnable or (not schedule.local and i > 0):
                    continue
                ranks = 1 if schedule.one_process else S
                threads = cores if ranks == 1 else max(1, cores // S)
                split = local_counts.get(loss, counts) if schedule.local else counts
                jobs.append(Job(precision, loss, variant, ranks, dict(
                    base, loss=loss_spec(args, loss), threads=threads, precision=precision,
                    counts=split, vcounts=vcounts)))
    return jobs


def _measure(args, model_name: str, jobs: list[Job]) -> dict:
    """(precision, loss, variant) -> the summaries of its repeats. Repeats are interleaved, so
    that slow phases of the machine hit every variant; a virtual-stage schedule that cannot
    run gets a row that says why, never a silent omission."""
    summaries = {j[:3]: [] for j in jobs}
    for rep in range(args.repeats):
        for job in jobs:
            print(f"- {model_name} {job.loss} {job.precision} {LABELS[job.variant]} "
                  f"(repeat {rep + 1}) ...", flush=True)
            try:
                row = summarise(job.variant, run_variant(job.variant, job.spec, job.ranks,
                                                         args.timeout), job.spec, args.windows)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                if SCHEDULES[job.variant].virtual == 1:
                    raise
                row = not_run(job.variant, job.ranks, job.spec["threads"], first_error(exc))
                print(f"  not run: {row['error']}", flush=True)
            summaries[job[:3]].append(row)
    return summaries


def _rows(args, model_name, mcfg, counts, summaries, cores, peaks,
          local_counts: dict | None = None) -> list[dict]:
    """The table's rows of one model: every precision, loss and variant (global backprop:
    its measurement with the first loss under each loss), with FLOP/s and MFU."""
    losses, rows = args.losses.split(","), []
    local_counts = local_counts or {}
    for precision in args.precisions:
        for loss in losses:
            local_flops, backbone = count_flops(ModelConfig(**mcfg),
                                                LossConfig(**loss_spec(args, loss)),
                                                INPUT_SHAPE, NUM_CLASSES, args.batch_size)
            for variant in args.variant_list:
                if variant in args.unrunnable:
                    row = not_run(variant, args.stages, max(1, cores // args.stages),
                                  args.unrunnable[variant])
                else:
                    key = (precision, loss, variant)
                    row = combine(summaries[key if key in summaries
                                            else (precision, losses[0], variant)])
                local = SCHEDULES[variant].local
                row.update(model=model_name, model_name=mcfg["name"], loss=loss,
                           precision=precision,
                           counts=local_counts.get(loss, counts) if local else counts,
                           local_modules=args.local_modules if local else "")
                if "error" not in row:
                    utilisation(row, local_flops if SCHEDULES[variant].local else backbone,
                                peaks, args.device)
                rows.append(row)
    return rows


def utilisation(row: dict, flops_per_sample: float, peaks: dict, device: str) -> None:
    """Achieved training FLOP/s per rank and as a fraction (MFU) of the peak of the row's
    arithmetic measured in this run (`peaks`: arithmetic -> FLOP/s of one GPU or one thread):
    on the CPU the one-thread peak times the threads the variant uses, on CUDA the peak of one
    GPU times the GPUs it uses."""
    row["peak_arithmetic"] = arithmetic_of(row["precision"], row["model_name"], device)
    peak_1 = peaks[row["peak_arithmetic"]]
    achieved = row["samples_per_s"] * flops_per_sample
    if device == "cuda":
        peak = peak_1 * min(row["ranks"], max(1, torch.cuda.device_count()))
    else:
        peak = peak_1 * row["ranks"] * row["threads_per_rank"]
    row.update(flops_per_sample=flops_per_sample, flop_per_s_per_rank=achieved / row["ranks"],
               mfu=achieved / peak)


def validate(model_name, loss, mcfg, costs, base, args, cores, measured=None) -> list[dict]:
    """Measured local-pipeline throughput at 1 thread per stage against the cost model.
    `measured`: summaries of local-pipeline runs already made in this invocation, by (loss,
    split, threads per rank); a check of the same configuration uses them (fp32, same batches)."""
    measured = measured or {}
    if args.validate_stages:
        counts_list = [int(s) for s in args.validate_stages.split(",")]
    else:
        counts_list = [s for s in (1, 2, 3, 4) if s <= max(2, cores)]
    local_costs = costs if loss == "predsim" else profile_blocks(
        ModelConfig(**mcfg), LossConfig(loss_sup=loss), INPUT_SHAPE, NUM_CLASSES,
        args.batch_size, torch.device(base["device"]))
    rows, link = [], None
    for S in counts_list:
        if S > len(costs) - 1:
            continue
        counts = balanced_split(fold_output([c.local_ms for c in local_costs]), S)
        spec = dict(base, loss={"loss_sup": loss}, threads=1, counts=counts)
        got = measured.get((loss, tuple(counts), 1)) if S == args.stages else None
        if got is not None:
            print(f"- {model_name} {loss} cost-model check, {S} stage(s): the local pipeline's "
                  "run above", flush=True)
        else:
            print(f"- {model_name} {loss} cost-model check, {S} stage(s) ...", flush=True)
            got = summarise("local", run_variant("local", spec, S, args.timeout), spec,
                            args.windows)
        link = got.get("link_bytes_per_s") or link or 1e9
        pred = predict(local_costs, counts, args.batch_size, link_bytes_per_s=link, cores=cores)
        rows.append({"model": model_name, "loss": loss, "stages": S, "counts": counts,
                     "predicted": pred["samples_per_s"], "measured": got["samples_per_s"],
                     "error": pred["samples_per_s"] / got["samples_per_s"] - 1,
                     "prediction": pred, "link_bytes_per_s": link})
    return rows


def _projection(args, model_name: str, costs) -> dict:
    """The model's FLOPs per sample and its projection to S GPUs (benchmarks/costmodel.py)."""
    flops = {"model": model_name, "backbone_flops_per_sample":
             sum(c.backbone_flops for c in costs) / args.batch_size,
             "local_train_flops_per_sample": sum(c.local_flops for c in costs) / args.batch_size,
             "blocks": [vars(c) for c in costs]}
    flops["heads_flops_per_sample"] = (flops["local_train_flops_per_sample"]
                                       - flops["backbone_flops_per_sample"])
    return {"model": model_name, "flops": flops,
            "rows": project(costs, args.batch_size, microbatches=args.microbatches)}


if __name__ == "__main__":
    raise SystemExit(main())
