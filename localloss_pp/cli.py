"""`localloss-pp` command line: train, params, plot, timeline, compare.

Errors in the input (bad flags, bad config, missing data) print one line and exit with status 2;
set LOCALLOSS_PP_DEBUG=1 to see the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from localloss_pp import __version__
from localloss_pp.config import Config, ModelConfig
from localloss_pp.data.registry import registered_datasets
from localloss_pp.flags import add_config_arguments, config_from_args
from localloss_pp.errors import first_line, os_error_line, write_error_note

__all__ = ["main", "build_parser", "load_config"]

log = logging.getLogger(__name__)

# (model, dataset, feat-mult, num-layers, num-hidden) rows of docs/algorithm.md section 5.3
PARAM_TABLE = [
    ("mlp", "MNIST", 1, 3, 1024), ("mlp", "CIFAR10", 1, 3, 3000), ("mlp", "CIFAR100", 1, 3, 3000),
    ("vgg8b", "MNIST", 1, 1, 1024), ("vgg8b", "FashionMNIST", 2, 1, 1024),
    ("vgg8b", "CIFAR10", 1, 1, 1024), ("vgg8b", "CIFAR100", 1, 1, 1024),
    ("vgg8b", "STL10", 1, 1, 1024), ("vgg11b", "CIFAR10", 1, 1, 1024),
    ("vgg11b", "CIFAR100", 1, 1, 1024), ("vgg11b", "CIFAR10", 2, 1, 1024),
    ("vgg11b", "CIFAR100", 2, 1, 1024), ("vgg11b", "CIFAR10", 3, 1, 1024),
    ("vgg11b", "CIFAR100", 3, 1, 1024), ("vit-micro", "MNIST", 1, 3, 1024),
    ("vit-tiny", "CIFAR10", 1, 3, 1024),
]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage of `train` is dozens of lines, and an error
    should be one line that says what is wrong and where the help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="localloss-pp", description="Train networks with local error signals.")
    parser.add_argument("--version", action="version", version=f"localloss-pp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train a model (the reference's flags work)",
                           description="Train a model. With no --dataset/--model (and no config "
                           "naming them) this is the quick-start run: a 3x1024 mlp trained with "
                           "predsim on the embedded mnist5k dataset.")
    add_config_arguments(train)
    params = sub.add_parser("params", help="print the paper's parameter count of a model")
    params.add_argument("--model", default="vgg8b", metavar="NAME",
                        help="mlp, vgg6a ... vgg19, resnet18 ... resnet152, "
                        "wresnet<depth>-<width>[a], vit-<depth>-<dim>[-p<patch>][-h<heads>]"
                        "[-m<mlp ratio>], vit-nano, vit-micro, vit-tiny (default: vgg8b)")
    params.add_argument("--dataset", default="CIFAR10", metavar="NAME",
                        help=f"one of {', '.join(registered_datasets())}, or folder:PATH "
                        "(default: CIFAR10)")
    params.add_argument("--feat-mult", type=float, default=1.0, metavar="F",
                        help="factor on every conv layer's channel count (default: 1.0)")
    params.add_argument("--num-layers", type=int, default=None, metavar="N",
                        help="hidden FC layers (default: 3 for mlp, 1 for vgg)")
    params.add_argument("--num-hidden", type=int, default=1024, metavar="N",
                        help="width of every hidden linear block (default: 1024)")
    params.add_argument("--no-batch-norm", action="store_true", help="blocks without BatchNorm")
    params.add_argument("--loss-sup", default=None, metavar="NAME",
                        help="also show the local modules this objective trains: each one's "
                        "units, parameters, and its head's parameters and forward FLOPs "
                        "relative to the module's")
    params.add_argument("--local-modules", default="", metavar="K",
                        help="with --loss-sup: K modules, or the units of each (3,3,2)")
    params.add_argument("--objective-module", default="", metavar="MODULE",
                        help="with --loss-sup: import this module first (your objectives)")
    params.add_argument("--table", action="store_true",
                        help="also print every model/dataset row of the paper's table")
    plot = sub.add_parser("plot", help="write PNG curves of a run directory")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    plot.add_argument("--out", default=None, metavar="DIR",
                      help="output folder (default: the run directory)")
    plot.add_argument("--epochs", default=None, metavar="E1,E2,...",
                      help="epochs of the error-vs-depth picture (default: first, middle, last)")
    timeline = sub.add_parser("timeline", help="draw the profiled batches of every stage "
                              "(train with --profile EPOCH:START:STEPS) on one time axis")
    timeline.add_argument("run_dir", metavar="RUN_DIR",
                          help="a run directory trained with --profile")
    timeline.add_argument("--out", default=None, metavar="PNG",
                          help="PNG path (default: RUN_DIR/timeline.png)")
    compare = sub.add_parser("compare", help="runs side by side: errors, speed, digests and "
                             "the config keys that differ")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                         help="two or more run directories")
    compare.add_argument("--plot", default=None, metavar="PNG",
                         help="also overlay the test-error curves (per epoch and wall time)")
    return parser


def _info(data):
    """The dataset's info; an image folder's is read from the folder (and its cache)."""
    from localloss_pp.data.registry import dataset_info
    info = dataset_info(data)
    if info is None:  # an image folder: its classes and its images' headers say enough
        from localloss_pp.data.folder import scan_folder
        from localloss_pp.data.registry import DatasetInfo
        scan = scan_folder(data)
        channels = 1 if scan.mode == "L" else 3
        info = DatasetInfo((channels, scan.size, scan.size), len(scan.classes),
                           (0.0,) * channels, (1.0,) * channels)
    return info


def _count(model: str, dataset: str, feat_mult: float, num_layers: int, num_hidden: int,
           batch_norm: bool = True) -> tuple[int, list]:
    from localloss_pp.config import LossConfig, validate, Config, DataConfig
    from localloss_pp.models import build_model, resolve_model
    cfg = Config(model=ModelConfig(name=model, feat_mult=feat_mult, num_layers=num_layers,
                                   num_hidden=num_hidden, batch_norm=batch_norm),
                 data=DataConfig(dataset=dataset))
    validate(cfg)
    resolve_model(cfg.model)
    info = _info(cfg.data)
    net = build_model(cfg.model, LossConfig(backprop=True), info.input_shape, info.num_classes, 0,
                      materialize=())
    rows = [(str(b.index), b, sum(p.numel() for p in b.parameters())) for b in net.blocks]
    rows.append(("output", net.output, sum(p.numel() for p in net.output.parameters())))
    return sum(r[2] for r in rows), rows


def _module_table(args, num_layers: int) -> None:
    """The local modules of `--loss-sup` (heads included): per module its units, parameters,
    head parameters, and the head's forward FLOPs per example over the module's."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from localloss_pp.config import DataConfig, LossConfig, validate
    from localloss_pp.models import build_model, resolve_model, resolve_objective
    cfg = Config(model=ModelConfig(name=args.model, feat_mult=args.feat_mult,
                                   num_layers=num_layers, num_hidden=args.num_hidden,
                                   batch_norm=not args.no_batch_norm),
                 loss=LossConfig(loss_sup=args.loss_sup, module=args.objective_module,
                                 local_modules=args.local_modules),
                 data=DataConfig(dataset=args.dataset))
    validate(cfg)
    resolve_model(cfg.model)
    resolve_objective(cfg.loss)
    loss, info = cfg.loss, _info(cfg.data)
    net = build_model(cfg.model, loss, info.input_shape, info.num_classes, 0, materialize=())
    net.eval()

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()
    print(f"\nlocal modules of --loss-sup {loss.loss_sup}"
          f"{' --local-modules ' + loss.local_modules if loss.local_modules else ''} "
          "(head FLOPs: its forward per example over the module's)")
    print(f"{'module':>6}  {'units':>6} {'params':>12} {'head params':>12} {'head FLOPs':>10}")
    y = torch.zeros(1, dtype=torch.long, device="meta")
    y1h = torch.zeros(1, info.num_classes, device="meta")
    image = torch.empty(1, *info.input_shape, device="meta")
    for unit in net.blocks:
        x = torch.empty(1, *unit.in_shape, device="meta")
        head = getattr(unit, "head", None)
        n = sum(p.numel() for p in unit.parameters())
        if head is None:  # the paper's per-layer heads, inside the unit
            print(f"{unit.index:>6}  {1:>6} {n:>12,} {'(per layer)':>12}")
            continue
        body = flops(lambda: unit.forward_parts(x, False))
        h = unit.forward_parts(x, False)[0]
        extra = flops(lambda: head.loss(h, y, y1h, x=x, image=image))
        heads = sum(p.numel() for p in head.parameters())
        print(f"{unit.index:>6}  {len(unit.members):>6} {n - heads:>12,} {heads:>12,} "
              f"{100 * extra / max(body, 1):>9.1f}%")
    out = net.output
    members = len(getattr(out, "members", []))
    print(f"{'output':>6}  {members:>6} {sum(p.numel() for p in out.parameters()):>12,} "
          f"{'(the network classifier)':>12}")


def _cmd_params(args) -> int:
    num_layers = args.num_layers if args.num_layers is not None else (
        3 if args.model.lower() == "mlp" else 1)
    total, rows = _count(args.model, args.dataset, args.feat_mult, num_layers, args.num_hidden,
                         not args.no_batch_norm)
    if args.model.lower().startswith("vit"):  # width and depth are in the name
        print(f"{args.model} on {args.dataset} (backprop-mode count, LayerNorms included, local "
              "heads excluded)")
    else:
        print(f"{args.model} on {args.dataset}, feat-mult {args.feat_mult}, {num_layers} hidden "
              f"FC layer(s) of {args.num_hidden} (backprop-mode count, BN affine included, "
              "local heads excluded)")
    width = max([28] + [len(unit.describe()) for _, unit, _ in rows])
    print(f"{'unit':>6}  {'layer':<{width}} {'params':>12}")
    for name, unit, n in rows:
        layer = unit.describe()
        print(f"{name:>6}  {layer:<{width}} {n:>12,}")
    print(f"total: {total} ({total / 1e6:.3g} M)")
    if args.loss_sup:
        _module_table(args, num_layers)
    if args.table:
        print("\nmodel    dataset        feat-mult  params")
        for model, dataset, fm, nl, nh in PARAM_TABLE:
            n, _ = _count(model, dataset, fm, nl, nh)
            print(f"{model:<8} {dataset:<14} {fm:<10} {n:>11,}")
    return 0


def _cmd_train(args) -> int:
    from localloss_pp.pipeline.distributed import import_before_process_group, torchrun_world
    from localloss_pp.observe.metrics import setup_logging
    from localloss_pp.training import run_training
    rank, world, _, _ = torchrun_world()
    setup_logging(rank, world)
    if world > 1:
        log.info("pid %d", os.getpid())
    cfg = load_config(args)
    from localloss_pp.faults import armed
    armed()  # a malformed LOCALLOSS_PP_FAULT is bad input like any other
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker dies with its agent
        from localloss_pp.run.rundir import stop_with_parent
        stop_with_parent()
    import_before_process_group()
    if world == 1:
        return _report(run_training(cfg))
    if os.environ.get("LOCALLOSS_PP_DEBUG"):
        logging.getLogger("localloss_pp").setLevel(logging.DEBUG)
    try:
        # success: the process group is destroyed normally and main returns
        return _report(run_training(cfg))
    except BaseException as exc:  # a pipeline stage: say what failed, then leave at once
        if os.environ.get("LOCALLOSS_PP_DEBUG"):
            log.exception("failed")
        line = os_error_line(exc) if isinstance(exc, OSError) else first_line(exc)
        code = 2 if isinstance(exc, ValueError) else 1
        write_error_note(rank, code, line)
        if not os.environ.get("LOCALLOSS_PP_DEBUG"):
            log.error("error: %s", line)
        for handler in logging.getLogger("localloss_pp").handlers:
            handler.flush()
        sys.stdout.flush()
        # no interpreter teardown: gloo closes the links and the neighbours stop promptly
        os._exit(code)


def load_config(args) -> Config:
    """The run's config from a parsed `train` command line, with the launch-time checks that
    need more than the config itself: the model name against the registry (after importing
    --model-module) and TensorBoard being installed when --tensorboard asks for it."""
    from localloss_pp.models.registry import resolve_model  # (torch: not for --help)
    from localloss_pp.data.registry import resolve_dataset
    from localloss_pp.observe.tensorboard import check_tensorboard
    cfg = config_from_args(args)
    resolve_model(cfg.model)
    resolve_dataset(cfg.data)
    if cfg.train.tensorboard:
        check_tensorboard(cfg.train.tensorboard)
    return cfg


def _report(result) -> int:
    if result is not None:  # only the writer (last stage) has the final numbers
        print(f"final test error: {result.test_error:.2f}% (train error "
              f"{result.train_error:.2f}%) after {result.epochs} epochs; run directory: "
              f"{result.run_dir}")
        print(f"model-digest: {result.digest}", flush=True)
    return 0


def _cmd_plot(args) -> int:
    from localloss_pp.observe.plots import plot_run
    epochs = None
    if args.epochs:
        try:
            epochs = [int(e) for e in args.epochs.split(",")]
        except ValueError:
            raise ValueError(f"--epochs {args.epochs}: give epoch numbers separated by commas, "
                             "e.g. 1,10,20") from None
    for path in plot_run(args.run_dir, args.out, epochs):
        print(f"wrote {path}")
    return 0


def _cmd_timeline(args) -> int:
    from localloss_pp.observe.profiling import plot_timeline
    print(f"wrote {plot_timeline(args.run_dir, args.out)}")
    return 0


def _cmd_compare(args) -> int:
    from localloss_pp.observe.compare import compare_table, load_run, plot_compare
    if len(args.run_dirs) < 2:
        raise ValueError("compare needs at least two run directories")
    runs = [load_run(d) for d in args.run_dirs]
    print("\n".join(compare_table(runs)))
    if args.plot:
        print(f"wrote {plot_compare(runs, args.plot)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {"train": _cmd_train, "params": _cmd_params, "plot": _cmd_plot,
               "timeline": _cmd_timeline, "compare": _cmd_compare}[args.command]
    try:
        return handler(args)
    except (ValueError, FloatingPointError) as exc:
        if os.environ.get("LOCALLOSS_PP_DEBUG"):
            raise
        write_error_note(int(os.environ.get("RANK", "0")), 2, str(exc))
        print(f"localloss-pp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the disk: full, read-only, gone (what finished is kept)
        if os.environ.get("LOCALLOSS_PP_DEBUG"):
            raise
        resume = (" (finished epochs are kept: continue with --resume auto)"
                  if args.command == "train" else "")
        print(f"localloss-pp {args.command}: error: {os_error_line(exc)}{resume}",
              file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a failure during training (StageFailure and the like)
        if os.environ.get("LOCALLOSS_PP_DEBUG"):
            raise
        print(f"localloss-pp {args.command}: error: {first_line(exc)} (set "
              "LOCALLOSS_PP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"localloss-pp {args.command}: interrupted", file=sys.stderr)
        return 130
