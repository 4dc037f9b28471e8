"""The command line of `python -m benchmarks.throughput`: its flags, their checks (each a one-line
error), and the models they choose.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .schedules import DEFAULT_VARIANTS, PIPELINES, SCHEDULES, VARIANTS
from .sweep import SWEEP_BATCHES, SWEEP_WARMUP

MODEL_CHOICES = ("mlp", "vgg8b", "resnet18", "resnet32", "vit")
DEFAULT_MODELS = ("mlp", "vgg8b", "resnet18")
PRECISIONS = ["fp32", "bf16"]


def models(args) -> list[tuple[str, dict]]:
    """(name in the tables, model config) of every model the flags choose."""
    every = {
        "mlp": ("mlp3x1024", {"name": "mlp", "num_layers": 3, "num_hidden": 1024,
                              "nonlin": "leakyrelu"}),
        "vgg8b": (f"vgg8b x{args.feat_mult:g}", {"name": "vgg8b", "feat_mult": args.feat_mult,
                                                 "dim_in_decoder": 1024, "nonlin": "leakyrelu"}),
        # a residual network: units are whole residual blocks (9 of them)
        "resnet18": (f"resnet18 x{args.resnet_feat_mult:g}", {
            "name": "resnet18", "feat_mult": args.resnet_feat_mult, "dim_in_decoder": 1024,
            "nonlin": "leakyrelu"}),
        # the CIFAR ResNet of the local-learning literature: the stem and 15 basic blocks
        "resnet32": (f"resnet32 x{args.resnet32_feat_mult:g}", {
            "name": "resnet32", "feat_mult": args.resnet32_feat_mult}),
        # a Vision Transformer: units are the patch embedding and every transformer block
        "vit": (args.vit, {"name": args.vit}),
    }
    chosen = ["mlp"] if args.mlp_only else args.models
    return [every[m] for m in chosen]


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of what every run measures: split, batch, models, batches, repeats."""
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
    p.add_argument("--resnet32-feat-mult", type=float, default=0.25,
                   help="resnet32 width (0.25)")
    p.add_argument("--objectives", "--losses", dest="losses", default="predsim,pred",
                   metavar="NAMES", help="the local variants' objectives, comma-separated: any "
                   "registered name (predsim, pred, sim, dgl, infopro, ...; default "
                   "predsim,pred); the cost-model check uses the first")
    p.add_argument("--local-modules", default="", metavar="K|N1,N2,...",
                   help="group the units of the local variants into K local modules, as "
                   "`train --local-modules` does (default: one module per unit)")
    p.add_argument("--batches", type=int, default=30,
                   help="measured batches per run of a variant (30; earlier tables used 60)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up batches per run (5)")
    p.add_argument("--windows", type=int, default=5, help="windows per measured run (5)")
    p.add_argument("--repeats", type=int, default=2, help="runs of every variant, interleaved")
    p.add_argument("--quick", action="store_true", help="mlp only, predsim only, fewer batches")
    p.add_argument("--mlp-only", action="store_true")


def _add_choice_flags(p: argparse.ArgumentParser) -> None:
    """The flags of which variants run where, the cost model, the outputs and the time limit."""
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
    p.add_argument("--timeout", type=float, default=600, help="per variant, seconds")


def _add_mode_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the other two modes: the timelines and the activation-memory sweep."""
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


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    """The flags, checked; besides them: `models` and `precisions` as lists, `variant_list` (the
    variants to run, in table order), `sweep` and `sweep_microbatch`, `device` resolved and
    `unrunnable` (variant -> why it cannot run in this configuration)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_flags(p)
    _add_choice_flags(p)
    _add_mode_flags(p)
    args = p.parse_args(argv)
    if args.quick:
        args.mlp_only, args.losses, args.batches, args.warmup = True, "predsim", 30, 5
        args.repeats = 1
    _check_models(p, args)
    _check_objectives(p, args)
    _check_precisions(p, args)
    _check_variants(p, args)
    if args.batch_size % args.microbatches or args.batch_size % args.stages:
        p.error("--batch-size must be divisible by --microbatches and by --stages")
    _check_sweep(p, args)
    args.device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)
    args.unrunnable = _unrunnable(args)
    return args


def _comma_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _chosen(p: argparse.ArgumentParser, flag: str, text: str, choices, hint: str = "") -> list:
    """The comma-separated values of `flag`, each one of `choices`, or a one-line error."""
    values = _comma_list(text)
    bad = [v for v in values if v not in choices]
    if bad or not values:
        p.error(f"{flag}: unknown {', '.join(bad) or 'nothing given'}; choose from "
                f"{', '.join(choices)}{hint}")
    return values


def _check_models(p: argparse.ArgumentParser, args) -> None:
    args.models = _chosen(p, "--models", args.models, MODEL_CHOICES)
    if "vit" in args.models:
        from localloss_pp.models.vit import parse_vit
        try:
            parse_vit(args.vit)
        except ValueError as exc:
            p.error(f"--vit: {exc}")


def loss_spec(args, objective: str) -> dict:
    """The LossConfig fields of a local variant trained by `objective`."""
    spec = {"loss_sup": objective}
    if args.local_modules:
        spec["local_modules"] = args.local_modules
    return spec


def _check_objectives(p: argparse.ArgumentParser, args) -> None:
    """Every objective registered, and each one builds on every chosen model (the module
    sizes of --local-modules fit it; a head fits the model's shapes)."""
    from localloss_pp.config import LossConfig, ModelConfig
    from localloss_pp.models import build_model, registered_objectives
    from .common import INPUT_SHAPE, NUM_CLASSES
    names = registered_objectives()
    objectives = _chosen(p, "--objectives", args.losses, names)
    for name, mcfg in models(args):
        for objective in objectives:
            try:
                build_model(ModelConfig(**mcfg), LossConfig(**loss_spec(args, objective)),
                            INPUT_SHAPE, NUM_CLASSES, 0, materialize=())
            except (ValueError, TypeError) as exc:
                p.error(f"--objectives {objective}"
                        f"{' --local-modules ' + args.local_modules if args.local_modules else ''}"
                        f" on {name}: {exc}")
    if args.local_modules and (args.memory_sweep is not None or args.timeline):
        p.error("--local-modules goes with the throughput runs only; --memory-sweep and "
                "--timeline split the model by units (leave --local-modules out)")


def _check_precisions(p: argparse.ArgumentParser, args) -> None:
    args.precisions = _chosen(p, "--precision", args.precision, PRECISIONS,
                              " (comma-separated for several)")


def _check_variants(p: argparse.ArgumentParser, args) -> None:
    chosen = _comma_list(args.variants)
    unknown = [v for v in chosen if v not in SCHEDULES]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.stages == 1 and any(SCHEDULES[v].multi_rank for v in chosen):
        p.error("--stages 1: the ddp and pipeline-schedule variants need 2 or more ranks; leave "
                "them out with --variants local,local1,backprop1")
    args.variant_list = [v for v in VARIANTS if v in chosen or v == "local"]


def _check_sweep(p: argparse.ArgumentParser, args) -> None:
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


def _unrunnable(args) -> dict:
    """Variant -> why it cannot run here: with ranks sharing a GPU, every pipeline schedule
    (torch.distributed.pipelining needs point-to-point between CUDA tensors, which gloo does
    not have and NCCL does not do on one GPU). Says so in one line."""
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device != "cuda" or gpus >= args.stages:
        return {}
    why = (f"{args.stages} ranks share {gpus} GPU(s); torch.distributed.pipelining needs "
           "one GPU per rank (point-to-point between CUDA tensors)")
    unrunnable = {v: why for v in PIPELINES if v in args.variant_list}
    if unrunnable:
        print(f"({why}: {', '.join(unrunnable)} get a 'not run' row)")
    return unrunnable
