"""Training modes that need gradients across blocks: `--backprop` and `--no-detach`.

They cannot be pipelined (a block's update waits for the backward pass of later blocks), so
they run with the whole model as one stage: in one process, or data-parallel (`--replicas` =
the number of processes), the gradients averaged across the replicas before every step. The
runner is the StageRunner without links; only the training step differs.
"""
from __future__ import annotations

from torch.profiler import record_function

from localloss_pp.config import RunMode
from localloss_pp.models.losses import onehot
from localloss_pp.observe.metrics import EpochStats, FiniteWatch
from localloss_pp.pipeline.stage import Batch, StageRunner

__all__ = ["GlobalRunner", "global_step"]


def global_step(blocks, output, x, y, y1h, detach_mode: RunMode | str, sync=None):
    """--backprop (no local losses) or --no-detach (local + global losses through the net):
    one forward and backward pass through every block, then every unit's step (after the
    average of its gradients across the replicas, with `sync`).

    Returns (per-block stats tensors, empty for --backprop; (logits, loss) of the output)."""
    stats, losses = [], []
    for block in blocks:
        if detach_mode == RunMode.BACKPROP:
            x = block(x)
            continue
        x, ctx = block.train_forward(x, detach=False)
        loss, s = block.local_loss(ctx, y, y1h)
        losses.append(loss)
        stats.append(s)
    logits = output(x)
    gloss = output.loss(logits, y)
    total = gloss + sum(losses) if losses else gloss
    total.backward()
    units = list(blocks) + [output]
    pending = [sync.start(u, y.size(0)) for u in units] if sync is not None else []
    for i, unit in enumerate(units):
        if sync is not None:
            sync.finish(pending[i])
        unit.step()
    return stats, (logits.detach(), gloss.detach())


class GlobalRunner(StageRunner):
    """--backprop / --no-detach (`mode` RunMode.BACKPROP or RunMode.NODETACH) over the whole
    model: the StageRunner's loop with its own training step (nothing is sent: the whole model
    is this stage)."""

    def __init__(self, *, mode: RunMode, **kw):
        super().__init__(**kw)
        self.mode = mode

    def loss_names(self) -> list[str]:
        if self.mode == RunMode.BACKPROP:  # no local losses: the global loss only
            return ["the output layer (global loss)"]
        return super().loss_names()

    def train_step(self, stats: EpochStats, watch: FiniteWatch, epoch: int, b: Batch) -> None:
        """One forward and backward pass through every block, every unit's step, statistics."""
        with self.clock.section("compute"):
            y1h = onehot(b.y, self.num_classes)
            block_stats, out = global_step(self.blocks, self.output, b.x, b.y, y1h, self.mode,
                                           self.replica_sync)
            with record_function("localloss_pp.statistics"):
                watch.add(self._statistics(stats, block_stats, out, b.y), epoch, b.seq)
