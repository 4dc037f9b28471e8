"""Training modes that need gradients across blocks: `--backprop` and `--no-detach`.

They cannot be pipelined (a block's update waits for the backward pass of later blocks), so
they run here with the whole model: in one process, or data-parallel (`--replicas` = the
number of processes), the gradients averaged across the replicas before every step.
"""
from __future__ import annotations

import logging

import torch

from .losses import onehot
from .metrics import EpochStats, NonFiniteLossError, check_finite, progress
from .models import LocalModel

__all__ = ["train_epoch", "evaluate"]

log = logging.getLogger(__name__)


def _step_all(model: LocalModel, sync=None, batch_size: int = 0) -> None:
    units = model.units()
    pending = [sync.start(u, batch_size) for u in units] if sync is not None else []
    for i, unit in enumerate(units):
        if sync is not None:
            sync.finish(pending[i])
        unit.optimizer.step()
        unit.optimizer.zero_grad(set_to_none=True)


def _global_step(model: LocalModel, x, y, y1h, detach_mode: str, sync=None):
    """--backprop (no local losses) or --no-detach (local + global losses through the net)."""
    stats, losses = [], []
    for block in model.blocks:
        if detach_mode == "backprop":
            x = block(x)
            continue
        x, ctx = block.train_forward(x, detach=False)
        loss, s = block.local_loss(ctx, y, y1h)
        losses.append(loss)
        stats.append(s)
    logits = model.output(x)
    gloss = model.output.loss(logits, y)
    total = gloss + sum(losses) if losses else gloss
    total.backward()
    _step_all(model, sync, y.size(0))
    return logits.detach(), gloss.detach(), stats


def _check(stats, glob_loss, model, step):
    for block, s in zip(model.blocks, stats):
        check_finite(s, f"block {block.index} ({block.describe()})", step)
    if not bool(torch.isfinite(glob_loss)):
        raise NonFiniteLossError(f"non-finite loss in the output layer at step {step}; "
                                 "lower --lr or check the input data")


def train_epoch(model: LocalModel, loader, device, *, mode: str, num_classes: int,
                epoch: int, show_progress: bool = False, check_every: int = 1,
                sync=None) -> EpochStats:
    """One training epoch; `mode` is "backprop" or "nodetach"."""
    model.train()
    acc = EpochStats([b.index for b in model.blocks], device)
    batches = progress(loader, total=len(loader), enabled=show_progress, desc=f"train {epoch}")
    for step, (x, y) in enumerate(batches, start=1):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        y1h = onehot(y, num_classes)
        logits, gloss, stats = _global_step(model, x, y, y1h, mode, sync)
        if stats:
            acc.add_blocks(stats, y.size(0))
        acc.add_global(gloss, logits, y)
        acc.add_count(y.size(0))
        if step % check_every == 0 or step == len(loader):
            _check(stats, gloss, model, f"{step} of epoch {epoch}")
    return acc


@torch.no_grad()
def evaluate(model: LocalModel, loader, device, *, num_classes: int, with_stats: bool,
             show_progress: bool = False) -> EpochStats:
    """Test-set pass in eval mode: final error and, if asked, every block's local stats."""
    model.eval()
    acc = EpochStats([b.index for b in model.blocks], device)
    batches = progress(loader, total=len(loader), enabled=show_progress, desc="test")
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        y1h = onehot(y, num_classes)
        stats = []
        for block in model.blocks:
            x, s = block.evaluate(x, y, y1h, with_stats)
            if s is not None:
                stats.append(s)
        logits = model.output(x)
        if stats:
            acc.add_blocks(stats, y.size(0))
        acc.add_global(model.output.loss(logits, y), logits, y)
        acc.add_count(y.size(0))
    return acc
