"""Assembling one pipeline stage: its links to the neighbouring stages, built in chain order,
and its runner. Used by train.py and by the benchmarks alike, so both run the same stage."""
from __future__ import annotations

from functools import partial

from localloss_pp.config import Config, RunMode
from localloss_pp.faults import fault_point
from localloss_pp.layout import Layout, shard_bounds
from localloss_pp.models.blocks import activation_dtype
from localloss_pp.pipeline.globalmode import GlobalRunner
from localloss_pp.pipeline.stage import StageRunner
from localloss_pp.pipeline.transport import Receiver, Sender

__all__ = ["build_links", "build_stage", "nhwc_boundary", "input_needed"]


def build_links(cfg: Config, env, model, part, stage_index: int, num_stages: int,
                fingerprint: int, layout: Layout | None = None, replica: int = 0):
    """Sender and receiver of stage `stage_index` of `replica` (None at the ends), connected to
    the neighbours in chain order: stage k connects to k-1 (which is done with k-2), then to
    k+1. Activations travel in the units' output dtype (bf16 under --precision bf16), and in
    channels-last when the blocks on both sides of the boundary run channels-last; the
    network's input goes along where a later unit reads it (`input_needed`)."""
    a, b = part.bounds[stage_index]
    layout = layout or Layout(num_stages, 1)
    lo, hi = shard_bounds(cfg.data.batch_size, 0, layout.num_replicas)  # the largest share
    common = dict(stage_index=stage_index, num_stages=num_stages,
                  dtype=activation_dtype(cfg.train.precision), max_batch=hi - lo,
                  device=env.device, timeout_s=cfg.train.timeout_s, group=None,
                  meta_group=env.meta_group, staging=env.staging)
    receiver = sender = None
    if stage_index > 0:
        receiver = Receiver(peer_rank=layout.rank_of(stage_index - 1, replica),
                            peer_stage=stage_index - 1, sample_shape=model.blocks[a].in_shape,
                            channels_last=nhwc_boundary(cfg, model, a),
                            side_shape=input_needed(model, a), **common)
        receiver.connect(fingerprint)
    if stage_index < num_stages - 1:
        sender = Sender(peer_rank=layout.rank_of(stage_index + 1, replica),
                        peer_stage=stage_index + 1, queue_depth=cfg.train.queue_depth,
                        sample_shape=model.blocks[b - 1].out_shape,
                        channels_last=nhwc_boundary(cfg, model, b),
                        side_shape=input_needed(model, b), **common)
        sender.connect(fingerprint)
    return sender, receiver


def input_needed(model, first: int) -> tuple | None:
    """The network's input shape when a unit from `first` on reads it (its objective needs the
    input): then the boundary before unit `first` carries it along; else None."""
    if any(getattr(u, "needs_input", False) for u in model.blocks[first:]):
        return tuple(model.blocks[0].in_shape)
    return None


def nhwc_boundary(cfg: Config, model, first: int) -> bool:
    """Whether the activation between blocks first-1 and first travels in channels-last: both
    blocks run channels-last, so the sender produces it so and the receiver uses it so."""
    return cfg.train.channels_last and all(
        getattr(block, "channels_last_capable", False)
        for block in model.blocks[first - 1:first + 1])


def build_stage(cfg: Config, env, model, part, stage_index: int, *, fingerprint: int,
                layout: Layout | None = None, replica: int = 0, mode: RunMode = RunMode.LOCAL,
                **runner_options) -> StageRunner:
    """The runner of stage `stage_index` (its units already set up on the device), linked to
    its neighbours: a StageRunner, or a GlobalRunner for --backprop / --no-detach (one stage).
    `runner_options` go to the runner (num_classes, with_stats, sync, on_log, trace, ...)."""
    num_stages = len(part.bounds)
    sender, receiver = build_links(cfg, env, model, part, stage_index, num_stages, fingerprint,
                                   layout, replica)
    fault_point("after-links")
    a, b = part.bounds[stage_index]
    runner = StageRunner if mode == RunMode.LOCAL else partial(GlobalRunner, mode=mode)
    return runner(blocks=model.blocks[a:b],
                  output=model.output if stage_index == num_stages - 1 else None,
                  stage_index=stage_index, num_stages=num_stages, device=env.device,
                  sender=sender, receiver=receiver, **runner_options)
