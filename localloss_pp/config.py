"""Run configuration: dataclass sections, TOML files, the reference's CLI flags, validation.

A config has the sections ``model``, ``loss``, ``data``, ``optim`` and ``train``; a TOML file uses
the same section and field names. Precedence: command line > TOML file > defaults. The defaults are
the reference implementation's, with one exception: when neither the command line nor the file names
a dataset or a model, the *quick-start preset* (`QUICKSTART`) applies: an mlp trained with predsim
on the embedded `mnist5k` dataset for a few epochs.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "ModelConfig", "LossConfig", "DataConfig", "OptimConfig", "TrainConfig", "Config",
    "QUICKSTART", "FLAGS", "Flag", "add_config_arguments", "config_from_args", "load_toml",
    "build_config", "validate", "to_toml", "lr_at_epoch", "RunMode",
    "parse_profile",
]

DATASET_NAMES = ("mnist5k", "MNIST", "FashionMNIST", "KuzushijiMNIST", "CIFAR10", "CIFAR100",
                 "SVHN", "STL10", "ImageNet")
LOSS_SUP = ("pred", "sim", "predsim")
LOSS_UNSUP = ("none", "sim", "recon")
OPTIMS = ("adam", "amsgrad", "sgd")
NONLINS = ("relu", "leakyrelu")


class RunMode(StrEnum):
    """How the blocks learn: from their local losses (pipelinable), or end to end."""
    LOCAL = "local"          # local losses, detached blocks: the pipeline
    BACKPROP = "backprop"    # --backprop: global backprop, no local losses
    NODETACH = "nodetach"    # --no-detach: local and global losses through the whole net

    @classmethod
    def of(cls, cfg: "Config") -> "RunMode":
        if cfg.loss.backprop:
            return cls.BACKPROP
        return cls.LOCAL if cfg.loss.detach else cls.NODETACH


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "vgg8b"
    num_layers: int = 1
    num_hidden: int = 1024
    feat_mult: float = 1.0
    nonlin: str = "relu"
    batch_norm: bool = True
    dropout: float = 0.0
    dim_in_decoder: int = 4096
    pre_act: bool = False
    module: str = ""  # a user's module that registers models (--model-module)


@dataclass(kw_only=True)
class LossConfig:
    loss_sup: str = "predsim"
    loss_unsup: str = "none"
    alpha: float = 0.0
    beta: float = 0.99
    backprop: bool = False
    detach: bool = True
    bio: bool = False
    target_proj_size: int = 128
    similarity_std: bool = True


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = "CIFAR10"
    data_dir: str = "data"
    download: bool = False
    batch_size: int = 128
    classes_per_batch: int = 0
    classes_per_batch_until_epoch: int = 0
    cutout: bool = False
    n_holes: int = 1
    length: int = 16
    num_workers: str = "auto"  # DataLoader workers (image folders): "auto" or a count


@dataclass(kw_only=True)
class OptimConfig:
    optim: str = "adam"
    lr: float = 5e-4
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_decay_milestones: list[int] = field(default_factory=lambda: [200, 300, 350, 375])
    lr_decay_fact: float = 0.25


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 400
    seed: int = 1
    device: str = "auto"
    backend: str = "auto"
    threads_per_rank: int = 0
    partition: str = "params"
    queue_depth: int = 2
    num_replicas: int = 1
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    timeout_s: float = 600.0
    print_stats: bool = True
    progress: bool = True
    run_dir: str = ""
    save_dir: str = ""
    resume: str = ""
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    tensorboard: str = ""   # "" off; "auto": RUN_DIR/tb; else the folder
    log_every: int = 0      # TensorBoard scalars every N training batches (0: per epoch only)
    profile: str = ""       # EPOCH:START:STEPS: profiler traces of those training batches


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_SECTION_CLASSES = {"model": ModelConfig, "loss": LossConfig, "data": DataConfig,
                    "optim": OptimConfig, "train": TrainConfig}

# The embedded default run: what `localloss-pp train` does with no dataset and no model given.
# MNIST mlp predsim recipe (leaky ReLU, dropout 0.1, lr 5e-4, 3x1024) shortened to a few epochs.
QUICKSTART: dict[str, dict[str, Any]] = {
    "model": {"name": "mlp", "num_layers": 3, "num_hidden": 1024, "nonlin": "leakyrelu",
              "dropout": 0.1},
    "data": {"dataset": "mnist5k"},
    "optim": {"lr": 5e-4, "lr_decay_milestones": [10, 15], "lr_decay_fact": 0.25},
    "train": {"epochs": 20},
}

class Flag(NamedTuple):
    """One `train` flag: the config field it sets, how, and what `--help` says of it.

    action: a type for a valued flag; "true"/"false" for a switch that sets the field; "cpu" for
    --no-cuda; "list" for a list of ints; "optional" for a flag whose value may be left out."""
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
         "... resnet152, wresnet<depth>-<width>[a], or a model a --model-module registers" + _REF,
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
    Flag("--loss-sup", "loss", "loss_sup", str, "loss", "supervised local loss: pred (a linear "
         "classifier per block), sim (similarity matching) or predsim (both)" + _REF, "NAME"),
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
    Flag("--dataset", "data", "dataset", str, "data", "mnist5k (embedded), MNIST, FashionMNIST, "
         "KuzushijiMNIST, CIFAR10, CIFAR100, SVHN, STL10 or ImageNet" + _REF, "NAME"),
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
]


def _default_text(f: Flag) -> str:
    """' (default: X; quick start: Y)' of a valued flag, '' for a switch."""
    if f.action in ("true", "false", "cpu"):
        return ""
    value = getattr(_SECTION_CLASSES[f.section](), f.name)
    shown = " ".join(map(str, value)) if isinstance(value, list) else (value if value != ""
                                                                          else "none")
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
        else:
            group.add_argument(f.flag, type=f.action, metavar=f.metavar, **common)


def _canonical(value: str, choices: tuple[str, ...], what: str, flag: str) -> str:
    for choice in choices:
        if value.lower() == choice.lower():
            return choice
    raise ValueError(f"unknown {what} {value!r} ({flag}); choose one of: {', '.join(choices)}")


def load_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a TOML config file; unknown sections or keys and wrong types are a ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; pass an existing .toml file to --config")
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {exc.start} cannot be "
                         "decoded); save it as UTF-8") from None
    except OSError as exc:
        raise ValueError(f"config file {path} cannot be read ({exc.strerror or exc})") from None
    for section, values in raw.items():
        if section not in _SECTION_CLASSES:
            raise ValueError(f"{path}: unknown section [{section}]; sections are: "
                             f"{', '.join(_SECTION_CLASSES)}")
        if not isinstance(values, dict):
            raise ValueError(f"{path}: {section} must be a [{section}] table, not a value")
        known = {f.name: f for f in fields(_SECTION_CLASSES[section])}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"{path}: unknown key {key!r} in [{section}]; known keys: "
                                 f"{', '.join(known)}")
            _check_type(f"{path}: [{section}] {key}", value, known[key])
    return raw


def _check_type(where: str, value: Any, fld: dataclasses.Field) -> None:
    expected = fld.type if isinstance(fld.type, str) else fld.type.__name__
    ok = {
        "str": isinstance(value, str) or (fld.name == "num_workers" and isinstance(value, int)
                                          and not isinstance(value, bool)),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list[int]": isinstance(value, list)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
    }[expected]
    if not ok:
        if fld.name == "num_workers":
            expected = '"auto" or an integer'
        raise ValueError(f"{where} must be {expected}, got {type(value).__name__} {value!r}")


def build_config(file_values: dict | None = None, cli_values: dict | None = None) -> Config:
    """Merge defaults, the quick-start preset (if no dataset/model is named), file and CLI values."""
    file_values = file_values or {}
    cli_values = cli_values or {}
    named = [("data", "dataset"), ("model", "name")]
    given = any(f in file_values.get(s, {}) or f in cli_values.get(s, {}) for s, f in named)
    layers = [] if given else [QUICKSTART]
    layers += [file_values, cli_values]
    merged: dict[str, dict[str, Any]] = {s: {} for s in _SECTION_CLASSES}
    for layer in layers:
        for section, values in layer.items():
            merged[section].update(values)
    cfg = Config(**{s: cls(**merged[s]) for s, cls in _SECTION_CLASSES.items()})
    for section in _SECTION_CLASSES:
        obj = getattr(cfg, section)
        for fld in fields(obj):
            if fld.type == "float":
                setattr(obj, fld.name, float(getattr(obj, fld.name)))
    cfg.data.num_workers = str(cfg.data.num_workers).strip().lower()
    validate(cfg)
    return cfg


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the Config of a parsed command line (see add_config_arguments)."""
    cli: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if dest.startswith("cfg:"):
            section, name = dest[4:].split(".")
            cli.setdefault(section, {})[name] = value
    file_values = load_toml(args.config) if getattr(args, "config", None) else {}
    return build_config(file_values, cli)


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _finite(x: float) -> bool:
    return math.isfinite(x)


def validate(cfg: Config) -> None:
    """Raise ValueError naming the first bad value and how to fix it; canonicalise names.

    One check per section, then the rules that span sections. The model's name is checked
    against the registry at launch (models.registry.resolve_model): the config knows no model
    code."""
    _check_model(cfg.model)
    _check_loss(cfg.loss)
    _check_data(cfg.data)
    _check_optim(cfg.optim)
    _check_train(cfg.train)
    _check_modes(cfg)


def _check_model(m: ModelConfig) -> None:
    m.nonlin = _canonical(m.nonlin, NONLINS, "nonlinearity", "--nonlin")
    _need(m.num_layers >= 0, f"--num-layers must be >= 0, got {m.num_layers}")
    _need(m.name.lower() != "mlp" or m.num_layers >= 1,
          "--num-layers must be >= 1 for the mlp (it is its number of hidden layers)")
    _need(m.num_hidden >= 1, f"--num-hidden must be >= 1, got {m.num_hidden}")
    _need(_finite(m.feat_mult) and m.feat_mult > 0, f"--feat-mult must be > 0, got {m.feat_mult}")
    _need(_finite(m.dropout) and 0 <= m.dropout < 1,
          f"--dropout must be in [0, 1), got {m.dropout}")
    _need(m.dim_in_decoder >= 1, f"--dim-in-decoder must be >= 1, got {m.dim_in_decoder}")


def _check_loss(lo: LossConfig) -> None:
    lo.loss_sup = _canonical(lo.loss_sup, LOSS_SUP, "supervised loss", "--loss-sup")
    lo.loss_unsup = _canonical(lo.loss_unsup, LOSS_UNSUP, "unsupervised loss", "--loss-unsup")
    _need(_finite(lo.alpha) and 0 <= lo.alpha <= 1, f"--alpha must be in [0, 1], got {lo.alpha}")
    _need(_finite(lo.beta) and 0 <= lo.beta <= 1, f"--beta must be in [0, 1], got {lo.beta}")
    _need(lo.target_proj_size >= 1,
          f"--target-proj-size must be >= 1, got {lo.target_proj_size}")
    _need(not (lo.backprop and not lo.detach),
          "--backprop and --no-detach cannot be combined: --backprop already trains end to end")
    _need(not (lo.backprop and lo.bio), "--backprop and --bio cannot be combined: --bio changes "
          "the local losses, which --backprop does not use")


def _check_data(d: DataConfig) -> None:
    d.dataset = _canonical(d.dataset, DATASET_NAMES, "dataset", "--dataset")
    _need(d.batch_size >= 1, f"--batch-size must be >= 1, got {d.batch_size}")
    _need(d.classes_per_batch >= 0,
          f"--classes-per-batch must be >= 0, got {d.classes_per_batch}")
    _need(d.classes_per_batch_until_epoch >= 0, "--classes-per-batch-until-epoch must be >= 0, "
          f"got {d.classes_per_batch_until_epoch}")
    _need(d.n_holes >= 1, f"--n_holes must be >= 1, got {d.n_holes}")
    _need(d.length >= 1, f"--length must be >= 1, got {d.length}")
    _need(str(d.num_workers) == "auto" or str(d.num_workers).isdigit(),
          f"--num-workers must be 'auto' or a count >= 0, got {d.num_workers!r}")


def _check_optim(o: OptimConfig) -> None:
    o.optim = _canonical(o.optim, OPTIMS, "optimizer", "--optim")
    _need(_finite(o.lr) and o.lr > 0, f"--lr must be > 0, got {o.lr}")
    _need(_finite(o.momentum) and o.momentum >= 0, f"--momentum must be >= 0, got {o.momentum}")
    _need(o.optim == "sgd" or o.momentum == 0,
          f"--momentum {o.momentum} only applies to --optim sgd; drop it or use --optim sgd")
    _need(_finite(o.weight_decay) and o.weight_decay >= 0,
          f"--weight-decay must be >= 0, got {o.weight_decay}")
    _need(_finite(o.lr_decay_fact) and o.lr_decay_fact > 0,
          f"--lr-decay-fact must be > 0, got {o.lr_decay_fact}")
    ms = o.lr_decay_milestones
    _need(all(b > a for a, b in zip(ms, ms[1:])),
          f"--lr-decay-milestones must be strictly increasing, got {' '.join(map(str, ms))}")
    _need(all(x >= 1 for x in ms), f"--lr-decay-milestones must be epochs >= 1, got {ms}")


def _check_train(t: TrainConfig) -> None:
    _need(t.epochs >= 1, f"--epochs must be >= 1, got {t.epochs}")
    _need(t.threads_per_rank >= 0,
          f"--threads-per-rank must be >= 0 (0 = cores / local ranks), got {t.threads_per_rank}")
    t.backend = t.backend.lower()
    _need(t.backend in ("auto", "gloo", "nccl"),
          f"--backend must be auto, gloo or nccl, got {t.backend!r}")
    _need(t.queue_depth >= 1, f"--queue-depth must be >= 1, got {t.queue_depth}")
    _need(t.num_replicas >= 1, f"--replicas must be >= 1, got {t.num_replicas}")
    t.precision = t.precision.lower()
    _need(t.precision in ("fp32", "bf16"),
          f"--precision must be fp32 or bf16, got {t.precision!r}")
    _need(_finite(t.timeout_s) and t.timeout_s > 0, f"--timeout-s must be > 0, got {t.timeout_s}")
    _need(t.checkpoint_every >= 0,
          f"--checkpoint-every must be >= 0 (0 = only at epoch ends), got {t.checkpoint_every}")
    _need(t.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {t.keep_checkpoints}")
    _need(t.log_every >= 0, f"--log-every must be >= 0 (0 = per epoch only), got {t.log_every}")
    _need(not t.log_every or t.tensorboard, "--log-every writes TensorBoard scalars: add "
          "--tensorboard (event files in RUN_DIR/tb, or --tensorboard FOLDER)")
    if t.profile:
        parse_profile(t.profile)
    t.partition = t.partition.replace(" ", "").lower()
    _need(t.partition in ("params", "auto") or all(p.isdigit() and int(p) >= 1
                                                   for p in t.partition.split(",")),
          f"--partition must be params, auto or block counts per stage like 3,3,2 "
          f"(each >= 1), got {t.partition!r}")
    dev = t.device.lower()
    _need(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
          f"--device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    t.device = dev


def _check_modes(cfg: Config) -> None:
    """The rules between sections: what the end-to-end modes do not support."""
    lo, t = cfg.loss, cfg.train
    end_to_end = lo.backprop or not lo.detach
    _need(not (end_to_end and (t.precision != "fp32" or t.compile or t.channels_last)),
          "--precision bf16, --channels-last and --compile apply to local training; drop them "
          "for --backprop and --no-detach runs")
    _need(not (t.checkpoint_every and end_to_end),
          "--checkpoint-every needs local training; --backprop and --no-detach runs are "
          "checkpointed at the end of every epoch")


def parse_profile(spec: str) -> tuple[int, int, int]:
    """(epoch, first batch, batches) of `--profile EPOCH:START:STEPS`; a ValueError that says
    what is wrong."""
    parts = spec.split(":")
    try:
        epoch, start, steps = (int(x) for x in parts)
    except ValueError:
        raise ValueError(f"--profile {spec}: give EPOCH:START:STEPS (integers), e.g. 1:10:5 "
                         "traces training batches 10 to 14 of epoch 1") from None
    if epoch < 1 or start < 0 or steps < 1:
        raise ValueError(f"--profile {spec}: EPOCH >= 1, START >= 0 and STEPS >= 1, e.g. 1:10:5")
    return epoch, start, steps


def lr_at_epoch(optim: OptimConfig, epoch: int) -> float:
    """Learning rate of 1-based `epoch`: decayed once per milestone <= epoch - 1 (reference rule)."""
    passed = sum(1 for m in optim.lr_decay_milestones if m <= epoch - 1)
    return optim.lr * optim.lr_decay_fact ** passed


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


def to_toml(cfg: Config) -> str:
    """The resolved config as a TOML document that load_toml reads back unchanged."""
    lines = []
    for section in _SECTION_CLASSES:
        lines.append(f"[{section}]")
        obj = getattr(cfg, section)
        for fld in fields(obj):
            lines.append(f"{fld.name} = {_toml_value(getattr(obj, fld.name))}")
        lines.append("")
    return "\n".join(lines)

