"""Data parallel x pipeline: the rank layout and the averaging among a stage's replicas.

A run of S stages and R replicas has S x R ranks. Rank r runs stage ``r % S`` of replica
``r // S``, so every replica chain holds consecutive ranks; torchrun numbers ranks node by node,
so a chain stays on one node whenever a node runs a multiple of S processes (and otherwise
crosses as few node boundaries as the counts allow).

Every replica streams its own shard of every global batch (data.py). The replicas of stage k
form a process group; after each local backward a block's gradients are averaged in it (one
flat bucket per unit, all-reduced asynchronously while the next unit computes its backward),
weighted by each replica's share of the batch, and the replicas' weights stay identical. For
per-example losses (pred, the output layer's cross-entropy) the average is the gradient over the
whole global batch; BatchNorm's batch statistics and the similarity matrices of sim/predsim are
those of each replica's share, so a replicated run is close to, not equal to, a one-replica run.
The BatchNorm running statistics travel in the same bucket: after every step they are the
running statistics of the global batch's mean (and the weighted mean of the replicas'
variances), identical on every replica.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from localloss_pp.pipeline.distributed import all_gather_json
from localloss_pp.models import combine_digests, unit_digest
from localloss_pp.pipeline.transport import guarded

__all__ = ["ReplicaSync"]

log = logging.getLogger(__name__)


class _Pending:
    __slots__ = ("work", "flat", "tensors")

    def __init__(self, work, flat, tensors):
        self.work, self.flat, self.tensors = work, flat, tensors


class ReplicaSync:
    """Averaging among the replicas of one stage (`group`: those ranks, one per replica)."""

    def __init__(self, *, group, object_group, replica: int, num_replicas: int,
                 stage_index: int, num_stages: int):
        self.group, self.object_group = group, object_group
        self.replica, self.num_replicas = replica, num_replicas
        self.stage_index, self.num_stages = stage_index, num_stages
        self.clock = None  # the stage's StageClock: waiting for an average is its "sync" time

    def _call(self, what: str, fn, *args, **kw):
        """A collective of this stage's replicas; a lost replica becomes a PeerLostError."""
        return guarded(what, fn, *args, lost=f"lost a replica of stage "
                           f"{self.stage_index + 1}/{self.num_stages} while", **kw)

    def warm(self, device: torch.device) -> None:
        """One tiny all-reduce on the group, in the set-up: on NCCL it creates the group's
        communicator there, before any link exists. Created by the first gradient average
        inside batch 0 instead, it would be made while the links' sends and receives are in
        flight on other communicators, which NCCL does not allow unless every rank issues them
        in the same order (a known deadlock)."""
        probe = torch.zeros(1, device=device)
        self._call("connecting the replicas", dist.all_reduce, probe, group=self.group)

    # --- gradients ------------------------------------------------------------------------------
    def start(self, unit, batch_size: int) -> _Pending | None:
        """Launch the all-reduce of `unit`'s gradients and BatchNorm running statistics,
        weighted by this replica's share of the batch (one flat bucket per unit)."""
        tensors = [p.grad for p in unit.parameters() if p.grad is not None]
        tensors += [b for name, b in unit.named_buffers()
                    if name.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
        if not tensors:
            return None
        flat = torch.cat([t.reshape(-1).float() for t in tensors]
                         + [tensors[0].new_ones(1, dtype=torch.float32)])
        flat.mul_(float(batch_size))  # sums over the examples; the last entry: the batch size
        work = self._call("averaging gradients", dist.all_reduce, flat, group=self.group,
                          async_op=True)
        return _Pending(work, flat, tensors)

    def finish(self, pending: _Pending | None) -> None:
        """Wait for an all-reduce started by `start` and write the averages back."""
        if pending is None:
            return
        if self.clock is None:
            self._call("averaging gradients", pending.work.wait)
        else:
            with self.clock.section("sync"):
                self._call("averaging gradients", pending.work.wait)
        flat = pending.flat
        flat[:-1].div_(flat[-1])
        offset = 0
        for t in pending.tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    # --- statistics, agreement ---------------------------------------------------------------
    def sum_stats(self, stats) -> dict:
        """EpochStats summed over the replicas (every replica gets the totals; `stats` itself
        is left as it is). Returns a dict for EpochStats.load."""
        flat = torch.cat([stats.blocks.reshape(-1), stats.glob,
                          stats.glob.new_tensor([float(stats.count)])])
        self._call("summing statistics", dist.all_reduce, flat, group=self.group)
        nb = stats.blocks.numel()
        return {"blocks": flat[:nb].view_as(stats.blocks).clone(),
                "glob": flat[nb:nb + 2].clone(), "count": int(round(float(flat[-1])))}

    def gather_generators(self, states: list[torch.Tensor]) -> list[list[torch.Tensor]] | None:
        """Every replica's generator states (uint8 tensors of fixed sizes) on replica 0 (None
        on the others), as tensors: nothing is unpickled."""
        if not states:
            return [[] for _ in range(self.num_replicas)] if self.replica == 0 else None
        flat = torch.cat([t.reshape(-1) for t in states])
        out = [torch.empty_like(flat) for _ in range(self.num_replicas)]
        self._call("gathering replica state", dist.all_gather, out, flat,
                   group=self.object_group)
        if self.replica != 0:
            return None
        sizes = [t.numel() for t in states]
        return [[t.clone() for t in torch.split(f, sizes)] for f in out]  # own storage

    def check_identical(self, units) -> str:
        """Raise if the replicas' weights (and buffers) differ; returns the common digest."""
        mine = combine_digests([unit_digest(u) for u in units])
        every = all_gather_json(mine, self.object_group, "comparing replicas",
                                lost=f"lost a replica of stage {self.stage_index + 1}/"
                                     f"{self.num_stages} while")
        if len(set(every)) != 1:
            bad = [r for r, d in enumerate(every) if d != every[0]]
            raise RuntimeError(f"the replicas of stage {self.stage_index + 1}/{self.num_stages} "
                               f"diverged: replica(s) {[b + 1 for b in bad]} differ from "
                               "replica 1")
        return mine
