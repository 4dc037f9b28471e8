"""The training and evaluation loop over a contiguous run of blocks (one process).

Order of work for one batch in local mode: all forwards of the blocks, then (where a pipeline
sends its output downstream) the local losses, backward passes and optimizer steps. The numbers
equal the reference order (each block's output is computed before its update).

`--backprop` and `--no-detach` need gradients across blocks; they run here with the whole model.
"""
from __future__ import annotations

import logging

import torch

from .losses import onehot
from .metrics import EpochStats, NonFiniteLossError, check_finite, progress
from .models import LocalModel

__all__ = ["train_epoch", "evaluate", "set_lr", "local_forward_update", "describe_block"]

log = logging.getLogger(__name__)


def describe_block(block) -> str:
    enc = block.encoder
    if isinstance(enc, torch.nn.Linear):
        return f"Linear({enc.in_features}->{enc.out_features})"
    k = enc.kernel_size[0]
    return f"Conv{k}x{k}({enc.in_channels}->{enc.out_channels})@{block.dim_out}"


def set_lr(model: LocalModel, lr: float) -> None:
    for unit in model.units():
        unit.set_lr(lr)


def local_forward_update(blocks, x, y, y1h, on_output=None):
    """Local-mode step of a run of blocks: forwards, optional hand-off of the output, updates.

    Returns (output of the last block, list of per-block stats tensors).
    """
    ctxs = []
    for block in blocks:
        x, ctx = block.train_forward(x)
        ctxs.append(ctx)
    if on_output is not None:
        on_output(x)
    stats = [block.train_update(ctx, y, y1h) for block, ctx in zip(blocks, ctxs)]
    return x, stats


def _step_all(model: LocalModel) -> None:
    for unit in model.units():
        unit.optimizer.step()
        unit.optimizer.zero_grad(set_to_none=True)


def _global_step(model: LocalModel, x, y, y1h, detach_mode: str):
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
    _step_all(model)
    return logits.detach(), gloss.detach(), stats


def _check(stats, glob_loss, model, step):
    for block, s in zip(model.blocks, stats):
        check_finite(s, f"block {block.index} ({describe_block(block)})", step)
    if not bool(torch.isfinite(glob_loss)):
        raise NonFiniteLossError(f"non-finite loss in the output layer at step {step}; "
                                 "lower --lr or check the input data")


def train_epoch(model: LocalModel, loader, device, *, mode: str, num_classes: int,
                epoch: int, show_progress: bool = False, check_every: int = 1) -> EpochStats:
    """One training epoch; `mode` is "local", "backprop" or "nodetach"."""
    model.train()
    acc = EpochStats([b.index for b in model.blocks], device)
    batches = progress(loader, total=len(loader), enabled=show_progress, desc=f"train {epoch}")
    for step, (x, y) in enumerate(batches, start=1):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        y1h = onehot(y, num_classes)
        if mode == "local":
            h, stats = local_forward_update(model.blocks, x, y, y1h)
            logits, gloss = model.output.train_update(h, y)
        else:
            logits, gloss, stats = _global_step(model, x, y, y1h, mode)
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
