"""One stage's part of every checkpoint: its units' states (and, mid-epoch, the epoch's running
statistics; with replicas, every replica's dropout generator), written by replica 1, and the
manifest that the last stage writes once every part is there; and the way back, restoring a
stage's units from a checkpoint of any stage count (docs/checkpoints.md)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from localloss_pp.durable import make_dirs
from localloss_pp.errors import first_line
from localloss_pp.faults import fault_point
from localloss_pp.run.checkpoint import (CheckpointError, checkpoint_name, load_units,
                                         prune_checkpoints, restore_unit, save_stage_checkpoint,
                                         semantic_config, unit_checkpoint, write_manifest)
from localloss_pp.run.resume import ResumePlan
from localloss_pp.seeds import derive_seed

__all__ = ["StageCheckpointer"]

log = logging.getLogger(__name__)


class StageCheckpointer:
    """Writes this stage's part of every checkpoint; the last stage adds the manifest."""

    def __init__(self, cfg, run_dir: Path, stage_index: int, num_stages: int, blocks, output,
                 counts: list[int], model_name: str, sync=None, token: str = ""):
        self.cfg, self.run_dir = cfg, run_dir
        self.token = token  # this attempt's mark on its checkpoint parts
        self.stage_index, self.num_stages = stage_index, num_stages
        self.blocks, self.output = list(blocks), output
        self.counts, self.model_name = counts, model_name
        self.sync = sync  # data-parallel replicas of this stage
        self.replica = sync.replica if sync is not None else 0
        self.num_replicas = sync.num_replicas if sync is not None else 1
        self.records_from = 1  # the first epoch of the run directory's metrics records

    def save(self, epoch: int, step: int | None, stats=None) -> None:
        """This stage's state after `step` batches of `epoch` (None: after the whole epoch).

        With replicas, every replica takes part (statistics summed, dropout and augmentation
        generator states gathered) and replica 1 writes."""
        gens = None
        if self.sync is not None:
            gens = self.sync.gather_generators([b.dropout_generator.get_state()
                                                for b in self.blocks])
            if stats is not None:
                totals = self.sync.sum_stats(stats)
                stats = type(stats)(stats.block_indices, "cpu", stats.fields)
                stats.load(totals)
            if self.replica != 0:
                return
        folder = self.run_dir / "checkpoints" / checkpoint_name(epoch, step)
        make_dirs(folder)
        units = {}
        for i, block in enumerate(self.blocks):
            units[str(block.index)] = unit_checkpoint(block)
            if gens is not None:
                units[str(block.index)]["replica_generators"] = [g[i] for g in gens]
            if stats is not None:
                units[str(block.index)]["stats_row"] = stats.blocks[i].cpu()
                units[str(block.index)]["count"] = stats.count
        payload = {"units": units}
        if self.output is not None:
            units[str(self.output.index)] = unit_checkpoint(self.output)
            if stats is not None:
                payload["global_stats"] = {"glob": stats.glob.cpu(), "count": stats.count}
        save_stage_checkpoint(folder, self.stage_index, payload, self.token, epoch, step)
        if self.output is not None:  # the last stage completes the checkpoint
            write_manifest(folder, self.num_stages, {
                "epoch": epoch, "step": step,
                "complete_epochs": epoch if step is None else epoch - 1,
                "config": semantic_config(self.cfg), "model": self.model_name,
                "partition": self.counts, "num_replicas": self.num_replicas,
                "records_from": self.records_from},
                self.cfg.train.timeout_s, self.token)
            fault_point("after-manifest", epoch, step)
            prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints, epoch, step)
            log.info("checkpoint %s written", folder.name)

    def restore(self, plan: ResumePlan) -> dict | None:
        """Load this stage's units from the plan's checkpoint. Returns the initial statistics
        of a resumed epoch, or None. (The data order and augmentation of every batch are
        functions of (seed, epoch, replica, batch): no data state is saved.)"""
        folder = Path(plan.path)
        saved_replicas = plan.manifest.get("num_replicas", 1)
        mid_epoch = plan.manifest["step"] is not None
        if mid_epoch and saved_replicas != self.num_replicas:
            raise CheckpointError(f"{folder} was taken within an epoch by a run of "
                                  f"{saved_replicas} replica(s); resume it with --replicas "
                                  f"{saved_replicas}, or resume an epoch-end checkpoint "
                                  f"(e*-end) with any number of replicas")
        wanted = [b.index for b in self.blocks] + ([self.output.index] if self.output else [])
        units, extra = load_units(folder, plan.manifest, wanted)
        for unit in self.blocks + ([self.output] if self.output else []):
            saved = units[unit.index]
            gens = saved.get("replica_generators")
            try:
                restore_unit(unit, saved)
                if self.replica > 0 and getattr(unit, "dropout_generator", None) is not None:
                    # replica 1's generator came with restore_unit
                    if gens is not None and len(gens) == self.num_replicas:
                        unit.dropout_generator.set_state(gens[self.replica])
                    else:  # another replica count: this replica's own fresh stream
                        unit.dropout_generator.manual_seed(derive_seed(
                            self.cfg.train.seed, unit.index,
                            f"dropout/replica{self.replica}/resume{plan.manifest['epoch']}"))
            except (RuntimeError, KeyError, ValueError) as exc:
                raise CheckpointError(f"{folder}: unit {unit.index} does not fit this model "
                                      f"({first_line(exc)})") from None
        if not mid_epoch or self.replica > 0:  # replica 1 carries the statistics (summed)
            return None
        rows = [units[b.index]["stats_row"] for b in self.blocks]
        glob = extra.get("global_stats") if self.output is not None else None
        initial = {"blocks": torch.stack(rows), "count": int(units[self.blocks[0].index]["count"]),
                   "glob": glob["glob"] if glob else torch.zeros(2, dtype=torch.float64)}
        return initial
