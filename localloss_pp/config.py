"""Run configuration: dataclass sections, TOML files, the reference's CLI flags, validation.

A config has the sections ``model``, ``loss``, ``data``, ``optim`` and ``train``; a TOML file uses
the same section and field names. Precedence: command line > TOML file > defaults. The defaults are
the reference implementation's, with one exception: when neither the command line nor the file names
a dataset or a model, the *quick-start preset* (`QUICKSTART`) applies: an mlp trained with predsim
on the embedded `mnist5k` dataset for a few epochs.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = [
    "ModelConfig", "LossConfig", "DataConfig", "OptimConfig", "TrainConfig", "Config",
    "QUICKSTART", "SECTION_CLASSES", "load_toml",
    "build_config", "validate", "to_toml", "lr_at_epoch", "RunMode",
    "parse_profile", "parse_local_modules",
]

IMAGE_MODES = ("auto", "L", "RGB")
AUGMENT_CHOICES = ("auto", "none", "flip", "crop-flip", "resized-crop-flip")
LOSS_UNSUP = ("none", "sim", "recon")
OPTIMS = ("adam", "amsgrad", "sgd")
LR_SCHEDULES = ("step", "cosine")
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
    module: str = ""         # a user's module that registers objectives (--objective-module)
    local_modules: str = ""  # "" one module per unit; "K"; or "n1,n2,...": units per module


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
    module: str = ""           # a user's module that registers datasets (--dataset-module)
    augment: str = "auto"      # "auto": the dataset's own; none, flip, crop-flip, ...
    mean: list[float] = field(default_factory=list)  # per channel; [] the dataset's own
    std: list[float] = field(default_factory=list)
    # image folders (--dataset folder:PATH)
    image_size: int = 0        # N: resize and centre-crop to N x N (0: the images' own size)
    image_mode: str = "auto"   # "auto" (grayscale if every image is), "L" or "RGB"
    val_fraction: float = 0.1  # held out of train/ as the test split when there is no val/
    in_memory: str = "auto"    # "auto" (decoded arrays up to IN_MEMORY_LIMIT_MB), "yes", "no"


@dataclass(kw_only=True)
class OptimConfig:
    optim: str = "adam"
    lr: float = 5e-4
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_decay_milestones: list[int] = field(default_factory=lambda: [200, 300, 350, 375])
    lr_decay_fact: float = 0.25
    nesterov: bool = False
    lr_schedule: str = "step"      # "step" (the milestones) or "cosine"
    lr_cosine_epochs: int = 0      # the cosine's horizon (0: the run's --epochs)
    lr_warmup_epochs: int = 0      # cosine: linear warm-up over these first epochs
    lr_warmup_from: float = 0.01   # ... from this learning rate


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
    snapshot_every: int = 0  # weight snapshots every N training batches (0: off)


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTION_CLASSES = {"model": ModelConfig, "loss": LossConfig, "data": DataConfig,
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

def _canonical(value: str, choices: tuple[str, ...], what: str, flag: str) -> str:
    for choice in choices:
        if value.lower() == choice.lower():
            return choice
    raise ValueError(f"unknown {what} {value!r} ({flag}); choose one of: {', '.join(choices)}")


def load_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a TOML config file; unknown sections or keys and wrong types are a ValueError."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"config file {path} does not exist; pass an existing .toml file to "
                         "--config")
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory; pass a .toml file to --config")
    if not path.is_file():
        raise ValueError(f"config file {path} is not a regular file (a device or a pipe); pass "
                         "a .toml file to --config")
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
        if section not in SECTION_CLASSES:
            raise ValueError(f"{path}: unknown section [{section}]; sections are: "
                             f"{', '.join(SECTION_CLASSES)}")
        if not isinstance(values, dict):
            raise ValueError(f"{path}: {section} must be a [{section}] table, not a value")
        known = {f.name: f for f in fields(SECTION_CLASSES[section])}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"{path}: unknown key {key!r} in [{section}]; known keys: "
                                 f"{', '.join(known)}")
            _check_type(f"{path}: [{section}] {key}", value, known[key])
    return raw


# string fields a TOML file may also give as an integer
_INT_OR_STR = {"num_workers": '"auto" or an integer',
               "local_modules": 'an integer or a string like "3,3,2"'}


def _check_type(where: str, value: Any, fld: dataclasses.Field) -> None:
    expected = fld.type if isinstance(fld.type, str) else fld.type.__name__
    ok = {
        "str": isinstance(value, str) or (fld.name in _INT_OR_STR and isinstance(value, int)
                                          and not isinstance(value, bool)),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list[int]": isinstance(value, list)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        "list[float]": isinstance(value, list)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
    }[expected]
    if not ok:
        if fld.name in _INT_OR_STR:
            expected = _INT_OR_STR[fld.name]
        raise ValueError(f"{where} must be {expected}, got {type(value).__name__} {value!r}")


def build_config(file_values: dict | None = None, cli_values: dict | None = None) -> Config:
    """Merge defaults, the quick-start preset (if no dataset/model is named), file and CLI values."""
    file_values = file_values or {}
    cli_values = cli_values or {}
    named = [("data", "dataset"), ("model", "name")]
    given = any(f in file_values.get(s, {}) or f in cli_values.get(s, {}) for s, f in named)
    layers = [] if given else [QUICKSTART]
    layers += [file_values, cli_values]
    merged: dict[str, dict[str, Any]] = {s: {} for s in SECTION_CLASSES}
    for layer in layers:
        for section, values in layer.items():
            merged[section].update(values)
    cfg = Config(**{s: cls(**merged[s]) for s, cls in SECTION_CLASSES.items()})
    for section in SECTION_CLASSES:
        obj = getattr(cfg, section)
        for fld in fields(obj):
            if fld.type == "float":
                setattr(obj, fld.name, float(getattr(obj, fld.name)))
            elif fld.type == "list[float]":
                setattr(obj, fld.name, [float(v) for v in getattr(obj, fld.name)])
    cfg.data.num_workers = str(cfg.data.num_workers).strip().lower()
    cfg.loss.local_modules = str(cfg.loss.local_modules)
    validate(cfg)
    return cfg


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


# bounds of values that are positive in principle but break far from any sensible setting
MAX_FEAT_MULT = 64.0       # ResNet/VGG widths times this: 64 x 512 channels at most
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1.0, 1e6  # gloo and the stores take milliseconds as C ints
MAX_THREADS = 1024       # more compute threads than any node has cores


def _check_model(m: ModelConfig) -> None:
    m.nonlin = _canonical(m.nonlin, NONLINS, "nonlinearity", "--nonlin")
    _need(m.num_layers >= 0, f"--num-layers must be >= 0, got {m.num_layers}")
    _need(m.name.lower() != "mlp" or m.num_layers >= 1,
          "--num-layers must be >= 1 for the mlp (it is its number of hidden layers)")
    _need(m.num_hidden >= 1, f"--num-hidden must be >= 1, got {m.num_hidden}")
    _need(_finite(m.feat_mult) and 0 < m.feat_mult <= MAX_FEAT_MULT,
          f"--feat-mult must be in (0, {MAX_FEAT_MULT:g}] (it scales the channel widths), got "
          f"{m.feat_mult}")
    _need(_finite(m.dropout) and 0 <= m.dropout < 1,
          f"--dropout must be in [0, 1), got {m.dropout}")
    _need(m.dim_in_decoder >= 1, f"--dim-in-decoder must be >= 1, got {m.dim_in_decoder}")


def _check_loss(lo: LossConfig) -> None:
    # (the name is checked against the objective registry at launch: resolve_objective)
    _need(isinstance(lo.loss_sup, str) and lo.loss_sup.strip() != "",
          "--loss-sup needs the name of a local objective, e.g. predsim or dgl")
    lo.loss_sup = lo.loss_sup.strip().lower()
    lo.local_modules = parse_local_modules(lo.local_modules)[2]
    lo.loss_unsup = _canonical(lo.loss_unsup, LOSS_UNSUP, "unsupervised loss", "--loss-unsup")
    _need(_finite(lo.alpha) and 0 <= lo.alpha <= 1, f"--alpha must be in [0, 1], got {lo.alpha}")
    _need(_finite(lo.beta) and 0 <= lo.beta <= 1, f"--beta must be in [0, 1], got {lo.beta}")
    _need(lo.target_proj_size >= 1,
          f"--target-proj-size must be >= 1, got {lo.target_proj_size}")
    _need(not (lo.backprop and not lo.detach),
          "--backprop and --no-detach cannot be combined: --backprop already trains end to end")
    _need(not (lo.backprop and lo.bio), "--backprop and --bio cannot be combined: --bio changes "
          "the local losses, which --backprop does not use")


def parse_local_modules(spec) -> tuple[int | None, list[int] | None, str]:
    """--local-modules: "" (one module per unit), a count K, or the units of each module
    ("3,3,2"). Returns (K or None, the sizes or None, the canonical text)."""
    text = str(spec).replace(" ", "")
    if text in ("", "0"):
        return None, None, ""
    parts = text.split(",")
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"--local-modules must be a number of modules K >= 1 or the units of "
                         f"each module as a list (e.g. 3,3,2), got {spec!r}")
    sizes = [int(p) for p in parts]
    if len(sizes) == 1:
        return sizes[0], None, str(sizes[0])
    return len(sizes), sizes, ",".join(map(str, sizes))


IN_MEMORY_LIMIT_MB = 2048  # image folders larger than this, decoded, stream (--in-memory auto)


def _check_data(d: DataConfig) -> None:
    # (the name is checked against the dataset registry at launch: data.registry.resolve_dataset)
    _need(isinstance(d.dataset, str) and d.dataset.strip() != "",
          "--dataset needs a name (e.g. MNIST) or folder:PATH")
    d.dataset = d.dataset.strip()
    _need(d.dataset != "folder:", "--dataset folder:PATH needs the folder's path after "
          "'folder:', e.g. folder:data/pets (it holds train/<class>/*)")
    d.augment = _canonical(d.augment, AUGMENT_CHOICES, "augmentation", "--augment")
    d.image_mode = _canonical(d.image_mode, IMAGE_MODES, "image mode", "--image-mode")
    _need(d.image_size >= 0, f"--image-size must be >= 0 (0: the images' own size), got "
          f"{d.image_size}")
    _need(d.image_size <= 4096, f"--image-size must be at most 4096 pixels, got {d.image_size}")
    _need(_finite(d.val_fraction) and 0 < d.val_fraction < 1,
          f"--val-fraction must be in (0, 1), got {d.val_fraction}")
    d.in_memory = str(d.in_memory).lower()
    _need(d.in_memory in ("auto", "yes", "no"),
          f"--in-memory must be auto, yes or no, got {d.in_memory!r}")
    _need(len(d.mean) == len(d.std), f"--mean and --std must give one value per channel each, "
          f"got {len(d.mean)} mean(s) and {len(d.std)} std(s)")
    _need(all(_finite(s) and s > 0 for s in d.std), f"--std values must be > 0, got {d.std}")
    _need(all(_finite(m) for m in d.mean), f"--mean values must be finite, got {d.mean}")
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
    o.lr_schedule = _canonical(o.lr_schedule, LR_SCHEDULES, "learning-rate schedule",
                               "--lr-schedule")
    _need(not o.nesterov or (o.optim == "sgd" and o.momentum > 0),
          "--nesterov is Nesterov momentum of --optim sgd: give --optim sgd and --momentum > 0")
    _need(o.lr_cosine_epochs >= 0, f"--lr-cosine-epochs must be >= 0, got {o.lr_cosine_epochs}")
    _need(o.lr_warmup_epochs >= 0, f"--lr-warmup-epochs must be >= 0, got {o.lr_warmup_epochs}")
    _need(_finite(o.lr_warmup_from) and o.lr_warmup_from >= 0,
          f"--lr-warmup-from must be >= 0, got {o.lr_warmup_from}")
    _need(o.lr_schedule == "cosine" or not (o.lr_warmup_epochs or o.lr_cosine_epochs),
          "--lr-warmup-epochs and --lr-cosine-epochs shape --lr-schedule cosine; add it")


def _check_train(t: TrainConfig) -> None:
    _need(t.epochs >= 1, f"--epochs must be >= 1, got {t.epochs}")
    _need(0 <= t.threads_per_rank <= MAX_THREADS,
          f"--threads-per-rank must be in [0, {MAX_THREADS}] (0 = cores / local ranks), got "
          f"{t.threads_per_rank}")
    t.backend = t.backend.lower()
    _need(t.backend in ("auto", "gloo", "nccl"),
          f"--backend must be auto, gloo or nccl, got {t.backend!r}")
    _need(t.queue_depth >= 1, f"--queue-depth must be >= 1, got {t.queue_depth}")
    _need(t.num_replicas >= 1, f"--replicas must be >= 1, got {t.num_replicas}")
    t.precision = t.precision.lower()
    _need(t.precision in ("fp32", "bf16"),
          f"--precision must be fp32 or bf16, got {t.precision!r}")
    _need(_finite(t.timeout_s) and MIN_TIMEOUT_S <= t.timeout_s <= MAX_TIMEOUT_S,
          f"--timeout-s must be in [{MIN_TIMEOUT_S:g}, {MAX_TIMEOUT_S:g}] seconds, got "
          f"{t.timeout_s:g}")
    _need(t.checkpoint_every >= 0,
          f"--checkpoint-every must be >= 0 (0 = only at epoch ends), got {t.checkpoint_every}")
    _need(t.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {t.keep_checkpoints}")
    _need(t.log_every >= 0, f"--log-every must be >= 0 (0 = per epoch only), got {t.log_every}")
    _need(t.snapshot_every >= 0,
          f"--snapshot-every must be >= 0 (0 = no snapshots), got {t.snapshot_every}")
    _need(not t.log_every or t.tensorboard, "--log-every writes TensorBoard scalars: add "
          "--tensorboard (event files in RUN_DIR/tb, or --tensorboard FOLDER)")
    if t.profile:
        epoch = parse_profile(t.profile)[0]
        _need(epoch <= t.epochs, f"--profile {t.profile}: epoch {epoch} is past the last epoch "
              f"(--epochs {t.epochs}), so nothing would be traced; choose an epoch <= {t.epochs}")
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
    _need(not (lo.local_modules and end_to_end),
          f"--local-modules {lo.local_modules} groups the units for local training; "
          "--backprop and --no-detach train end to end: drop one of them")
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


def lr_at_epoch(optim: OptimConfig, epoch: int, epochs: int = 0) -> float:
    """Learning rate of 1-based `epoch`.

    step: decayed once per milestone <= epoch - 1 (reference rule). cosine (per epoch, as the
    InfoPro and AugLocal code schedule it): 0.5 * lr * (1 + cos(pi * epoch / E)), E =
    --lr-cosine-epochs or the run's `epochs`; over the first W = --lr-warmup-epochs epochs that
    value times (epoch - 1) / W plus --lr-warmup-from times (W + 1 - epoch) / W."""
    if optim.lr_schedule != "cosine":
        passed = sum(1 for m in optim.lr_decay_milestones if m <= epoch - 1)
        return optim.lr * optim.lr_decay_fact ** passed
    horizon = optim.lr_cosine_epochs or epochs
    if horizon < 1:
        raise ValueError("--lr-schedule cosine needs its horizon: --lr-cosine-epochs or --epochs")
    lr = 0.5 * optim.lr * (1 + math.cos(math.pi * epoch / horizon))
    w = optim.lr_warmup_epochs
    if epoch <= w:
        lr = lr * (epoch - 1) / w + optim.lr_warmup_from * (w + 1 - epoch) / w
    return lr


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
    for section in SECTION_CLASSES:
        lines.append(f"[{section}]")
        obj = getattr(cfg, section)
        for fld in fields(obj):
            lines.append(f"{fld.name} = {_toml_value(getattr(obj, fld.name))}")
        lines.append("")
    return "\n".join(lines)

