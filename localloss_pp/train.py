"""A whole training run in one process: setup, epochs, logs, metrics, final model."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from .checkpoint import atomic_write_bytes, load_model_state, save_model
from .config import Config, lr_at_epoch, to_toml
from .data import NClassRandomSampler, build_loaders, train_loader
from .metrics import append_jsonl
from .models import build_model, count_params
from .stage import describe_block, evaluate, set_lr, train_epoch

__all__ = ["RunResult", "run_training", "resolve_device", "run_tag", "resolve_run_dir"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    digest: str
    test_error: float
    train_error: float
    epochs: int


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec} asks for CUDA, but no CUDA device is available; "
                         "use --device cpu")
    return dev


def run_tag(cfg: Config) -> str:
    """The reference's run-tag (SPEC.md 6.6), used under --save-dir."""
    m, lo, d, o = cfg.model, cfg.loss, cfg.data, cfg.optim
    drop = f"drop{m.dropout}" + (f"_cutout{d.n_holes}x{d.length}" if d.cutout else "")
    return "_".join([
        m.nonlin, f"{m.num_layers}x{m.num_hidden}", lo.loss_sup + ("-bio" if lo.bio else ""),
        lo.loss_unsup, f"dimdec{m.dim_in_decoder}", f"alpha{lo.alpha}", f"beta{lo.beta}",
        f"bs{d.batch_size}", f"cpb{d.classes_per_batch}", drop, f"bn{int(m.batch_norm)}",
        o.optim, f"wd{o.weight_decay}", f"bp{int(lo.backprop)}", f"detach{int(lo.detach)}",
        f"lr{o.lr:.2e}"])


def resolve_run_dir(cfg: Config) -> Path:
    """--run-dir; else the reference's layout under --save-dir; else runs/<dataset>-<model>-<time>."""
    t = cfg.train
    if t.run_dir:
        return Path(t.run_dir)
    if t.save_dir:
        return (Path(t.save_dir) / cfg.data.dataset / f"{cfg.model.name}_mult{cfg.model.feat_mult:.1f}"
                / run_tag(cfg))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.data.dataset}-{cfg.model.name}-{stamp}"


def _check_run_dir(path: Path) -> None:
    if (path / "metrics.jsonl").exists() or (path / "model.pt").exists():
        raise ValueError(f"run directory {path} already holds a run; choose another --run-dir "
                         "(nothing is ever deleted)")


def _mode(cfg: Config) -> str:
    if cfg.loss.backprop:
        return "backprop"
    return "local" if cfg.loss.detach else "nodetach"


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def _fmt_err(x) -> str:
    return "-" if x is None else f"{x:.2f}%"


def _log_epoch(epoch, epochs, lr, tr, te, tr_blocks, te_blocks, names, secs, stats: bool):
    log.info("epoch %d/%d lr %.2e | train loss_local %.4f loss_global %.4f error %.2f%% | "
             "test loss_global %.4f error %.2f%% | %.1fs", epoch, epochs, lr, tr["loss_local"],
             tr["loss_global"], tr["error"], te["loss_global"], te["error"], secs)
    if not stats:
        return
    for i, (name, a) in enumerate(zip(names, tr_blocks)):
        line = (f"  block {a['index']} {name}: train sim {_fmt(a['loss_sim'])} "
                f"pred {_fmt(a['loss_pred'])} error {_fmt_err(a['error'])}")
        if te_blocks:
            b = te_blocks[i]
            line += (f" | test sim {_fmt(b['loss_sim'])} pred {_fmt(b['loss_pred'])} "
                     f"error {_fmt_err(b['error'])}")
        log.info("%s", line)


def run_training(cfg: Config) -> RunResult:
    """Train as configured; write config.toml, metrics.jsonl and model.pt into the run dir."""
    device = resolve_device(cfg.train.device)
    threads = cfg.train.threads or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)  # only the data pipeline draws from the global generator
    run_dir = resolve_run_dir(cfg)
    _check_run_dir(run_dir)
    train_dl, test_dl, info = build_loaders(cfg.data, cfg.train.seed,
                                            pin_memory=device.type == "cuda")
    model = build_model(cfg.model, cfg.loss, info.input_shape, info.num_classes, cfg.train.seed)
    for unit in model.units():
        unit.setup(device, cfg.optim)
    start_epoch = 1
    if cfg.train.resume:
        state = load_model_state(model, cfg.train.resume)
        start_epoch = state["epoch"] + 1
        log.info("resumed %s after epoch %d (fresh optimizers)", cfg.train.resume, state["epoch"])
        if start_epoch > cfg.train.epochs:
            raise ValueError(f"{cfg.train.resume} was trained for {state['epoch']} epochs, "
                             f"--epochs is {cfg.train.epochs}: raise --epochs to train further")
    run_dir.mkdir(parents=True, exist_ok=True)  # only once everything above has succeeded
    config_toml = to_toml(cfg)
    atomic_write_bytes(run_dir / "config.toml", config_toml.encode())
    mode = _mode(cfg)
    names = [describe_block(b) for b in model.blocks]
    has_decoder = [hasattr(b, "decoder_y") for b in model.blocks]
    n_params = count_params(cfg.model, info.input_shape, info.num_classes)
    n_local = sum(p.numel() for p in model.parameters())
    log.info("%s on %s (%d train / %d test images), %s mode, device %s, %d thread(s)",
             cfg.model.name, cfg.data.dataset, len(train_dl.dataset), len(test_dl.dataset), mode,
             device, threads)
    log.info("%d blocks: %s; %s parameters (paper count), %s with local heads", len(names),
             ", ".join(names), f"{n_params:,}", f"{n_local:,}")
    log.info("run directory: %s", run_dir)

    show = cfg.train.progress
    tr = te = {"error": float("nan")}
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        lr = lr_at_epoch(cfg.optim, epoch)
        set_lr(model, lr)
        until = cfg.data.classes_per_batch_until_epoch
        if cfg.data.classes_per_batch > 0 and until > 0 and epoch > until \
                and isinstance(train_dl.sampler, NClassRandomSampler):
            log.info("epoch %d: classes-per-batch sampler off, ordinary shuffling from now on",
                     epoch)
            train_dl = train_loader(train_dl.dataset, cfg.data, cfg.train.seed, False,
                                    device.type == "cuda")
        if hasattr(train_dl.sampler, "set_epoch"):
            train_dl.sampler.set_epoch(epoch)
        start = time.perf_counter()
        tr_acc = train_epoch(model, train_dl, device, mode=mode, num_classes=info.num_classes,
                             epoch=epoch, show_progress=show,
                             check_every=1 if device.type == "cpu" else 50)
        train_s = time.perf_counter() - start
        with_stats = cfg.train.print_stats and mode != "backprop"
        te_acc = evaluate(model, test_dl, device, num_classes=info.num_classes,
                          with_stats=with_stats, show_progress=show)
        secs = time.perf_counter() - start
        tr, tr_blocks = tr_acc.summary(has_decoder)
        te, te_blocks = te_acc.summary(has_decoder)
        if mode == "backprop":
            tr_blocks, te_blocks = [], []
        _log_epoch(epoch, cfg.train.epochs, lr, tr, te, tr_blocks, te_blocks, names, secs,
                   cfg.train.print_stats)
        blocks = []
        for i, name in enumerate(names if tr_blocks else []):
            rec = {"index": i, "name": name, "train": tr_blocks[i]}
            if te_blocks:
                rec["test"] = te_blocks[i]
            blocks.append(rec)
        append_jsonl(run_dir / "metrics.jsonl", {
            "epoch": epoch, "lr": lr, "train": tr, "test": te, "blocks": blocks,
            "train_time_s": train_s, "epoch_time_s": secs,
            "train_samples_per_s": tr["num_examples"] / train_s if train_s > 0 else None})
    digest = save_model(model, run_dir / "model.pt", config_toml, cfg.train.epochs)
    log.info("final test error %.2f%%; model saved to %s", te["error"], run_dir / "model.pt")
    return RunResult(run_dir, digest, te["error"], tr["error"], cfg.train.epochs)
