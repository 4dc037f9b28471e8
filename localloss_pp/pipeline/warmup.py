"""Compile before the links: with --compile, every stage runs its blocks once on synthetic
batches of the run's shapes (every batch size of the run, training and evaluation) during the
set-up, and then restores every unit exactly as it was.

Why: torch.compile compiles a graph the first time it meets a shape, a grad mode or a batch
size. Left to the first batch, stage k's first message would arrive only after every upstream
stage had compiled, one after another (and again at the first evaluation batch and the short
last batch), and a pipeline deeper than a few stages would pass --timeout-s there and report a
lost stage (on NCCL the posted receive would trip the watchdog). Warmed here, the stages compile
at the same time, before any link exists: the longest wait is one stage's compile time, not
the sum along the pipeline. The timeout cannot simply exempt the first message instead: gloo
applies its group's timeout to every wait, and a per-call timeout tears the group down.
"""
from __future__ import annotations

import logging
import time

import torch

from localloss_pp.layout import shard_bounds
from localloss_pp.models.losses import onehot

__all__ = ["batch_sizes", "warm_compiled"]

log = logging.getLogger(__name__)


def batch_sizes(batch_size: int, train_examples: int, test_examples: int, replica: int,
                num_replicas: int) -> list[int]:
    """Every batch size this replica meets: full and last batches of training and test."""
    sizes = []
    for n in (train_examples, test_examples):
        for global_bs in (min(batch_size, n), n % batch_size or batch_size):
            lo, hi = shard_bounds(global_bs, replica, num_replicas)
            if hi > lo and hi - lo not in sizes:
                sizes.append(hi - lo)
    return sizes


def warm_compiled(blocks, num_classes: int, sizes: list[int], device: torch.device, *,
                  from_data: bool, with_stats: bool, channels_last_input: bool = False) -> float:
    """Run `blocks` (a stage's chain) once per batch size in `sizes`, a training step's forward
    and local backward and an evaluation, on random data (fp32 like the data on the first stage,
    `from_data`; else the activations' dtype, in channels-last when they arrive so,
    `channels_last_input`: compiled graphs are specialised on strides); then put back every
    unit's weights, buffers, gradients and dropout generator. Returns the seconds it took."""
    if not blocks:
        return 0.0
    input_dtype = torch.float32 if from_data else blocks[0].act_dtype
    start = time.perf_counter()
    saved = [({k: v.detach().clone() for k, v in b.state_dict().items()},
              b.dropout_generator.get_state() if b.dropout_generator is not None else None)
             for b in blocks]
    gen = torch.Generator(device="cpu").manual_seed(0)
    for bs in sizes:
        x = torch.randn(bs, *blocks[0].in_shape, generator=gen).to(device, input_dtype)
        if channels_last_input and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(num_classes, (bs,), generator=gen).to(device)
        y1h = onehot(y, num_classes)
        h = x
        for block in blocks:  # a training step, without the optimizer's step
            h, ctx = block.train_forward(h)
            block.local_backward(ctx, y, y1h)
        with torch.no_grad():  # as the runner evaluates: eval mode, no gradients
            h = x
            for block in blocks:
                was_training = block.training
                block.eval()
                h, _ = block.evaluate(h, y, y1h, with_stats)
                block.train(was_training)
    for block, (state, gen_state) in zip(blocks, saved):
        block.load_state_dict(state)
        block.zero_grad(set_to_none=True)
        if gen_state is not None:
            block.dropout_generator.set_state(gen_state)
    if device.type == "cuda":  # (set-up, not a batch: waiting for the device is fine here)
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
