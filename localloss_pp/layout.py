"""Which stage of which replica each rank runs (stages x replicas), each replica's share of a
batch, and the balanced contiguous split (of units into stages or local modules). A leaf
module."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Layout", "layout_for", "shard_bounds", "balanced_split"]


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


def balanced_split(costs: list[float], num_stages: int) -> list[int]:
    """Contiguous split of `costs` into `num_stages` non-empty parts (stages, or local modules)
    minimising the largest part (dynamic programming; ties go to the split with earlier, larger
    stages)."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} blocks into {num_stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: minimal max-part cost of the first i blocks in s parts; cut[s][i]: last cut
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j])
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    counts, i = [], n
    for s in range(num_stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]
