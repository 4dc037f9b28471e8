"""The `train` command line: every flag, the config field it sets, its help text and its group;
and the Config of a parsed command line (precedence: flags > --config file > defaults).

The reference's flags keep their names and meanings, so its published recipes run unchanged;
this tool's own flags follow. `localloss-pp train --help` shows them in their groups, each with
its default (and the quick-start preset's value where that differs).
"""
from __future__ import annotations

import argparse
from typing import Any, NamedTuple

from localloss_pp.config import (IN_MEMORY_LIMIT_MB, QUICKSTART, SECTION_CLASSES, Config,
                                 build_config, load_toml)
from localloss_pp.data.registry import registered_datasets

__all__ = ["Flag", "FLAGS", "GROUPS", "add_config_arguments", "config_from_args"]


class Flag(NamedTuple):
    """One `train` flag: the config field it sets, how, and what `--help` says of it.

    action: a type for a valued flag; "true"/"false" for a switch that sets the field; "cpu" for
    --no-cuda; "list" for a list of ints; "floats" for one or more floats; "optional" for a
    flag whose value may be left out."""
    flag: str
    section: str
    name: str
    action: Any
    group: str
    help: str
    metavar: str | None = None


GROUPS = {
    "model": "model (the network and its blocks)",
    "loss": "loss (what each block learns from)",
    "data": "data",
    "optim": "optimisation",
    "pipeline": "pipeline and devices",
    "checkpoints": "run directory, checkpoints and resuming",
    "observe": "observing a run",
}
_REF = " [reference flag]"

# Reference flags first (same names and meanings as the reference), then this tool's own flags.
FLAGS: list[Flag] = [
    Flag("--model", "model", "name", str, "model", "the network: mlp, vgg6a ... vgg19, resnet18 "
         "... resnet152, wresnet<depth>-<width>[a], vit-<depth>-<dim>[-p<patch>][-h<heads>][-m<mlp "
         "ratio>] or vit-nano/vit-micro/vit-tiny (Vision Transformers), or a model a "
         "--model-module registers" + _REF,
         "NAME"),
    Flag("--num-layers", "model", "num_layers", int, "model", "hidden linear blocks: of the mlp, "
         "or of a VGG's head (0: the head is one linear layer)" + _REF, "N"),
    Flag("--num-hidden", "model", "num_hidden", int, "model",
         "width of every hidden linear block" + _REF, "N"),
    Flag("--feat-mult", "model", "feat_mult", float, "model",
         "factor on every conv layer's channel count" + _REF, "F"),
    Flag("--dim-in-decoder", "model", "dim_in_decoder", int, "model", "largest input size of a "
         "conv block's pred decoder, reached by average pooling of its feature map" + _REF, "N"),
    Flag("--nonlin", "model", "nonlin", str, "model",
         "nonlinearity: relu or leakyrelu (slope 0.01)" + _REF, "NAME"),
    Flag("--no-batch-norm", "model", "batch_norm", "false", "model",
         "blocks without BatchNorm" + _REF),
    Flag("--dropout", "model", "dropout", float, "model", "dropout rate after every hidden "
         "nonlinearity (channel-wise in conv blocks), in [0, 1)" + _REF, "P"),
    Flag("--pre-act", "model", "pre_act", "true", "model",
         "pre-activation ResNet (resnet* models only)" + _REF),
    Flag("--model-module", "model", "module", str, "model", "import this module first: it "
         "registers your own models (docs/usage.md, \"Your own model\")", "MODULE"),
    Flag("--loss-sup", "loss", "loss_sup", str, "loss", "the local objective, a registered "
         "name: the paper's pred (a linear classifier per block), sim (similarity matching) or "
         "predsim (both)" + _REF + "; the literature's dgl and infopro (docs/algorithm.md 10.1); "
         "or one an --objective-module registers (an unknown name lists them all)", "NAME"),
    Flag("--objective-module", "loss", "module", str, "loss", "import this module first: it "
         "registers your own objectives (docs/usage.md, \"Your own objective\")", "MODULE"),
    Flag("--local-modules", "loss", "local_modules", str, "loss", "group the model's units "
         "into K contiguous local modules (balanced by parameters), or as many units per module "
         "as listed (3,3,2): one head at each module's end, backprop inside a module; default: "
         "one module per unit (the paper's objectives: every layer its own heads)", "K"),
    Flag("--loss-unsup", "loss", "loss_unsup", str, "loss",
         "unsupervised local loss: none, sim or recon (weighted by --alpha)" + _REF, "NAME"),
    Flag("--alpha", "loss", "alpha", float, "loss",
         "weight of the unsupervised loss: alpha*unsup + (1-alpha)*sup, in [0, 1]" + _REF, "A"),
    Flag("--beta", "loss", "beta", float, "loss",
         "weight of sim in predsim: beta*sim + (1-beta)*pred, in [0, 1]" + _REF, "B"),
    Flag("--no-similarity-std", "loss", "similarity_std", "false", "loss", "similarity of "
         "flattened feature maps instead of each channel's spatial std" + _REF),
    Flag("--backprop", "loss", "backprop", "true", "loss", "global backprop instead of local "
         "losses (one process, or data-parallel with --replicas)" + _REF),
    Flag("--no-detach", "loss", "detach", "false", "loss", "local and global losses flow through "
         "the whole network (one process, or data-parallel)" + _REF),
    Flag("--bio", "loss", "bio", "true", "loss", "the biologically plausible variants: feedback "
         "alignment, a fixed random label projection" + _REF),
    Flag("--target-proj-size", "loss", "target_proj_size", int, "loss",
         "width of the random label projection under --bio" + _REF, "N"),
    Flag("--dataset", "data", "dataset", str, "data", "a registered dataset: "
         f"{', '.join(registered_datasets())}" + _REF + "; folder:PATH, a folder of your own "
         "images (PATH/train/<class>/*, PATH/test/ or val/ likewise); or one a "
         "--dataset-module registers (docs/usage.md, \"Your own data\")", "NAME"),
    Flag("--dataset-module", "data", "module", str, "data", "import this module first: it "
         "registers your own datasets (docs/usage.md, \"Your own data\")", "MODULE"),
    Flag("--augment", "data", "augment", str, "data", "training augmentation: auto (the "
         "dataset's own: the reference's, or resized-crop-flip for image folders), none, flip, "
         "crop-flip (random crop with size/8 padding, then a flip) or resized-crop-flip",
         "NAME"),
    Flag("--mean", "data", "mean", "floats", "data", "per-channel mean of the normalisation "
         "(default: the dataset's; measured on the training split of an image folder)", "M"),
    Flag("--std", "data", "std", "floats", "data", "per-channel std of the normalisation, "
         "with --mean", "S"),
    Flag("--image-size", "data", "image_size", int, "data", "image folders: resize (shorter "
         "side) and centre-crop to N x N (0: the images' own size, when all are square and of "
         "one size)", "N"),
    Flag("--image-mode", "data", "image_mode", str, "data", "image folders: auto (grayscale "
         "when every image is), L (grayscale) or RGB", "auto|L|RGB"),
    Flag("--val-fraction", "data", "val_fraction", float, "data", "image folders without "
         "test/ or val/: this share of every class of train/ is held out as the test split "
         "(a fixed draw, the same for every run)", "F"),
    Flag("--in-memory", "data", "in_memory", str, "data", "image folders: decode once into "
         "memory (yes), stream with DataLoader workers (no), or auto (memory up to "
         f"{IN_MEMORY_LIMIT_MB} MB decoded)", "auto|yes|no"),
    Flag("--batch-size", "data", "batch_size", int, "data", "examples per batch (the global "
         "batch, split across --replicas)" + _REF, "N"),
    Flag("--classes-per-batch", "data", "classes_per_batch", int, "data",
         "N > 0: every training batch holds examples of N classes only (0: off)" + _REF, "N"),
    Flag("--classes-per-batch-until-epoch", "data", "classes_per_batch_until_epoch", int, "data",
         "ordinary shuffling again after this epoch (0: the whole run)" + _REF, "E"),
    Flag("--cutout", "data", "cutout", "true", "data",
         "cutout augmentation of the training images" + _REF),
    Flag("--n_holes", "data", "n_holes", int, "data", "cutout squares per image" + _REF, "N"),
    Flag("--length", "data", "length", int, "data",
         "side of a cutout square, in pixels" + _REF, "PIXELS"),
    Flag("--data-dir", "data", "data_dir", str, "data", "folder of the torchvision datasets",
         "DIR"),
    Flag("--download", "data", "download", "true", "data",
         "let torchvision download a missing dataset into --data-dir (needs the internet)"),
    Flag("--num-workers", "data", "num_workers", str, "data", "loader processes of image-folder "
         "datasets: auto (the spare cores) or a count", "auto|N"),
    Flag("--epochs", "train", "epochs", int, "optim", "number of epochs" + _REF, "N"),
    Flag("--lr", "optim", "lr", float, "optim",
         "initial learning rate of every unit's optimizer" + _REF, "LR"),
    Flag("--lr-decay-milestones", "optim", "lr_decay_milestones", "list", "optim",
         "epochs after which the learning rate is multiplied by --lr-decay-fact" + _REF, "EPOCH"),
    Flag("--lr-decay-fact", "optim", "lr_decay_fact", float, "optim",
         "learning-rate factor per milestone passed" + _REF, "F"),
    Flag("--optim", "optim", "optim", str, "optim", "adam, amsgrad or sgd" + _REF, "NAME"),
    Flag("--nesterov", "optim", "nesterov", "true", "optim",
         "Nesterov momentum (--optim sgd with --momentum > 0)"),
    Flag("--lr-schedule", "optim", "lr_schedule", str, "optim", "step (the milestones, "
         "reference) or cosine (per epoch, as the InfoPro and AugLocal code)", "NAME"),
    Flag("--lr-cosine-epochs", "optim", "lr_cosine_epochs", int, "optim",
         "the cosine's horizon in epochs (0: --epochs; epoch E runs at lr 0, as in the "
         "published code: give a short run its epochs + 1)", "E"),
    Flag("--lr-warmup-epochs", "optim", "lr_warmup_epochs", int, "optim",
         "cosine: linear warm-up over the first W epochs", "W"),
    Flag("--lr-warmup-from", "optim", "lr_warmup_from", float, "optim",
         "cosine: the warm-up's first learning rate (default 0.01)", "LR"),
    Flag("--momentum", "optim", "momentum", float, "optim",
         "SGD momentum (--optim sgd only)" + _REF, "M"),
    Flag("--weight-decay", "optim", "weight_decay", float, "optim",
         "L2 weight decay of every optimizer" + _REF, "WD"),
    Flag("--seed", "train", "seed", int, "optim", "run seed: every random stream (weights, "
         "dropout, data order, augmentation) is derived from it" + _REF, "N"),
    Flag("--no-cuda", "train", "device", "cpu", "pipeline", "same as --device cpu" + _REF),
    Flag("--device", "train", "device", str, "pipeline", "auto (CUDA when available, else the "
         "CPU), cpu, cuda (GPU local-rank mod GPU count) or cuda:N", "DEV"),
    Flag("--backend", "train", "backend", str, "pipeline",
         "process-group backend: auto (NCCL with one GPU per process, else gloo), gloo or "
         "nccl", "NAME"),
    Flag("--threads-per-rank", "train", "threads_per_rank", int, "pipeline",
         "CPU threads per process (0: the cores divided among the local processes)", "N"),
    Flag("--partition", "train", "partition", str, "pipeline", "how blocks are split into "
         "stages: params (balanced parameter counts), auto (measured step times) or block "
         "counts per stage like 3,3,2", "params|auto|LIST"),
    Flag("--queue-depth", "train", "queue_depth", int, "pipeline",
         "sends in flight per stage before it waits for its receiver (back-pressure)", "N"),
    Flag("--replicas", "train", "num_replicas", int, "pipeline", "data-parallel replicas of the "
         "pipeline: world size = stages x replicas", "R"),
    Flag("--precision", "train", "precision", str, "pipeline",
         "fp32, or bf16 (autocast; activations travel in bf16)", "fp32|bf16"),
    Flag("--channels-last", "train", "channels_last", "true", "pipeline",
         "channels-last memory format for conv blocks"),
    Flag("--compile", "train", "compile", "true", "pipeline",
         "torch.compile every block's train and eval step"),
    Flag("--timeout-s", "train", "timeout_s", float, "pipeline", "seconds a stage waits for a "
         "neighbour before it reports the neighbour lost", "S"),
    Flag("--run-dir", "train", "run_dir", str, "checkpoints", "the run directory (default: "
         "runs/<dataset>-<model>-<time>, or the reference's layout under --save-dir)", "DIR"),
    Flag("--save-dir", "train", "save_dir", str, "checkpoints", "root of the reference's "
         "layout: DIR/<dataset>/<model>_mult<f>/<run-tag>" + _REF, "DIR"),
    Flag("--resume", "train", "resume", str, "checkpoints", "auto (continue the run in "
         "--run-dir), a checkpoint folder, a run directory or a model.pt" + _REF,
         "auto|PATH"),
    Flag("--checkpoint-every", "train", "checkpoint_every", int, "checkpoints",
         "also checkpoint every N training batches (0: only at epoch ends)", "N"),
    Flag("--keep-checkpoints", "train", "keep_checkpoints", int, "checkpoints",
         "complete checkpoints kept (older ones are deleted)", "N"),
    Flag("--no-print-stats", "train", "print_stats", "false", "observe",
         "no per-block local losses and decoder errors" + _REF),
    Flag("--progress-bar", "train", "progress", "true", "observe",
         "a progress bar on the last stage when stderr is a terminal (the default)" + _REF),
    Flag("--no-progress", "train", "progress", "false", "observe", "no progress bar"),
    Flag("--tensorboard", "train", "tensorboard", "optional", "observe", "write TensorBoard "
         "event files: to RUN_DIR/tb, or to DIR", "DIR"),
    Flag("--log-every", "train", "log_every", int, "observe",
         "TensorBoard scalars every N training batches (0: per epoch only)", "N"),
    Flag("--profile", "train", "profile", str, "observe", "torch.profiler traces of training "
         "batches START to START+STEPS-1 of EPOCH, per stage in RUN_DIR/profile",
         "EPOCH:START:STEPS"),
    Flag("--snapshot-every", "train", "snapshot_every", int, "observe", "keep the weights every "
         "N training batches (and at each epoch's end) with the training time so far, in "
         "RUN_DIR/snapshots: test error against time within epochs (python -m benchmarks.tta "
         "evaluates them; 0: off)", "N"),
]


def _default_text(f: Flag) -> str:
    """' (default: X; quick start: Y)' of a valued flag, '' for a switch."""
    if f.action in ("true", "false", "cpu"):
        return ""
    value = getattr(SECTION_CLASSES[f.section](), f.name)
    shown = " ".join(map(str, value)) if isinstance(value, list) else value
    shown = "none" if shown == "" else shown
    text = f" (default: {shown}"
    preset = QUICKSTART.get(f.section, {}).get(f.name)
    if preset is not None and preset != value:
        preset = " ".join(map(str, preset)) if isinstance(preset, list) else preset
        text += f"; quick start: {preset}"
    return text + ")"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config` and every flag of FLAGS, in their groups; unset flags stay absent."""
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    parser.add_argument("--config", metavar="FILE", help="a TOML config with the sections "
                        "[model] [loss] [data] [optim] [train]; flags override it")
    for f in FLAGS:
        dest = f"cfg:{f.section}.{f.name}"
        common = dict(dest=dest, default=argparse.SUPPRESS, help=f.help + _default_text(f))
        group = groups[f.group]
        if f.action in ("true", "false"):
            group.add_argument(f.flag, action="store_const", const=f.action == "true", **common)
        elif f.action == "cpu":
            group.add_argument(f.flag, action="store_const", const="cpu", **common)
        elif f.action == "optional":  # --flag alone: "auto"; --flag VALUE
            group.add_argument(f.flag, nargs="?", const="auto", metavar=f.metavar, **common)
        elif f.action == "list":
            group.add_argument(f.flag, type=int, nargs="*", metavar=f.metavar, **common)
        elif f.action == "floats":
            group.add_argument(f.flag, type=float, nargs="+", metavar=f.metavar, **common)
        else:
            group.add_argument(f.flag, type=f.action, metavar=f.metavar, **common)


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the Config of a parsed command line (see add_config_arguments)."""
    cli: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if dest.startswith("cfg:"):
            section, name = dest[4:].split(".")
            cli.setdefault(section, {})[name] = value
    file_values = load_toml(args.config) if getattr(args, "config", None) else {}
    return build_config(file_values, cli)
