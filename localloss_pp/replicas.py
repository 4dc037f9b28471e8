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
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .distributed import all_gather_json
from .models import combine_digests, unit_digest
from .transport import guarded

__all__ = ["Layout", "layout_for", "shard_bounds", "ReplicaSync"]

log = logging.getLogger(__name__)


def shard_bounds(n: int, replica: int, num_replicas: int) -> tuple[int, int]:
    """Rows [lo, hi) of a batch of n examples that `replica` trains on (shares differ by <= 1)."""
    q, rem = divmod(n, num_replicas)
    lo = replica * q + min(replica, rem)
    return lo, lo + q + (1 if replica < rem else 0)


@dataclass(frozen=True)
class Layout:
    """Which stage of which replica each rank runs."""
    num_stages: int
    num_replicas: int

    @property
    def world_size(self) -> int:
        return self.num_stages * self.num_replicas

    def stage_of(self, rank: int) -> int:
        return rank % self.num_stages

    def replica_of(self, rank: int) -> int:
        return rank // self.num_stages

    def rank_of(self, stage_index: int, replica: int) -> int:
        return replica * self.num_stages + stage_index

    def stage_ranks(self, stage_index: int) -> list[int]:
        """The ranks that run `stage_index` (one per replica): its averaging group."""
        return [self.rank_of(stage_index, r) for r in range(self.num_replicas)]

    def cross_node_links(self, nodes: list) -> int:
        """Stage-to-stage links whose two ends are on different nodes."""
        return sum(nodes[self.rank_of(k, r)] != nodes[self.rank_of(k + 1, r)]
                   for r in range(self.num_replicas) for k in range(self.num_stages - 1))

    def describe(self, nodes: list | None = None, devices: list | None = None) -> list[str]:
        """Lines of the rank table: one per replica, stage by stage (stages and replicas are
        numbered from 1 in text, ranks from 0 as torchrun numbers them)."""
        S = self.num_stages
        lines = [f"layout: {S} stage(s) x {self.num_replicas} replica(s) = {self.world_size} "
                 f"ranks; rank r runs stage r % {S} + 1 of replica r // {S} + 1"]
        for r in range(self.num_replicas):
            cells = []
            for k in range(S):
                rank = self.rank_of(k, r)
                where = [f"rank {rank}"]
                if nodes is not None:
                    where.append(f"node {nodes[rank]}")
                if devices is not None:
                    where.append(str(devices[rank]))
                cells.append(f"stage {k + 1} ({', '.join(where)})")
            lines.append(f"  replica {r + 1}: " + " -> ".join(cells))
        if nodes is not None and S > 1 and len(set(nodes)) > 1:
            lines.append(f"  {self.cross_node_links(nodes)} of {(S - 1) * self.num_replicas} "
                         "stage-to-stage links cross nodes")
        return lines


def layout_for(world_size: int, num_replicas: int) -> Layout:
    """The layout of a world of `world_size` ranks with `num_replicas` replicas, or a clear
    error when the world cannot be split that way."""
    if world_size % num_replicas:
        raise ValueError(f"--replicas {num_replicas} needs a world size that is a multiple of "
                         f"{num_replicas} (stages x replicas), but {world_size} process(es) "
                         f"were launched; launch {num_replicas} x S processes (e.g. torchrun "
                         f"--nproc-per-node {2 * num_replicas} for 2 stages)")
    return Layout(world_size // num_replicas, num_replicas)


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
