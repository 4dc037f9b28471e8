"""Training modes that need gradients across blocks: `--backprop` and `--no-detach`.

They cannot be pipelined (a block's update waits for the backward pass of later blocks), so
they run with the whole model as one stage: in one process, or data-parallel (`--replicas` =
the number of processes), the gradients averaged across the replicas before every step. The
runner is the StageRunner without links; only the training step differs.
"""
from __future__ import annotations

from localloss_pp.config import RunMode
from localloss_pp.pipeline.stage import StageRunner

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
    model."""

    def __init__(self, *, mode: RunMode, **kw):
        super().__init__(**kw)
        self.mode = mode

    def loss_names(self) -> list[str]:
        if self.mode == RunMode.BACKPROP:  # no local losses: the global loss only
            return ["the output layer (global loss)"]
        return super().loss_names()

    def forwards(self, x):
        """Nothing to hand on (the whole model is this stage); the input is the context."""
        return None, x

    def updates(self, x, _, y, y1h):
        return global_step(self.blocks, self.output, x, y, y1h, self.mode, self.replica_sync)
