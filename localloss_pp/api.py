"""The Python API: `train`, `load`, `evaluate` (docs/python.md).

`train` runs exactly what `localloss-pp train` runs: in the calling process with one stage, or
as S x R processes started by torch's elastic launcher (what torchrun uses) with `stages=S`.
`load` turns a model.pt into an ordinary nn.Module for inference; `evaluate` measures one.
"""
from __future__ import annotations

import codecs
import contextlib
import copy
import dataclasses
import difflib
import logging
import os
import signal
import sys
import tempfile
import threading
import tomllib
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from localloss_pp.config import (SECTION_CLASSES, Config, DataConfig, build_config, load_toml,
                                 to_toml)
from localloss_pp.data.registry import DatasetInfo
from localloss_pp.errors import ERROR_DIR_ENV
from localloss_pp.result import RunResult

__all__ = ["train", "load", "evaluate", "option_names", "TrainedModel", "Evaluation"]

log = logging.getLogger(__name__)



def option_names() -> dict[str, tuple[str, str]]:
    """{option: (section, field)}: every valued long flag without its dashes (`loss_sup`,
    `replicas`, `model_module`), and every field name that only one section has (`num_replicas`,
    `lr`, and the switches' fields: `progress`, `batch_norm`, `backprop`)."""
    from localloss_pp.flags import FLAGS
    names = {f.flag[2:].replace("-", "_"): (f.section, f.name) for f in FLAGS
             if f.action not in ("true", "false", "cpu")}  # switches: by their field's name
    owners: dict[str, list[str]] = {}
    for section, cls in SECTION_CLASSES.items():
        for fld in fields(cls):
            owners.setdefault(fld.name, []).append(section)
    for name, sections in owners.items():
        if len(sections) == 1 and name != "name":
            names.setdefault(name, (sections[0], name))
    return names


def _config_of(config, options: dict[str, Any]) -> Config:
    """The run's Config: `config` (None, a Config, or a TOML file), then `options` over it,
    validated as the command line validates its flags."""
    from localloss_pp.config import _check_type
    if config is None:
        base = {}
    elif isinstance(config, Config):
        base = {s: dataclasses.asdict(getattr(config, s)) for s in SECTION_CLASSES}
    elif isinstance(config, (str, os.PathLike)):
        base = load_toml(config)
    else:
        raise TypeError(f"config must be a Config, a TOML file's path or None, not "
                        f"{type(config).__name__}")
    names = option_names()
    given: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        if key not in names:
            close = difflib.get_close_matches(key, list(names), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else \
                "; options are the long flags of `localloss-pp train` without the dashes"
            raise ValueError(f"train(): unknown option {key!r}{hint}")
        section, name = names[key]
        fld = next(f for f in fields(SECTION_CLASSES[section]) if f.name == name)
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, os.PathLike):  # a folder given as a Path is an image folder
            value = ("folder:" if key == "dataset" else "") + os.fspath(value)
        _check_type(f"train(): {key}", value, fld)
        given.setdefault(section, {})[name] = value
    return build_config(base, given)


def _resolve(cfg: Config) -> None:
    """The launch-time checks of the command line: model, dataset, TensorBoard."""
    from localloss_pp.data.registry import resolve_dataset
    from localloss_pp.models.registry import resolve_model
    from localloss_pp.observe.tensorboard import check_tensorboard
    resolve_model(cfg.model)
    resolve_dataset(cfg.data)
    if cfg.train.tensorboard:
        check_tensorboard(cfg.train.tensorboard)


def train(config: Config | str | os.PathLike | None = None, *, stages: int = 1,
          **options) -> RunResult:
    """Train a model as `localloss-pp train` does and return its `RunResult`.

    `config`: a `Config`, the path of a TOML config, or None (the defaults; with no dataset and
    no model named, the quick-start run). `options`: any config value by its long flag without
    the dashes or by its field name: `dataset="folder:data/pets"`, `model="vgg8b"`,
    `loss_sup="dgl"`, `epochs=5`, `replicas=2`, `run_dir="runs/a"`, `resume="auto"`, ...
    They override `config`. `stages=S` pipelines the model over S processes on this machine
    (S x replicas processes in all), started by torch's elastic launcher as torchrun starts
    them; with one stage and one replica the run happens in this process. Works from scripts
    and notebooks alike (no `if __name__ == "__main__"` needed). Progress and the per-epoch
    lines go to stderr as on the command line. Ctrl-C (a notebook's interrupt) stops every
    process; the run directory keeps every finished epoch: `resume="auto"` with the same
    `run_dir` continues it. Bad input raises ValueError with the command line's message."""
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise ValueError(f"train(): stages must be an integer >= 1, got {stages!r}")
    cfg = _config_of(config, options)
    _resolve(cfg)
    world = stages * cfg.train.num_replicas
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("train() starts its own processes; call it from a plain Python "
                         "process, not from inside a torchrun worker (WORLD_SIZE is set)")
    if world == 1:
        return _train_here(cfg)
    _check_visible_to_stages(cfg)
    from localloss_pp.training import resolve_run_dir
    if not cfg.train.run_dir:  # fixed here, so that the result can be read back
        cfg.train.run_dir = str(resolve_run_dir(cfg))
    _launch(cfg, world)
    return RunResult.from_dir(cfg.train.run_dir)


def _check_visible_to_stages(cfg: Config) -> None:
    """The stage processes are new interpreters: a dataset or model registered in this
    process's __main__ (a notebook, or the script itself) does not exist there."""
    from localloss_pp.data.registry import dataset_entry
    from localloss_pp.models.registry import model_builder
    entry = dataset_entry(cfg.data.dataset)
    found = [("dataset", cfg.data.dataset, "dataset_module",
              entry.loader if entry is not None and entry.kind == "user" else None),
             ("model", cfg.model.name, "model_module", model_builder(cfg.model.name))]
    for what, name, option, fn in found:
        if fn is not None and getattr(fn, "__module__", "") == "__main__":
            raise ValueError(f"{what} {name} is registered in this process's __main__ (a "
                             "notebook or the script itself), which the stage processes do not "
                             f"run: move it to a module and name that with {option}=..., or "
                             "train with stages=1")


def _train_here(cfg: Config) -> RunResult:
    from localloss_pp.observe.metrics import setup_logging
    from localloss_pp.training import run_training
    setup_logging(0, 1)
    threads = torch.get_num_threads()
    try:
        return run_training(cfg)
    finally:
        torch.set_num_threads(threads)  # the run sets its own; the caller's comes back


@contextlib.contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _signal_handlers_kept():
    """The launcher installs its own SIGINT/SIGTERM handlers; the caller's come back after."""
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in kept.items():
            if handler is not None:
                signal.signal(s, handler)


def _launch(cfg: Config, world: int) -> None:
    """`world` processes of `python -m localloss_pp train --config FILE` on this machine,
    through torch.distributed's elastic launcher (torchrun --standalone's settings, no
    restarts); a stage's failure is raised here with its one-line message."""
    from torch.distributed.elastic.multiprocessing.api import (DefaultLogsSpecs,
                                                                SignalException, Std)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    package_root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory(prefix="localloss-pp-launch-") as tmp:
        conf = Path(tmp) / "config.toml"
        conf.write_text(to_toml(cfg))
        errors = Path(tmp) / "errors"
        errors.mkdir()
        relay = None if _streams_are_files() else _Relay(Path(tmp) / "logs")
        logs = DefaultLogsSpecs(log_dir=str(Path(tmp) / "logs"),
                                redirects=Std.NONE if relay is None else Std.ALL)
        launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world,
                              run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.1, logs_specs=logs)
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        env = {ERROR_DIR_ENV: str(errors), "PYTHONPATH": path}
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = "1"  # (torchrun's default; each stage sets its threads)
        with _environ(**env), _signal_handlers_kept(), relay or contextlib.nullcontext():
            try:
                elastic_launch(launch, sys.executable)(
                    "-m", "localloss_pp", "train", "--config", str(conf))
            except ChildFailedError as exc:
                raise _failure(errors, exc) from None
            except SignalException as exc:
                if exc.sigval == signal.SIGINT:
                    raise KeyboardInterrupt(
                        f"stopped; every finished epoch is in {cfg.train.run_dir}: "
                        "train(..., run_dir=..., resume=\"auto\") continues it") from None
                raise


def _streams_are_files() -> bool:
    """Whether this process's sys.stdout and sys.stderr are its file descriptors 1 and 2,
    which the stage processes inherit; in a notebook's kernel they are not."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


class _Relay:
    """While the stages run, copies their output (files the launcher writes) to this
    process's sys.stdout and sys.stderr, line by line: where a notebook shows them."""

    def __init__(self, folder: Path):
        self.folder, self.offsets, self.partial, self.decoders = folder, {}, {}, {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        for path, rest in self.partial.items():  # a last line without its newline
            (sys.stderr if path.name == "stderr.log" else sys.stdout).write(rest + "\n")

    def _run(self):
        while not self.done.wait(0.2):
            self.pump()
        self.pump()

    def pump(self):
        for name, dst in (("stdout.log", sys.stdout), ("stderr.log", sys.stderr)):
            for path in sorted(self.folder.rglob(name)):
                try:
                    with open(path, "rb") as fh:
                        fh.seek(self.offsets.get(path, 0))
                        data = fh.read()
                except OSError:
                    continue
                self.offsets[path] = self.offsets.get(path, 0) + len(data)
                decoder = self.decoders.setdefault(  # (a character split between two reads)
                    path, codecs.getincrementaldecoder("utf-8")(errors="replace"))
                text = self.partial.pop(path, "") + decoder.decode(data)
                lines, _, rest = text.rpartition("\n")
                if rest:
                    self.partial[path] = rest
                if lines:
                    dst.write(lines + "\n")
                    dst.flush()


def _failure(errors: Path, exc) -> Exception:
    """The first stage error as the exception the command line's exit code stands for."""
    notes = sorted(errors.glob("rank*.txt"), key=lambda p: p.stat().st_mtime_ns)
    codes = {rank: f.exitcode for rank, f in exc.failures.items()}
    if notes:
        text = notes[0].read_text().strip()
        code = int(text.split(" ", 1)[0])
        message = text.split(" ", 1)[1]
        return ValueError(message) if code == 2 else RuntimeError(message)
    return RuntimeError(f"the run's processes failed (exit codes by rank: {codes}); their "
                        "output above says why")


# --- loading a trained model --------------------------------------------------------------------

class TrainedModel(nn.Module):
    """A trained model for inference: its blocks, then its output layer, in eval mode.

    `forward(x)` takes normalised images (N, C, H, W), as the run's first stage fed them, and
    returns logits (N, classes); `preprocess(images)` normalises uint8 images or floats in
    [0, 1] with the run's mean and std; `predict(images)` gives class indices. `classes`:
    the class names where the dataset has them; `info`: the dataset's DatasetInfo; `digest`,
    `epochs`, `config`: of the run. An ordinary nn.Module: `torch.save`, `torch.export`,
    `.to(device)` work on it."""

    def __init__(self, blocks: list[nn.Module], output: nn.Module, info: DatasetInfo,
                 config: Config, digest: str, epochs: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.output = output
        self.info, self.config, self.digest, self.epochs = info, config, digest, epochs
        self.classes = list(info.classes)
        self.register_buffer("norm_mean", torch.tensor(info.mean).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("norm_std", torch.tensor(info.std).view(-1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.output(x)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (0-255), or floats in [0, 1], (N, C, H, W) -> the model's input."""
        x = images.to(self.norm_mean.device)
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
        return (x - self.norm_mean) / self.norm_std

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class indices of raw images (uint8 or [0, 1] floats, (N, C, H, W))."""
        return self(self.preprocess(images)).argmax(1)

    def extra_repr(self) -> str:
        return (f"{self.config.model.name} on {self.config.data.dataset}, "
                f"{self.info.num_classes} classes, input {tuple(self.info.input_shape)}, "
                f"{self.epochs} epochs, digest {self.digest[:16]}")


def _without_heads(unit: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of `unit` without the submodules its inference forward never calls (the local
    heads: classifiers, similarity and reconstruction decoders, auxiliary networks). Kept
    whole when the stripped copy does not compute the same output."""
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _: called.add(id(mod)))
             for m in unit.modules()]
    try:
        with torch.no_grad():
            expected = unit(x)
    finally:
        for h in hooks:
            h.remove()
    stripped = copy.deepcopy(unit)
    originals = dict(unit.named_modules())
    removed: list[str] = []
    for name, module in list(stripped.named_modules()):
        if not name or name not in originals or id(originals[name]) in called or \
                any(name.startswith(r + ".") for r in removed):
            continue
        if any(id(m) in called for m in originals[name].modules()):
            continue  # an unused container of something used
        if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = stripped.get_submodule(parent_name) if parent_name else stripped
        if child in parent._modules:
            parent._modules[child] = None
            removed.append(name)
    try:
        with torch.no_grad():
            same = torch.equal(stripped(x), expected)
    except Exception:
        same = False
    return stripped if same else unit


def load(path, device: str | torch.device = "cpu", heads: bool = False) -> TrainedModel:
    """A trained model as an ordinary nn.Module in eval mode (see `TrainedModel`).

    `path`: a model.pt or a run directory (its model.pt). The file's weights are checked
    against the digest they were saved with (a damaged file raises ValueError). The model is
    rebuilt from the config the file carries (a model or objective of your own needs its
    module importable, as in training). `heads=True` keeps the local heads (auxiliary
    classifiers and decoders) that inference does not use."""
    from localloss_pp.data.registry import dataset_info
    from localloss_pp.models import build_model, resolve_model, resolve_objective
    from localloss_pp.run.checkpoint import load_model_state, read_model_file
    path = Path(path)
    if path.is_dir():
        if not (path / "model.pt").exists():
            raise ValueError(f"run directory {path} has no model.pt: the run has not finished; "
                             "continue it with resume=\"auto\" (--resume auto)")
        path = path / "model.pt"
    state = read_model_file(path)
    cfg = build_config(tomllib.loads(state["config"]))
    resolve_model(cfg.model)
    if not cfg.loss.backprop:
        resolve_objective(cfg.loss)
    if "dataset" in state:
        info = DatasetInfo.from_dict(state["dataset"])
    else:  # written before model.pt carried the dataset's info
        info = dataset_info(cfg.data)
        if info is None:
            raise ValueError(f"{path} does not carry its image folder's info (input size, "
                             "classes, normalisation); retrain with this version")
    net = build_model(cfg.model, cfg.loss, info.input_shape, info.num_classes, cfg.train.seed,
                      input_norm=(info.mean, info.std))
    load_model_state(net, path, state=state)
    net.eval()
    blocks = list(net.blocks)
    if not heads:
        x = torch.randn(2, *info.input_shape, generator=torch.Generator().manual_seed(0))
        stripped = []
        for block in blocks:
            stripped.append(_without_heads(block, x))
            with torch.no_grad():
                x = block(x)
        blocks = stripped
    model = TrainedModel(blocks, net.output, info, cfg, state["digest"], int(state["epoch"]))
    return model.to(device).eval()


# --- evaluating a model -------------------------------------------------------------------------

@dataclass
class Evaluation:
    """Test error (%) of a model on a dataset's test split, and its accuracy (%) per class."""
    error: float
    num_examples: int
    per_class_accuracy: dict[str, float] = field(default_factory=dict)
    confusion: torch.Tensor | None = field(default=None, repr=False)  # [true, predicted]


def _shape(shape) -> str:
    return "x".join(map(str, shape))


@torch.no_grad()
def evaluate(model, dataset: str | None = None, *, batch_size: int | None = None,
             device: str | torch.device | None = None, data_dir: str | None = None,
             ) -> Evaluation:
    """The test error and per-class accuracy of `model` (a TrainedModel, a model.pt or a run
    directory) on the test split of `dataset` (a registered name or folder:PATH; default: the
    dataset the model was trained on, with its data directory unless `data_dir` is given).
    Images are prepared as the run prepared its test images, with the model's own
    normalisation; `batch_size` defaults to the run's."""
    from localloss_pp.data.datasets import build_sources
    from localloss_pp.data.registry import dataset_info
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"evaluate(): batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(model, TrainedModel):
        model = load(model, device or "cpu")
    dev = torch.device(device) if device is not None else model.norm_mean.device
    model = model.to(dev)
    data = copy.deepcopy(model.config.data)
    if dataset is not None:
        data.dataset = ("folder:" if isinstance(dataset, os.PathLike) else "") + \
            os.fspath(dataset)
    if data_dir is not None:
        data.data_dir = data_dir
    data.mean, data.std = list(model.info.mean), list(model.info.std)
    if data.dataset.startswith("folder:"):  # any folder: to the model's input
        data.image_size = model.info.input_shape[1]
        data.image_mode = "L" if model.info.input_shape[0] == 1 else "RGB"
    else:  # a registered dataset brings its own size and mode
        plain = DataConfig()
        data.image_size, data.image_mode = plain.image_size, plain.image_mode
        data.val_fraction, data.in_memory = plain.val_fraction, plain.in_memory
        data.mean, data.std = [], []
        known = dataset_info(data)
        if tuple(known.input_shape) != tuple(model.info.input_shape):
            raise ValueError(f"dataset {data.dataset} has {_shape(known.input_shape)} images; "
                             f"the model was trained on {_shape(model.info.input_shape)}")
        data.mean, data.std = list(model.info.mean), list(model.info.std)
    data.batch_size = batch_size or data.batch_size
    data.cutout, data.classes_per_batch = False, 0
    _, test, info = build_sources(data, 0, dev)
    if info.num_classes != model.info.num_classes or \
            tuple(info.input_shape) != tuple(model.info.input_shape):
        raise ValueError(f"dataset {data.dataset} has {info.num_classes} classes of "
                         f"{_shape(info.input_shape)} images; the model was trained on "
                         f"{model.info.num_classes} classes of {_shape(model.info.input_shape)}")
    if info.classes and model.info.classes and tuple(info.classes) != tuple(model.info.classes):
        raise ValueError(f"dataset {data.dataset} has the classes {', '.join(info.classes)}; "
                         f"the model was trained on {', '.join(model.info.classes)} (the same "
                         "names in the same order are needed)")
    k = info.num_classes
    confusion = torch.zeros(k, k, dtype=torch.int64, device=dev)
    test.set_epoch(1)
    for x, y, _ in test:
        pred = model(x).argmax(1)
        confusion += torch.bincount(y * k + pred, minlength=k * k).view(k, k)
    confusion = confusion.cpu()
    n = int(confusion.sum())
    names = list(model.classes) or [str(i) for i in range(k)]
    per_class = {names[i]: 100.0 * int(confusion[i, i]) / int(confusion[i].sum())
                 for i in range(k) if int(confusion[i].sum())}
    error = 100.0 * (n - int(confusion.diag().sum())) / max(n, 1)
    return Evaluation(error, n, per_class, confusion)
