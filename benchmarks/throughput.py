"""Throughput of the local-loss pipeline against global backprop, on this machine, in one run.

    python -m benchmarks.throughput [--quick] [--models mlp,vgg8b,resnet18] [--stages S]
                                    [--microbatches M] [--precision fp32,bf16] [--json PATH]
                                    [--plot PATH] [--time-to-accuracy --data-dir DIR]
                                    [--memory-sweep 1,2,4,8 [--memory-plot PNG]
                                     [--memory-only]]

For each model (mlp 3x1024, vgg8b and resnet18 at MNIST size; --feat-mult and
--resnet-feat-mult shrink the conv nets; --models picks) and local loss
(predsim, pred) it runs, with the same global batch and the same synthetic in-memory batches:
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
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from localloss_pp.config import LossConfig, ModelConfig
from localloss_pp.pipeline.partition import balanced_split, fold_output

from .costmodel import (PROJECTION_ASSUMPTIONS, arithmetic_of, count_flops, matmul_peak_flops,
                        predict, profile_blocks, project)

ROOT = Path(__file__).resolve().parents[1]
INPUT_SHAPE, NUM_CLASSES = (1, 28, 28), 10
VARIANTS = ["local", "local1", "backprop1", "ddp", "gpipe", "1f1b", "i1f1b", "loopedbfs",
            "zb1p", "zbv", "dualpipev"]
# the pipeline schedules of torch.distributed.pipelining with V = 2 virtual stages per rank
VIRTUAL_VARIANTS = ("i1f1b", "loopedbfs", "zb1p", "zbv", "dualpipev")
PIPELINES = ("gpipe", "1f1b") + VIRTUAL_VARIANTS
DEFAULT_VARIANTS = ["local", "local1", "backprop1", "ddp", "gpipe", "1f1b", "i1f1b", "zb1p"]
PRECISIONS = ["fp32", "bf16"]
# the memory sweep: few batches per point (the figure is a peak, not a rate)
SWEEP_WARMUP, SWEEP_BATCHES = 2, 3
LABELS = {"local": "(a) local pipeline", "local1": "(b) local, 1 process",
          "backprop1": "(c) backprop, 1 process", "ddp": "(d) backprop DDP",
          "gpipe": "(e) backprop GPipe", "1f1b": "(f) backprop 1F1B",
          "i1f1b": "(g) backprop Interleaved1F1B", "loopedbfs": "(h) backprop LoopedBFS",
          "zb1p": "(i) backprop ZB1P", "zbv": "(j) backprop ZBV",
          "dualpipev": "(k) backprop DualPipeV"}
VIRTUAL = 2  # virtual stages per rank of the interleaved and V-shaped schedules


def environment() -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        rev = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "cuda": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "git_revision": rev}


MODEL_CHOICES = ("mlp", "vgg8b", "resnet18", "vit")
DEFAULT_MODELS = ("mlp", "vgg8b", "resnet18")


def models(args) -> list[tuple[str, dict]]:
    every = {
        "mlp": ("mlp3x1024", {"name": "mlp", "num_layers": 3, "num_hidden": 1024,
                              "nonlin": "leakyrelu"}),
        "vgg8b": (f"vgg8b x{args.feat_mult:g}", {"name": "vgg8b", "feat_mult": args.feat_mult,
                                                 "dim_in_decoder": 1024, "nonlin": "leakyrelu"}),
        # a residual network: units are whole residual blocks (9 of them)
        "resnet18": (f"resnet18 x{args.resnet_feat_mult:g}", {
            "name": "resnet18", "feat_mult": args.resnet_feat_mult, "dim_in_decoder": 1024,
            "nonlin": "leakyrelu"}),
        # a Vision Transformer: units are the patch embedding and every transformer block
        "vit": (args.vit, {"name": args.vit}),
    }
    chosen = ["mlp"] if args.mlp_only else args.models
    return [every[m] for m in chosen]


def run_variant(variant: str, spec: dict, ranks: int, timeout: float) -> list[dict]:
    """Launch one variant (torchrun for several ranks) and return every rank's JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(dict(spec, variant=variant)))
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(ranks), "-m", "benchmarks.worker", str(spec_path), tmp]
        else:
            cmd = [sys.executable, "-m", "benchmarks.worker", str(spec_path), tmp]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"variant {variant} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]


def summarise(variant: str, ranks: list[dict], spec: dict, windows: int) -> dict:
    rep = next(r for r in ranks if r.get("report"))
    stamps = rep["timestamps"]
    per = max(1, (len(stamps) - 1) // windows)
    rates = [per * spec["batch_size"] / (stamps[i + per] - stamps[i])
             for i in range(0, len(stamps) - per, per)]
    out = {"variant": variant, "label": LABELS[variant], "ranks": len(ranks),
           "threads_per_rank": ranks[0]["threads"], "samples_per_s": statistics.median(rates),
           "window_samples_per_s": rates,
           "peak_memory_mb": [round(r["peak_memory_bytes"] / 2 ** 20, 1) for r in ranks]}
    out.update(memory_summary(ranks))
    out["bytes_per_sample"] = sum(r.get("bytes_per_batch", 0) for r in ranks) / spec["batch_size"]
    out["bytes_how"] = "measured" if variant.startswith("local") else "analytic"
    if variant in ("local", "local1"):
        stages = [r["times"] for r in sorted(ranks, key=lambda r: r["rank"])]
        batch_rate = out["samples_per_s"] / spec["batch_size"]
        slowest = max(s["busy_s"] / max(s["batches"], 1) for s in stages)
        out["pipeline_efficiency"] = batch_rate * slowest
        out["bubble_fraction"] = 1 - statistics.mean(s["busy_fraction"] for s in stages)
        out["stages"] = [{k: s[k] for k in ("busy_fraction", "wait_recv_s", "wait_send_s",
                                             "busy_s", "wall_s", "batches")} for s in stages]
        out["link_bytes_per_s"] = next((r["link_bytes_per_s"] for r in ranks
                                        if r.get("link_bytes_per_s")), None)
    elif variant in PIPELINES:
        S, M = len(ranks), spec["microbatches"]
        if variant in ("gpipe", "1f1b"):
            out["bubble_ideal"] = (S - 1) / (M + S - 1)  # the schedule's ideal bubble
        elif variant in ("i1f1b", "loopedbfs"):
            out["bubble_ideal"] = (S - 1) / (VIRTUAL * M + S - 1)  # V chunks per rank
        busy = [r for r in ranks if r.get("busy_s") is not None and r.get("wall_s")]
        if len(busy) == len(ranks):  # measured (CPU): 1 - the ranks' mean busy fraction
            out["busy_fraction_per_rank"] = [r["busy_s"] / r["wall_s"] for r in
                                             sorted(busy, key=lambda r: r["rank"])]
            out["bubble_fraction"] = 1 - statistics.mean(out["busy_fraction_per_rank"])
            out["bubble_how"] = "measured"
        elif "bubble_ideal" in out:
            out["bubble_fraction"] = out["bubble_ideal"]
            out["bubble_how"] = "ideal"
    return out


def memory_summary(ranks: list[dict]) -> dict:
    """A variant's activation memory from its ranks' JSON (in rank order): per rank and the
    maximum over ranks of the saved activations (peak over the measured batches), the buffer
    bytes, and their sum (`activation_memory_bytes_*`); `buffers_measured` is false when some
    rank's buffers are computed from their shapes instead of read from the objects."""
    ranks = sorted(ranks, key=lambda r: r.get("rank", 0))
    if any(r.get("saved_activation_bytes") is None for r in ranks):
        return {}
    saved = [int(r["saved_activation_bytes"]) for r in ranks]
    buffers = [int(r.get("buffer_bytes", 0)) for r in ranks]
    return _memory_totals(saved, buffers, all(r.get("buffers_measured", True) for r in ranks),
                          [r.get("buffer_parts", {}) for r in ranks])


def _memory_totals(saved: list[int], buffers: list[int], measured: bool, parts: list) -> dict:
    act = [s + b for s, b in zip(saved, buffers)]
    return {"saved_activation_bytes_per_rank": saved, "saved_activation_bytes_max": max(saved),
            "buffer_bytes_per_rank": buffers, "buffer_bytes_max": max(buffers),
            "buffer_parts_per_rank": parts, "buffers_measured": measured,
            "activation_memory_bytes_per_rank": act, "activation_memory_bytes_max": max(act)}


def not_run(variant: str, ranks: int, threads: int, why: str) -> dict:
    """The row of a variant that could not run in this configuration, with the reason."""
    return {"variant": variant, "label": LABELS[variant], "ranks": ranks,
            "threads_per_rank": threads, "error": why}


def combine(reps: list[dict]) -> dict:
    """One row from the summaries of several repeats of the same variant."""
    failed = next((r for r in reps if "error" in r), None)
    if failed is not None:
        return dict(failed)
    out = dict(reps[-1])
    windows = [w for r in reps for w in r["window_samples_per_s"]]
    out["window_samples_per_s"] = windows
    out["samples_per_s"] = statistics.median(windows)
    out["repeat_samples_per_s"] = [r["samples_per_s"] for r in reps]
    out["peak_memory_mb"] = [max(v) for v in zip(*(r["peak_memory_mb"] for r in reps))]
    if all("saved_activation_bytes_per_rank" in r for r in reps):  # per rank, the largest
        out.update(_memory_totals(
            [max(v) for v in zip(*(r["saved_activation_bytes_per_rank"] for r in reps))],
            [max(v) for v in zip(*(r["buffer_bytes_per_rank"] for r in reps))],
            all(r["buffers_measured"] for r in reps), reps[-1]["buffer_parts_per_rank"]))
    for key in ("pipeline_efficiency", "bubble_fraction"):
        if key in out:
            out[key] = statistics.median(r[key] for r in reps)
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | loss | precision | variant | ranks x threads | samples/s | windows min-max "
             "| vs (a) | pipeline efficiency | idle/bubble | GFLOP/s per rank | MFU (peak) "
             "| peak MB/rank | act. MB/rank (saved + buffers) | bytes/sample |",
             "|" + "---|" * 15]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['loss']} | {r['precision']} | {r['label']} | "
                         f"{r['ranks']}x{r['threads_per_rank']} | not run: {r['error']} |"
                         + " |" * 9)
            continue
        eff = f"{r['pipeline_efficiency']:.3f}" if r["variant"] == "local" else "-"
        bub = f"{r['bubble_fraction']:.2f}" if "bubble_fraction" in r and \
            r["variant"] != "local1" else "-"
        if r.get("bubble_how") == "ideal":
            bub += " (ideal)"
        w = r["window_samples_per_s"]
        lines.append(f"| {r['model']} | {r['loss']} | {r['precision']} | {r['label']} | "
                     f"{r['ranks']}x"
                     f"{r['threads_per_rank']} | {r['samples_per_s']:.0f} | "
                     f"{min(w):.0f}-{max(w):.0f} | {r['samples_per_s'] / r['vs_local']:.2f} | "
                     f"{eff} | {bub} | {r['flop_per_s_per_rank'] / 1e9:.2f} | "
                     f"{100 * r['mfu']:.1f}% ({r['peak_arithmetic']}) | "
                     f"{max(r['peak_memory_mb']):.0f} | {_act_mb(r)} | "
                     f"{r['bytes_per_sample']:.0f} |")
    return "\n".join(lines)


def _act_mb(r: dict) -> str:
    """The activation memory cell: max over ranks of saved + buffers, in MB (* where buffers
    are computed from their shapes)."""
    if "activation_memory_bytes_max" not in r:
        return "-"
    star = "" if r.get("buffers_measured", True) else "*"
    return (f"{r['activation_memory_bytes_max'] / 2 ** 20:.2f}{star} "
            f"({r['saved_activation_bytes_max'] / 2 ** 20:.2f} + "
            f"{r['buffer_bytes_max'] / 2 ** 20:.2f})")


ACT_NOTE = ("act. MB/rank: the largest over ranks of the peak bytes autograd holds saved for "
            "backward over the measured batches (parameters and input batches excluded) plus "
            "the rank's buffers (receive buffers, sends in flight, DDP's gradient buckets); in "
            "brackets the largest saved and the largest buffers (ranks may differ); * buffers "
            "computed from their shapes, not read from the objects.")


def ratio_matrix(rows: list[dict]) -> str:
    names = [f"{r['label'].split()[0]}" for r in rows]
    lines = ["| row / column | " + " | ".join(names) + " |", "|" + "---|" * (len(rows) + 1)]
    for r, n in zip(rows, names):
        lines.append(f"| {n} | " + " | ".join(f"{r['samples_per_s'] / c['samples_per_s']:.2f}"
                                              for c in rows) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({_group(r) for r in results})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (model, loss, precision) in zip(axes[0], groups):
        rows = [r for r in results if _group(r) == (model, loss, precision) and "error" not in r]
        ax.bar([r["label"].split(" ", 1)[0] for r in rows], [r["samples_per_s"] for r in rows],
               color=["tab:green" if r["variant"].startswith("local") else "tab:gray"
                      for r in rows])
        ax.set_title(f"{model}, local loss {loss}, {precision}")
        ax.set_ylabel("samples/s")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=2, help="pipeline stages / DDP ranks (2)")
    p.add_argument("--microbatches", type=int, default=4, help="GPipe/1F1B micro-batches (4)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--feat-mult", type=float, default=0.25, help="vgg8b width (0.25)")
    p.add_argument("--resnet-feat-mult", type=float, default=0.125,
                   help="resnet18 width (0.125)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"which models, comma-separated, of {','.join(MODEL_CHOICES)} "
                   f"(default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--vit", default="vit-micro", metavar="NAME",
                   help="the ViT of --models vit (default vit-micro: 6 blocks, dim 64, patch 4)")
    p.add_argument("--losses", default="predsim,pred")
    p.add_argument("--batches", type=int, default=30,
                   help="measured batches per run of a variant (30; earlier tables used 60)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up batches per run (5)")
    p.add_argument("--windows", type=int, default=5, help="windows per measured run (5)")
    p.add_argument("--repeats", type=int, default=2, help="runs of every variant, interleaved")
    p.add_argument("--quick", action="store_true", help="mlp only, predsim only, fewer batches")
    p.add_argument("--mlp-only", action="store_true")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"which variants to run, comma-separated, of {','.join(VARIANTS)}; "
                   f"'local' is always run (default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--precision", default="fp32",
                   help="fp32, bf16 or both (fp32,bf16): every variant in each (default fp32)")
    p.add_argument("--no-costmodel", action="store_true")
    p.add_argument("--validate-stages", default=None,
                   help="stage counts to validate the cost model on (default 1,2 and every "
                   "count up to the cores)")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG chart here")
    p.add_argument("--time-to-accuracy", action="store_true",
                   help="instead: wall time to a target test error on real data")
    p.add_argument("--data-dir", default=None, help="with --time-to-accuracy: MNIST or "
                   "FashionMNIST under this folder")
    p.add_argument("--timeout", type=float, default=600, help="per variant, seconds")
    p.add_argument("--timeline", type=Path, default=None, metavar="PNG",
                   help="instead: profile a few batches of the local pipeline, GPipe and 1F1B "
                   "on the first model and draw their timelines one above the other")
    p.add_argument("--timeline-batches", type=int, default=4,
                   help="batches per timeline (4)")
    p.add_argument("--memory-sweep", default=None, metavar="M1,M2,...",
                   help="also measure the activation memory per rank of the pipelines (local and "
                   "the backprop schedules chosen) at these micro-batch counts M, each micro-batch "
                   "of a fixed size m: the schedules on a global batch of M x m, the local "
                   f"pipeline on batches of m ({SWEEP_WARMUP} warm-up, {SWEEP_BATCHES} measured "
                   "batches per point), e.g. 1,2,4,8")
    p.add_argument("--memory-microbatch-size", type=int, default=None, metavar="m",
                   help="the fixed micro-batch size of --memory-sweep (default: --batch-size / "
                   "--microbatches)")
    p.add_argument("--memory-plot", type=Path, default=None, metavar="PNG",
                   help="with --memory-sweep: draw MB per rank against M here")
    p.add_argument("--memory-only", action="store_true",
                   help="with --memory-sweep: only the sweep (no throughput runs, no cost model; "
                   "stages split by equal block counts)")
    args, rest = p.parse_known_args(argv)
    if args.time_to_accuracy:
        return args, rest
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.quick:
        args.mlp_only, args.losses, args.batches, args.warmup = True, "predsim", 30, 5
        args.repeats = 1
        if args.variants == ",".join(DEFAULT_VARIANTS):
            args.variants = "local,local1,backprop1,ddp,gpipe,1f1b,i1f1b,zb1p"
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODEL_CHOICES]
    if bad or not args.models:
        p.error(f"--models: unknown {', '.join(bad) or 'nothing given'}; choose from "
                f"{', '.join(MODEL_CHOICES)}")
    if "vit" in args.models:
        from localloss_pp.models.vit import parse_vit
        try:
            parse_vit(args.vit)
        except ValueError as exc:
            p.error(f"--vit: {exc}")
    args.precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    wrong = [x for x in args.precisions if x not in PRECISIONS]
    if wrong or not args.precisions:
        p.error(f"--precision: unknown {', '.join(wrong) or 'nothing given'}; choose from "
                f"{', '.join(PRECISIONS)} (comma-separated for several)")
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.stages == 1 and any(v in chosen for v in ("ddp",) + PIPELINES):
        p.error("--stages 1: the ddp and pipeline-schedule variants need 2 or more ranks; leave "
                "them out with --variants local,local1,backprop1")
    args.variant_list = [v for v in VARIANTS if v in chosen or v == "local"]
    if args.batch_size % args.microbatches or args.batch_size % args.stages:
        p.error("--batch-size must be divisible by --microbatches and by --stages")
    args.sweep = []
    if args.memory_sweep is not None:
        try:
            args.sweep = [int(x) for x in args.memory_sweep.split(",") if x.strip()]
        except ValueError:
            args.sweep = []
        if not args.sweep or min(args.sweep) < 1:
            p.error(f"--memory-sweep {args.memory_sweep}: give micro-batch counts >= 1, "
                    "comma-separated, e.g. 1,2,4,8")
        args.sweep = sorted(set(args.sweep))
        if args.stages < 2:
            p.error("--memory-sweep: the pipelines need --stages 2 or more")
    elif args.memory_plot or args.memory_only or args.memory_microbatch_size is not None:
        p.error("--memory-plot, --memory-only and --memory-microbatch-size go with "
                "--memory-sweep M1,M2,...")
    if args.memory_microbatch_size is not None and args.memory_microbatch_size < 1:
        p.error(f"--memory-microbatch-size must be >= 1, got {args.memory_microbatch_size}")
    args.sweep_microbatch = args.memory_microbatch_size or args.batch_size // args.microbatches
    args.device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    args.unrunnable = {}  # variant -> why it cannot run in this configuration
    if args.device == "cuda" and gpus < args.stages:
        # ranks share a GPU: torch.distributed.pipelining's schedules need point-to-point
        # between CUDA tensors, which gloo does not have and NCCL does not do on one GPU
        why = (f"{args.stages} ranks share {gpus} GPU(s); torch.distributed.pipelining needs "
               "one GPU per rank (point-to-point between CUDA tensors)")
        args.unrunnable = {v: why for v in PIPELINES if v in args.variant_list}
        if args.unrunnable:
            print(f"({why}: {', '.join(args.unrunnable)} get a 'not run' row)")
    return args, rest


def _base_spec(args, mcfg: dict) -> dict:
    """What every run of one model shares."""
    return {"model": mcfg, "batch_size": args.batch_size, "warmup": args.warmup,
            "batches": args.batches, "microbatches": args.microbatches, "device": args.device}


def _jobs(args, mcfg: dict, counts, cores: int) -> list[tuple]:
    """(precision, loss, variant, ranks, spec) of every run of one model."""
    base = _base_spec(args, mcfg)
    S, jobs = args.stages, []
    for precision in args.precisions:
        for i, loss in enumerate(args.losses.split(",")):
            for variant in args.variant_list:
                if variant in args.unrunnable:
                    continue  # a 'not run' row (run_model)
                if variant in ("backprop1", "ddp") + PIPELINES and i > 0:
                    continue  # global backprop does not use the local loss: measured once
                ranks = 1 if variant in ("local1", "backprop1") else S
                threads = cores if ranks == 1 else max(1, cores // S)
                jobs.append((precision, loss, variant, ranks, dict(
                    base, loss={"loss_sup": loss}, threads=threads, precision=precision,
                    counts=counts or balanced_split([1.0] * _num_blocks(mcfg), S),
                    vcounts=_virtual_counts(_num_blocks(mcfg) + 1, S * VIRTUAL))))
    return jobs


def _virtual_counts(units: int, chunks: int) -> list[int]:
    """Units (blocks and the output layer) per virtual stage: contiguous, as equal as the
    counts allow; [] when there are fewer units than virtual stages (the worker says so)."""
    if units < chunks:
        return []
    return [units // chunks + (1 if c < units % chunks else 0) for c in range(chunks)]


def _why(exc: Exception) -> str:
    """The reason a variant's launch failed, in one line: its first Python error."""
    text = str(exc)
    m = re.search(r"\[rank\d+\]: (\w+(?:Error|Exception): [^\n]*)", text)
    line = m.group(1) if m else next((ln for ln in reversed(text.splitlines()) if ln.strip()),
                                     text)
    return line.strip()[:160]


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


def run_model(args, model_name: str, mcfg: dict, cores: int, peaks: dict) -> tuple:
    """Every variant of one model: (result rows, cost-model rows, projection or None)."""
    mcfg = dict(mcfg, dropout=0.0)
    device = torch.device(args.device)
    costs = None if args.no_costmodel else profile_blocks(
        ModelConfig(**mcfg), LossConfig(), INPUT_SHAPE, NUM_CLASSES, args.batch_size, device)
    counts = balanced_split(fold_output([c.local_ms for c in costs]), args.stages) \
        if costs else None
    jobs = _jobs(args, mcfg, counts, cores)
    summaries = {j[:3]: [] for j in jobs}
    for rep in range(args.repeats):  # repeats interleaved: slow phases hit every variant
        for precision, loss, variant, ranks, spec in jobs:
            print(f"- {model_name} {loss} {precision} {LABELS[variant]} (repeat {rep + 1}) ...",
                  flush=True)
            try:
                row = summarise(variant, run_variant(variant, spec, ranks, args.timeout), spec,
                                args.windows)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                if variant not in VIRTUAL_VARIANTS:
                    raise
                # a schedule that cannot run here (its constraints on M, S or the units) is a
                # row that says why, never a silent omission
                row = not_run(variant, ranks, spec["threads"], _why(exc))
                print(f"  not run: {row['error']}", flush=True)
            summaries[(precision, loss, variant)].append(row)
    losses = args.losses.split(",")
    backbone = None
    rows = []
    for precision in args.precisions:
        for loss in losses:
            local_flops, backbone = count_flops(ModelConfig(**mcfg), LossConfig(loss_sup=loss),
                                                INPUT_SHAPE, NUM_CLASSES, args.batch_size)
            for variant in args.variant_list:
                if variant in args.unrunnable:
                    ranks = args.stages
                    rows.append(dict(not_run(variant, ranks, max(1, cores // ranks),
                                             args.unrunnable[variant]),
                                     model=model_name, model_name=mcfg["name"], loss=loss,
                                     precision=precision, counts=jobs[0][4]["counts"]))
                    continue
                key = (precision, loss, variant)
                if key not in summaries:  # backprop: measured with the first loss only
                    key = (precision, losses[0], variant)
                row = combine(summaries[key])
                row.update(model=model_name, model_name=mcfg["name"], loss=loss,
                           precision=precision, counts=jobs[0][4]["counts"])
                if "error" not in row:
                    utilisation(row, local_flops if variant.startswith("local") else backbone,
                                peaks, args.device)
                rows.append(row)
    if costs is None:
        return rows, [], None
    # the local pipeline's runs above, by (loss, split, threads): the cost-model check of the
    # same configuration reuses them instead of launching it again
    measured = {(r["loss"], tuple(r["counts"]), r["threads_per_rank"]): r for r in rows
                if r["variant"] == "local" and r["precision"] == "fp32" and "error" not in r}
    checks = validate(model_name, losses[0], mcfg, costs, _base_spec(args, mcfg), args, cores,
                      measured)
    flops = {"model": model_name, "backbone_flops_per_sample":
             sum(c.backbone_flops for c in costs) / args.batch_size,
             "local_train_flops_per_sample": sum(c.local_flops for c in costs) / args.batch_size,
             "blocks": [vars(c) for c in costs]}
    flops["heads_flops_per_sample"] = (flops["local_train_flops_per_sample"]
                                       - flops["backbone_flops_per_sample"])
    return rows, checks, {"model": model_name, "flops": flops,
                          "rows": project(costs, args.batch_size,
                                          microbatches=args.microbatches)}


def memory_sweep(args, model_name: str, mcfg: dict, counts, cores: int) -> list[dict]:
    """Activation memory per rank of the pipelines at each M of --memory-sweep, micro-batches
    of a fixed size m: the backprop schedules (GPipe, 1F1B and the virtual-stage ones chosen
    with --variants) train a global batch of M x m in M micro-batches, as they must to keep the
    pipeline full; the local pipeline has no micro-batches and streams batches of m: measured
    at every M all the same (one launch per variant runs every M in turn). One row per variant,
    loss (the local pipeline: each loss; the schedules: the first, they do not use it),
    precision and M; a point or a launch that fails gets a row with its error."""
    mcfg = dict(mcfg, dropout=0.0)
    S, m = args.stages, args.sweep_microbatch
    counts = counts or balanced_split([1.0] * _num_blocks(mcfg), S)
    losses = args.losses.split(",")
    base = dict(_base_spec(args, mcfg), warmup=SWEEP_WARMUP, batches=SWEEP_BATCHES,
                threads=max(1, cores // S), counts=counts,
                vcounts=_virtual_counts(_num_blocks(mcfg) + 1, S * VIRTUAL))
    jobs = [(loss, "local") for loss in losses] + \
        [(losses[0], v) for v in args.variant_list if v in PIPELINES]
    unrunnable = getattr(args, "unrunnable", {})
    rows = []
    for precision in args.precisions:
        for loss, variant in jobs:
            local = variant == "local"
            points = [{"microbatches": M, "batch_size": m if local else M * m}
                      for M in args.sweep]
            spec = dict(base, loss={"loss_sup": loss}, precision=precision, points=points)
            if variant in unrunnable:
                rows += [{"model": model_name, "loss": "-", "precision": precision,
                          "variant": variant, "label": LABELS[variant], "ranks": S,
                          "microbatches": pt["microbatches"], "micro_batch_size": m,
                          "batch_size": pt["batch_size"], "counts": counts,
                          "error": unrunnable[variant]} for pt in points]
                continue
            print(f"- {model_name} memory sweep, {LABELS[variant]}"
                  f"{' ' + loss if local else ''} {precision}, M = "
                  f"{','.join(map(str, args.sweep))} ...", flush=True)
            try:
                ranks = sorted(run_variant(variant, spec, S, args.timeout),
                               key=lambda r: r["rank"])
                per_point = [[dict(r["points"][i], rank=r["rank"]) for r in ranks]
                             for i in range(len(points))]
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                why = _why(exc)
                print(f"  not run: {why}", flush=True)
                per_point = [[{"error": why}] for _ in points]
            for point, ranks_of_point in zip(points, per_point):
                row = {"model": model_name, "loss": loss if local else "-",
                       "precision": precision, "variant": variant, "label": LABELS[variant],
                       "ranks": S, "microbatches": point["microbatches"],
                       "micro_batch_size": m, "batch_size": point["batch_size"],
                       "counts": counts}
                error = next((r["error"] for r in ranks_of_point if "error" in r), None)
                if error is not None:
                    row["error"] = error
                else:
                    row.update(memory_summary(ranks_of_point))
                rows.append(row)
    return rows


def sweep_markdown(rows: list[dict], sweep: list[int]) -> str:
    """Rows: variant (and loss, precision); columns: M; cells: MB per rank (max over ranks of
    saved activations + buffers), or "not run: reason"."""
    lines = ["| model | loss | precision | variant | " +
             " | ".join(f"M={M}" for M in sweep) + " |", "|" + "---|" * (4 + len(sweep))]
    keys = []
    for r in rows:
        key = (r["model"], r["loss"], r["precision"], r["variant"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        cells = {r["microbatches"]: r for r in rows
                 if (r["model"], r["loss"], r["precision"], r["variant"]) == key}
        out = []
        for M in sweep:
            r = cells.get(M)
            if r is None or "error" in r:
                out.append(f"not run: {r['error'] if r else 'no result'}")
            else:
                star = "" if r["buffers_measured"] else "*"
                out.append(f"{r['activation_memory_bytes_max'] / 2 ** 20:.2f}{star}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {LABELS[key[3]]} | " +
                     " | ".join(out) + " |")
    return "\n".join(lines)


def sweep_plot(rows: list[dict], sweep: list[int], path: Path) -> None:
    """MB per rank (max over ranks of saved + buffers) against M, one line per variant (and
    loss), one panel per model and precision; points that did not run are left out (the
    table says why)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    for r in rows:
        if (r["model"], r["precision"]) not in panels:
            panels.append((r["model"], r["precision"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (model, precision) in zip(axes[0], panels):
        lines = []
        for r in rows:
            if (r["model"], r["precision"]) == (model, precision) and \
                    (r["variant"], r["loss"]) not in lines:
                lines.append((r["variant"], r["loss"]))
        palette = iter(["tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown",
                        "tab:pink", "tab:gray", "tab:olive", "tab:cyan"] * 2)
        styles = iter(["-", "--", ":", "-."] * 4)  # the local pipeline, one line per loss
        for variant, loss in lines:
            pts = {r["microbatches"]: r for r in rows if (r["model"], r["precision"],
                                                          r["variant"], r["loss"]) ==
                   (model, precision, variant, loss)}
            ys = [pts[M]["activation_memory_bytes_max"] / 2 ** 20
                  if M in pts and "error" not in pts[M] else float("nan") for M in sweep]
            label = LABELS[variant] + (f" ({loss})" if variant == "local" else "")
            local = variant == "local"
            ax.plot(sweep, ys, marker="o", label=label, linewidth=2.5 if local else 1.5,
                    color="tab:green" if local else next(palette),
                    linestyle=next(styles) if local else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sweep, [str(M) for M in sweep])
        ax.set_xlabel(f"micro-batches M (micro-batch of {rows[0]['micro_batch_size']} samples)")
        ax.set_ylabel("activation memory, MB per rank (max over ranks)")
        ax.set_title(f"{model}, {precision}: saved activations + buffers")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


SWEEP_NOTE = ("MB per rank: the largest over the ranks of the peak bytes autograd holds saved "
              "for backward over the measured batches (parameters and input batches excluded) "
              "plus the rank's buffers (receive buffers and sends in flight); * buffers "
              "computed from their shapes. The schedules run a global batch of M x m in M "
              "micro-batches; the local pipeline runs batches of m at every M (it has no "
              "micro-batches).")


def _group(r: dict) -> tuple:
    return r["model"], r["loss"], r["precision"]


def report(results, costmodel_rows, projection, peaks: dict, device: str) -> None:
    for group in sorted({_group(r) for r in results}):
        rows = [r for r in results if _group(r) == group]
        ref = next(r for r in rows if r["variant"] == "local")["samples_per_s"]
        for r in rows:
            r["vs_local"] = ref
    print("\n## Throughput (samples/s: median over windows; 'vs (a)': this / local pipeline)\n")
    print(markdown(results))
    print("\n" + ACT_NOTE)
    unit = "GPU" if device == "cuda" else "thread"
    print("\nMFU: achieved matmul/conv training FLOP/s over the matmul peak of the arithmetic "
          "the row runs (in brackets), measured in this run (" + ", ".join(
              f"{name} {flops / 1e9:.1f} GFLOP/s" for name, flops in peaks.items()) +
          f" per {unit}), times the {unit}s each variant uses.")
    for group in sorted({_group(r) for r in results}):
        rows = [r for r in results if _group(r) == group and "error" not in r]
        print(f"\n### Ratios, {' '.join(group)} (row samples/s / column samples/s)\n")
        print(ratio_matrix(rows))
        for r in rows:
            if "stages" in r:
                print(f"\n{r['label']}: " + "; ".join(
                    f"stage {i + 1} busy {100 * s['busy_fraction']:.0f}% recv-wait "
                    f"{s['wait_recv_s']:.2f}s send-wait {s['wait_send_s']:.2f}s"
                    for i, s in enumerate(r["stages"])))
    if projection:
        print("\n## FLOPs per sample (matmul/conv, training step)\n")
        print("| model | backbone (fwd+bwd) | local heads (extra) | heads / backbone |")
        print("|---|---|---|---|")
        for pj in projection:
            f = pj["flops"]
            print(f"| {pj['model']} | {f['backbone_flops_per_sample'] / 1e6:.1f} MFLOP | "
                  f"{f['heads_flops_per_sample'] / 1e6:.1f} MFLOP | "
                  f"{f['heads_flops_per_sample'] / f['backbone_flops_per_sample']:.2f} |")
    if costmodel_rows:
        print("\n## Cost model vs measurement (local pipeline, 1 thread per stage)\n")
        print("| model | loss | stages | partition | predicted | measured | error |")
        print("|---|---|---|---|---|---|---|")
        for c in costmodel_rows:
            print(f"| {c['model']} | {c['loss']} | {c['stages']} | {c['counts']} | "
                  f"{c['predicted']:.0f} | {c['measured']:.0f} | {100 * c['error']:+.1f}% |")
    if projection:
        print("\n## PROJECTION (not measured): S GPUs, a network of S blocks like the model's "
              "average block\n")
        print(PROJECTION_ASSUMPTIONS + "\n")
        print("| model | link | S | local / 1 GPU | GPipe,1F1B / 1 GPU | DDP / 1 GPU | bubble |")
        print("|---|---|---|---|---|---|---|")
        for pj in projection:
            for r in pj["rows"]:
                if r["stages"] in (2, 4, 8, 16):
                    print(f"| {pj['model']} | {r['link']} | {r['stages']} | "
                          f"{r['local_vs_one_gpu']:.2f} | {r['pp_vs_one_gpu']:.2f} | "
                          f"{r['ddp_vs_one_gpu']:.2f} | {r['bubble']:.2f} |")


def timelines(args, cores: int) -> int:
    """Profiler timelines of the local pipeline, GPipe and 1F1B on the same model, split, batch
    and ranks, one above the other on one time scale (--timeline PNG)."""
    from localloss_pp.observe.profiling import plot_timelines
    model_name, mcfg = models(args)[0]
    S = args.stages
    counts = balanced_split([1.0] * _num_blocks(mcfg), S)
    groups = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, title in (("local", "local pipeline (local losses, no backward between "
                                          "stages)"),
                               ("gpipe", f"GPipe, {args.microbatches} micro-batches (global "
                                         "backprop)"),
                               ("1f1b", f"1F1B, {args.microbatches} micro-batches (global "
                                        "backprop)")):
            if variant != "local" and variant not in args.variant_list:
                continue
            folder = Path(tmp) / variant
            spec = dict(_base_spec(args, mcfg), loss={"loss_sup": args.losses.split(",")[0]},
                        threads=max(1, cores // S), counts=counts,
                        trace={"dir": str(folder), "start": 2, "steps": args.timeline_batches})
            print(f"- {model_name} {variant}: tracing {args.timeline_batches} batches ...",
                  flush=True)
            run_variant(variant, spec, S, args.timeout)
            groups.append((f"{model_name}, {S} stages: {title}",
                           sorted(folder.glob("stage*.json"))))
        out = plot_timelines(groups, args.timeline)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    args, rest = parse_args(argv)
    if args.time_to_accuracy:
        from .tta import main as tta_main
        return tta_main(rest + (["--data-dir", args.data_dir] if args.data_dir else []) +
                        (["--json", str(args.json)] if args.json else []) +
                        (["--plot", str(args.plot)] if args.plot else []))
    cores = os.cpu_count() or 1
    if args.timeline:
        return timelines(args, cores)
    env_info = environment()
    print("# localloss-pp throughput benchmark")
    print(json.dumps({"environment": env_info, "config": {k: (str(v) if isinstance(v, Path)
                                                             else v)
                                                         for k, v in vars(args).items()}},
                     indent=1))
    torch.set_num_threads(1)  # per-block costs and the matmul peaks at one thread
    needed = sorted({arithmetic_of(p, m["name"], args.device) for p in args.precisions
                     for _, m in models(args)}) if not args.memory_only else []
    peaks = {name: matmul_peak_flops(torch.device(args.device), arithmetic=name)
             for name in needed}
    for name, flops in peaks.items():
        print(f"{name} matmul peak: {flops / 1e9:.1f} GFLOP/s per "
              f"{'GPU' if args.device == 'cuda' else 'thread'}", flush=True)
    results, costmodel_rows, projection, sweep_rows = [], [], [], []
    for model_name, mcfg in models(args):
        counts = None
        if not args.memory_only:
            rows, checks, pj = run_model(args, model_name, mcfg, cores, peaks)
            results += rows
            costmodel_rows += checks
            if pj is not None:
                projection.append(pj)
            counts = rows[0]["counts"]  # the sweep uses the same split
        if args.sweep:
            sweep_rows += memory_sweep(args, model_name, mcfg, counts, cores)
    if results:
        report(results, costmodel_rows, projection, peaks, args.device)
    sweep = None
    if args.sweep:
        print(f"\n## Activation memory per rank against M (MB; micro-batches of "
              f"{args.sweep_microbatch} samples, {args.stages} ranks)\n")
        print(sweep_markdown(sweep_rows, args.sweep))
        print("\n" + SWEEP_NOTE)
        sweep = {"microbatches": args.sweep, "micro_batch_size": args.sweep_microbatch,
                 "warmup": SWEEP_WARMUP, "batches": SWEEP_BATCHES, "rows": sweep_rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env_info, "config": vars(args) | {
            "json": str(args.json), "plot": str(args.plot)}, "results": results,
            "matmul_peak_flops": peaks, "costmodel": costmodel_rows,
            "projection": projection, "memory_sweep": sweep}, indent=1, default=str))
        print(f"\nwrote {args.json}")
    if args.plot and results:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    if args.memory_plot and sweep_rows:
        sweep_plot(sweep_rows, args.sweep, args.memory_plot)
        print(f"wrote {args.memory_plot}")
    return 0


def _num_blocks(mcfg: dict) -> int:
    from localloss_pp.models import build_model
    return len(build_model(ModelConfig(**mcfg), LossConfig(), INPUT_SHAPE, NUM_CLASSES, 0,
                           materialize=()).blocks)


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


if __name__ == "__main__":
    raise SystemExit(main())
